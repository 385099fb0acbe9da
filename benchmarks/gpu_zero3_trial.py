"""One ZeRO-3 bf16 trial of a ~1.1 B Llama built from config, through `python -m scaling_lab.study run` on one GPU:
tokens/s, model FLOP utilization (4 N FLOPs per token against --peak-tflops) and peak GPU memory, from its row.
Without a GPU it runs the same path in fp32 on CPU (use a small --hidden/--layers): a check of the code path only.

    python benchmarks/gpu_zero3_trial.py [--hidden 2048 --layers 16 --batch 16 --seq-len 512 --steps 30]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_throughput import PEAK_BF16_TFLOPS, build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cpus", type=int, default=4)
    parser.add_argument("--peak-tflops", type=float)
    args = parser.parse_args()

    import torch

    from scaling_lab import results

    gpu = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if gpu else "CPU (no GPU: a check of the code path only)"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if gpu and k in name), None)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build_model(workdir / "model", args.hidden, args.layers, args.seq_len)
        spec = {
            "name": "gpu-zero3",
            "models": [{"name": "bench", "source": str(workdir / "model")}],
            "grid": {"ranks": [16], "alphas": [32], "learning_rates": [1e-4], "seeds": [0]},
            "training": {"steps": args.steps, "batch_size": args.batch, "seq_len": args.seq_len,
                         "eval_every": args.steps, "eval_batches": 1, "diagnostics_every": 0},
            "deepspeed": {"zero_stage": 3, "precision": "bf16" if gpu else "fp32"},
            "execution": {"resources": {"workers": 1, "gpus_per_worker": 1 if gpu else 0, "cpus_per_worker": args.cpus}},
            "output_dir": str(workdir / "results"),
        }
        (workdir / "spec.yaml").write_text(yaml.safe_dump(spec))
        done = subprocess.run([sys.executable, "-m", "scaling_lab.study", "run", "spec.yaml", "--cache-dir",
                               str(workdir / "cache")], cwd=workdir, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"study run failed:\n{done.stderr[-3000:]}")
        row = results.load(workdir / "results").iloc[0]
    if row["status"] != "ok":
        raise SystemExit(f"the trial ended {row['status']}: {row['error']}")
    utilization = f", MFU {4 * row['model_params'] * row['tokens_per_s'] / (peak * 1e12):.3f}" if peak else ""
    memory = f"peak GPU memory {row['peak_memory_mb']:,.0f} MB" if gpu else f"peak RSS {row['peak_memory_mb']:,.0f} MB"
    print(f"{name}; model {row['model_params'] / 1e6:.0f} M parameters, ZeRO-3 {row['precision']}, {args.steps} steps "
          f"of {args.batch} × {args.seq_len} tokens: {row['tokens_per_s']:,.0f} tokens/s{utilization}; {memory}; "
          f"set-up {row['setup_time_s']:.1f} s")


if __name__ == "__main__":
    main()
