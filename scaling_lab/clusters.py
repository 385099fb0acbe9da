"""Offline checks of cluster files: Ray cluster-launcher YAMLs against Ray's own schema, KubeRay manifests by structure.

Usage: python -m scaling_lab.clusters check FILE...
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from click import ClickException

# Private Ray API, written against ray==2.60.0. Both functions read only Ray's bundled defaults.yaml and
# ray-schema.json; the cloud calls (instance types, IAM, security groups) happen later, in `ray up`.
from ray.autoscaler._private.util import prepare_config, validate_config

KUBERAY_API_VERSION = "ray.io/v1"
WORKER_GROUP_FIELDS = {
    "groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int, "rayStartParams": dict, "template": dict
}
# What Ray's prepare/validate raise for a config they reject; ClickException comes from cli_logger.abort.
RAY_REJECTIONS = (ClickException, ValueError, RuntimeError, KeyError, TypeError, AttributeError, NotImplementedError)


class ClusterConfigError(ValueError):
    """A cluster file Ray or KubeRay would reject; the one-line message names the file and the field."""


def validate_cluster_file(path: str | Path) -> None:
    document = _load_mapping(path)
    if "apiVersion" in document or "kind" in document:
        _check_kuberay_manifest(document, str(path))
    else:
        _prepare_and_validate(document, str(path))


def effective_launcher_config(path: str | Path) -> dict[str, Any]:
    """The config `ray up` acts on: the file merged with Ray's defaults for its provider, validated."""
    return _prepare_and_validate(_load_mapping(path), str(path))


def _load_mapping(path: str | Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ClusterConfigError(f"{path}: cannot read YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(document, dict):
        raise ClusterConfigError(f"{path}: expected a mapping at the top level, got {type(document).__name__}")
    return document


def _prepare_and_validate(config: dict[str, Any], source: str) -> dict[str, Any]:
    try:
        prepared = prepare_config(config)
        validate_config(prepared)
    except jsonschema.ValidationError as exc:
        location = ".".join(str(part) for part in exc.absolute_path)
        raise ClusterConfigError(f"{source}: {exc.message}" + (f" at {location}" if location else "")) from None
    except RAY_REJECTIONS as exc:
        raise ClusterConfigError(f"{source}: {type(exc).__name__}: {exc}") from None
    return prepared


def _check_kuberay_manifest(manifest: dict[str, Any], source: str) -> None:
    api_version, kind = manifest.get("apiVersion"), manifest.get("kind")
    if api_version != KUBERAY_API_VERSION:
        raise ClusterConfigError(f"{source}: apiVersion must be {KUBERAY_API_VERSION}, got {api_version!r}")
    _require(manifest, "metadata.name", str, source)
    spec = _require(manifest, "spec", dict, source)
    if kind == "RayCluster":
        _check_ray_cluster_spec(spec, "spec", source)
    elif kind == "RayJob":
        _require(spec, "entrypoint", str, source, "spec")
        if "rayClusterSpec" in spec:
            cluster_spec = _require(spec, "rayClusterSpec", dict, source, "spec")
            _check_ray_cluster_spec(cluster_spec, "spec.rayClusterSpec", source)
        elif "clusterSelector" not in spec:
            raise ClusterConfigError(f"{source}: missing required field spec.rayClusterSpec or spec.clusterSelector")
    else:
        raise ClusterConfigError(f"{source}: kind must be RayCluster or RayJob, got {kind!r}")


def _check_ray_cluster_spec(spec: dict[str, Any], spec_path: str, source: str) -> None:
    head_path = f"{spec_path}.headGroupSpec"
    head = _require(spec, "headGroupSpec", dict, source, spec_path)
    # Optional since KubeRay 1.4; requiring it keeps the manifests valid for older operators.
    _require(head, "rayStartParams", dict, source, head_path)
    _require_containers(head, head_path, source)
    groups = _require(spec, "workerGroupSpecs", list, source, spec_path) if "workerGroupSpecs" in spec else []
    for index, group in enumerate(groups):
        group_path = f"{spec_path}.workerGroupSpecs[{index}]"
        for field, kind in WORKER_GROUP_FIELDS.items():
            _require(group, field, kind, source, group_path)
        _require_containers(group, group_path, source)
        if group["minReplicas"] > group["maxReplicas"]:
            raise ClusterConfigError(f"{source}: {group_path}.minReplicas is greater than maxReplicas")


def _require_containers(group: dict[str, Any], group_path: str, source: str) -> None:
    if not _require(group, "template.spec.containers", list, source, group_path):
        raise ClusterConfigError(f"{source}: {group_path}.template.spec.containers must list at least one container")


def _require(node: Any, dotted_path: str, kind: type, source: str, parent_path: str = "") -> Any:
    """The value at dotted_path below node; it must exist and be of the given kind."""
    value, field_path = node, parent_path
    for key in dotted_path.split("."):
        field_path = f"{field_path}.{key}" if field_path else key
        if not isinstance(value, dict) or key not in value:
            raise ClusterConfigError(f"{source}: missing required field {field_path}")
        value = value[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ClusterConfigError(f"{source}: {field_path} must be of type {kind.__name__}, got {value!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scaling_lab.clusters", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="validate cluster files offline; exit 2 if any is invalid").add_argument(
        "files", nargs="+", type=Path
    )
    args = parser.parse_args(argv)
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # Ray logs each default it fills in
    exit_code = 0
    for path in args.files:
        try:
            validate_cluster_file(path)
            print(f"{path}: ok")
        except ClusterConfigError as exc:
            print(exc, file=sys.stderr)
            exit_code = 2
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
