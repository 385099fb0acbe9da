"""Tier 2: a study across a simulated multi-node cluster whose nodes carry custom resources standing in for GPU
types; each trial lands on a node with the type its model requires, all rows reach one results directory, and
`status` follows the study from another process while it runs."""

import re
import subprocess
import sys

import pytest
import yaml

from scaling_lab import results, spec as spec_lib
from scaling_lab.grid import expand
from simulated_cluster import ROOT, simulated_cluster, study, wait_until

pytestmark = pytest.mark.ray

GPU_TYPES = {"small": "gpu_type_a10g", "large": "gpu_type_a100"}
SPEC = {
    "name": "multinode",
    "models": [
        {"name": name, "source": "tiny:xs", "resources": {"custom": {gpu_type: 1}}}
        for name, gpu_type in GPU_TYPES.items()
    ],
    "grid": {"ranks": [1, 4], "alphas": [4, 64, 1024]},
    "training": {"steps": 10, "eval_every": 5},
    "execution": {"backend": "simulated", "trials_per_group": 3, "simulated_step_time_s": 0.1},
}


def test_a_study_runs_across_nodes_by_resource_and_reports_progress_while_it_runs(tmp_path):
    head = {"num_cpus": 1}
    nodes = [{"num_cpus": 1, "resources": {gpu_type: 1}} for gpu_type in GPU_TYPES.values()]
    output = tmp_path / "results"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({**SPEC, "output_dir": str(output)}))
    trial_ids = {t.trial_id for t in expand(spec_lib.parse(SPEC))}

    with simulated_cluster(head, nodes) as (cluster, workers):
        node_of_type = {gpu_type: node.node_id for node, gpu_type in zip(workers, GPU_TYPES.values())}
        driver = subprocess.Popen(
            [sys.executable, "-m", "scaling_lab.study", "run", "spec.yaml", "--address", cluster.address],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            def progress_midway():
                line = study("status", str(output), cwd=tmp_path).stdout if output.exists() else ""
                found = re.search(r"(\d+)/(\d+) done.*?(\d+) running", line)
                midway = found and (int(found[3]) > 0 or 0 < int(found[1]) < int(found[2]))
                return line if midway else None

            assert wait_until(progress_midway, timeout_s=60), "no progress seen while the study ran"
            log, _ = driver.communicate(timeout=180)
        finally:
            driver.kill()
        assert driver.returncode == 0, log[-3000:]

    frame = results.load(output)
    assert set(frame["trial_id"]) == trial_ids and frame["trial_id"].is_unique
    for model, gpu_type in GPU_TYPES.items():
        assert set(frame.loc[frame["model"] == model, "node"]) == {node_of_type[gpu_type]}, model
    final = study("status", str(output), cwd=ROOT)
    assert final.returncode == 0 and f"{len(trial_ids)}/{len(trial_ids)} done" in final.stdout
