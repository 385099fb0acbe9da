"""One ZeRO-3 bf16 trial of a ~1.1 B Llama built from config, through `python -m scaling_lab.study run` on one GPU:
tokens/s, model FLOP utilization (4 N FLOPs per token against --peak-tflops) and peak GPU memory, from its row.
Without a GPU it runs the same path in fp32 on CPU (use a small --hidden/--layers): a check of the code path only.

    python benchmarks/gpu_zero3_trial.py [--hidden 2048 --layers 16 --batch 16 --seq-len 512 --steps 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_throughput import mfu, model_arguments, platform_trial, this_device  # noqa: E402


def main() -> None:
    args = model_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]), steps=30)
    gpu, name, peak = this_device(args)
    with tempfile.TemporaryDirectory() as tmp:
        _, row = platform_trial(Path(tmp), args, gpu, zero_stage=3, name="gpu-zero3")
    memory = f"peak GPU memory {row['peak_memory_mb']:,.0f} MB" if gpu else f"peak RSS {row['peak_memory_mb']:,.0f} MB"
    print(f"{name}; model {row['model_params'] / 1e6:.0f} M parameters, ZeRO-3 {row['precision']}, {args.steps} steps "
          f"of {args.batch} × {args.seq_len} tokens: {row['tokens_per_s']:,.0f} tokens/s"
          f"{mfu(row['model_params'], row['tokens_per_s'], peak)}; {memory}; set-up {row['setup_time_s']:.1f} s")


if __name__ == "__main__":
    main()
