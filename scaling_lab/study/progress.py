"""What a study has done: live progress while it runs, `status` from any process, and the closing summary."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pandas as pd

from scaling_lab import results
from scaling_lab.objective import metric_column


@dataclass(frozen=True)
class Snapshot:
    total: int
    by_status: dict[str, int]
    running: int

    @property
    def done(self) -> int:
        return sum(self.by_status.values())

    @property
    def failed(self) -> int:
        return self.by_status.get("error", 0) + self.by_status.get("oom", 0)

    def line(self) -> str:
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(self.by_status.items()))
        return (
            f"{self.done}/{self.total} done ({statuses or 'none yet'}), {self.running} running, "
            f"{self.total - self.done} left"
        )


def snapshot(results_dir: str, trial_ids: list[str], statuses: dict[str, str] | None = None) -> Snapshot:
    """Counts of the study's trials by status; `statuses` (trial id → status) saves reading every row."""
    if statuses is None:
        rows = results.read_trials(results_dir).select(["trial_id", "status"]).to_pylist()
        statuses = {row["trial_id"]: row["status"] for row in rows}
    wanted = set(trial_ids)
    by_status = dict(Counter(status for trial_id, status in statuses.items() if trial_id in wanted))
    claimed = (name.removesuffix(".json") for name in results.Store(results_dir).list(results.CLAIMS, ".json"))
    running = sum(1 for t in claimed if t in wanted and t not in statuses)
    return Snapshot(total=len(wanted), by_status=by_status, running=running)


class RowStatuses:
    """Each finished trial's status, read once from its row, since a row is written once: polling a study
    of many trials then costs a directory listing, not a read of every row (which took seconds of CPU)."""

    def __init__(self, results_dir: str):
        self.store = results.Store(results_dir)
        self.by_name: dict[str, str] = {}

    def current(self) -> dict[str, str]:
        names = set(self.store.list(results.TRIALS, ".parquet"))
        self.by_name = {name: status for name, status in self.by_name.items() if name in names}
        for name in names - self.by_name.keys():
            self.by_name[name] = self.store.read_table(f"{results.TRIALS}/{name}").column("status")[0].as_py()
        return {name.removesuffix(".parquet"): status for name, status in self.by_name.items()}


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class LiveProgress:
    """Prints a progress line whenever the results directory changes, with time left at the current rate."""

    def __init__(self, results_dir: str, trial_ids: list[str], slots: int, every_s: float = 5.0):
        self.results_dir, self.trial_ids, self.slots, self.every_s = results_dir, trial_ids, slots, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._started = time.monotonic()
        self._done_at_start = 0
        self._last = ""
        self._statuses = RowStatuses(results_dir)

    def note(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def _report(self) -> None:
        snap = snapshot(self.results_dir, self.trial_ids, self._statuses.current())
        elapsed = time.monotonic() - self._started
        finished_now = snap.done - self._done_at_start
        left = snap.total - snap.done
        eta = f", about {_duration(left * elapsed / finished_now)} to go" if finished_now and left else ""
        line = snap.line() + eta
        if snap.line() != self._last:
            self._last = snap.line()
            self.note(line)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._report()

    def __enter__(self) -> LiveProgress:
        self._done_at_start = snapshot(self.results_dir, self.trial_ids, self._statuses.current()).done
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._report()
        self.note(f"finished in {_duration(time.monotonic() - self._started)}")


def failures(results_dir: str) -> pd.DataFrame:
    frame = results.load(results_dir)
    failed = frame[frame["status"].isin(["error", "oom"])]
    return failed[["trial_id", "model", "rank", "alpha", "learning_rate", "seed", "status", "error"]]


def summary(results_dir: str, trial_ids: list[str], metric: str = "eval_loss") -> str:
    """One screen: counts by status, the best α per (model, rank) by the study's metric (its final value; higher
    is better for accuracy), throughput."""
    snap = snapshot(results_dir, trial_ids)
    frame = results.load(results_dir)
    frame = frame[frame["trial_id"].isin(set(trial_ids))]
    lines = [f"study results in {results_dir}", snap.line()]
    ok = frame[frame["status"] == "ok"]
    if not ok.empty:
        column, maximize = metric_column(metric)
        mean_loss = ok.groupby(["model", "scaling_rule", "learning_rate", "rank", "alpha"])[column].mean()
        cells = mean_loss.groupby(level=["model", "scaling_rule", "learning_rate", "rank"])
        best = cells.idxmax() if maximize else cells.idxmin()
        alphas = sorted(frame["alpha"].unique())
        what = "final held-out accuracy, higher is better" if maximize else "final held-out loss"
        lines.append(f"best α per cell (seed-averaged {what}; * = at the edge of the α grid):")
        for key, index in best.items():
            alpha = index[-1]
            edge = "*" if alpha in (alphas[0], alphas[-1]) else " "
            model, rule, lr, rank = key
            lines.append(
                f"  {model:>12} {rule:>8} lr={lr:<8.3g} r={rank:<5} α*={alpha:<10.4g}{edge} "
                f"{metric.removeprefix('eval_')}={mean_loss[index]:.4f}"
            )
        throughput = ok["tokens_per_s"].dropna()
        lines.append(
            f"trial time: {ok['wall_time_s'].sum():.0f} s in all, median {ok['wall_time_s'].median():.2f} s"
            + (f"; median {throughput.median():.0f} tokens/s" if len(throughput) else "")
        )
    for _, row in failures(results_dir).head(5).iterrows():
        first_line = (row["error"] or "").splitlines()[0] if row["error"] else ""
        lines.append(f"  failed {row['trial_id']} r={row['rank']} α={row['alpha']:.4g}: {first_line[:120]}")
    lines.append(f"next: python -m scaling_lab.analysis fit {results_dir}")
    return "\n".join(lines)


def claims(results_dir: str) -> list[dict]:
    store = results.Store(results_dir)
    found = []
    for name in store.list(results.CLAIMS, ".json"):
        try:
            held = json.loads(store.read_bytes(f"{results.CLAIMS}/{name}"))
            found.append({"trial_id": name.removesuffix(".json"), **held})
        except (OSError, ValueError):
            continue
    return found
