"""GPU throughput: tokens/s and model FLOP utilization of a trial through Ray Train + DeepSpeed ÷ the same trial
as a bare PyTorch + PEFT loop on the same GPU (target ≥ 0.95).

Builds a Llama from config (--hidden, --layers: about 1.1 B parameters by default), saves it as a local model
directory, and fine-tunes one LoRA adapter (rank 16, all linear layers) on it for --steps steps of --batch
sequences of --seq-len tokens, on each side:
- the platform: `python -m scaling_lab.study run` on local Ray, one Ray Train worker with one GPU, DeepSpeed
  ZeRO-0 in bf16;
- bare: one process, the LoRA model cast to bf16 on the GPU, AdamW, the same batches (scaling_lab/reference_loop.py).
Both count the same work: the training steps and the final held-out batch, from the first step on. Model FLOPs
per token are taken as 4 N (forward and backward through the activations of the N frozen weights; LoRA's own
are negligible), against --peak-tflops (bf16 dense: 989 for H100 and H200). On a machine without a GPU both
sides run in fp32 on --cpus cores: a check of the code path, not a GPU figure.

    python benchmarks/gpu_throughput.py [--hidden 2048 --layers 16 --batch 16 --seq-len 512 --steps 50]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def build_model(directory: Path, hidden: int, layers: int, seq_len: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from scaling_lab.model_sources import TINY_VOCAB_SIZE

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=seq_len)
    LlamaForCausalLM(config).save_pretrained(directory)


def study_spec(model_dir: Path, args, gpu: bool, output_dir: Path, zero_stage: int = 0,
               name: str = "gpu-throughput") -> dict:
    """One trial (LoRA rank 16 on all linear layers) of the model at `model_dir`, on one worker: bf16 on a GPU,
    fp32 on --cpus cores without one."""
    return {
        "name": name,
        "models": [{"name": "bench", "source": str(model_dir)}],
        "grid": {"ranks": [16], "alphas": [32], "learning_rates": [1e-4], "seeds": [0]},
        "training": {"steps": args.steps, "batch_size": args.batch, "seq_len": args.seq_len, "eval_every": args.steps,
                     "eval_batches": 1, "diagnostics_every": 0},
        "deepspeed": {"zero_stage": zero_stage, "precision": "bf16" if gpu else "fp32"},
        "execution": {"resources": {"workers": 1, "gpus_per_worker": 1 if gpu else 0, "cpus_per_worker": args.cpus}},
        "output_dir": str(output_dir),
    }


def model_arguments(parser: argparse.ArgumentParser, steps: int) -> argparse.Namespace:
    """The model built from config, the trial's shape and the device's peak; parsed."""
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--cpus", type=int, default=4, help="CPUs of the Ray Train worker (and threads without a GPU)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak bf16 TFLOP/s (default: from its name)")
    return parser.parse_args()


def this_device(args) -> tuple[bool, str, float | None]:
    """Whether a GPU is here, its name (or the CPU's note) and its peak bf16 TFLOP/s where known."""
    import torch

    gpu = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if gpu else "CPU (no GPU: a check of the code path only)"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if gpu and k in name), None)
    return gpu, name, peak


def run_study(spec: dict, workdir: Path):
    """`python -m scaling_lab.study run` on `spec` in `workdir`; the trial's row, which must be ok."""
    from scaling_lab import results

    (workdir / "spec.yaml").write_text(yaml.safe_dump(spec))
    done = subprocess.run([sys.executable, "-m", "scaling_lab.study", "run", "spec.yaml", "--cache-dir",
                           str(workdir / "cache")], cwd=workdir, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"study run failed:\n{done.stderr[-3000:]}")
    row = results.load(Path(spec["output_dir"])).iloc[0]
    if row["status"] != "ok":
        raise SystemExit(f"the platform's trial ended {row['status']}: {row['error']}")
    return row


def platform_trial(workdir: Path, args, gpu: bool, zero_stage: int, name: str) -> tuple[dict, object]:
    """The model built from config in `workdir`, and its one trial run through `study run`: the spec and the row."""
    build_model(workdir / "model", args.hidden, args.layers, args.seq_len)
    spec = study_spec(workdir / "model", args, gpu, workdir / "results", zero_stage=zero_stage, name=name)
    return spec, run_study(spec, workdir)


def mfu(model_params: float, tokens_per_s: float, peak: float | None) -> str:
    """Model FLOP utilization (4 N FLOPs per token), as a phrase; nothing where the peak is unknown."""
    return f", MFU {4 * model_params * tokens_per_s / (peak * 1e12):.3f}" if peak else ""


def main() -> None:
    args = model_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]), steps=50)

    import torch

    from scaling_lab import reference_loop, spec as spec_lib
    from scaling_lab.grid import expand

    gpu, device_name, peak = this_device(args)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        spec, row = platform_trial(workdir, args, gpu, zero_stage=0, name="gpu-throughput")
        if not gpu:
            torch.set_num_threads(args.cpus)
        (config,) = expand(spec_lib.parse(spec))
        bare = reference_loop.run(config, workdir / "cache", ROOT, evaluate=True, device="cuda" if gpu else "cpu",
                                  dtype=torch.bfloat16 if gpu else None)
    tokens = args.steps * args.batch * args.seq_len
    platform_rate, bare_rate = row["tokens_per_s"], tokens / bare.loop_s
    print(f"{device_name}; model {row['model_params'] / 1e6:.0f} M parameters, LoRA rank 16 on all linear layers; "
          f"{args.steps} steps of {args.batch} × {args.seq_len} tokens")
    for name, rate in (("bare PyTorch + PEFT loop", bare_rate), ("Ray Train + DeepSpeed", platform_rate)):
        print(f"{name:>25}: {rate:,.0f} tokens/s{mfu(row['model_params'], rate, peak)}")
    print(f"throughput ratio (platform ÷ bare): {platform_rate / bare_rate:.3f}")


if __name__ == "__main__":
    main()
