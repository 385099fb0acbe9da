"""Reliability without Ray: claims, atomic and failing writes, checkpoints, bad input, secrets.

The fault-injection tests that need Ray (killed drivers, workers and nodes, concurrent drivers) are in
test_reliability_ray.py.
"""

import dataclasses
import datetime as dt
import errno
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from scaling_lab import checkpoint, claims, results, spec as spec_lib
from scaling_lab.grid import expand
from scaling_lab.group import GroupSpec
from scaling_lab.outcome import TrainOutcome
from scaling_lab.study import grouping, results_checks
from scaling_lab.study.__main__ import main
from scaling_lab.trial import record_cut_short, result_row, run_group, scrub_secrets

SPEC = {
    "name": "sim",
    "models": [{"name": "xs", "source": "tiny:xs"}],
    "grid": {"ranks": [1, 4], "alphas": [4, 16, 64]},
    "training": {"steps": 20, "eval_every": 5},
    "execution": {"backend": "simulated"},
}


def simulated_study(tmp_path: Path, data: dict = SPEC) -> results.Store:
    """A finished study's results directory, as `run` leaves it, computed in-process without Ray."""
    spec = spec_lib.parse(data, tmp_path)
    store = results.Store(spec.results_dir(tmp_path))
    store.write("spec.yaml", spec_lib.dump(spec).encode())
    run_group(group_of(spec, store))
    return store


def group_of(spec: spec_lib.StudySpec, store: results.Store, **extra) -> GroupSpec:
    return GroupSpec(trials=tuple(t.to_dict() for t in expand(spec)), results_dir=str(store), cache_dir=str(store),
                     base_dir=str(store), backend=spec.execution.backend, study=spec.name, **extra)


# ---- worker groups that fail past their retries ----

MEMORY_MONITOR_KILL = ("ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.\n"
                       "1 worker(s) were killed due to the node running low on memory. Memory on the node was "
                       "22.7GB / 23.5GB (0.96), which exceeds the memory usage threshold of 0.95.")


@pytest.mark.parametrize("failure, status", [(MEMORY_MONITOR_KILL, "oom"),
                                             ("ActorDiedError: its worker process has died (SIGKILL)", "error")])
def test_the_trial_a_failed_worker_group_was_running_becomes_a_row(tmp_path, failure, status):
    spec = spec_lib.parse(SPEC, tmp_path)
    store = results.Store(tmp_path / "results")
    first, second, third = expand(spec)[:3]
    group = dataclasses.replace(group_of(spec, store, run_id="run-1", resources=spec_lib.Resources(workers=2)),
                                trials=tuple(t.to_dict() for t in (first, second, third)))
    results.write_trial(store, {**_row_of(first), "status": "ok"}, [])  # finished before the failure
    claims.acquire(store, second.trial_id, "run-1")  # running when its workers were killed
    claims.acquire(store, third.trial_id, "another-run")  # another driver's: not this group's to record
    assert record_cut_short(group, failure) == [second.trial_id]
    row = results.load(store).set_index("trial_id").loc[second.trial_id]
    assert row["status"] == status and row["num_workers"] == 2 and row["attempts"] == 1
    assert row["error"].startswith("its worker group failed past its retries (memory of node ")
    assert failure in row["error"]
    assert claims.read(store, second.trial_id) is None and claims.read(store, third.trial_id) is not None
    assert record_cut_short(group, failure) == []  # recorded once


def _row_of(config) -> dict:
    return result_row(config, TrainOutcome(status="ok"), study="rel", attempt=1, num_workers=1,
                      started_at=dt.datetime.now(dt.UTC), git_commit=None, device="cpu")


# ---- claims ----


def test_create_exclusive_succeeds_once_and_keeps_the_first_content(tmp_path):
    store = results.Store(tmp_path)
    assert store.create_exclusive("claims/a.json", b"first")
    assert not store.create_exclusive("claims/a.json", b"second")
    assert store.read_bytes("claims/a.json") == b"first"
    assert sorted(p.name for p in (tmp_path / "claims").iterdir()) == ["a.json"]


