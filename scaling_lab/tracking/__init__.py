"""Experiment trackers (MLflow, TensorBoard, Weights & Biases) for a study's results: `python -m scaling_lab.results
export` after a run, or live logging from inside the trials (`tracking:` in a spec). The layout is the same for
both and for every tracker: scaling_lab/tracking/layout.py. The trackers' packages are the `track` extra.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

TRACKERS = ("mlflow", "tensorboard", "wandb")
INSTALL = "pip install 'scaling_lab[track]'"
MODULES = {"mlflow": ("mlflow", "mlflow-skinny sqlalchemy alembic"), "tensorboard": ("tensorboard", "tensorboard"),
           "wandb": ("wandb", "wandb")}


class TrackingError(ValueError):
    """A tracker that cannot be used as asked; the one-line message names the option and what to do."""


def require(tracker: str) -> None:
    module, packages = MODULES[tracker]
    if importlib.util.find_spec(module) is None:
        raise TrackingError(f"{tracker}: the {module} package is not installed: {INSTALL} (or pip install {packages})")


def open_tracker(tracker: str, study: str, *, tracking_uri: str | None = None, logdir: str | None = None,
                 project: str | None = None, wandb_dir: str | None = None, base_dir: Path = Path(".")):
    """A tracker for the study's runs; relative paths are taken against base_dir."""
    require(tracker)
    if tracker == "mlflow":
        from scaling_lab.tracking.mlflow_tracker import MlflowTracker, resolve_uri

        if not tracking_uri:
            raise TrackingError("mlflow: needs a tracking URI (--tracking-uri, or tracking.mlflow_tracking_uri in a "
                                "spec), e.g. sqlite:///mlflow.db or http://127.0.0.1:5000")
        return MlflowTracker(resolve_uri(tracking_uri, base_dir), experiment=study)
    if tracker == "tensorboard":
        from scaling_lab.tracking.tensorboard_tracker import TensorBoardTracker

        if not logdir:
            raise TrackingError("tensorboard: needs a log directory (--logdir, or tracking.tensorboard_logdir in a "
                                "spec)")
        return TensorBoardTracker(base_dir / Path(logdir).expanduser(), study)
    from scaling_lab.tracking.wandb_tracker import WandbTracker

    return WandbTracker(study, project=project, directory=base_dir / Path(wandb_dir or ".").expanduser())
