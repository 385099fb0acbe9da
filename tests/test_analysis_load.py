"""Reading results: hand-made files with the minimal columns work; bad input is one line naming the file."""

import math

import numpy as np
import pandas as pd
import pytest

from scaling_lab.analysis import load_results
from scaling_lab.analysis.planted import planted_trials, power_law
from scaling_lab.results import ResultsError


def test_minimal_hand_made_csv(tmp_path):
    path = tmp_path / "sweep.csv"
    path.write_text("rank,alpha,final_eval_loss\n4,8,1.3\n4,16,1.1\n4,32,1.2\n4,32,1.25\n")
    loaded = load_results(path)
    trials = loaded.trials
    assert list(trials["model"].astype(str).unique()) == ["default"]
    assert (trials["scaling_rule"] == "standard").all() and (trials["status"] == "ok").all()
    assert trials["effective_scale"].tolist() == pytest.approx([2.0, 4.0, 8.0, 8.0])
    # Without a seed column, two trials of the same setting are two replicates.
    assert trials.loc[trials["alpha"] == 32, "seed"].tolist() == [0, 1]
    assert not loaded.maximize


def test_statuses_error_and_oom_are_dropped_and_diverged_kept_as_worst(tmp_path):
    frame = pd.DataFrame(
        {
            "rank": [4] * 6,
            "alpha": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
            "final_eval_accuracy": [0.5, 0.6, np.nan, 0.4, 0.9, 0.2],
            "status": ["ok", "ok", "ok", "diverged", "error", "oom"],
        }
    )
    frame.to_parquet(tmp_path / "r.parquet")
    loaded = load_results(tmp_path / "r.parquet", metric="final_eval_accuracy")
    assert loaded.maximize
    assert loaded.status_counts == {"ok": 3, "diverged": 1, "error": 1, "oom": 1}
    assert loaded.n_dropped == 2 and loaded.nonfinite_ok == 1
    objective = loaded.trials["objective"].tolist()
    assert objective[:2] == [-0.5, -0.6] and math.isinf(objective[2]) and math.isinf(objective[3])


def test_results_directory(tmp_path):
    from scaling_lab import results

    frame = planted_trials(power_law(16.0, 0.5), ranks=(1, 4), alphas=(4.0, 16.0), seeds=1)
    for index, row in enumerate(frame.to_dict("records")):
        results.write_trial(tmp_path, {"trial_id": f"t{index}", **row}, [])
    loaded = load_results(tmp_path)
    assert len(loaded.trials) == 4 and loaded.n_rows == 4
    assert len(load_results(tmp_path.as_uri()).trials) == 4


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "a.csv",
            "rank,alpha\n1,2\n",
            "a.csv: missing column final_eval_loss (required: rank, alpha, final_eval_loss;",
        ),
        ("b.csv", "alpha,loss\n1,2\n", "b.csv: missing columns rank, final_eval_loss"),
        ("c.csv", "", "c.csv: empty file"),
        ("d.parquet", "", "d.parquet: empty file"),
        ("e.parquet", "PAR1 not really parquet", "e.parquet: not a readable Parquet file"),
        ("f.csv", "rank,alpha,final_eval_loss\n", "f.csv: no result rows"),
        ("g.csv", "rank,alpha,final_eval_loss\n1.5,2,1\n", "g.csv: column rank must hold positive integers"),
        ("h.csv", "rank,alpha,final_eval_loss\n1,-2,1\n", "h.csv: column alpha must hold positive finite numbers"),
        ("i.csv", "rank,alpha,final_eval_loss,status\n1,2,1,done\n", "i.csv: column status has ['done']"),
        ("j.csv", "rank,alpha,final_eval_loss,scaling_rule\n1,2,1,pissa\n", "j.csv: column scaling_rule has ['pissa']"),
        ("k.csv", "rank,alpha,final_eval_loss,status\n1,2,1,error\n", "k.csv: no usable trials"),
        ("l.txt", "rank,alpha\n", "l.txt: expected a results directory, a .parquet or a .csv file"),
    ],
)
def test_bad_files_give_one_line_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ResultsError) as error:
        load_results(path)
    assert str(error.value).startswith(f"{path}: ") or str(error.value).startswith(str(path))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_directory_without_results_and_missing_path(tmp_path):
    with pytest.raises(ResultsError, match="no results \\(expected trials/\\*.parquet in it\\)"):
        load_results(tmp_path)
    with pytest.raises(ResultsError, match="no such file or directory"):
        load_results(tmp_path / "absent.parquet")


def test_corrupt_trial_file_in_a_results_directory_is_named(tmp_path):
    (tmp_path / "trials").mkdir()
    (tmp_path / "trials" / "abc.parquet").write_bytes(b"garbage")
    with pytest.raises(ResultsError, match="abc.parquet: not a readable Parquet file"):
        load_results(tmp_path)


def test_varying_nuisance_columns_are_reported(tmp_path):
    frame = pd.DataFrame(
        {"rank": [1, 1], "alpha": [1.0, 2.0], "final_eval_loss": [1.0, 0.9], "lora_init": ["gaussian", "pissa"]}
    )
    frame.to_parquet(tmp_path / "r.parquet")
    (warning,) = load_results(tmp_path / "r.parquet").warnings
    assert warning.startswith("column lora_init has 2 values")


def test_trial_files_that_do_not_fit_the_schema_are_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "trials").mkdir()
    odd = pa.table(
        {"schema_version": pa.array([1], pa.int32()), "rank": [4], "alpha": ["eight"], "final_eval_loss": [1.0]}
    )
    pq.write_table(odd, tmp_path / "trials" / "odd.parquet")
    with pytest.raises(ResultsError) as error:
        load_results(tmp_path)
    assert str(error.value).startswith(str(tmp_path)) and "\n" not in str(error.value)
