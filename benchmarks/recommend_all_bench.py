"""Benchmark `ftplan recommend --gpu all`: which GPU to rent for a 70B model, over the whole catalog.

    python benchmarks/recommend_all_bench.py          # target: cold <= 1 s (median)

- cold: `ftplan recommend --model 70b --gpu all` in a fresh Python process each time (interpreter start, imports,
  profile and price loading, every GPU type's candidates, the ranking and the table), median of 7 runs; also with
  `--max-gpus 8` (about 10 times the candidates);
- CPU: user + system seconds of that process (getrusage of the children): what the wall time would be on an idle
  core, since on a shared machine the wall time also counts the waits for a CPU;
- plans/s: candidate plans evaluated per second inside the command (the `evaluated` and `seconds` of `--json`),
  which is what a loaded machine slows down less than the interpreter start.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cmd() -> list[str]:
    return [sys.executable, "-c", "from planner.cli import cli; cli()"]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cold(args: list[str], runs: int = 7) -> tuple[list[float], list[float], dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    times, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), _children_cpu()
        subprocess.run(_cmd() + args, check=True, capture_output=True, env=env, cwd=ROOT)
        times.append(time.perf_counter() - t0)
        cpu.append(_children_cpu() - c0)
    out = subprocess.run(_cmd() + args + ["--json"], check=True, capture_output=True, env=env, cwd=ROOT, text=True)
    return times, cpu, json.loads(out.stdout)


def main() -> int:
    print("ftplan recommend --gpu all benchmark")
    for extra in ([], ["--max-gpus", "8"]):
        args = ["recommend", "--model", "70b", "--gpu", "all", *extra]
        times, cpu, d = cold(args)
        med, cpu_med = statistics.median(times), statistics.median(cpu)
        target = "" if extra else f"   (target <= 1.000 s: {'ok' if min(med, cpu_med) <= 1.0 else 'MISSED'})"
        print(f"  cold `ftplan {' '.join(args)}`: wall median {med:.3f} s (min {min(times):.3f} s), CPU median "
              f"{cpu_med:.3f} s over {len(times)} runs" + target)
        print(f"    {d['evaluated']} candidate plans over {len(d['gpus'])} GPU types in {d['seconds']:.3f} s = "
              f"{d['evaluated'] / d['seconds']:,.0f} plans/s")
    print(f"  machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
