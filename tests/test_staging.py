"""Staging: a run's outputs are published together or not at all; stale staging of killed runs goes."""

import os
import subprocess

import pytest

from miq import atomic
from miq.staging import Staging


def tree(root) -> dict[str, str | None]:
    """path -> content (None for a folder) of everything under root, hidden entries included."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            with open(os.path.join(dirpath, f)) as fh:
                out[os.path.relpath(os.path.join(dirpath, f), root)] = fh.read()
    return out


def stage_all(stage: Staging, root) -> None:
    """A JSON in new folders, a model folder, and a figure in an existing folder."""
    with open(stage.file(root / "a" / "b" / "r.json"), "w") as f:
        f.write("new json")
    model = stage.folder(root / "model")
    with open(os.path.join(model, "weights"), "w") as f:
        f.write("new weights")
    with open(stage.file(root / "figs" / "fig.png"), "w") as f:
        f.write("new figure")


@pytest.fixture
def root(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old_weights").write_text("old weights")
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "fig.png").write_text("old figure")
    return tmp_path


def test_publish_replaces_every_target_and_leaves_no_staging(root):
    with Staging() as stage:
        stage_all(stage, root)
        assert not (root / "a" / "b" / "r.json").exists(), "published before the end"
    assert tree(root) == {"a": None, "a/b": None, "a/b/r.json": "new json", "model": None,
                          "model/weights": "new weights", "figs": None, "figs/fig.png": "new figure"}


def test_an_error_leaves_nothing_new_and_the_old_outputs_as_they_were(root):
    before = tree(root)
    with pytest.raises(KeyboardInterrupt), Staging() as stage:
        stage_all(stage, root)
        raise KeyboardInterrupt
    assert tree(root) == before  # the folders created for r.json are gone too


def test_a_failed_rename_undoes_the_ones_before(root, monkeypatch):
    before = tree(root)
    real, failed = os.replace, []

    def replace(src, dst):  # publishing the figure (the last output) fails, once
        if str(dst).endswith("fig.png") and str(src).endswith(f"fig.png.{os.getpid()}.tmp") and not failed:
            failed.append(dst)
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError), Staging() as stage:
        stage_all(stage, root)
    assert failed and tree(root) == before


def test_stale_staging_of_a_dead_process_is_removed_and_a_live_ones_kept(root):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = root / atomic.temp_name("model", dead.pid)
    stale.mkdir()
    (stale / "weights").write_text("half")
    (root / atomic.temp_name("model.old", dead.pid)).write_text("x")
    live = root / atomic.temp_name("model", 1)  # init: alive
    live.write_text("someone else's")
    with Staging() as stage:
        stage.folder(root / "model")
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in root.iterdir()) == sorted([live.name, "model", "figs"])


def test_remove_leftovers_takes_a_killed_runs_staged_folders_too(tmp_path):
    staged = tmp_path / atomic.temp_name("model", 4242)
    staged.mkdir()
    (staged / "weights").write_text("half")
    assert atomic.remove_leftovers(tmp_path, 4242) == [str(staged)]
    assert list(tmp_path.iterdir()) == []
