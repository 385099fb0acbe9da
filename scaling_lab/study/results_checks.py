"""What the driver checks in a results directory before and while it runs: that it may add to it, what changed
since the last run there, failed rows to run again, and a full disk named as such."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os

import yaml

from scaling_lab import results, spec as spec_lib
from scaling_lab.grid import TrialConfig, expand
from scaling_lab.search.space import study_trial_ids
from scaling_lab.spec import StudySpec, to_dict
from scaling_lab.study.tune_wiring import GroupsFailed


def pending_trials(spec: StudySpec, results_dir: str) -> tuple[list[TrialConfig], list[TrialConfig]]:
    trials = expand(spec)
    done = results.completed_ids(results_dir)
    return trials, [t for t in trials if t.trial_id not in done]


def changed_fields(old, new, path: str = "") -> list[str]:
    """Dotted paths of the fields that differ between two plain spec mappings."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [path]
    return [changed for key in sorted(set(old) | set(new), key=str)
            for changed in changed_fields(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))]


def check_results_dir(spec: StudySpec, store: results.Store) -> list[str]:
    """Refuse, before any compute, a results directory this study must not add to: another study's, or one
    holding rows that cannot be read (corrupt, or another results schema). Returns the spec fields changed
    since the last run there."""
    changed = []
    if store.exists("spec.yaml"):
        try:
            previous = yaml.safe_load(store.read_bytes("spec.yaml"))
        except yaml.YAMLError:
            previous = None
        if not isinstance(previous, dict):
            raise results.ResultsError(f"{store.path('spec.yaml')}: not a study spec; move it away or choose "
                                       f"another output_dir")
        with contextlib.suppress(spec_lib.SpecError):  # with today's defaults, so that new settings read as unchanged
            previous = to_dict(spec_lib.build(StudySpec, previous))
        if previous.get("name") != spec.name:
            raise results.ResultsError(f"{store}: holds the results of study {previous.get('name')!r}, not "
                                       f"{spec.name!r}; choose another output_dir")
        changed = changed_fields(previous, to_dict(spec))
    try:
        results.read_trials(store)
    except results.ResultsError as exc:
        raise results.ResultsError(f"{exc}; nothing was run: move or delete that file (its trial then runs again) "
                                   f"or choose another output_dir") from None
    return changed


def set_aside_failures(spec: StudySpec, results_dir: str) -> list[str]:
    """Move the rows of the study's failed trials (error, oom) to failed/, so that they run again."""
    store = results.Store(results_dir)
    wanted = set(study_trial_ids(spec, results_dir))
    rows = results.read_trials(store).select(["trial_id", "status"]).to_pylist()
    failed = [r["trial_id"] for r in rows if r["status"] in ("error", "oom") and r["trial_id"] in wanted]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    for trial_id in failed:
        results.set_aside_failed(store, trial_id, stamp)
    return failed


def _write_problem(store: results.Store, failure: BaseException) -> str | None:
    """Why the results directory has no room to work in (a full disk, say), or None if it has."""
    chain = []
    while failure is not None and len(chain) < 20:
        chain.append(str(failure))
        failure = failure.__cause__ or failure.__context__
    if any(os.strerror(errno.ENOSPC) in text for text in chain):
        return f"{store}: cannot write ({os.strerror(errno.ENOSPC)})"
    try:
        store.write(".write-probe", bytes(2**20))  # a MiB: a few freed blocks are not room to work in
    except results.ResultsError as exc:
        return str(exc)
    store.delete(".write-probe")
    return None


@contextlib.contextmanager
def full_disk_named(store: results.Store):
    """Ray fails in obscure ways (an EOFError while unpickling, a failed group) once the results disk is full:
    any failure while the results directory cannot be written becomes one line that names the cause."""
    try:
        yield
    except Exception as exc:
        if problem := _write_problem(store, exc):
            raise GroupsFailed(f"{problem}; the study stopped: run it again once there is room") from None
        raise