def _race_for_claim(root: str, everyone: multiprocessing.Barrier, won: multiprocessing.Queue) -> None:
    everyone.wait()
    claim = claims.acquire(results.Store(root), "t1", run_id=f"run-{os.getpid()}")
    won.put(claim is not None)
    everyone.wait()  # stay alive until all have tried: a dead owner's claim is rightly taken over


def test_only_one_of_many_concurrent_drivers_gets_a_claim(tmp_path):
    context = multiprocessing.get_context("fork")
    everyone, won = context.Barrier(8), context.Queue()
    racers = [context.Process(target=_race_for_claim, args=(str(tmp_path), everyone, won)) for _ in range(8)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=30)
    assert sorted(won.get(timeout=5) for _ in racers) == [False] * 7 + [True]


def test_a_live_claim_is_respected_and_a_stale_one_taken_over_with_the_next_attempt(tmp_path):
    store = results.Store(tmp_path)
    held = claims.acquire(store, "t1", run_id="driver-a")
    assert held.attempt == 1
    assert claims.acquire(store, "t1", run_id="driver-b") is None
    assert claims.held_elsewhere(store, ["t1", "t2"], run_id="driver-b") == ["t1"]
    assert claims.held_elsewhere(store, ["t1"], run_id="driver-a") == []

    retry = claims.acquire(store, "t1", run_id="driver-a")  # the same run: a retry of a group whose worker died
    assert retry.attempt == 2

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {**retry.data, "run_id": "driver-c", "pid": int(dead.stdout)}  # its process is gone
    store.write("claims/t1.json", json.dumps(stale).encode())
    taken_over = claims.acquire(store, "t1", run_id="driver-b")
    assert taken_over.attempt == 3

    elsewhere = {**taken_over.data, "host": "another-host", "heartbeat_at": time.time() - 1000, "timeout_s": 60}
    store.write("claims/t1.json", json.dumps(elsewhere).encode())  # on another host, silent past its timeout
    assert claims.acquire(store, "t1", run_id="driver-b").attempt == 4

    store.write("claims/t1.json", b"{torn")
    assert claims.acquire(store, "t1", run_id="driver-b").attempt == 2


def test_worker_groups_of_one_round_leave_each_other_s_trials_alone(tmp_path):
    store = results.Store(tmp_path)
    held = claims.acquire(store, "t1", run_id="driver-a", lane=(0, 0))
    assert claims.acquire(store, "t1", run_id="driver-a", lane=(0, 1)) is None  # a sibling group, running it
    assert claims.held_elsewhere(store, ["t1"], run_id="driver-a") == []  # the driver's own, not another's
    assert claims.acquire(store, "t1", run_id="driver-a", lane=(0, 0)).attempt == held.attempt + 1  # its retry
    assert claims.acquire(store, "t1", run_id="driver-a", lane=(1, 1)).attempt == held.attempt + 2  # next round
    assert claims.acquire(store, "t1", run_id="driver-b", lane=(0, 0)) is None  # another driver's group


def test_a_round_hands_out_higher_ranks_first_and_keeps_the_grid_order_otherwise():
    spec = spec_lib.parse({"name": "order", "models": [{"name": "xs", "source": "tiny:xs"}],
                           "grid": {"ranks": [1, 16, 4], "alphas": [8, 64], "seeds": [0, 1]}})
    trials = expand(spec)
    ordered = grouping.longest_first(trials)
    assert [t.rank for t in ordered] == [16] * 4 + [4] * 4 + [1] * 4
    assert [(t.alpha, t.seed) for t in ordered if t.rank == 4] == [(t.alpha, t.seed) for t in trials if t.rank == 4]


