"""MLflow: an experiment per study, a study-level run holding the analysis as artifacts, a nested run per trial.

A trial already in the experiment with the same `finished_at` is left alone; one with another (the trial was run
again) is deleted and logged anew, so the experiment holds one active run per trial however often it is exported.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from scaling_lab.tracking.layout import TAG_PREFIX, StudyRecord, TrialRecord

BATCH_METRICS, BATCH_PARAMS = 1000, 100  # MLflow's log_batch limits per call
FAILED_STATUSES = ("error", "oom")


def _ms(moment) -> int | None:
    return int(moment.timestamp() * 1000) if moment else None


def resolve_uri(uri: str, base_dir: Path) -> str:
    """sqlite:///relative.db and file:relative against base_dir, so that trial workers (whose working directory
    is Ray's) write where the driver means."""
    for scheme in ("sqlite:///", "file:"):
        if uri.startswith(scheme) and not uri.startswith(scheme + "/") and "://" not in uri.removeprefix(scheme):
            return scheme + str((base_dir / uri.removeprefix(scheme)).resolve())
    return uri


class MlflowTracker:
    name = "mlflow"

    def __init__(self, tracking_uri: str, experiment: str):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(experiment,
                                                               artifact_location=self._artifacts_beside_db())
        else:
            self.experiment_id = found.experiment_id
        self.experiment = experiment
        self.study_run_id: str | None = None
        self.logged: dict[str, tuple[str, str]] = {}  # trial id -> (run id, finished_at)

    def _artifacts_beside_db(self) -> str | None:
        """For a sqlite store, artifacts next to the database file rather than in the current directory."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        return None

    def where(self) -> str:
        return f"experiment {self.experiment!r} at {self.uri}"

    def _runs(self, kind: str) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{TAG_PREFIX}kind` = '{kind}'",
                                           max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def start_study(self, study: StudyRecord) -> None:
        existing = self._runs("study")
        if existing:
            self.study_run_id = existing[0].info.run_id
        else:
            tags = {f"{TAG_PREFIX}kind": "study", f"{TAG_PREFIX}study": study.name}
            self.study_run_id = self.client.create_run(self.experiment_id, run_name=study.name, tags=tags).info.run_id
            self.client.set_terminated(self.study_run_id)
        for run in self._runs("trial"):
            tags = run.data.tags
            trial_id, finished = tags.get(f"{TAG_PREFIX}trial_id", ""), tags.get(f"{TAG_PREFIX}finished_at", "")
            self.logged[trial_id] = (run.info.run_id, finished)

    def log_trial(self, trial: TrialRecord) -> str:
        from mlflow.entities import Metric, Param

        outcome = "logged"
        if trial.trial_id in self.logged:
            run_id, finished = self.logged[trial.trial_id]
            if finished == trial.finished_key:
                return "unchanged"
            self.client.delete_run(run_id)
            outcome = "replaced"
        tags = {f"{TAG_PREFIX}{name}": value for name, value in trial.tags.items()}
        tags.update({f"{TAG_PREFIX}kind": "trial", f"{TAG_PREFIX}finished_at": trial.finished_key})
        if self.study_run_id:
            tags["mlflow.parentRunId"] = self.study_run_id
        run_id = self.client.create_run(self.experiment_id, start_time=_ms(trial.started_at), tags=tags,
                                        run_name=trial.run_name).info.run_id
        stamp = _ms(trial.finished_at) or 0
        metrics = [Metric(name, value, stamp, step) for step, values in trial.steps for name, value in values.items()]
        metrics += [Metric(name, value, stamp, trial.last_step) for name, value in trial.final_metrics.items()]
        params = [Param(name, str(value)) for name, value in trial.parameters.items()]
        for start in range(0, max(len(metrics), len(params)), BATCH_METRICS):
            self.client.log_batch(run_id, metrics=metrics[start:start + BATCH_METRICS],
                                  params=params[start:start + BATCH_PARAMS] if start == 0 else [])
        status = "FAILED" if trial.status in FAILED_STATUSES else "FINISHED"
        self.client.set_terminated(run_id, status=status, end_time=_ms(trial.finished_at))
        self.logged[trial.trial_id] = (run_id, trial.finished_key)
        return outcome

    def finish_study(self, study: StudyRecord) -> None:
        from mlflow.entities import Metric, Param

        existing = self.client.get_run(self.study_run_id).data.params
        params = [] if "source" in existing else [Param("source", study.source)]  # a parameter cannot change
        stamp = int(time.time() * 1000)
        metrics = [Metric(f"trials_{status}", float(count), stamp, 0) for status, count in study.statuses.items()]
        metrics.append(Metric("trials", float(study.trials), stamp, 0))
        self.client.log_batch(self.study_run_id, metrics=metrics, params=params)
        if study.artifacts:
            with tempfile.TemporaryDirectory() as folder:
                for name, content in study.artifacts.items():
                    (Path(folder) / name).write_bytes(content)
                self.client.log_artifacts(self.study_run_id, folder)

    def close(self) -> None:
        pass
