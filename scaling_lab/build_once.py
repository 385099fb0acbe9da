"""A cache directory built once: by whichever process gets there first, while the others wait and then read it."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def build_once(directory: Path, build: Callable[[Path], None]) -> Path:
    """`directory`, filled by `build(staging)` unless it already exists.

    Concurrent callers (workers on one node, or nodes sharing the cache) wait on a file lock and build it once;
    `build` writes into a temporary directory that is then renamed, so a directory that exists is complete.
    """
    if directory.is_dir():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(directory.parent / f"{directory.name}.lock"):
        if directory.is_dir():
            return directory
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            build(staging)
            os.rename(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return directory


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
