"""Per-trial overhead: trials through the platform ÷ the same trials as a bare PyTorch + PEFT loop.

Both sides run the same trials of the embedded default study's size (tiny-xs, 80 steps, the same evaluations,
gradients clipped as the spec says; ranks 1, 4, 16 × four α values that do not diverge × seeds), one at a time
on one core, each as one command timed from its start to its end, imports included:
- the platform: `python -m scaling_lab.study run` on a fresh local Ray (Ray Tune → Ray Train → DeepSpeed
  ZeRO-0), all trials in one worker group, as each of the default study's two worker groups runs 98 trials;
- bare: one Python process with a plain training loop, what a researcher would write by hand.
Diagnostics are off on both sides (they are extra work, not overhead). Prints the per-trial ratio last (a
trial's wall time once both sides have started); the start-up costs and the whole-run ratio come before it.

    python benchmarks/trial_overhead.py [--seeds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    spec["search"] = {"method": "grid"}
    spec["training"]["diagnostics_every"] = 0
    spec["execution"] = {"resources": {"workers": 1, "cpus_per_worker": 1}, "max_concurrent": 1,
                         "trials_per_group": 10_000}
    return spec


def bare_loop(spec_path: Path, cache_dir: Path) -> None:
    """The trials as a plain PyTorch + PEFT loop; prints when each trial started and ended (JSON)."""
    import torch

    from scaling_lab import reference_loop, spec as spec_lib
    from scaling_lab.grid import expand

    torch.set_num_threads(1)
    times = []
    for config in expand(spec_lib.load(spec_path)):
        started = time.time()
        reference_loop.run(config, cache_dir, ROOT, evaluate=True)
        times.append([started, time.time()])
    print(json.dumps(times))


def warm_up(spec: dict, cache_dir: Path) -> None:
    """Build what either side would otherwise build on its first run: the cached base model, DeepSpeed's CPU op."""
    from scaling_lab import models, spec as spec_lib
    from scaling_lab.deepspeed_setup import build_deepspeed_ops

    models.load_base(spec_lib.parse(spec).models[0], cache_dir)
    build_deepspeed_ops()


def timed(command: list[str], cwd: Path) -> tuple[float, float, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.time()
    done = subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True, text=True)
    return started, time.time(), done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8, help="12 trials per seed (default 8: 96 trials)")
    parser.add_argument("--bare", nargs=2, metavar=("SPEC", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare_loop(Path(args.bare[0]), Path(args.bare[1]))
        return
    from scaling_lab import results

    with tempfile.TemporaryDirectory() as tmp:
        workdir, cache_dir = Path(tmp), Path(tmp) / "cache"
        spec = study_spec(args.seeds, workdir / "results")
        (workdir / "spec.yaml").write_text(yaml.safe_dump(spec))
        warm_up(spec, cache_dir)
        bare_start, bare_end, out = timed([sys.executable, __file__, "--bare", "spec.yaml", str(cache_dir)], workdir)
        bare_trials = json.loads(out.strip().splitlines()[-1])
        platform_start, platform_end, _ = timed([sys.executable, "-m", "scaling_lab.study", "run", "spec.yaml",
                                                 "--cache-dir", str(cache_dir)], workdir)
        rows = results.load(workdir / "results").sort_values("started_at")
    n = len(bare_trials)
    bare_first = bare_trials[0][0] - bare_start
    bare_steady = statistics.mean(end - start for start, end in bare_trials[1:])
    platform_first = rows["started_at"].iloc[0].timestamp() - platform_start
    platform_steady = rows["wall_time_s"].iloc[1:].mean()
    bare, platform = bare_end - bare_start, platform_end - platform_start
    print(f"{n} trials of the default study's size (tiny-xs, 80 steps), one at a time, in one worker group, "
          f"on one core")
    print(f"bare PyTorch + PEFT process: {bare:.1f} s; first trial after {bare_first:.1f} s; "
          f"then {bare_steady:.2f} s per trial")
    print(f"through the platform:        {platform:.1f} s; first trial after {platform_first:.1f} s (Ray, Tune, "
          f"Train start-up); then {platform_steady:.2f} s per trial")
    print(f"whole runs of {n} trials, start-up included (platform ÷ bare): {platform / bare:.3f}")
    print(f"per-trial overhead ratio (platform ÷ bare, trials 2..{n}): {platform_steady / bare_steady:.3f}")


if __name__ == "__main__":
    main()
