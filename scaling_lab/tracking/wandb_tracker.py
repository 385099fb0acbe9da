"""Weights & Biases: a project per study (unless named), a run per trial grouped under the study, a study-level run
holding the analysis as an artifact. Offline (local files under <dir>/wandb, for `wandb sync` later) unless the
user is logged in (WANDB_API_KEY or a netrc entry for the W&B host) or sets WANDB_MODE.

A trial's run id is its trial id and a hash of its `finished_at`: exporting again finds the run and skips it; a
trial run again gets a new id, and its earlier offline run is removed.
"""

from __future__ import annotations

import hashlib
import netrc
import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path

from scaling_lab.tracking.layout import StudyRecord, TrialRecord

DEFAULT_HOST = "https://api.wandb.ai"


def logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL", DEFAULT_HOST)).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


class WandbTracker:
    name = "wandb"

    def __init__(self, study: str, project: str | None = None, directory: str | Path = ".", mode: str | None = None):
        import wandb

        self.wandb = wandb
        self.study = study
        self.project = project or study
        self.directory = Path(directory).expanduser().resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.mode = mode or os.environ.get("WANDB_MODE") or ("online" if logged_in() else "offline")

    def where(self) -> str:
        place = f"{self.directory / 'wandb'} (upload with `wandb sync`)" if self.mode == "offline" else "W&B"
        return f"project {self.project!r}, {self.mode}, {place}"

    def _offline_runs(self, run_id_pattern: str) -> list[Path]:
        return sorted((self.directory / "wandb").glob(f"offline-run-*-{run_id_pattern}"))

    def _exists(self, run_id: str) -> bool:
        if self.mode == "offline":
            return bool(self._offline_runs(run_id))
        try:
            self.wandb.Api().run(f"{self.project}/{run_id}")
            return True
        except (ValueError, self.wandb.errors.CommError):
            return False

    def _init(self, run_id: str, name: str, job_type: str, config: dict, tags: list[str], resume: str | None = None):
        return self.wandb.init(project=self.project, id=run_id, name=name, group=self.study, job_type=job_type,
                               config=config, tags=tags, dir=str(self.directory), mode=self.mode, resume=resume,
                               reinit="create_new", settings=self.wandb.Settings(silent=True, console="off"))

    def start_study(self, study: StudyRecord) -> None:
        pass

    def log_trial(self, trial: TrialRecord) -> str:
        run_id = f"{trial.trial_id}-{_short_hash(trial.finished_key)}"
        if self._exists(run_id):
            return "unchanged"
        earlier = self._offline_runs(f"{trial.trial_id}-*") if self.mode == "offline" else []
        for folder in earlier:
            shutil.rmtree(folder)
        config = {**trial.parameters, "trial_id": trial.trial_id, "study": trial.study}
        tags = [f"status:{trial.status}", f"trial:{trial.trial_id}"]
        run = self._init(run_id, trial.run_name, "trial", config, tags)
        try:
            for step, values in trial.steps:
                run.log(values, step=step)
            run.summary.update({**trial.final_metrics, **{f"tag/{k}": v for k, v in trial.tags.items()},
                                "finished_at": trial.finished_key})
        finally:
            run.finish(exit_code=1 if trial.status in ("error", "oom") else 0)
        return "replaced" if earlier else "logged"

    def finish_study(self, study: StudyRecord) -> None:
        run_id = f"study-{_short_hash(study.name)}"
        for folder in self._offline_runs(run_id) if self.mode == "offline" else []:
            shutil.rmtree(folder)  # the study run is rewritten whole: its counts and artifacts change
        run = self._init(run_id, f"{study.name} (study)", "study", {"source": study.source}, ["study"],
                         resume=None if self.mode == "offline" else "allow")
        with tempfile.TemporaryDirectory() as folder:  # kept until the run has finished with the files
            try:
                run.summary.update({"trials": study.trials, **{f"trials_{k}": v for k, v in study.statuses.items()}})
                if study.artifacts:
                    for name, content in study.artifacts.items():
                        (Path(folder) / name).write_bytes(content)
                    artifact = self.wandb.Artifact(f"{study.name}-analysis", type="analysis")
                    artifact.add_dir(folder)
                    run.log_artifact(artifact)
            finally:
                run.finish()

    def close(self) -> None:
        pass
