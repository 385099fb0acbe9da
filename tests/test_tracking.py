"""Experiment trackers: `python -m scaling_lab.results export` of the published default grid into a real local
MLflow store and TensorBoard event files, read back with MLflow's client and TensorBoard's event reader; W&B's
offline files read back record by record; exporting twice duplicates nothing; live logging from inside the
trials gives the layout the export gives. Nothing needs network."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from scaling_lab import results
from scaling_lab.tracking import TrackingError, open_tracker
from scaling_lab.tracking.layout import trial_record
from scaling_lab.tracking.live import TrialLogger

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "analysis" / "default_grid" / "results"
PUBLISHED_ANALYSIS = ["law.json", "report.md", "alpha_vs_rank.png", "metric_vs_alpha.png", "residuals.png"]

pytest.importorskip("mlflow", reason="the track extra: pip install 'scaling_lab[track]'")
pytest.importorskip("tensorboard", reason="the track extra: pip install 'scaling_lab[track]'")


def export(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**(os.environ if env is None else env), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "scaling_lab.results", "export", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def mlflow_runs(uri: str, experiment: str, kind: str, deleted: bool = False) -> list:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    view = ViewType.DELETED_ONLY if deleted else ViewType.ACTIVE_ONLY
    return client.search_runs([experiment_id], filter_string=f"tags.`scaling_lab.kind` = '{kind}'",
                              run_view_type=view, max_results=5000)


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def published_export(tmp_path_factory):
    """The published default study exported twice to MLflow (sqlite store) and TensorBoard."""
    where = tmp_path_factory.mktemp("export")
    uri = f"sqlite:///{where / 'mlflow.db'}"
    args = [str(PUBLISHED), "--to", "mlflow", "--tracking-uri", uri, "--to", "tensorboard", "--logdir", "tb"]
    first = export(*args, cwd=where)
    second = export(*args, cwd=where)
    return where, uri, first.stdout, second.stdout


def test_published_results_give_one_mlflow_run_per_row(published_export):
    from mlflow.tracking import MlflowClient

    where, uri, first, second = published_export
    frame = results.load(PUBLISHED)
    runs = mlflow_runs(uri, "default", "trial")
    assert len(runs) == len(frame) == 168
    assert {r.data.tags["scaling_lab.trial_id"] for r in runs} == set(frame["trial_id"])
    assert "mlflow: 168 trials of 'default': 168 logged" in first
    assert "0 logged, 0 replaced (run again since), 168 already there" in second
    assert not mlflow_runs(uri, "default", "trial", deleted=True)

    (study_run,) = mlflow_runs(uri, "default", "study")
    client = MlflowClient(tracking_uri=uri)
    artifacts = {a.path for a in client.list_artifacts(study_run.info.run_id)}
    assert set(PUBLISHED_ANALYSIS) | {"spec.yaml"} <= artifacts
    law = json.loads(Path(client.download_artifacts(study_run.info.run_id, "law.json", str(where))).read_text())
    assert law == json.loads((PUBLISHED.parent / "law.json").read_text())

    row = frame.sort_values("trial_id").iloc[0]
    run = next(r for r in runs if r.data.tags["scaling_lab.trial_id"] == row["trial_id"])
    assert run.data.tags["mlflow.parentRunId"] == study_run.info.run_id
    assert run.data.tags["scaling_lab.status"] == row["status"]
    params = run.data.params
    assert (params["model"], int(params["rank"]), int(params["seed"])) == (row["model"], row["rank"], row["seed"])
    assert float(params["alpha"]) == pytest.approx(row["alpha"], rel=1e-12)
    assert float(params["learning_rate"]) == pytest.approx(row["learning_rate"], rel=1e-12)
    assert float(params["effective_scale"]) == pytest.approx(row["effective_scale"], rel=1e-12)
    assert run.data.metrics["final_eval_loss"] == pytest.approx(row["final_eval_loss"], rel=1e-9)
    curve = results.load_curves(PUBLISHED, [row["trial_id"]]).dropna(subset=["train_loss"])
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(curve["step"])
    assert [m.value for m in history] == pytest.approx(list(curve["train_loss"]), rel=1e-9)


def test_published_results_give_tensorboard_event_files_with_the_loss_curves(published_export):
    where, _, first, second = published_export
    frame = results.load(PUBLISHED)
    study_folder = where / "tb" / "default"
    trial_folders = sorted(p for p in study_folder.iterdir() if p.name != "study")
    assert [p.name for p in trial_folders] == sorted(frame["trial_id"])
    assert len(list(trial_folders[0].glob("events.out.tfevents.*"))) == 1  # the second export wrote nothing
    assert "tensorboard: 168 trials of 'default': 0 logged, 0 replaced (run again since), 168 already" in second

    row = frame.sort_values("trial_id").iloc[0]
    accumulator = events(study_folder / row["trial_id"])
    curve = results.load_curves(PUBLISHED, [row["trial_id"]])
    train = curve.dropna(subset=["train_loss"])
    scalars = accumulator.Scalars("train_loss")
    assert [s.step for s in scalars] == list(train["step"])
    assert [s.value for s in scalars] == pytest.approx(list(train["train_loss"]), rel=1e-6)  # stored as float32
    evaluated = curve.dropna(subset=["eval_loss"])
    assert [s.value for s in accumulator.Scalars("eval_loss")] == pytest.approx(list(evaluated["eval_loss"]), rel=1e-6)
    (final,) = accumulator.Scalars("final_eval_loss")
    assert final.value == pytest.approx(row["final_eval_loss"], rel=1e-6)
    assert "_hparams_/session_start_info" in accumulator.Tags()["tensors"]

    study = events(study_folder / "study")
    assert {"alpha_vs_rank", "metric_vs_alpha", "residuals"} <= set(study.Tags()["images"])
    law_text = study.Tensors("law.json")[0].tensor_proto.string_val[0].decode()
    assert json.loads(law_text) == json.loads((PUBLISHED.parent / "law.json").read_text())
    assert (study_folder / "study" / "report.md").read_bytes() == (PUBLISHED.parent / "report.md").read_bytes()


def small_study(tmp_path: Path, trials: int) -> Path:
    """A results directory with the first `trials` trials of the published study (and no analysis)."""
    target = tmp_path / "results"
    (target / "trials").mkdir(parents=True)
    (target / "curves").mkdir()
    shutil.copy(PUBLISHED / "spec.yaml", target / "spec.yaml")
    for name in sorted(p.name for p in (PUBLISHED / "trials").iterdir())[:trials]:
        shutil.copy(PUBLISHED / "trials" / name, target / "trials" / name)
        shutil.copy(PUBLISHED / "curves" / name, target / "curves" / name)
    return target


def finish_again(results_dir: Path) -> str:
    """Rewrite one trial's row as if it had been run again: a later finished_at."""
    path = sorted((results_dir / "trials").iterdir())[0]
    table = pq.read_table(path)
    later = table.column("finished_at")[0].as_py() + dt.timedelta(hours=1)
    index = table.schema.get_field_index("finished_at")
    field = table.schema.field(index)
    pq.write_table(table.set_column(index, field, pa.array([later], type=field.type)), path)
    return path.stem


