"""scaling-lab: one command for the package's command-line tools, beside their python -m forms.

Each subcommand is passed whole to the tool that defines it (scaling_lab.study, scaling_lab.analysis,
scaling_lab.results, scaling_lab.clusters); the list is read from those tools' own parsers, so a subcommand
added to one of them is a scaling-lab subcommand too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from unittest import mock

# (module whose main(argv) runs the tool, how the tool is named in the overview)
TOOLS = [
    ("scaling_lab.study.__main__", "studies"),
    ("scaling_lab.analysis.__main__", "analysis"),
    ("scaling_lab.tracking.export", "experiment trackers"),
]
CLUSTERS = "clusters"  # scaling-lab clusters check FILE...: its own group, its subcommand names are generic


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def parser_of(main: Callable[[list[str]], int]) -> argparse.ArgumentParser:
    """The parser a tool's main builds, caught at its parse_args call, before the tool does anything."""

    def capture(parser, *args, **kwargs):
        raise _Captured(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            main([])
        except _Captured as caught:
            return caught.parser
    raise RuntimeError(f"{main.__module__}.main did not parse its arguments")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Subcommand name -> its help text."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            return {name: helps.get(name, "") for name in action.choices}
    return {}


def command_table() -> list[tuple[str, str, str, str]]:
    """(subcommand, module, help, group) for every tool's subcommands, in the tools' order."""
    table, seen = [], set()
    for module_name, group in TOOLS:
        main = importlib.import_module(module_name).main
        for name, help_text in subcommands(parser_of(main)).items():
            if name not in seen:
                seen.add(name)
                table.append((name, module_name, help_text, group))
    return table


def overview(table: list[tuple[str, str, str, str]]) -> str:
    lines = ["usage: scaling-lab COMMAND [ARGS...]   (scaling-lab COMMAND --help for its options)", "",
             __doc__.splitlines()[0], ""]
    width = max(len(name) for name, *_ in table)
    for group in dict.fromkeys(group for *_, group in table):
        lines.append(f"{group}:")
        lines += [f"  {name:<{width}}  {help_text}" for name, _, help_text, g in table if g == group]
    lines += ["cluster files:", f"  {CLUSTERS:<{width}}  check FILE...: validate Ray cluster files offline"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == CLUSTERS:
        from scaling_lab.clusters import main as clusters_main

        return clusters_main(argv[1:])
    table = command_table()
    if not argv or argv[0] in ("-h", "--help"):
        print(overview(table))
        return 0 if argv else 2
    modules = {name: module_name for name, module_name, *_ in table}
    if argv[0] not in modules:
        print(f"error: unknown command {argv[0]!r}; commands: {', '.join(modules)}, {CLUSTERS}", file=sys.stderr)
        return 2
    return importlib.import_module(modules[argv[0]]).main(argv)


if __name__ == "__main__":
    sys.exit(main())
