"""planner/fileio.py: files written for the user appear whole or not at all, and writable-path checks."""

from __future__ import annotations

import pytest

from planner.config import TrainConfig
from planner.fileio import atomic_path, write_text, writable_dir_problem, writable_file_problem
from planner.planfile import PlanFile, read_plan, write_plan


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "plan.toml"
    p.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half of the new")
            assert tmp.parent == tmp_path and tmp.name.startswith(".plan.toml.tmp-")
            raise RuntimeError("crash while writing")
    assert p.read_text() == "old\n" and sorted(x.name for x in tmp_path.iterdir()) == ["plan.toml"]
    write_text(p, "new\n", fsync=True)
    assert p.read_text() == "new\n" and sorted(x.name for x in tmp_path.iterdir()) == ["plan.toml"]
    with pytest.raises(FileExistsError):
        write_text(p, "other\n", exclusive=True)
    assert p.read_text() == "new\n" and len(list(tmp_path.iterdir())) == 1
    with atomic_path(tmp_path / "chart.png", keep_suffix=True) as tmp:
        assert tmp.suffix == ".png"  # matplotlib picks the format from it
        tmp.write_bytes(b"png")
    assert (tmp_path / "chart.png").read_bytes() == b"png"


def test_a_plan_write_that_fails_keeps_the_old_plan(tmp_path, monkeypatch):
    """The new plan is complete on disk under a temporary name before it replaces the old one: a failure before
    the rename (a full disk, a kill) leaves the old plan readable and no temporary file."""
    path = tmp_path / "plan.toml"
    write_plan(PlanFile(model="8b", train=TrainConfig(rank=8)), path)
    before = path.read_bytes()

    import planner.fileio as fileio

    def no_rename(src, dst):
        assert read_plan(src).train.rank == 64  # whole before the rename
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", no_rename)
    with pytest.raises(OSError):
        write_plan(PlanFile(model="8b", train=TrainConfig(rank=64)), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["plan.toml"]


def test_writable_path_problems(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert writable_dir_problem(tmp_path / "new" / "deeper") is None
    assert "is a file" in writable_dir_problem(f)
    assert "cannot be created" in writable_dir_problem(f / "sub")
    assert writable_file_problem(tmp_path / "new" / "plan.toml") is None
    assert "is a directory" in writable_file_problem(tmp_path)
    assert "cannot be written" in writable_file_problem(f / "plan.toml")
