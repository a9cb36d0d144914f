"""atomic.py: a file is either its old complete self or the new complete content, never half."""

import pytest

import atomic


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
