"""Tier 1: loading and validating study specs."""

from pathlib import Path

import pytest
import yaml

from scaling_lab import spec as spec_lib
from scaling_lab.spec import SpecError

MINIMAL = {
    "name": "t",
    "models": [{"name": "xs", "source": "tiny:xs"}],
    "grid": {"ranks": [1, 4], "alphas": [1, 8, 64]},
}


def with_change(path: str, value):
    return spec_lib.apply_overrides(MINIMAL, [f"{path}={yaml.safe_dump(value, default_flow_style=True).strip()}"])


def test_minimal_spec_gets_defaults():
    spec = spec_lib.parse(MINIMAL)
    assert spec.grid.ranks == (1, 4)
    assert spec.grid.alpha_values() == (1.0, 8.0, 64.0)
    assert spec.training.total_steps == 80
    assert spec.results_dir(Path("/base")) == "/base/results/t"
    assert spec_lib.parse({**MINIMAL, "output_dir": "s3://bucket/x"}).results_dir() == "s3://bucket/x"


def test_round_trip_through_yaml():
    spec = spec_lib.parse(with_change("grid.alphas", {"min": 1, "max": 1024, "num": 6}))
    assert spec_lib.parse(yaml.safe_load(spec_lib.dump(spec))) == spec


def test_alpha_range_is_log_spaced_and_inclusive():
    spec = spec_lib.parse(with_change("grid.alphas", {"min": 1, "max": 1024, "num": 6}))
    assert spec.grid.alpha_values() == (1.0, 4.0, 16.0, 64.0, 256.0, 1024.0)


def test_token_budget_becomes_steps():
    spec = spec_lib.parse(spec_lib.apply_overrides(MINIMAL, ["training={tokens: 10000, batch_size: 8, seq_len: 32}"]))
    assert spec.training.total_steps == 40


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("grid.rnks", [1], "grid.rnks: unknown key (did you mean 'ranks'?)"),
        ("grid.ranks", [4, -1], "grid.ranks[1]: expected a positive integer, got -1"),
        ("grid.ranks", [], "grid.ranks: expected a non-empty list"),
        ("grid.alphas", [1, 0, 4], "grid.alphas[1]: expected a finite number > 0, got 0.0"),
        ("grid.scaling_rules", ["sqrt"], "grid.scaling_rules[0]: expected one of 'standard', 'rslora', 'fixed'"),
        ("grid.ranks", "four", "grid.ranks: expected a list, got 'four'"),
        ("grid.learning_rates", [0.001, 0.001], "grid.learning_rates: expected distinct values"),
        ("data.source", "missing.jsonl", "data.source: data file 'missing.jsonl' does not exist"),
        ("models.0.source", "./no/such/model", "models[0].source:"),
        ("models.0.source", "tiny:huge", "models[0].source:"),
        ("training.steps", 0, "training.steps: expected an integer >= 1, got 0"),
        ("training", {"steps": 5, "micro_batch_size": 0},
         "training.micro_batch_size: expected an integer >= 1 or null, got 0"),
        ("training", {"steps": 5, "micro_batch_size": 3},
         "training.micro_batch_size: expected a divisor of batch_size / workers = 32"),
        ("execution.resources.workers", 3, "training.batch_size: expected a multiple of the 3 workers of "
                                           "execution.resources, got 32"),
        ("models.0.revision", "v1", "models[0].revision: expected null unless the source is a hub id"),
        ("data.revision", "v1", "data.revision: expected null unless source is hf:<dataset id>"),
        ("deepspeed.config", {"bf16": {"enabled": True}},
         "deepspeed.config.bf16: expected it left out (the spec sets it from deepspeed.precision)"),
        ("deepspeed.config", {"zero_optimization": {"stage": 2}},
         "deepspeed.config.zero_optimization.stage: expected it left out (the spec sets it from deepspeed.zero_stage)"),
        ("deepspeed.zero_stage", 5, "deepspeed.zero_stage: expected one of 0, 1, 2, 3, got 5"),
        ("deepspeed.precision", "fp16",
         "deepspeed.precision: expected bf16 or fp32 for CPU workers (execution.resources.gpus_per_worker is 0; "
         "fp16 runs on GPUs only), got 'fp16'"),
        ("lora.dropout", 1.5, "lora.dropout: expected a number in [0, 1), got 1.5"),
        ("metric", "perplexity", "metric: expected one of 'eval_loss', 'eval_accuracy'"),
    ],
)
def test_bad_values_name_the_field(path, value, message):
    with pytest.raises(SpecError) as info:
        spec_lib.parse(with_change(path, value))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_fp16_is_for_gpu_workers_only():
    gpu_workers = spec_lib.apply_overrides(MINIMAL, ["deepspeed.precision=fp16",
                                                     "execution.resources={workers: 1, gpus_per_worker: 1}"])
    assert spec_lib.parse(gpu_workers).deepspeed.precision == "fp16"
    cpu_model = {**gpu_workers, "models": [{**gpu_workers["models"][0], "resources": {"workers": 1}}]}
    with pytest.raises(SpecError, match=r"models\[0\]\.resources\.gpus_per_worker is 0"):
        spec_lib.parse(cpu_model)