def test_a_trial_run_again_replaces_its_run_and_nothing_else(tmp_path):
    source = small_study(tmp_path, 3)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [str(source), "--to", "mlflow", "--tracking-uri", uri, "--to", "tensorboard", "--logdir", "tb"]
    export(*args, cwd=tmp_path)
    rerun = finish_again(source)
    again = export(*args, cwd=tmp_path)
    assert again.stdout.count("2 already there") == 2 and again.stdout.count("1 replaced") == 2, again.stdout
    active = mlflow_runs(uri, "default", "trial")
    assert len(active) == 3
    (replaced,) = [r for r in active if r.data.tags["scaling_lab.trial_id"] == rerun]
    assert replaced.data.tags["scaling_lab.finished_at"] == str(results.load(source).set_index("trial_id")
                                                                .loc[rerun, "finished_at"].isoformat())
    assert [r.data.tags["scaling_lab.trial_id"] for r in mlflow_runs(uri, "default", "trial", deleted=True)] == [rerun]
    assert len(list((tmp_path / "tb" / "default" / rerun).glob("events.out.tfevents.*"))) == 1
    assert not (tmp_path / "mlruns").exists()  # artifacts go beside the sqlite file, not into the working directory


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file (LevelDB's log format: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_export_writes_offline_runs_once(tmp_path):
    pytest.importorskip("wandb", reason="the track extra: pip install 'scaling_lab[track]'")
    source = small_study(tmp_path, 2)
    clean = {name: value for name, value in os.environ.items() if not name.startswith("WANDB_")}
    clean["HOME"] = str(tmp_path)  # no netrc: not logged in
    first = export(str(source), "--to", "wandb", "--wandb-dir", "wb", cwd=tmp_path, env=clean)
    assert "wandb: 2 trials of 'default': 2 logged" in first.stdout and "offline" in first.stdout
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    frame = results.load(source).sort_values("trial_id")
    assert len(runs) == 3  # two trials and the study
    row = frame.iloc[0]
    (run_folder,) = [p for p in runs if f"-{row['trial_id']}-" in p.name]
    records = wandb_records(next(run_folder.glob("run-*.wandb")))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["rank"] == row["rank"] and config["trial_id"] == row["trial_id"]
    assert f"status:{row['status']}" in run.tags
    losses = [json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "history"
              for item in r.history.item if "train_loss" in (item.key, *item.nested_key)]
    curve = results.load_curves(source, [row["trial_id"]]).dropna(subset=["train_loss"])
    assert losses == pytest.approx(list(curve["train_loss"]), rel=1e-9)

    second = export(str(source), "--to", "wandb", "--wandb-dir", "wb", cwd=tmp_path, env=clean)
    assert "0 logged, 0 replaced (run again since), 2 already there" in second.stdout
    assert len(list((tmp_path / "wb" / "wandb").glob("offline-run-*"))) == 3


def test_export_errors_are_one_line(tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "scaling_lab.results", "export"]
    for args, message in [
        ([str(PUBLISHED), "--to", "tensorboard"], "tensorboard: needs a log directory"),
        ([str(tmp_path / "nowhere"), "--to", "tensorboard", "--logdir", "tb"], "no such results directory"),
        ([str(PUBLISHED), "--to", "tensorboard", "--logdir", "tb", "--analysis", str(tmp_path)], "no law.json"),
    ]:
        done = subprocess.run(command + args, cwd=tmp_path, env=environment, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def test_a_missing_tracker_package_names_the_install_command(monkeypatch):
    from scaling_lab import tracking

    monkeypatch.setitem(tracking.MODULES, "wandb", ("wandb_is_not_installed_here", "wandb"))
    with pytest.raises(TrackingError, match=r"not installed: pip install 'scaling_lab\[track\]'"):
        open_tracker("wandb", "study")


def test_a_failing_tracker_costs_a_warning_not_the_trial(capsys):
    class Broken:
        name = "broken"

        def log_trial(self, trial):
            raise ConnectionError("the server went away")

    logger = TrialLogger.__new__(TrialLogger)
    logger.trackers = [Broken()]
    row = results.read_trials(PUBLISHED).slice(0, 1).to_pylist()[0]
    logger.log(row, [])
    assert "warning: tracking: broken could not log trial" in capsys.readouterr().err


@pytest.mark.ray
def test_live_logging_from_the_trials_matches_the_export(tmp_path):
    """A simulated study with `tracking:` logs each trial from its worker; the export afterwards finds them all."""
    spec = {
        "name": "live",
        "models": [{"name": "xs", "source": "tiny:xs"}],
        "grid": {"ranks": [1, 4], "alphas": [4, 64]},
        "training": {"steps": 10, "eval_every": 5},
        "execution": {"backend": "simulated", "trials_per_group": 4},
        "tracking": {"to": ["mlflow", "tensorboard"], "mlflow_tracking_uri": "sqlite:///tracking/mlflow.db",
                     "tensorboard_logdir": "tracking/tb"},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "tracking").mkdir()
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "scaling_lab.study", "run", "spec.yaml"], cwd=tmp_path,
                          env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: tracking" not in done.stderr
    uri = f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"
    frame = results.load(tmp_path / "results" / "live")
    runs = mlflow_runs(uri, "live", "trial")
    assert sorted(r.data.tags["scaling_lab.trial_id"] for r in runs) == sorted(frame["trial_id"])
    (study_run,) = mlflow_runs(uri, "live", "study")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {study_run.info.run_id}
    for trial_id in frame["trial_id"]:
        assert events(tmp_path / "tracking" / "tb" / "live" / trial_id).Scalars("train_loss")

    after = export(str(tmp_path / "results" / "live"), "--to", "mlflow", "--tracking-uri", uri, "--to",
                   "tensorboard", "--logdir", "tracking/tb", cwd=tmp_path)
    assert after.stdout.count("0 logged, 0 replaced (run again since), 4 already there") == 2, after.stdout
    assert len(mlflow_runs(uri, "live", "trial")) == 4


def test_records_take_the_axes_curve_and_outcome():
    row = results.read_trials(PUBLISHED).slice(0, 1).to_pylist()[0]
    curve = results.Store(PUBLISHED).read_table(f"curves/{row['trial_id']}.parquet").to_pylist()
    record = trial_record(row, curve)
    assert record.parameters["rank"] == row["rank"] and record.parameters["alpha"] == row["alpha"]
    assert record.tags["trial_id"] == row["trial_id"] and record.tags["status"] == row["status"]
    assert [step for step, _ in record.steps] == sorted(p["step"] for p in curve)
    assert record.final_metrics["steps"] == row["steps"]
    assert record.finished_key == row["finished_at"].isoformat()
