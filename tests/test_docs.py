"""The docs stay true to the code: docs/cli.md is rendered from the flag parser, the README stays a short front
door, and every relative link in the README and docs/ points at a file (and heading) that exists.

    python tests/test_docs.py      # rewrites docs/cli.md from miq.run.flags.build_parser()
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script; under pytest, pytest.ini's pythonpath = . already has it
    sys.path.insert(0, str(ROOT))

from miq.run.flags import build_parser  # noqa: E402  (torch-free)

CLI_MD = ROOT / "docs" / "cli.md"
README_MAX_LINES = 200
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


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
        "Generated from `miq.run.flags.build_parser()` by `python tests/test_docs.py` (do not edit by hand); "
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


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.*)$", md.read_text(), flags=re.M)}


def test_cli_md_is_generated_from_the_parser():
    assert CLI_MD.read_text() == render_cli(), "docs/cli.md is stale: run python tests/test_docs.py"


def test_the_readme_is_a_short_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= README_MAX_LINES


def test_relative_links_point_at_what_exists():
    broken = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(md.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                broken.append(f"{md.name}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{md.name}: {target} (no such heading)")
    assert broken == []


if __name__ == "__main__":
    CLI_MD.parent.mkdir(exist_ok=True)
    CLI_MD.write_text(render_cli())
    print(f"wrote {CLI_MD.relative_to(ROOT)}")
