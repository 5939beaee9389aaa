"""Benchmark `ftplan recommend`: cold wall time of the command and candidate plans evaluated per second.

    python benchmarks/recommend_bench.py            # targets: cold <= 0.3 s, >= 10,000 plans/s

- cold: `ftplan recommend --model 70b --gpu a100-80` in a fresh Python process each time (interpreter start,
  imports, profile loading, the per-configuration layer replays and the ranking), median of 7 runs;
- plans/s (warm): a fixed sweep of every method x precision/rank x optimizer x micro-batch x checkpointing x
  GPU count x strategy for Llama-3.1-8B on an A100-80, evaluated with `make_plan` after one pass that fills
  the replay caches (the steady state of recommend, report and fit maps);
- plans/s (cold, in process): the same sweep on a model not seen before, replays included.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cold_command(runs: int = 7) -> list[float]:
    exe = Path(sys.executable).with_name("ftplan")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "planner.cli"]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd + ["recommend", "--model", "70b", "--gpu", "a100-80"], check=True, capture_output=True,
                       env=dict(os.environ, PYTHONDONTWRITEBYTECODE="0"))
        times.append(time.perf_counter() - t0)
    return times


def sweep(model: str):
    from planner.config import TrainConfig
    from planner.profiles import load_gpu, load_model

    arch, gpu = load_model(model), load_gpu("a100-80")
    fams = [dict(method="full", precision="mixed"), dict(method="full", precision="bf16")]
    fams += [dict(method=m, rank=r, target_modules=("all-linear",)) for m in ("lora", "qlora") for r in (8, 16, 64)]
    fams += [dict(method="ia3"), dict(method="prompt"), dict(method="prefix")]
    layouts = [(1, "ddp")] + [(n, s) for n in (2, 4, 8) for s in ("ddp", "zero2", "zero3", "fsdp")]
    out = []
    for fam in fams:
        for opt in ("adamw", "adamw8bit", "paged_adamw8bit", "adafactor", "sgd"):
            for b in (1, 2, 4, 8, 16):
                for ck in ((False,) if fam["method"] == "prefix" else (False, True)):
                    for n, s in layouts:
                        out.append(TrainConfig(seq_len=2048, batch_size=b, grad_accum=16 // b, grad_ckpt=ck, optimizer=opt,
                                               num_gpus=n, strategy=s, **fam))
    return arch, gpu, out


def plans_per_second(model: str, warm: bool) -> tuple[int, float]:
    from planner.plan import Workload, make_plan

    arch, gpu, tcs = sweep(model)
    work = Workload(50_000_000, 3)
    if warm:
        for tc in tcs:
            make_plan(arch, tc, gpu, work)
    t0 = time.perf_counter()
    for tc in tcs:
        make_plan(arch, tc, gpu, work)
    return len(tcs), time.perf_counter() - t0


def main() -> int:
    cold = cold_command()
    n_cold, s_cold = plans_per_second("qwen2.5-7b", warm=False)
    n_warm, s_warm = plans_per_second("llama-3.1-8b", warm=True)
    med = statistics.median(cold)
    print("ftplan recommend benchmark")
    print(f"  cold `ftplan recommend --model 70b --gpu a100-80`: median {med:.3f} s, min {min(cold):.3f} s "
          f"over {len(cold)} runs   (target <= 0.300 s: {'ok' if med <= 0.3 else 'MISSED'})")
    print(f"  warm sweep: {n_warm} candidate plans in {s_warm:.3f} s = {n_warm / s_warm:,.0f} plans/s   "
          f"(target >= 10,000: {'ok' if n_warm / s_warm >= 10_000 else 'MISSED'})")
    print(f"  cold sweep (replays included): {n_cold} plans in {s_cold:.3f} s = {n_cold / s_cold:,.0f} plans/s")
    print(f"  machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
