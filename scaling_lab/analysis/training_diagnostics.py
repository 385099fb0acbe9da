"""Training diagnostics against α: per-trial summaries of the curve table's diagnostics, then means over seeds.

The definitions are scaling_lab/diagnostics.py's (ours; the LoRA-α paper's are not public): signal = the
first-order predicted decrease of a fixed probe batch's loss from one step's update; drift = how much the actual
change exceeds that prediction; drift ratio = drift / signal; update norm = ‖s·B·A‖_F over the adapted layers;
spectral ratio = σ₁(s·B·A) / σ₁(W) per adapted layer at the end of a trial (the trial row holds the mean over
layers). Each trial is summarised over its diagnostic steps after step 1 (at step 1 B is still zero, and the
norms are taken before the step's update):
- the trial's value: signal and update norm averaged over those steps; the drift ratio as their summed drift
  over their summed signal (a mean of per-step ratios explodes at any step whose signal is near zero);
- the early value: the same at the first of those steps.
Non-finite steps (a diverging trial's last ones) are left out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from scaling_lab import results

CURVE_COLUMNS = ("trial_id", "step", "signal", "drift", "update_norm")
QUANTITIES = ("drift_ratio", "signal", "update_norm")
SPECTRAL_RATIO = "spectral_ratio_mean"
EARLY = "_early"


def read_trial_diagnostics(store: results.Store, trial_ids: pd.Series) -> pd.DataFrame | None:
    """Per-trial summaries indexed by trial id (columns QUANTITIES and their _early values), reading only the
    diagnostic columns of these trials' curves; None when no curve holds diagnostics."""
    on_disk = {name.removesuffix(".parquet") for name in store.list(results.CURVES, ".parquet")}
    paths = [store.path(f"{results.CURVES}/{t}.parquet") for t in trial_ids.unique() if t in on_disk]
    if not paths:
        return None
    schema = pa.schema([results.CURVE_SCHEMA.field(name) for name in CURVE_COLUMNS])
    # An explicit schema reads curves written before the diagnostics columns existed as nulls.
    dataset = ds.dataset(paths, schema=schema, format="parquet", filesystem=store.fs)
    table = dataset.to_table(filter=(pc.field("step") > 1) & pc.field("signal").is_valid())
    frame = table.to_pandas()
    values = frame[["signal", "drift", "update_norm"]].to_numpy()
    frame = frame[np.isfinite(values).all(axis=1)].sort_values(["trial_id", "step"])
    if frame.empty:
        return None
    per_trial = frame.groupby("trial_id", sort=False)
    sums = per_trial[["drift", "signal"]].sum()
    first = per_trial.head(1).set_index("trial_id")
    return pd.DataFrame(
        {
            "drift_ratio": sums["drift"] / sums["signal"],
            "signal": per_trial["signal"].mean(),
            "update_norm": per_trial["update_norm"].mean(),
            "drift_ratio" + EARLY: first["drift"] / first["signal"],
            "signal" + EARLY: first["signal"],
            "update_norm" + EARLY: first["update_norm"],
        }
    )


def has_diagnostics(trials: pd.DataFrame) -> bool:
    return all(name in trials for name in QUANTITIES)


def diagnostics_by_alpha(trials: pd.DataFrame) -> pd.DataFrame:
    """Means over seeds per (model, learning rate, rank, α) of each diagnostic and its early value, with the
    spectral ratio where the trial rows hold it; trials need model, learning_rate, rank, alpha, status."""
    columns = [*QUANTITIES, *(q + EARLY for q in QUANTITIES)]
    if SPECTRAL_RATIO in trials:
        columns.append(SPECTRAL_RATIO)
    work = trials[["model", "learning_rate", "rank", "alpha", *columns]].copy()
    work[columns] = work[columns].astype(float).where(np.isfinite(work[columns].astype(float)))
    work["log_alpha"] = np.round(np.log(work["alpha"].to_numpy(dtype=float)), 9)
    work["diverged"] = (trials["status"] == "diverged").to_numpy()
    keys = ["model", "learning_rate", "rank", "log_alpha"]
    grouped = work.groupby(keys, dropna=False, observed=True, sort=True)
    table = grouped[columns].mean()
    table["alpha"] = grouped["alpha"].first()
    table["n_trials"] = grouped.size()
    table["n_diverged"] = grouped["diverged"].sum()
    return table.reset_index().drop(columns="log_alpha")
