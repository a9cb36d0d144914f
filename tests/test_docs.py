"""The docs stay true to the code: docs/cli.md is what tests/gen_cli_doc.py renders from the flag parser, the
README stays a short front door, and every relative link in the README and docs/ points at a file (and heading)
that exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from gen_cli_doc import CLI_MD, COMMAND, render_cli

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.*)$", md.read_text(), flags=re.M)}


def test_cli_md_is_generated_from_the_parser():
    assert CLI_MD.read_text() == render_cli(), f"docs/cli.md is stale: run {COMMAND}"


def test_the_generator_runs_as_the_docs_say(tmp_path):
    """The command named in docs/cli.md and docs/architecture.md, run from the repository root as a user would,
    writes the page the check above compares against."""
    out = tmp_path / "cli.md"
    r = subprocess.run([sys.executable, *COMMAND.split()[1:], str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == render_cli()
    for doc in (CLI_MD, ROOT / "docs" / "architecture.md"):
        assert f"`{COMMAND}`" in doc.read_text()


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

