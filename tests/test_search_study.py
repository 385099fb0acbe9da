"""Tier 2: the adaptive search, asynchronous, over the simulated backend: alone, and as a study on local Ray."""

import math
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from scaling_lab import results, simulated, spec as spec_lib
from scaling_lab.group import GroupSpec
from scaling_lab.search.async_search import AsyncSearch
from scaling_lab.search.proposals import cell_optimum
from scaling_lab.search.space import SearchSpace, plan_line, read_rows
from scaling_lab.study.__main__ import main as study_cli
from scaling_lab.trial import run_group

SPEC = {
    "name": "adaptive",
    "models": [{"name": "xs", "source": "tiny:xs"}],
    "grid": {"ranks": [1, 4, 16, 64], "alphas": {"min": 1, "max": 65536, "num": 17}, "seeds": [0, 1]},
    "training": {"steps": 20, "eval_every": 5},
    "execution": {"backend": "simulated", "trials_per_group": 8},
    "search": {"method": "adaptive"},
}
GRID_TRIALS = 4 * 17 * 2


def check_optima(results_dir: Path) -> None:
    space = SearchSpace(spec_lib.parse(SPEC))
    (cells,) = space.measured(results.load(results_dir)).values()
    for rank, points in cells.items():
        assert abs(cell_optimum(points) - math.log2(simulated.optimal_alpha(rank))) < 0.1


def test_search_over_the_results_store_without_ray(tmp_path):
    """Driven as the study's queue drives it: poll, run one wanted trial (in a random order), poll again."""
    spec = spec_lib.parse(SPEC)
    store = results.Store(tmp_path)
    notes = []
    search = AsyncSearch(SearchSpace(spec), lambda: read_rows(store), note=notes.append)
    rng = random.Random(0)
    while True:
        wanted, open_shapes = search.poll(results.completed_ids(store))
        if not wanted:
            assert not open_shapes, "nothing runs, so the search must not wait"
            break
        trial = rng.choice(wanted)
        run_group(GroupSpec(trials=(trial.to_dict(),), results_dir=str(tmp_path), cache_dir=str(tmp_path),
                            base_dir=str(tmp_path), backend="simulated", study=spec.name))
    assert len(results.load(tmp_path)) < GRID_TRIALS / 3
    assert any("search done after 3 steps" in note for note in notes), notes
    check_optima(tmp_path)


def test_plan_states_the_grid_count_and_the_adaptive_range():
    line = plan_line(spec_lib.parse(SPEC))
    assert f"the full grid would need {GRID_TRIALS} trials" in line and "expected 40–96 trials" in line
    at_best = plan_line(spec_lib.parse({**SPEC, "search": {"method": "adaptive", "other_seeds": "best_alpha"}}))
    assert "expected 24–96 trials" in at_best and "the others at each cell's best α)" in at_best
    ends = plan_line(spec_lib.parse({**SPEC, "search": {"method": "adaptive", "other_seeds": "best_alpha",
                                                        "other_seed_ranks": "end_ranks"}}))
    assert "expected 22–72 trials" in ends and "best α of the smallest and largest rank" in ends


@pytest.mark.ray
def test_adaptive_study_on_local_ray_run_and_status(tmp_path, monkeypatch, capsys):
    data = {**SPEC, "execution": {**SPEC["execution"], "trials_per_group": 64, "max_concurrent": 1}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))  # for the Ray workers
    assert study_cli(["run", "spec.yaml"]) == 0
    run = capsys.readouterr().out
    results_dir = tmp_path / "results/adaptive"
    frame = results.load(results_dir)
    assert len(SearchSpace(spec_lib.parse(data)).rows(frame)) == len(frame) < GRID_TRIALS / 3
    assert set(frame["status"]) <= {"ok", "diverged"} and frame["trial_id"].is_unique
    assert not list((results_dir / "claims").glob("*.json"))
    assert "search done after 3 steps" in run and "best α per cell" in run
    check_optima(results_dir)

    assert study_cli(["status", "results/adaptive"]) == 0
    status = capsys.readouterr().out
    assert f"{len(frame)}/{len(frame)} done" in status and "adaptive search" in status

    failed = frame["trial_id"].iloc[0]
    row_path = results_dir / results.TRIALS / f"{failed}.parquet"
    row = pq.read_table(row_path)
    pq.write_table(row.set_column(row.schema.get_field_index("status"), "status", pa.array(["error"])), row_path)
    assert study_cli(["run", "spec.yaml", "--retry-failed"]) == 0
    assert "failed trials to run again: 1" in capsys.readouterr().out
    again = results.load(results_dir).set_index("trial_id")
    assert len(again) == len(frame) and again.loc[failed, "status"] == "ok"
    assert (results_dir / results.FAILED).is_dir() and any((results_dir / results.FAILED).iterdir())