def test_a_heartbeat_keeps_a_long_trial_claimed_and_stops_once_the_claim_is_lost(tmp_path):
    store = results.Store(tmp_path)
    claim = claims.acquire(store, "t1", run_id="driver-a", timeout_s=0.4)
    with claim.heartbeat():
        time.sleep(1.0)
        assert claims.acquire(store, "t1", run_id="driver-b") is None
        taken = {**claims.read(store, "t1"), "run_id": "driver-b", "attempt": 2}
        store.write("claims/t1.json", json.dumps(taken).encode())
        time.sleep(0.3)
    assert claims.read(store, "t1")["run_id"] == "driver-b"  # not overwritten by the old owner's heartbeat
    claim.release()
    assert claims.read(store, "t1")["run_id"] == "driver-b"  # nor removed


# ---- writes that fail, rows that cannot be read ----


def test_a_full_disk_fails_the_trial_clearly_and_leaves_no_partial_file(tmp_path, monkeypatch):
    spec = spec_lib.parse(SPEC, tmp_path)
    store = results.Store(tmp_path / "out")
    real_replace = os.replace

    def disk_full(source, target):
        if f"/{results.TRIALS}/" in str(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(results.ResultsError, match=r"trials/\w{16}\.parquet: cannot write \(No space left on device\)"):
        run_group(group_of(spec, store))
    assert list((tmp_path / "out" / results.TRIALS).iterdir()) == []  # not even a hidden temporary
    assert results.load(store).empty and results.load_curves(store).empty
    abandoned = claims.read(store, expand(spec)[0].trial_id)
    assert abandoned["attempt"] == 1 and claims.is_stale(abandoned, run_id="next-run")


def test_truncated_rows_are_named_by_load_and_curves_without_rows_are_not_loaded(tmp_path):
    store = simulated_study(tmp_path)
    loaded = results.load(store)
    orphan = tmp_path / "results/sim/trials" / f"{loaded['trial_id'][0]}.parquet"
    orphan.unlink()  # as left by an attempt killed between writing its curve and its row
    assert set(results.load_curves(store)["trial_id"]) == set(loaded["trial_id"][1:])

    row = tmp_path / "results/sim/trials" / f"{loaded['trial_id'][1]}.parquet"
    row.write_bytes(row.read_bytes()[:100])
    with pytest.raises(results.ResultsError) as caught:
        results.load(store)
    assert str(caught.value).startswith(f"{row}: not a readable Parquet file") and "\n" not in str(caught.value)


# ---- bad input: one line naming the thing and what was expected, exit code 2, nothing computed ----


def _spec(tmp_path: Path, **changes) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**SPEC, **changes}))
    return str(path)


def _rewrite_first_row(tmp_path: Path, change) -> None:
    row = sorted((tmp_path / "results/sim/trials").iterdir())[0]
    change(row)


def _old_schema(row: Path) -> None:
    table = pq.read_table(row)
    version = table.schema.get_field_index("schema_version")
    pq.write_table(table.set_column(version, "schema_version", pa.array([0], pa.int32())), row)


def _studied(tmp_path: Path, change=None) -> Path:
    simulated_study(tmp_path)
    if change:
        _rewrite_first_row(tmp_path, change)
    return tmp_path


