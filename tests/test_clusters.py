"""The shipped cluster files pass Ray's own validation (KubeRay's required structure for manifests), offline,
keep the dashboard private, hold no credentials, and agree with the pinned versions and install order."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from scaling_lab.clusters import ClusterConfigError, effective_launcher_config, validate_cluster_file

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTERS_DIR = REPO_ROOT / "clusters"
GPU_FILE = CLUSTERS_DIR / "gpu.yaml"
LOCAL_FILE = CLUSTERS_DIR / "local.yaml"
RAY_CLUSTER_FILE = CLUSTERS_DIR / "kuberay" / "raycluster.yaml"
RAY_JOB_FILE = CLUSTERS_DIR / "kuberay" / "rayjob.yaml"
DOCKERFILE = CLUSTERS_DIR / "Dockerfile"
LAUNCHER_FILES = [GPU_FILE, LOCAL_FILE]
CLUSTER_FILES = sorted(CLUSTERS_DIR.rglob("*.yaml"))
CREDENTIAL_PATTERNS = [
    r"aws_access_key_id",
    r"aws_secret_access_key",
    r"aws_session_token",
    r"aws_credentials",
    r"gcp_credentials",
    r"AKIA[0-9A-Z]{16}",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
]


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _write(tmp_path: Path, name: str, document: dict[str, Any]) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def test_the_expected_cluster_files_are_shipped() -> None:
    assert set(CLUSTER_FILES) == {GPU_FILE, LOCAL_FILE, RAY_CLUSTER_FILE, RAY_JOB_FILE}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_relative)
def test_every_cluster_file_validates(path: Path) -> None:
    validate_cluster_file(path)


def test_validation_never_touches_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("cluster validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for path in CLUSTER_FILES:
        validate_cluster_file(path)


def _rename_key(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


@pytest.mark.parametrize(
    ("mistype", "expected"),
    [
        (
            lambda config: _rename_key(config["available_node_types"]["gpu_1x_a10g"], "max_workers", "max_worker"),
            "Additional properties are not allowed ('max_worker' was unexpected) at available_node_types.gpu_1x_a10g",
        ),
        (
            lambda config: _rename_key(config, "idle_timeout_minutes", "idle_timeout_minute"),
            "Additional properties are not allowed ('idle_timeout_minute' was unexpected)",
        ),
        (
            lambda config: _rename_key(config["provider"]["security_group"], "IpPermissions", "IpPermission"),
            "Additional properties are not allowed ('IpPermission' was unexpected) at provider.security_group",
        ),
        (
            lambda config: config["available_node_types"]["gpu_8x_a100"].update(resources={"gpu_type_a100": "8"}),
            "'8' is not of type 'integer' at available_node_types.gpu_8x_a100.resources.gpu_type_a100",
        ),
    ],
    ids=["node-type-field", "top-level-field", "provider-field", "resource-type"],
)
def test_a_mistyped_launcher_field_is_rejected_with_a_message_naming_it(
    tmp_path: Path, mistype: Callable[[dict[str, Any]], None], expected: str
) -> None:
    config = _load(GPU_FILE)
    mistype(config)
    bad_file = _write(tmp_path, "gpu.yaml", config)
    with pytest.raises(ClusterConfigError) as error:
        validate_cluster_file(bad_file)
    assert str(error.value) == f"{bad_file}: {expected}"


def _delete(document: dict[str, Any], dotted_path: str) -> None:
    *parents, last = dotted_path.split(".")
    node: Any = document
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    del node[last]


@pytest.mark.parametrize(
    ("path", "deleted_field"),
    [
        (RAY_CLUSTER_FILE, "spec.headGroupSpec.rayStartParams"),
        (RAY_CLUSTER_FILE, "spec.headGroupSpec.template.spec.containers"),
        (RAY_CLUSTER_FILE, "spec.workerGroupSpecs.0.maxReplicas"),
        (RAY_CLUSTER_FILE, "spec.workerGroupSpecs.0.groupName"),
        (RAY_JOB_FILE, "spec.entrypoint"),
        (RAY_JOB_FILE, "spec.rayClusterSpec.workerGroupSpecs.0.template"),
    ],
    ids=lambda value: value if isinstance(value, str) else value.name,
)
def test_a_kuberay_manifest_missing_a_required_field_is_rejected(
    tmp_path: Path, path: Path, deleted_field: str
) -> None:
    manifest = _load(path)
    _delete(manifest, deleted_field)
    bad_file = _write(tmp_path, path.name, manifest)
    expected_field = re.sub(r"\.(\d+)", r"[\1]", deleted_field)
    with pytest.raises(ClusterConfigError) as error:
        validate_cluster_file(bad_file)
    assert str(error.value) == f"{bad_file}: missing required field {expected_field}"


def test_a_rayjob_needs_a_cluster_to_run_on(tmp_path: Path) -> None:
    manifest = _load(RAY_JOB_FILE)
    del manifest["spec"]["rayClusterSpec"]
    with pytest.raises(ClusterConfigError, match=r"spec\.rayClusterSpec or spec\.clusterSelector"):
        validate_cluster_file(_write(tmp_path, "rayjob.yaml", manifest))
    manifest["spec"]["clusterSelector"] = {"ray.io/cluster": "scaling-lab"}
    validate_cluster_file(_write(tmp_path, "rayjob.yaml", manifest))


def test_a_manifest_for_another_api_version_is_rejected(tmp_path: Path) -> None:
    manifest = _load(RAY_CLUSTER_FILE) | {"apiVersion": "ray.io/v1alpha1"}
    with pytest.raises(ClusterConfigError, match=r"apiVersion must be ray\.io/v1, got 'ray\.io/v1alpha1'"):
        validate_cluster_file(_write(tmp_path, "raycluster.yaml", manifest))


def test_the_cli_exits_2_with_a_one_line_error(tmp_path: Path) -> None:
    config = _load(GPU_FILE)
    _rename_key(config["available_node_types"]["gpu_1x_a10g"], "max_workers", "max_worker")
    bad_file = _write(tmp_path, "gpu.yaml", config)
    completed = subprocess.run(
        [sys.executable, "-m", "scaling_lab.clusters", "check", str(GPU_FILE), str(bad_file)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert completed.returncode == 2
    assert completed.stdout == f"{GPU_FILE}: ok\n"
    assert completed.stderr.splitlines() == [
        f"{bad_file}: Additional properties are not allowed ('max_worker' was unexpected)"
        " at available_node_types.gpu_1x_a10g"
    ]


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=_relative)
def test_the_dashboard_listens_only_on_localhost(path: Path) -> None:
    # Checked on the effective config: Ray's provider defaults would start the dashboard on 0.0.0.0.
    config = effective_launcher_config(path)
    head_start = " ".join(config["head_start_ray_commands"])
    assert re.findall(r"--dashboard-host[= ](\S+)", head_start) == ["127.0.0.1"]
    start_commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert not [command for command in start_commands if "0.0.0.0" in command]


def test_the_aws_security_group_opens_only_ssh_and_not_to_everyone() -> None:
    rules = _load(GPU_FILE)["provider"]["security_group"]["IpPermissions"]
    assert rules
    for rule in rules:
        assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
        assert "0.0.0.0/0" not in [ip_range["CidrIp"] for ip_range in rule.get("IpRanges", [])]
        assert "::/0" not in [ip_range["CidrIpv6"] for ip_range in rule.get("Ipv6Ranges", [])]


@pytest.mark.parametrize("path", [RAY_CLUSTER_FILE, RAY_JOB_FILE], ids=_relative)
def test_the_kuberay_head_service_stays_inside_kubernetes(path: Path) -> None:
    spec = _load(path)["spec"]
    head = spec.get("rayClusterSpec", spec)["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)


@pytest.mark.parametrize("path", sorted(p for p in CLUSTERS_DIR.rglob("*") if p.is_file()), ids=_relative)
def test_no_credentials_in_cluster_files(path: Path) -> None:
    text = path.read_text()
    found = [pattern for pattern in CREDENTIAL_PATTERNS if re.search(pattern, text, re.IGNORECASE)]
    assert not found, f"{_relative(path)} matches {found}"


def test_the_rayjob_runs_the_same_cluster_as_raycluster_yaml() -> None:
    assert _load(RAY_JOB_FILE)["spec"]["rayClusterSpec"] == _load(RAY_CLUSTER_FILE)["spec"]


def test_the_rayjob_runs_a_study_spec_with_results_in_shared_storage() -> None:
    entrypoint = _load(RAY_JOB_FILE)["spec"]["entrypoint"]
    assert re.search(r"python -m scaling_lab\.study run \S+\.yaml --override output_dir=s3://\S+$", entrypoint)


def test_every_file_pins_the_installed_ray_version() -> None:
    version = ray.__version__
    assert _load(GPU_FILE)["docker"]["image"].startswith(f"rayproject/ray:{version}-py311")
    assert f'pip install "ray[default]=={version}"' in _load(LOCAL_FILE)["setup_commands"]
    assert _load(RAY_CLUSTER_FILE)["spec"]["rayVersion"] == version
    assert f"FROM rayproject/ray:{version}-py311" in DOCKERFILE.read_text()


def _install_steps(commands: list[str]) -> list[str]:
    steps = {"torch": r"pip install [^&]*torch==", "package": r"pip install [^&]*-e \.", "deepspeed": r"deepspeed=="}
    return [name for command in commands for name, pattern in steps.items() if re.search(pattern, command)]


@pytest.mark.parametrize(
    "commands",
    [
        pytest.param(_load(GPU_FILE)["setup_commands"], id="gpu.yaml"),
        pytest.param(_load(LOCAL_FILE)["setup_commands"], id="local.yaml"),
        pytest.param(
            [step for step in re.split(r"\n|&&", DOCKERFILE.read_text()) if not step.lstrip().startswith("#")],
            id="Dockerfile",
        ),
    ],
)
def test_torch_is_installed_before_the_package_and_deepspeed_last(commands: list[str]) -> None:
    assert _install_steps(commands) == ["torch", "package", "deepspeed"]
    deepspeed_install = next(command for command in commands if "deepspeed==" in command)
    assert "DS_BUILD_OPS=0" in deepspeed_install and "--no-build-isolation" in deepspeed_install


def test_gpu_worker_types_scale_from_zero_and_name_their_gpu_type() -> None:
    config = _load(GPU_FILE)
    workers = {name: node for name, node in config["available_node_types"].items() if name != config["head_node_type"]}
    assert workers
    for name, node in workers.items():
        assert node["min_workers"] == 0, name
        assert [resource for resource in node["resources"] if resource.startswith("gpu_type_")], name
