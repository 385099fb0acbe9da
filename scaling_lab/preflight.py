"""Pre-flight: before Ray starts, that what the trials need is there, or one line naming the missing piece and the
command that installs it.

- the ray_train backend: torch, transformers, peft, tokenizers and DeepSpeed import (in a child process, as the
  trial workers import them; a success is remembered per environment and package versions);
- `hf:` datasets: the datasets library;
- GPUs or custom resources a spec asks for, when the study runs on this machine (no --address or RAY_ADDRESS):
  this machine has them (local Ray would otherwise wait for them forever);
- `tracking:` trackers: their packages, and that the tracker opens (the study-level run is made here).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from scaling_lab import spec as spec_lib

DEEPSPEED_INSTALL = "DS_BUILD_OPS=0 pip install --no-build-isolation 'deepspeed>=0.19.8,<0.20' (after torch)"
TORCH_INSTALL = ("pip install 'torch>=2.13,<2.15' --index-url https://download.pytorch.org/whl/cpu (CPU build; "
                 "plain pip install on Linux gives the CUDA build)")
PACKAGE_INSTALL = "pip install scaling_lab"
PROBE_MARKER = "scaling_lab-preflight:"
CACHE_FILE = ".scaling_lab-preflight.json"
PROBE_TIMEOUT_S = 600


class PreflightError(spec_lib.SpecError):
    """What the spec asks for is not in this environment; nothing was run."""


@dataclass(frozen=True)
class Requirement:
    module: str
    needed_for: str
    install: str


TRAINING = (
    Requirement("torch", "the ray_train backend", TORCH_INSTALL),
    Requirement("transformers", "the ray_train backend's models", PACKAGE_INSTALL),
    Requirement("tokenizers", "the ray_train backend's models", PACKAGE_INSTALL),
    Requirement("peft", "the ray_train backend's LoRA", PACKAGE_INSTALL),
    Requirement("deepspeed", "the ray_train backend (it trains every trial with DeepSpeed)", DEEPSPEED_INSTALL),
)
HUB_DATA = Requirement("datasets", "data.source hf:<dataset id>", PACKAGE_INSTALL)

PROBE = f"""
import importlib, json, sys
failed = {{}}
for name in sys.argv[1].split(","):
    try:
        importlib.import_module(name)
    except Exception as exc:
        reason = str(exc).strip().splitlines()
        failed[name] = type(exc).__name__ + (": " + reason[0] if reason else "")
gpus = cuda = torch_version = None
if sys.argv[2] == "1" and "torch" not in failed:
    import torch
    gpus, cuda, torch_version = torch.cuda.device_count(), torch.version.cuda, torch.__version__
print({PROBE_MARKER!r} + json.dumps({{"failed": failed, "gpus": gpus, "cuda": cuda, "torch": torch_version}}))
"""


def requirements(spec: spec_lib.StudySpec) -> list[Requirement]:
    needed = list(TRAINING) if spec.execution.backend == "ray_train" else []
    if spec.execution.backend == "ray_train" and spec.data.is_hub:
        needed.append(HUB_DATA)
    return needed


def gpu_requests(spec: spec_lib.StudySpec) -> list[tuple[str, spec_lib.Resources]]:
    """(field path, resources) of each resources block a group of the study runs with."""
    blocks = [(f"models[{i}].resources", m.resources) for i, m in enumerate(spec.models) if m.resources is not None]
    if any(m.resources is None for m in spec.models):
        blocks.append(("execution.resources", spec.execution.resources))
    return blocks


def _environment(modules: list[str]) -> dict[str, list[str]]:
    """Each module's installed version and where it would be imported from: what a remembered success is for."""
    found = {}
    for module in modules:
        try:
            version = importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            version = ""
        try:
            origin = getattr(importlib.util.find_spec(module), "origin", None) or ""
        except (ImportError, ValueError):
            origin = ""
        found[module] = [version, origin]
    return found


def _cache_path() -> Path:
    return Path(sys.prefix) / CACHE_FILE


def _cached_success(key: dict) -> bool:
    try:
        return json.loads(_cache_path().read_text()) == key
    except (OSError, ValueError):
        return False


