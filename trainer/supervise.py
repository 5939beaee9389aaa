"""Signals and child processes: a run stops cleanly on SIGINT/SIGTERM, and no process of it outlives `ftplan run`.

In one process, `Signals` turns SIGINT/SIGTERM into a flag: the loop finishes the optimizer step, writes a checkpoint
and stops (a second signal stops at once).

Several processes: `ftplan run` -> `accelerate launch` (torch elastic's agent) -> one worker per rank (the agent
starts each in its own session). `run_child` starts the launcher

- in its own session, so a terminal's Ctrl-C reaches `ftplan run` alone, which passes each SIGINT/SIGTERM on once
  (the agent passes it to the workers; they checkpoint and stop);
- with a parent-death signal (Linux `prctl(PR_SET_PDEATHSIG, SIGTERM)`): when `ftplan run` dies, even by SIGKILL,
  the launcher gets SIGTERM and stops its workers the same way (SIGKILL after its 30 s grace);
- and, should `ftplan run` leave `run_child` by an exception, SIGTERM then SIGKILL to the launcher's group.

Each worker calls `die_with_parent()` first thing: when the launcher dies without stopping it (SIGKILL, OOM killer),
the kernel kills the worker.

No torch here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl():
    """libc's prctl, or None off Linux (resolved before a fork: nothing is loaded in the child)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(signum: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `signum` to this process when its parent dies; if the parent is already gone (this
    process was re-parented to init), send it now. False where the platform has no such thing."""
    prctl = _prctl()
    if prctl is None:
        return False
    if prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        return False
    if os.getppid() == 1:
        os.kill(os.getpid(), signum)
    return True


class Signals:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the current optimizer step and stops. A second
    signal stops at once (the default behaviour)."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def run_child(cmd: list[str], env: dict, *, pass_fds: tuple = (), death_signal: int = signal.SIGTERM,
              grace_s: float = 60.0, stdout: int | None = None) -> int:
    """Run `cmd` (the launcher) to completion under the rules of the module docstring; returns its exit code.
    `pass_fds`: descriptors it inherits (the output folder's lock, held until the launcher exits); `stdout`: where
    its standard output goes (a descriptor; None: this process's)."""
    parent = os.getpid()
    prctl = _prctl()

    def preexec():  # in the child, between fork and exec
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
            if os.getppid() != parent:  # the parent died before the call: no signal would come
                os.kill(os.getpid(), int(death_signal))

    proc = subprocess.Popen(cmd, env=env, start_new_session=True, pass_fds=tuple(pass_fds), preexec_fn=preexec,
                            stdout=stdout)

    def forward(signum, frame):
        _signal_group(proc, signum)

    old = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, forward)
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc.poll() is None:  # leaving early (an exception here): stop the launcher, which stops its workers
            stop(proc, grace_s)


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop(proc: subprocess.Popen, grace_s: float = 60.0) -> int | None:
    """SIGTERM to the child's process group; SIGKILL when it has not exited after `grace_s` seconds."""
    _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        _signal_group(proc, signal.SIGKILL)
    return proc.wait()
