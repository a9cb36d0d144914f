"""docs/cli.md, rendered from opt_mi.py's flag parser so that the page cannot drift from what the code accepts
(tests/test_docs.py checks the page equals this rendering). From the repository root:

    python -m tests.gen_cli_doc      # rewrites docs/cli.md from miq.run.flags.build_parser()
    python -m tests.gen_cli_doc OUT  # writes the page to OUT instead (how test_docs runs the command)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from miq.run.flags import build_parser  # torch-free

ROOT = Path(__file__).resolve().parents[1]
CLI_MD = ROOT / "docs" / "cli.md"
COMMAND = "python -m tests.gen_cli_doc"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(action: argparse.Action) -> str:
    d = action.default
    if d is None or d == argparse.SUPPRESS:
        return ""
    return "`''`" if d == "" else f"`{d}`"


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if action.choices:
        one_of = "one of: " + ", ".join(f"`{c}`" for c in action.choices)
        text = f"{text}; {one_of}" if text else one_of
    return text


def _flag(action: argparse.Action) -> str:
    names = action.option_strings or [action.metavar or action.dest]
    return ", ".join(f"`{n}`" for n in names)


def render_cli() -> str:
    """docs/cli.md: one table per argument group of opt_mi.py's parser, positional arguments first."""
    p = build_parser()
    lines = [
        "# `opt_mi.py` command line",
        "",
        f"Generated from `miq.run.flags.build_parser()` by `{COMMAND}` (do not edit by hand); "
        "`python opt_mi.py -h` prints the same.",
        "",
        "`python opt_mi.py MODEL DATASET [options]`: " + (p.description or ""),
    ]
    groups = sorted(p._action_groups, key=lambda g: not any(not a.option_strings for a in g._group_actions))
    for group in groups:
        if not group._group_actions:
            continue
        lines += ["", f"## {group.title}", "", "| flag | default | help |", "|---|---|---|"]
        lines += [f"| {_cell(_flag(a))} | {_cell(_default(a))} | {_cell(_help(a))} |" for a in group._group_actions]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else CLI_MD
    out.parent.mkdir(exist_ok=True)
    out.write_text(render_cli())
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
