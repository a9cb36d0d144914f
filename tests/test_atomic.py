"""atomic.py: a file is either its old complete self or the new complete content, never half."""

import subprocess
import sys
from pathlib import Path

import pytest

from miq import atomic


def test_write_creates_folders_and_replaces(tmp_path):
    p = tmp_path / "a" / "b" / "r.json"
    atomic.write_text(p, "first")
    atomic.write_text(p, "second")
    assert p.read_text() == "second"
    assert sorted(x.name for x in p.parent.iterdir()) == ["r.json"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "r.json"
    atomic.write_text(p, "old")
    with pytest.raises(TypeError):
        atomic.write_bytes(p, "not bytes")  # fails inside the write, after the temp file exists
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_remove_leftovers_takes_only_that_writers_temp_files(tmp_path):
    mine, other = tmp_path / ".r.json.41.tmp", tmp_path / ".r.json.4.tmp"
    for p in (mine, other, tmp_path / "r.json"):
        p.write_text("x")
    assert atomic.remove_leftovers(tmp_path, 41) == [str(mine)]
    assert sorted(x.name for x in tmp_path.iterdir()) == [".r.json.4.tmp", "r.json"]
    assert atomic.remove_leftovers(tmp_path / "absent", 41) == []


def test_remove_leftovers_finds_what_a_killed_writer_left(tmp_path):
    code = ("import os, signal, sys; from miq import atomic; "
            "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL); atomic.write_text(sys.argv[1], 'half')")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "r.json")],
                         cwd=Path(atomic.__file__).parents[1])
    assert p.wait() == -9
    assert [x.name for x in tmp_path.iterdir()] == [f".r.json.{p.pid}.tmp"]
    atomic.remove_leftovers(tmp_path, p.pid)
    assert list(tmp_path.iterdir()) == []
