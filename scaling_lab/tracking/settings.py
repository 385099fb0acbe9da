"""The spec's `tracking:` section: live logging of each trial to experiment trackers as it finishes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from scaling_lab.spec_base import SpecError


@dataclass(frozen=True)
class TrackingSettings:
    """Off by default. Paths and sqlite:/// URIs are taken against the directory `run` starts in; on a cluster
    they must be places every node reaches (an MLflow server, a shared filesystem)."""

    to: tuple[Literal["mlflow", "tensorboard", "wandb"], ...] = ()
    mlflow_tracking_uri: str | None = None
    tensorboard_logdir: str | None = None
    wandb_project: str | None = None  # default: the study's name
    wandb_dir: str | None = None  # where offline runs go (<wandb_dir>/wandb); default: the directory `run` starts in

    def check(self, path: str) -> None:
        if len(set(self.to)) != len(self.to):
            raise SpecError(f"{path}.to: expected distinct trackers, got {list(self.to)!r}")
        if "mlflow" in self.to and not self.mlflow_tracking_uri:
            raise SpecError(f"{path}.mlflow_tracking_uri: expected a tracking URI for `to: [mlflow]`, e.g. "
                            f"sqlite:////shared/mlflow.db or http://mlflow.internal:5000")
        if "tensorboard" in self.to and not self.tensorboard_logdir:
            raise SpecError(f"{path}.tensorboard_logdir: expected a directory for `to: [tensorboard]`")
