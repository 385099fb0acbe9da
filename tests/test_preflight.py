"""Pre-flight: before Ray starts, what the trials need is checked, and a missing piece is one line naming it and its
install command; nothing is run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scaling_lab import preflight, spec as spec_lib

ROOT = Path(__file__).resolve().parents[1]
SPEC = {
    "name": "pre",
    "models": [{"name": "xs", "source": "tiny:xs"}],
    "grid": {"ranks": [1], "alphas": [4]},
    "training": {"steps": 2, "eval_every": 1},
}


def spec_of(**changes) -> spec_lib.StudySpec:
    return spec_lib.parse({**SPEC, **changes})


def fake_package(folder: Path, name: str, body: str) -> Path:
    (folder / name).mkdir(parents=True)
    (folder / name / "__init__.py").write_text(body)
    return folder


def run_study(tmp_path: Path, spec: dict, pythonpath: list[Path] = ()) -> subprocess.CompletedProcess:
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in [*pythonpath, ROOT])}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "scaling_lab.study", "run", "spec.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_missing_deepspeed_is_one_line_with_the_install_command_before_anything_runs(tmp_path):
    shadow = fake_package(tmp_path / "shadow", "deepspeed",
                          "raise ModuleNotFoundError(\"No module named 'deepspeed'\", name='deepspeed')\n")
    done = run_study(tmp_path, SPEC, [shadow])
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: deepspeed is not installed; the ray_train backend")
    assert "DS_BUILD_OPS=0 pip install --no-build-isolation 'deepspeed>=0.19.8,<0.20'" in done.stderr
    assert not (tmp_path / "results").exists()  # not even spec.yaml: Ray never started


def test_a_deepspeed_that_does_not_import_is_named_with_its_reason(tmp_path, monkeypatch):
    """What the child process reports (its import is exercised above) becomes the one line."""
    reported = {"failed": {"deepspeed": "ImportError: built against torch 2.4, found another"}, "gpus": None,
                "cuda": None, "torch": None}
    monkeypatch.setattr(preflight, "probe", lambda modules, count_gpus: reported)
    monkeypatch.setattr(preflight, "_cached_success", lambda key: False)
    with pytest.raises(preflight.PreflightError) as failure:
        preflight.check(spec_of(), None, tmp_path)
    assert str(failure.value).startswith("deepspeed does not import (ImportError: built against torch 2.4, found "
                                         "another); the ray_train backend (it trains every trial with DeepSpeed)")


def test_the_installed_environment_passes(tmp_path):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("the train extra is not installed")
    preflight.check(spec_of(), None, tmp_path)


def test_gpus_asked_for_on_this_machine_must_exist(tmp_path):
    spec = spec_of(execution={"backend": "simulated", "resources": {"gpus_per_worker": 64}})
    with pytest.raises(preflight.PreflightError) as failure:
        preflight.check(spec, None, tmp_path)
    message = str(failure.value)
    assert message.startswith("execution.resources.gpus_per_worker: asks for 64 GPU per worker (1 workers), but "
                              "this machine has ")
    assert "\n" not in message and "nothing was run" in message
    preflight.check(spec, "ray://head:10001", tmp_path)  # a cluster's GPUs are the cluster's business


def test_a_model_asking_for_a_cluster_label_locally_is_named(tmp_path):
    models = [{"name": "xs", "source": "tiny:xs", "resources": {"custom": {"gpu_type_a10g": 1}}}]
    spec = spec_of(models=models, execution={"backend": "simulated"})
    with pytest.raises(preflight.PreflightError, match=r"^models\[0\]\.resources\.custom\.gpu_type_a10g: local Ray "
                                                       r"has no 'gpu_type_a10g' resource"):
        preflight.check(spec, None, tmp_path)
    preflight.check(spec, "127.0.0.1:6379", tmp_path)


def test_the_simulated_backend_needs_no_training_libraries():
    assert preflight.requirements(spec_of(execution={"backend": "simulated"})) == []
    needed = [r.module for r in preflight.requirements(spec_of())]
    assert needed == ["torch", "transformers", "tokenizers", "peft", "deepspeed"]


def test_a_live_tracker_without_its_package_is_refused_before_compute(tmp_path, monkeypatch):
    from scaling_lab import tracking

    monkeypatch.setitem(tracking.MODULES, "tensorboard", ("tensorboard_is_not_installed_here", "tensorboard"))
    spec = spec_of(execution={"backend": "simulated"},
                   tracking={"to": ["tensorboard"], "tensorboard_logdir": "tb"})
    with pytest.raises(preflight.PreflightError, match=r"^tracking\.to: tensorboard: the tensorboard_is_not_installed"
                                                       r"_here package is not installed: pip install"):
        preflight.check(spec, None, tmp_path)


def test_tracking_settings_name_the_missing_field():
    with pytest.raises(spec_lib.SpecError, match=r"^tracking\.mlflow_tracking_uri: expected a tracking URI"):
        spec_of(tracking={"to": ["mlflow"]})
    with pytest.raises(spec_lib.SpecError, match=r"^tracking\.to\[0\]: expected one of 'mlflow', 'tensorboard'"):
        spec_of(tracking={"to": ["neptune"]})


def test_tracking_changes_no_trial_id():
    from scaling_lab.grid import expand

    plain = [t.trial_id for t in expand(spec_of())]
    tracked = [t.trial_id for t in expand(spec_of(tracking={"to": ["tensorboard"], "tensorboard_logdir": "tb"}))]
    assert plain == tracked
