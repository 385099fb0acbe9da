"""Tier 2: a study whose results live in an S3 bucket (a moto server on 127.0.0.1): run, status and load by URI."""

import pytest
import yaml

from scaling_lab import results
from simulated_cluster import free_port, study

moto_server = pytest.importorskip("moto.server", reason="moto[server] (the dev extra) runs the local S3 server")
pytestmark = pytest.mark.ray

# Credentials reach every process through the environment only; this one must never be written anywhere.
SECRET_KEY = "scaling-lab-test-secret-key-0123456789"


@pytest.fixture
def bucket(monkeypatch):
    import pyarrow.fs as pafs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "scaling-lab-test-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                           allow_bucket_creation=True)
    fs.create_dir("lab")
    yield fs, f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    server.stop()


def test_a_study_writes_and_reads_its_results_at_an_s3_uri(tmp_path, bucket):
    import pyarrow.fs as pafs

    fs, query = bucket
    uri = f"s3://lab/studies/sim?{query}"
    spec = {
        "name": "sim",
        "models": [{"name": "xs", "source": "tiny:xs"}],
        "grid": {"ranks": [1, 4], "alphas": [4, 64, 1024]},
        "training": {"steps": 10, "eval_every": 5},
        "output_dir": uri,
        "execution": {"backend": "simulated", "trials_per_group": 3},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    done = study("run", "spec.yaml", "--address", "local", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "results").exists()

    status = study("status", uri, cwd=tmp_path)
    assert status.returncode == 0 and "6/6 done" in status.stdout, status.stderr
    frame = results.load(uri)
    assert len(frame) == 6 and frame["trial_id"].is_unique and frame["status"].isin(["ok", "diverged"]).all()
    assert set(results.load_curves(uri)["trial_id"]) == set(frame["trial_id"])

    objects = [info.path for info in fs.get_file_info(pafs.FileSelector("lab", recursive=True))
               if info.type == pafs.FileType.File]
    names = {path.removeprefix("lab/studies/sim/") for path in objects}
    assert {f"trials/{t}.parquet" for t in frame["trial_id"]} <= names and "spec.yaml" in names
    assert any(name.startswith("ray/") for name in names), "Ray Tune's files go to the same bucket and endpoint"
    assert not [name for name in names if name.endswith(".tmp")]
    for path in objects:
        with fs.open_input_stream(path) as stream:
            assert SECRET_KEY.encode() not in stream.read(), path