BAD_INPUTS = {
    "malformed YAML": (lambda tmp: ["run", str(_write(tmp / "s.yaml", "name: sim\ngrid: [unclosed\n"))],
                       "s.yaml: not valid YAML at line 3"),
    "unknown key": (lambda tmp: ["run", _spec(tmp, grid={**SPEC["grid"], "rnks": [1]})],
                    "grid.rnks: unknown key (did you mean 'ranks'?)"),
    "wrong type": (lambda tmp: ["run", _spec(tmp, training={"steps": "ten"})],
                   "training.steps: expected an integer or null, got 'ten'"),
    "impossible value": (lambda tmp: ["run", _spec(tmp, grid={**SPEC["grid"], "alphas": [4, -1]})],
                         "grid.alphas[1]: expected a finite number > 0, got -1.0"),
    "override of an unknown key": (lambda tmp: ["run", _spec(tmp), "--override", "execution.max_retrys=3"],
                                   "execution.max_retrys: unknown key (did you mean 'max_retries'?)"),
    "missing spec file": (lambda tmp: ["run", str(tmp / "nope.yaml")], "nope.yaml: spec file does not exist"),
    "missing data file": (lambda tmp: ["run", _spec(tmp, data={"source": "nope.jsonl", "text_column": "text"})],
                          "data.source: data file"),
    "unreadable dataset": (
        lambda tmp: ["run", _spec(tmp, data={"source": str(_write(tmp / "d.jsonl", '{"text": "a"}\n{oops\n')),
                                             "text_column": "text"})],
        "d.jsonl: cannot be read as jsonl"),
    "missing model directory": (lambda tmp: ["run", _spec(tmp, models=[{"name": "m", "source": "./no/model"}])],
                                "models[0].source: model directory './no/model' does not exist"),
    "study name that is a path": (lambda tmp: ["run", _spec(tmp, name="../escape")],
                                  "name: expected a name of letters, digits"),
    "credentials in the output URI": (lambda tmp: ["run", _spec(tmp, output_dir="s3://KEY:SECRET@bucket/x")],
                                      "output_dir: expected a URI without credentials"),
    "faults injected into real trials": (
        lambda tmp: ["run", _spec(tmp, execution={"inject_faults": [{"kind": "nan"}]})],
        "execution.inject_faults: expected no faults unless backend is simulated"),
    "unwritable output directory": (
        lambda tmp: ["run", _spec(tmp, output_dir=str(_write(tmp / "a-file", "") / "results"))],
        "a-file/results/spec.yaml: cannot write (Not a directory)"),
    "results of another schema version": (
        lambda tmp: ["run", _spec(_studied(tmp, _old_schema))],
        "written with results schema version 0, this scaling_lab reads version 1; nothing was run: move or delete"),
    "truncated results file": (
        lambda tmp: ["run", _spec(_studied(tmp, lambda row: row.write_bytes(row.read_bytes()[:50])))],
        ".parquet: not a readable Parquet file (Parquet magic bytes not found in footer"),
    "results of another study": (lambda tmp: ["run", _spec(_studied(tmp), name="other",
                                                           output_dir=str(tmp / "results/sim"))],
                                 "holds the results of study 'sim', not 'other'; choose another output_dir"),
    "status of a directory without results": (lambda tmp: ["status", str(tmp)], "no spec.yaml, so not a study"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("make_args, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_refused_with_one_line_before_any_compute(tmp_path, monkeypatch, capsys, make_args, message):
    monkeypatch.chdir(tmp_path)
    args = make_args(tmp_path)
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file())
    monkeypatch.setitem(sys.modules, "ray", None)  # compute would need Ray: importing it now fails the test
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    after = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file())
    assert after == before  # nothing written, nothing overwritten


def test_a_changed_spec_says_what_changed_and_keeps_the_old_rows(tmp_path, monkeypatch, capsys):
    store = simulated_study(tmp_path)
    longer = spec_lib.parse({**SPEC, "training": {"steps": 40, "eval_every": 5}}, tmp_path)
    assert results_checks.check_results_dir(longer, store) == ["training.steps"]
    assert len(results_checks.pending_trials(longer, str(store))[1]) == 6  # part of each trial's identity: all new ids

    rows = {p: p.stat().st_mtime_ns for p in (tmp_path / "results/sim/trials").iterdir()}
    monkeypatch.chdir(tmp_path)
    narrower = _spec(tmp_path, grid={**SPEC["grid"], "ranks": [4]}, execution={**SPEC["execution"], "max_retries": 5})
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["run", narrower]) == 0
    out = capsys.readouterr().out
    assert (f"the spec changed since the last run in {tmp_path / 'results/sim'}: execution.max_retries, grid.ranks; "
            "finished rows are kept (3 not in the current grid); 0 of 3 trials to run") in out, out
    assert {p: p.stat().st_mtime_ns for p in rows} == rows

    assert main(["status", "results/sim"]) == 0
    assert "3 finished trials are not in the current grid" in capsys.readouterr().out


# ---- in-trial checkpoints, on the simulated trial and on a real tiny model ----


