"""What names a base model, checked without loading anything: the embedded tiny family (tiny:<size>), local
directories, folders shipped in Python packages (package:<name>[/<folder>]) and hub ids.

Imports nothing heavy and nothing else of scaling_lab: spec validation uses it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

TINY_PREFIX = "tiny:"
TINY_VOCAB_SIZE = 64  # the synthetic tasks' alphabet, data.SYNTHETIC_VOCAB_SIZE


def _tiny_llama(hidden_size: int, num_layers: int, num_heads: int) -> dict[str, Any]:
    return {
        "vocab_size": TINY_VOCAB_SIZE,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "max_position_embeddings": 256,
    }


# LlamaConfig arguments; head dimension 16 throughout. Parameter counts: xs 90k, s 289k, m 673k, l 1.5M.
TINY_FAMILY: dict[str, dict[str, Any]] = {
    "xs": _tiny_llama(hidden_size=64, num_layers=2, num_heads=4),
    "s": _tiny_llama(hidden_size=96, num_layers=3, num_heads=6),
    "m": _tiny_llama(hidden_size=128, num_layers=4, num_heads=8),
    "l": _tiny_llama(hidden_size=192, num_layers=4, num_heads=12),
}

_HUB_ID = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?")
PACKAGE_PREFIX = "package:"
_PACKAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_model_source(source: str) -> None:
    """Raise ValueError with a one-line reason if `source` cannot name a model; torch-free and fast."""
    if source.startswith(TINY_PREFIX):
        size = source.removeprefix(TINY_PREFIX)
        if size not in TINY_FAMILY:
            allowed = ", ".join(TINY_PREFIX + name for name in TINY_FAMILY)
            raise ValueError(f"unknown tiny model size {size!r}; allowed: {allowed}")
        return
    directory = local_directory(source)
    if directory is not None:
        if not directory.exists():
            raise ValueError(f"model directory {source!r} does not exist")
        if not (directory / "config.json").is_file():
            raise ValueError(f"model directory {source!r} has no config.json")
        return
    if not _HUB_ID.fullmatch(source):
        raise ValueError(
            f"{source!r} is neither tiny:<size>, an existing model directory, nor a hub id like org/name"
        )


def is_hub_source(source: str) -> bool:
    return not source.startswith(TINY_PREFIX) and local_directory(source) is None


def local_directory(source: str) -> Path | None:
    """The path `source` names, if it looks like one or exists on disk; otherwise it is a hub id.

    `package:<import name>[/<folder>]` is a model folder shipped inside an installed Python package.
    """
    if source.startswith(PACKAGE_PREFIX):
        return package_model_directory(source)
    path = Path(source).expanduser()
    if source.startswith(("/", "./", "../", "~")) or path.exists():
        return path
    return None


def model_location(source: str) -> str:
    """What from_pretrained is given for a local or package `source`: its directory; a hub id as it is."""
    directory = local_directory(source)
    return str(directory) if directory is not None else source


def package_model_directory(source: str) -> Path:
    """The folder of `package:<name>[/<folder>]`: <folder> inside the package, or else the package's only folder
    holding a config.json (the package itself first). Finds the package without importing it."""
    import importlib.util

    name, _, folder = source.removeprefix(PACKAGE_PREFIX).partition("/")
    found = importlib.util.find_spec(name) if _PACKAGE_NAME.fullmatch(name) else None
    if found is None or not found.submodule_search_locations:
        raise ValueError(
            f"package {name!r} is not installed; install it with: python -m pip install {name.replace('_', '-')}"
        )
    package_dir = Path(next(iter(found.submodule_search_locations)))
    if folder:
        return package_dir / folder
    configs = sorted(package_dir.rglob("config.json"), key=lambda path: (len(path.parts), str(path)))
    return configs[0].parent if configs else package_dir