def test_missing_required_key():
    with pytest.raises(SpecError, match="grid: required key is missing"):
        spec_lib.parse({"name": "t", "models": MINIMAL["models"]})


def test_both_steps_and_tokens_rejected():
    with pytest.raises(SpecError, match="exactly one of steps or tokens"):
        spec_lib.parse(spec_lib.apply_overrides(MINIMAL, ["training={steps: 5, tokens: 100}"]))


def test_file_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match=r"broken.yaml: not valid YAML at line"):
        spec_lib.load(broken)
    with pytest.raises(SpecError, match="nothere.yaml: spec file does not exist"):
        spec_lib.load(tmp_path / "nothere.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        spec_lib.load(hostile)


def test_overrides_reach_list_items_and_nested_keys():
    data = spec_lib.apply_overrides(MINIMAL, ["models.0.source=tiny:s", "training.steps=5"])
    assert data["models"][0]["source"] == "tiny:s"
    assert data["training"] == {"steps": 5}
    with pytest.raises(SpecError, match="expected key.path=value"):
        spec_lib.apply_overrides(MINIMAL, ["training.steps"])


def test_a_dataset_revision_is_for_hub_datasets_and_ids_without_it_are_unchanged():
    from scaling_lab.grid import expand

    hub = {"source": "hf:org/name", "text_column": "text"}
    pinned = spec_lib.parse({**MINIMAL, "data": {**hub, "revision": "v1.0"}})
    unpinned = spec_lib.parse({**MINIMAL, "data": hub})
    assert pinned.data.revision == "v1.0" and "revision" not in expand(unpinned)[0].identity()["data"]
    assert expand(pinned)[0].trial_id != expand(unpinned)[0].trial_id
    with pytest.raises(SpecError, match=r"^data.revision: expected null unless source is hf:<dataset id>"):
        spec_lib.parse({**MINIMAL, "data": {"revision": "v1.0"}})


def test_names_of_the_split_sections_are_importable_from_spec():
    from scaling_lab import spec_axes, spec_base, spec_data, spec_training

    for name in spec_lib.__all__:
        assert hasattr(spec_lib, name), name
    assert spec_lib.SpecError is spec_base.SpecError and spec_lib.build is spec_base.build
    assert (spec_lib.ModelSpec, spec_lib.DataSpec, spec_lib.TrainingSettings) == (
        spec_axes.ModelSpec, spec_data.DataSpec, spec_training.TrainingSettings)


def test_a_model_source_is_checked_with_the_spec():
    with pytest.raises(SpecError, match=r"models\[0\].source: unknown tiny model size 'huge'"):
        spec_lib.parse(with_change("models.0.source", "tiny:huge"))
    with pytest.raises(SpecError, match=r"models\[0\].revision: expected null unless the source is a hub id"):
        spec_lib.parse(with_change("models.0.revision", "main"))
    assert spec_lib.parse(with_change("models.0", {"name": "h", "source": "org/name", "revision": "v1"}))


def test_injected_faults_are_built_checked_and_round_trip():
    faults = {"backend": "simulated", "inject_faults": [{"kind": "crash", "ranks": [1], "at_step": 3}]}
    spec = spec_lib.parse(with_change("execution", faults))
    assert spec.execution.inject_faults == (spec_lib.FaultInjection(kind="crash", at_step=3, ranks=(1,)),)
    assert spec_lib.parse(yaml.safe_load(spec_lib.dump(spec))) == spec
    with pytest.raises(SpecError, match=r"execution.inject_faults\[0\].at_step: expected an integer >= 1, got 0"):
        spec_lib.parse(with_change("execution", {**faults, "inject_faults": [{"kind": "nan", "at_step": 0}]}))