def test_a_simulated_trial_resumes_from_its_checkpoint_with_the_same_result(tmp_path, capsys):
    spec = spec_lib.parse(SPEC, tmp_path)
    alone = results.Store(tmp_path / "fault-free")
    run_group(group_of(spec, alone))
    store = results.Store(tmp_path / "resumed")
    crash = {"kind": "error", "at_step": 13, "attempts": 1}
    config = expand(spec)[0]
    checkpoints = checkpoint.TrialCheckpoints(store, config.trial_id, every=5)
    from scaling_lab.simulated import simulate

    with pytest.raises(RuntimeError, match="injected error at step 13"):
        simulate(config, faults=(spec_lib.build(spec_lib.FaultInjection, crash),), checkpoints=checkpoints)
    assert checkpoints.latest()[0] == 10
    outcome = simulate(config, attempt=2, checkpoints=checkpoints)
    assert "resumed from its checkpoint at step 10" in capsys.readouterr().out
    expected = results.load_curves(alone, [config.trial_id]).drop(columns="trial_id")
    assert results.curve_table(config.trial_id, outcome.curve).to_pandas().drop(columns="trial_id").equals(expected)


class WorkerKilled(BaseException):
    """Stands for a SIGKILL: not an Exception, so no trial turns it into a row."""


@pytest.mark.real
@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: DeepSpeed wraps the optimizer, its state reset
def test_a_real_trial_resumes_from_its_checkpoint_bit_identically(tmp_path, tiny_cache, monkeypatch, capsys,
                                                                  precision):
    spec = spec_lib.parse({
        "name": "ckpt", "models": [{"name": "xs", "source": "tiny:xs"}], "grid": {"ranks": [2], "alphas": [16]},
        "training": {"steps": 8, "batch_size": 8, "eval_every": 3, "eval_batches": 1, "diagnostics_every": 2},
        "deepspeed": {"precision": precision},
    })
    group = dataclasses.replace(group_of(spec, results.Store(tmp_path / "fault-free")), cache_dir=str(tiny_cache))
    run_group(group)

    resumed = results.Store(tmp_path / "resumed")
    save = checkpoint.save_engine

    def killed_after_step_5(checkpoints, step, engine, outcome):
        save(checkpoints, step, engine, outcome)
        if step == 5:
            raise WorkerKilled

    monkeypatch.setattr(checkpoint, "save_engine", killed_after_step_5)
    with pytest.raises(WorkerKilled):
        run_group(dataclasses.replace(group, results_dir=str(resumed), checkpoint_every=3))
    monkeypatch.setattr(checkpoint, "save_engine", save)
    run_group(dataclasses.replace(group, results_dir=str(resumed), checkpoint_every=3))

    trial_id = expand(spec)[0].trial_id
    assert f"trial {trial_id}: resumed from its checkpoint at step 3" in capsys.readouterr().out
    assert results.load_curves(resumed).equals(results.load_curves(tmp_path / "fault-free"))
    row = results.load(resumed).iloc[0]
    assert row["attempts"] == 2 and row["steps"] == 8
    measured = ["final_eval_loss", "final_train_loss", "spectral_ratio_max", "status"]
    assert row[measured].equals(results.load(tmp_path / "fault-free").iloc[0][measured])
    assert not (tmp_path / "resumed/checkpoints" / trial_id).exists()


# ---- secrets ----


def test_secrets_in_the_environment_are_scrubbed_from_error_text(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_123456")
    monkeypatch.setenv("NOT_A_SECRET", "hf_fake_token_123456-but-public")
    assert scrub_secrets("401 for hf_fake_token_123456") == "401 for <HF_TOKEN>"

    from scaling_lab import simulated

    def leaky(config, *args, **kwargs):
        raise PermissionError(f"hub refused token {os.environ['HF_TOKEN']}")

    monkeypatch.setattr(simulated, "simulate", leaky)
    store = results.Store(tmp_path)
    run_group(group_of(spec_lib.parse(SPEC, tmp_path), store))
    errors = results.load(store)["error"]
    assert errors.str.contains("hub refused token <HF_TOKEN>").all()
    assert not any(b"hf_fake_token_123456" in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())

