"""Tier 1: running out of memory is data (status oom, with the memory figures), `status` says what to change, and
study submit passes named environment variables (a gated model's HF_TOKEN) to the job without writing them."""

import datetime as dt
import sys
from pathlib import Path

import pytest
import yaml

from scaling_lab import results, spec as spec_lib, trial
from scaling_lab.grid import expand
from scaling_lab.study import submit
from scaling_lab.study.__main__ import main

SPEC = {
    "name": "memory",
    "models": [{"name": "xs", "source": "tiny:xs"}],
    "grid": {"ranks": [4], "alphas": [16, 64]},
    "training": {"steps": 4, "batch_size": 8},
    "execution": {"resources": {"workers": 2}},
}


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)"),
    type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 2.00 GiB"),
])
def test_a_trial_that_runs_out_of_memory_is_oom_and_names_the_figures(monkeypatch, tmp_path, error):
    import scaling_lab.train

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(scaling_lab.train, "fine_tune", out_of_memory)
    config = expand(spec_lib.parse(SPEC))[0]
    outcome = trial.execute(config, "ray_train", tmp_path, tmp_path, 0.0)
    assert outcome.status == "oom"
    first_line = outcome.error.splitlines()[0]
    assert first_line.startswith("out of memory: worker peak RSS ") and " MB; node memory " in first_line


def test_other_errors_stay_errors(monkeypatch, tmp_path):
    import scaling_lab.train

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(scaling_lab.train, "fine_tune", broken)
    outcome = trial.execute(expand(spec_lib.parse(SPEC))[0], "ray_train", tmp_path, tmp_path, 0.0)
    assert outcome.status == "error" and "out of memory" not in outcome.error


def test_status_says_what_to_change_after_an_oom(tmp_path, capsys):
    spec = spec_lib.parse(SPEC)
    store = results.Store(tmp_path / "results")
    store.write("spec.yaml", spec_lib.dump(spec).encode())
    config = expand(spec)[0]
    outcome = trial.TrainOutcome(status="oom", error="out of memory: worker peak RSS 11,224 MB; node memory ...")
    row = trial.result_row(config, outcome, study="memory", attempt=1, num_workers=2,
                           started_at=dt.datetime.now(dt.UTC), git_commit=None, device="cpu")
    results.write_trial(store, row, [])
    assert main(["status", str(tmp_path / "results")]) == 0
    printed = capsys.readouterr().out
    assert "oom " + config.trial_id in printed and "worker peak RSS 11,224 MB" in printed
    for change in ["deepspeed.zero_stage=3", "training.micro_batch_size=2", "deepspeed.gradient_checkpointing=true",
                   "execution.resources.cpus_per_worker=2", "--retry-failed"]:
        assert change in printed, change
    assert "deepspeed.offload" not in printed  # no GPU: offloading to CPU memory saves nothing


def test_plan_refuses_a_batch_that_does_not_split_over_the_workers(tmp_path, capsys):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({**SPEC, "training": {"steps": 4, "batch_size": 9}}))
    assert main(["plan", str(tmp_path / "study.yaml")]) == 2
    error = capsys.readouterr().err
    assert "training.batch_size: expected a multiple of the 2 workers of execution.resources, got 9" in error
    micro = {**SPEC, "training": {"steps": 4, "batch_size": 8, "micro_batch_size": 3}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(micro))
    assert main(["plan", str(tmp_path / "study.yaml")]) == 2
    assert "training.micro_batch_size: expected a divisor of batch_size / workers = 4" in capsys.readouterr().err


def test_plan_has_deepspeed_validate_the_extra_config(tmp_path, capsys):
    bad = {**SPEC, "deepspeed": {"zero_stage": 3, "config": {"zero_optimization": {"reduce_bucket_size": "lots"}}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(bad))
    assert main(["plan", str(tmp_path / "study.yaml")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: deepspeed.config: DeepSpeed rejects it") and error.count("\n") == 1
    good = {**SPEC, "deepspeed": {"zero_stage": 3, "config": {"zero_optimization": {"reduce_bucket_size": 1000}}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(good))
    assert main(["plan", str(tmp_path / "study.yaml")]) == 0


def test_submit_passes_named_environment_variables_and_writes_them_nowhere(tmp_path, monkeypatch, capsys):
    secret = "hf_secretvalue0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    submitted = {}

    class Client:
        def __init__(self, address):
            pass

        def submit_job(self, **job):
            submitted.update(job)
            return "raysubmit_1"

    monkeypatch.setitem(sys.modules, "ray.job_submission", type(sys)("ray.job_submission"))
    sys.modules["ray.job_submission"].JobSubmissionClient = Client
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({**SPEC, "output_dir": str(tmp_path / "out")}))
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "study.yaml", "--address", "http://127.0.0.1:1", "--env", "HF_TOKEN"]) == 0
    assert submitted["runtime_env"]["env_vars"] == {"HF_TOKEN": secret}
    assert secret not in submitted["entrypoint"] and secret not in str(submitted["metadata"])
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err and "HF_TOKEN (values not shown)" in printed.out
    assert not any(secret.encode() in path.read_bytes() for path in Path(tmp_path).rglob("*") if path.is_file())
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(spec_lib.SpecError, match="--env HF_TOKEN: not set in this environment"):
        submit.passed_environment(["HF_TOKEN"])
