"""Killing `ftplan calibrate` mid-measurement: by SIGKILL, SIGTERM or SIGINT of the parent, no measuring child is
left running, no record appears afterwards and no temporary file or folder stays behind. The real CLI in a
subprocess, a tiny model on the CPU, and the harness's injection hook to hold the child inside a point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calibrate import harness

from conftest import TINY_LLAMA_CONFIG

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that never comes, in a container, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _wait(predicate, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux")
@pytest.mark.parametrize("sig, inject", [(signal.SIGKILL, "hang@load"), (signal.SIGKILL, "wedge@load"),
                                         (signal.SIGTERM, "hang@load"), (signal.SIGINT, "hang@load")],
                         ids=["sigkill", "sigkill-main-thread-wedged", "sigterm", "sigint"])
def test_killing_the_parent_leaves_no_child_no_record_and_no_temporary_files(tmp_path, sig, inject):
    cfg = tmp_path / "tiny" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(TINY_LLAMA_CONFIG))
    out, tmp, mark = tmp_path / "records", tmp_path / "tmp", tmp_path / "child.pid"
    tmp.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), TMPDIR=str(tmp),
               **{harness.INJECT_ENV: inject, harness.INJECT_ENV + "_MARK": str(mark)})
    parent = subprocess.Popen(
        [sys.executable, "-c", "from planner.cli import main; main()", "calibrate", "--model", str(cfg), "--method",
         "full", "--device", "cpu", "--steps", "2", "--seq-len", "16", "--batch-size", "1", "--out", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert _wait(lambda: mark.exists() and mark.read_text().strip(), 180), "the child never reached the point"
        child = int(mark.read_text())
        assert _alive(child)
        os.kill(parent.pid, sig)
        rc = parent.wait(timeout=30)
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL
        else:  # the parent killed the child's process group itself and says so
            assert rc == 128 + sig, parent.stdout.read()
            assert f"stopped by {signal.Signals(sig).name}" in parent.stdout.read()
        assert _wait(lambda: not _alive(child), 5), f"child {child} still running after the parent died"
    finally:
        if parent.poll() is None:
            parent.kill()
        if mark.exists() and mark.read_text().strip() and _alive(int(mark.read_text())):
            os.kill(int(mark.read_text()), signal.SIGKILL)
    time.sleep(0.5)  # a record written late would show up now
    # nothing but the folder's lock (one calibrate per results folder; the kernel released it with the parent)
    left = [p for p in out.rglob("*") if p.name != ".ftplan.lock"] if out.exists() else []
    assert not left, left
    assert not list(tmp.iterdir()), list(tmp.iterdir())


def test_a_child_returns_its_record_and_the_parent_writes_it(tmp_path, monkeypatch):
    """The protocol without a kill: the child's record comes back on a descriptor; only the parent writes files."""
    from planner.arch import arch_from_config
    from planner.config import TrainConfig

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    point = harness.point_from_arch(arch_from_config(TINY_LLAMA_CONFIG, name="tiny"),
                                    TrainConfig(method="full", precision="fp32", seq_len=16), steps=2)
    monkeypatch.setenv(harness.INJECT_ENV, "fail@step2")
    (o,) = harness.run_points([point], device="cpu", out_dir=tmp_path / "r", command="test")
    assert o.status == "error" and "injected failure at step2" in o.record["error"]
    assert o.path.parent == tmp_path / "r" / "cpu" and json.loads(o.path.read_text())["id"] == o.record["id"]
    assert not [p for p in (tmp_path / "tmp").iterdir() if not p.name.startswith("torchinductor_")]  # torch's cache


def test_one_calibrate_per_results_folder(tmp_path):
    """While another process measures into a results folder, a second `ftplan calibrate` into it exits 2 at once,
    naming the pid that holds it; once that process dies the kernel releases the lock and the folder is usable."""
    from click.testing import CliRunner

    from planner.cli import cli

    out = tmp_path / "results"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from trainer.files import OutputLock; "
         f"OutputLock({str(out)!r}, 'ftplan calibrate', '--out').acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = tmp_path / "config.json"
        cfg.write_text(json.dumps(TINY_LLAMA_CONFIG))
        r = CliRunner().invoke(cli, ["calibrate", "--model", str(cfg), "--device", "cpu", "--seq-len", "32",
                                     "--out", str(out)])
        assert r.exit_code == 2 and "Traceback" not in r.output
        text = " ".join(r.output.split())
        assert f"pid {holder.pid}" in text and "--out" in text and "ftplan calibrate" in text
    finally:
        holder.kill()
        holder.wait()
    from trainer.files import OutputLock

    with OutputLock(out, "ftplan calibrate", "--out"):  # a dead holder's lock is gone
        pass
