"""Real-text classification tasks built at run time from text that ships with Python: no download, no data file.

builtin:stdlib-docstrings: the first paragraph of the docstring of every public function, class and method of a
fixed list of standard-library modules, labelled by the family of modules it comes from (text processing,
numbers, files, networking, concurrency, data formats, data types): a 7-way topic classification of short
technical English, like AG News on library documentation. Rows are deduplicated (a text found in two families is
dropped), and each family is cut to the size of the smallest one (the texts with the lowest SHA-256 are kept), so
the labels are exactly balanced. On CPython 3.11.7: 1,155 rows, 165 per family.

The rows depend on the Python version (docstrings change between releases, and so the row count may too): they are
the same on every machine with the same Python minor version. The version is recorded in every trial row's
`versions` (key "python") and in the table's `python` column.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import platform
from collections.abc import Callable
from typing import Any

import pandas as pd

# Module families: every module is imported (the standard library only; none opens a window or a connection).
STDLIB_FAMILIES: dict[str, tuple[str, ...]] = {
    "text": ("string", "re", "textwrap", "difflib", "unicodedata", "codecs", "html", "html.parser", "locale",
             "gettext", "shlex"),
    "numbers": ("math", "cmath", "decimal", "fractions", "statistics", "random", "numbers", "operator"),
    "files": ("os", "os.path", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "stat", "filecmp", "io",
              "fileinput"),
    "network": ("socket", "ssl", "http.client", "http.server", "http.cookiejar", "urllib.request", "urllib.parse",
                "smtplib", "ftplib", "imaplib", "poplib", "ipaddress", "email.message", "mailbox"),
    "concurrency": ("threading", "multiprocessing", "asyncio", "concurrent.futures", "queue", "subprocess", "sched",
                    "selectors", "signal"),
    "formats": ("json", "csv", "pickle", "sqlite3", "zipfile", "tarfile", "gzip", "bz2", "lzma", "configparser",
                "xml.etree.ElementTree", "base64", "struct", "plistlib", "tomllib", "zlib", "binascii"),
    "datatypes": ("collections", "heapq", "bisect", "array", "enum", "datetime", "calendar", "copy", "types",
                  "weakref", "dataclasses", "functools", "itertools", "contextlib", "abc"),
}
MIN_WORDS = 4  # shorter docstrings ("Return self.") carry no topic


def stdlib_docstrings() -> pd.DataFrame:
    """Columns text, label (the family), module (where the docstring was found), python (the version)."""
    found: dict[str, set[str]] = {}
    module_of: dict[tuple[str, str], str] = {}
    for family, module_names in STDLIB_FAMILIES.items():
        for module_name in module_names:
            for text in _first_paragraphs(importlib.import_module(module_name)):
                found.setdefault(text, set()).add(family)
                module_of.setdefault((text, family), module_name)
    by_family: dict[str, list[str]] = {family: [] for family in STDLIB_FAMILIES}
    for text, families in found.items():
        if len(families) == 1:
            by_family[next(iter(families))].append(text)
    per_family = min(len(texts) for texts in by_family.values())
    rows = []
    for family, texts in by_family.items():
        for text in sorted(texts, key=_digest)[:per_family]:
            rows.append({"text": text, "label": family, "module": module_of[(text, family)]})
    table = pd.DataFrame(rows).sort_values("text", key=lambda texts: texts.map(_digest), ignore_index=True)
    return table.assign(python=platform.python_version())


def _first_paragraphs(module: Any) -> list[str]:
    """The first paragraph, whitespace collapsed, of each public function, class and method defined in `module`."""
    texts = []
    for name in sorted(dir(module)):
        obj = getattr(module, name)
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if not (_defined_in(obj, module.__name__) or inspect.isbuiltin(obj)):
            continue  # re-exported from another module: it belongs to that module's family
        texts.append(obj.__doc__)
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                member = getattr(member, "__func__", member)
                if not member_name.startswith("_") and inspect.isroutine(member):
                    texts.append(member.__doc__)
    paragraphs = [" ".join(inspect.cleandoc(text).split("\n\n")[0].split()) for text in texts if text]
    return [paragraph for paragraph in paragraphs if len(paragraph.split()) >= MIN_WORDS]


def _defined_in(obj: Any, module_name: str) -> bool:
    """Defined in the module, one of its submodules, or its C accelerator (_json for json, ...)."""
    defined = getattr(obj, "__module__", None) or ""
    return defined.lstrip("_") == module_name or defined.startswith(module_name + ".")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


BUILTIN_TASKS: dict[str, Callable[[], pd.DataFrame]] = {"builtin:stdlib-docstrings": stdlib_docstrings}


def builtin_table(source: str) -> pd.DataFrame:
    """The rows of a builtin task, generated on each call (about a second); `source` must be a BUILTIN_TASKS key."""
    return BUILTIN_TASKS[source]()