def _remember_success(key: dict) -> None:
    try:
        _cache_path().write_text(json.dumps(key))
    except OSError:
        pass  # a read-only environment probes every time


def probe(modules: list[str], count_gpus: bool) -> dict:
    """Import `modules` in a child process (as a trial worker would) and count CUDA GPUs if asked."""
    done = subprocess.run([sys.executable, "-c", PROBE, ",".join(modules), "1" if count_gpus else "0"],
                          capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(PROBE_MARKER):
            return json.loads(line.removeprefix(PROBE_MARKER))
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise PreflightError(f"pre-flight: importing {', '.join(modules)} crashed the Python process "
                         f"(exit code {done.returncode}: {tail})")


def check_imports_and_gpus(spec: spec_lib.StudySpec, local: bool) -> None:
    needed = requirements(spec)
    asking = [(path, r) for path, r in gpu_requests(spec) if local and r.gpus_per_worker > 0]
    modules = [r.module for r in needed] + (["torch"] if asking and "torch" not in [r.module for r in needed] else [])
    if not modules:
        return
    key = {"python": sys.executable, "modules": _environment(modules)}
    if not asking and _cached_success(key):
        return
    found = probe(modules, count_gpus=bool(asking))
    for requirement in needed:
        reason = found["failed"].get(requirement.module)
        if reason is None:
            continue
        missing = reason.startswith("ModuleNotFoundError") and f"'{requirement.module}'" in reason
        state = "is not installed" if missing else f"does not import ({reason})"
        raise PreflightError(f"{requirement.module} {state}; {requirement.needed_for} needs it: install it with "
                             f"{requirement.install}; nothing was run")
    for path, resources in asking:
        gpus = found["gpus"] or 0
        if resources.gpus_per_worker > gpus:
            build = (f"torch {found['torch']} is a CPU build, " if found["torch"] and not found["cuda"] else
                     "torch is not installed, " if found["gpus"] is None else "")
            raise PreflightError(
                f"{path}.gpus_per_worker: asks for {resources.gpus_per_worker:g} GPU per worker "
                f"({resources.workers} workers), but this machine has {gpus} CUDA GPUs ({build}the study runs on "
                f"local Ray): run it on a GPU machine or a cluster (--address), or set gpus_per_worker: 0; nothing "
                f"was run")
    if not found["failed"]:
        _remember_success(key)


def check_custom_resources(spec: spec_lib.StudySpec) -> None:
    for path, resources in gpu_requests(spec):
        for name in resources.custom:
            raise PreflightError(f"{path}.custom.{name}: local Ray has no {name!r} resource (it labels cluster "
                                 f"nodes), so no trial would ever start: run on the cluster with --address, or "
                                 f"remove it; nothing was run")


def check_trackers(spec: spec_lib.StudySpec, base_dir: Path) -> None:
    """Each live tracker opens, and its study-level run exists before the trials log under it."""
    from scaling_lab.tracking import TrackingError, open_tracker
    from scaling_lab.tracking.layout import StudyRecord

    settings = spec.tracking
    for name in settings.to:
        try:
            tracker = open_tracker(name, spec.name, tracking_uri=settings.mlflow_tracking_uri,
                                   logdir=settings.tensorboard_logdir, project=settings.wandb_project,
                                   wandb_dir=settings.wandb_dir, base_dir=base_dir)
            tracker.start_study(StudyRecord(spec.name, spec.results_dir(base_dir), 0, {}))
            tracker.close()
        except TrackingError as exc:
            raise PreflightError(f"tracking.to: {exc}; nothing was run") from None
        except Exception as exc:  # the tracker's own failure: a server that does not answer, a bad URI
            reason = " ".join(str(exc).split())[:300]
            raise PreflightError(f"tracking.to: {name} cannot be opened ({type(exc).__name__}: {reason}); "
                                 f"nothing was run") from None


def check(spec: spec_lib.StudySpec, address: str | None, base_dir: Path) -> None:
    """Everything above; `address` is the Ray cluster the study runs on (None: local Ray on this machine)."""
    local = (address or os.environ.get("RAY_ADDRESS") or "local") == "local"
    if local:
        check_custom_resources(spec)
    check_imports_and_gpus(spec, local)
    check_trackers(spec, base_dir)
