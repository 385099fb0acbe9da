"""A running trial's `should_stop(step, eval_loss)`: the rule of scaling_lab/early_stop.py, fed with the finished
trials of the trial's cell (its identity without α and seed) from the results store.

The study's seeds and metric come from the store's spec.yaml. Finished rows and curves are written once, so they
are cached per process and read incrementally: a group of trials reads each file once.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import yaml

from scaling_lab import results
from scaling_lab.early_stop import should_prune
from scaling_lab.grid import TrialConfig
from scaling_lab.objective import metric_column, point_value, trial_objective
from scaling_lab.spec import StudySpec, build

FULLY_TRAINED = ("ok", "diverged")


@dataclass(frozen=True)
class FinishedTrial:
    trial_id: str
    cell: str
    alpha: float
    seed: int
    status: str
    final_eval_loss: float | None
    final_eval_accuracy: float | None


_finished: dict[str, dict[str, FinishedTrial]] = {}  # results dir → trial id → row
_eval_curves: dict[tuple[str, str], dict[int, float]] = {}  # (results dir, trial id) → step → held-out loss


def cell_key(config: TrialConfig) -> str:
    identity = config.identity()
    identity.pop("alpha")
    identity.pop("seed")
    return json.dumps(identity, sort_keys=True)


def pruning_rule(
    store: results.Store, config: TrialConfig, rank: int, world_size: int
) -> Callable[[int, float], bool] | None:
    """The trial's should_stop, or None when early stopping is off (or the store holds no study spec).
    Worker 0 decides and every worker of the group follows, so that all leave the training loop together."""
    settings = config.training.early_stop
    if not settings.enabled or not store.exists("spec.yaml"):
        return None
    spec = study_spec(store.read_bytes("spec.yaml"))
    cell = cell_key(config)

    def decide(step: int, eval_loss: float) -> bool:
        if step >= config.training.total_steps:
            return False
        trials = [t for t in finished_trials(store) if t.cell == cell]
        same_seed = [t.trial_id for t in trials if t.seed == config.seed]
        seeds = set(spec.grid.seeds) | {t.seed for t in trials}
        return should_prune(config.alpha, step, eval_loss, best_loss_at(store, same_seed, step),
                            finished_points(trials, seeds, spec.metric), settings)

    def should_stop(step: int, eval_loss: float) -> bool:
        decision = [decide(step, eval_loss) if rank == 0 else False]
        if world_size > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(decision, src=0)
        return decision[0]

    return should_stop


@functools.lru_cache(maxsize=8)
def study_spec(text: bytes) -> StudySpec:
    return build(StudySpec, yaml.safe_load(text))


def finished_trials(store: results.Store) -> list[FinishedTrial]:
    known = _finished.setdefault(store.uri, {})
    for name in store.list(results.TRIALS, ".parquet"):
        trial_id = name.removesuffix(".parquet")
        if trial_id not in known:
            row = store.read_table(f"{results.TRIALS}/{name}").to_pylist()[0]
            known[trial_id] = FinishedTrial(
                trial_id=trial_id,
                cell=cell_key(TrialConfig.from_dict(json.loads(row["config"]))),
                alpha=row["alpha"],
                seed=row["seed"],
                status=row["status"],
                final_eval_loss=row.get("final_eval_loss"),
                final_eval_accuracy=row.get("final_eval_accuracy"),
            )
    return list(known.values())


def best_loss_at(store: results.Store, trial_ids: list[str], step: int) -> float | None:
    losses = [curve[step] for curve in (_eval_curve(store, t) for t in trial_ids) if step in curve]
    finite = [loss for loss in losses if math.isfinite(loss)]
    return min(finite) if finite else None


def _eval_curve(store: results.Store, trial_id: str) -> dict[int, float]:
    key = (store.uri, trial_id)
    if key not in _eval_curves:
        curve = results.load_curves(store, [trial_id])
        curve = curve[curve["eval_loss"].notna()]
        _eval_curves[key] = dict(zip(curve["step"].tolist(), curve["eval_loss"].tolist()))
    return _eval_curves[key]


def finished_points(trials: list[FinishedTrial], seeds: set[int], metric: str) -> dict[float, float]:
    """α → seed-mean final metric to minimize (scaling_lab/objective.py: the analysis's rule), for the α values
    whose every seed trained to the end or diverged."""
    column, maximize = metric_column(metric)
    by_alpha: dict[float, dict[int, FinishedTrial]] = {}
    for trial in trials:
        by_alpha.setdefault(trial.alpha, {})[trial.seed] = trial
    return {
        alpha: point_value([trial_objective(t.status, getattr(t, column), maximize) for t in by_seed.values()])
        for alpha, by_seed in by_alpha.items()
        if set(by_seed) == seeds and all(t.status in FULLY_TRAINED for t in by_seed.values())
    }
