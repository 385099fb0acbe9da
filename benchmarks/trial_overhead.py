"""Per-trial overhead: trials through the platform ÷ the same trials as a bare PyTorch + PEFT loop.

Both sides run the same trials of the embedded default study's size (tiny-xs, 80 steps, the same evaluations;
ranks 1, 4, 16 × four α values that do not diverge × the given number of seeds), one at a time on one core. The platform side is `python -m scaling_lab.study run` on local Ray (Ray Tune →
Ray Train → DeepSpeed ZeRO-0), timed from the command's start to its end, Ray's start-up included; the bare
side is one process with a plain training loop. Diagnostics are off on both sides (they are extra work, not
overhead). Prints the ratio last.

    python benchmarks/trial_overhead.py [--seeds 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def study_spec(seeds: int, output_dir: Path) -> dict:
    spec = yaml.safe_load((ROOT / "studies/default.yaml").read_text())
    spec["models"] = spec["models"][:1]
    spec["grid"].update(ranks=[1, 4, 16], alphas=[181, 512, 1448, 4096], seeds=list(range(seeds)))
    spec["output_dir"] = str(output_dir)
    spec["training"]["diagnostics_every"] = 0
    spec["execution"] = {"resources": {"workers": 1, "cpus_per_worker": 1}, "max_concurrent": 1,
                         "trials_per_group": 10_000}
    return spec


def bare_loop(trials, cache_dir: Path) -> float:
    """The same trials as a plain PyTorch + PEFT loop: what a researcher would write by hand."""
    import torch

    from scaling_lab import data, models
    from scaling_lab.train import lora_model

    torch.set_num_threads(1)
    started = time.perf_counter()
    for config in trials:
        base = models.load_base(config.model, cache_dir)
        task = data.load_task(config.data, kind="causal_lm", tokenizer=None, vocab_size=base.vocab_size,
                              seq_len=config.training.seq_len, base_dir=ROOT)
        torch.manual_seed(config.seed)
        model = lora_model(config, base)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
        batches = data.batch_iterator(task.train, config.training.batch_size, seed=config.seed)
        evaluate(model, task.eval, config)
        for step in range(1, config.training.total_steps + 1):
            loss = model(**next(batches)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step % config.training.eval_every == 0:
                evaluate(model, task.eval, config)
    return time.perf_counter() - started


def evaluate(model, split, config) -> float:
    import torch

    count = config.training.eval_batches * config.training.batch_size
    model.eval()
    with torch.no_grad():
        losses = [model(**{k: v[i : i + config.training.batch_size] for k, v in split.items()}).loss.item()
                  for i in range(0, count, config.training.batch_size)]
    model.train()
    return sum(losses) / len(losses)


def platform(spec: dict, cache_dir: Path, workdir: Path) -> float:
    path = workdir / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "scaling_lab.study", "run", str(path), "--cache-dir", str(cache_dir)],
                   cwd=workdir, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2, help="12 trials per seed")
    args = parser.parse_args()
    from scaling_lab import spec as spec_lib
    from scaling_lab.grid import expand

    with tempfile.TemporaryDirectory() as tmp:
        workdir, cache_dir = Path(tmp), Path(tmp) / "cache"
        spec = study_spec(args.seeds, workdir / "results")
        trials = expand(spec_lib.parse(spec))
        bare_loop(trials[:1], cache_dir)  # builds the cached base model and DeepSpeed's CPU ops for both sides
        bare = bare_loop(trials, cache_dir)
        through_platform = platform(spec, cache_dir, workdir)
    print(f"{len(trials)} trials of the default study's size (tiny-xs, 80 steps), one at a time, on one core")
    print(f"bare PyTorch + PEFT loop: {bare:.1f} s ({bare / len(trials):.2f} s per trial)")
    print(f"through the platform:     {through_platform:.1f} s ({through_platform / len(trials):.2f} s per trial, "
          "Ray start-up included)")
    print(f"overhead ratio (platform ÷ bare): {through_platform / bare:.3f}")


if __name__ == "__main__":
    main()
