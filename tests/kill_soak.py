"""Kill -9 soak of `ftplan run` (used by tests/test_reliability.py; not a test module itself).

    python tests/kill_soak.py --ref REF --out OUT --kills 20 --seed 0 -- run PLAN --data ... --device cpu

1. the reference run into REF, uninterrupted, in this process: it also imports and initialises everything (torch,
   transformers' model classes, peft, the tokenizer) once, with one thread;
2. `kills` times: a run into OUT with --resume, forked from this warm process (a fork costs milliseconds; a fresh
   interpreter importing torch costs seconds, which would make 20 kills take minutes), then SIGKILLed: one time in
   five at a random moment of its start-up, else once it has published a new checkpoint, after a random part of a
   step (so during a step, a checkpoint write, or the final save);
3. a last run into OUT with --resume, to the end.

Every run is a real process killed by a real SIGKILL. Prints one JSON line: the exit statuses and the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time

os.environ["OMP_NUM_THREADS"] = "1"


def _child(argv: list[str], log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        from planner.cli import cli

        cli.main(args=argv, prog_name="ftplan", standalone_mode=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - report it as a failed run
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _fork(argv: list[str], log_path: str) -> int:
    pid = os.fork()
    if pid == 0:
        _child(argv, log_path)
    return pid


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def _latest_step(out: str) -> int:
    steps = [int(n.split("-")[1]) for n in os.listdir(out) if n.startswith("checkpoint-")
             and os.path.exists(os.path.join(out, n, "state.json"))] if os.path.isdir(out) else []
    return max(steps, default=0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("argv", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    argv = [x for x in a.argv if x != "--"]
    logs = a.out + ".logs"
    os.makedirs(logs, exist_ok=True)

    import torch
    import tqdm

    torch.set_num_threads(1)  # no thread pool to fork
    tqdm.tqdm.monitor_interval = 0  # no tqdm monitor thread (transformers' loading bar) either
    from planner.cli import cli

    t0 = time.monotonic()
    try:
        cli.main(args=[*argv, "--output-dir", a.ref], prog_name="ftplan", standalone_mode=False)
        ref_status = "exit 0"
    except Exception as e:  # noqa: BLE001
        ref_status = f"error {e!r}"
    ref_seconds = time.monotonic() - t0
    assert threading.active_count() == 1, threading.enumerate()  # forking is safe
    times = [r["time"] for r in map(json.loads, open(os.path.join(a.ref, "trainer_log.jsonl"))) if "loss" in r]
    step_s = (times[-1] - times[0]) / max(1, len(times) - 1) if len(times) > 1 else 0.1

    rng = random.Random(a.seed)
    statuses, progressed = [], 0
    t1 = time.monotonic()
    for i in range(a.kills):
        before = _latest_step(a.out)
        pid = _fork([*argv, "--output-dir", a.out, "--resume"], f"{logs}/kill{i:02d}.log")
        done = None  # the child's wait status, once it has ended by itself
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0.0, 0.5))
        else:
            target, deadline = before + 1, time.monotonic() + 120
            while _latest_step(a.out) < target and time.monotonic() < deadline:
                r = os.waitpid(pid, os.WNOHANG)
                if r != (0, 0):
                    done = r[1]
                    break
                time.sleep(0.002)
            if done is None:
                time.sleep(rng.uniform(0.0, step_s))
        if done is None:
            os.kill(pid, signal.SIGKILL)  # a zombie until reaped below, so the pid cannot be reused meanwhile
            done = os.waitpid(pid, 0)[1]
        statuses.append(_status(done))
        progressed += _latest_step(a.out) > before
    kill_seconds = time.monotonic() - t1
    pid = _fork([*argv, "--output-dir", a.out, "--resume"], f"{logs}/final.log")
    final_status = _status(os.waitpid(pid, 0)[1])
    print(json.dumps({"ref": ref_status, "ref_seconds": round(ref_seconds, 2), "step_seconds": round(step_s, 4),
                      "kills": statuses, "kills_after_progress": progressed, "kill_seconds": round(kill_seconds, 2),
                      "final": final_status, "logs": logs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
