"""A byte-exact snapshot of the planner's predictions, so that a refactor cannot move a number unnoticed.

For every configuration of the trace reference grid (`calibrate/reference/trace-points.jsonl`), each one again
under every multi-GPU strategy (with and without CPU offload), and a few GPUs: the predicted events, breakdown,
peak, paged and offloaded bytes, parameter counts, and tokens/s with its parts. Integers must match exactly;
floats to 1e-9 relative (`tests/test_snapshot.py`).

Regenerate only on purpose, with the reason in the commit: `python -m calibrate.snapshot --write`.
Pure planner code: no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from planner.config import TrainConfig
from planner.plan import make_plan
from planner.profiles import load_gpu, load_model

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "calibrate" / "reference" / "trace-points.jsonl"
SNAPSHOT = ROOT / "calibrate" / "reference" / "snapshot.jsonl"

GPUS = ("h100-sxm-80gb", "a100-sxm-80gb", "rtx-4090-24gb", "t4-16gb")
# (num_gpus, strategy, cpu_offload) variants applied to every reference configuration
STRATEGY_VARIANTS = ((8, "ddp", False), (8, "zero2", False), (8, "zero3", False), (8, "fsdp", False),
                     (4, "zero2", True), (16, "zero3", True), (2, "fsdp", True))


def reference_configs() -> list[tuple[str, str, dict]]:
    """(id, model, train dict) of every configuration the snapshot covers, in a fixed order."""
    out = []
    for line in REFERENCE.read_text().splitlines():
        if not line.strip():
            continue
        p = json.loads(line)
        out.append((p["id"], p["model"], dict(p["train"])))
        for n, strategy, offload in STRATEGY_VARIANTS:
            t = dict(p["train"], num_gpus=n, strategy=strategy, cpu_offload=offload)
            out.append((f"{p['id']}-{n}{strategy}{'-off' if offload else ''}", p["model"], t))
    return out


def predict(model: str, train: dict, gpu: str) -> dict:
    """Everything the planner predicts for one configuration on one GPU, as plain JSON values."""
    plan = make_plan(load_model(model), TrainConfig.from_dict(train), load_gpu(gpu))
    m, s = plan.memory, plan.speed
    return {
        "peak_allocated_bytes": m.peak_allocated_bytes,
        "peak_event": m.peak_event,
        "events": dict(m.events),
        "breakdown": dict(m.breakdown),
        "paged_bytes": m.paged_bytes,
        "cpu_offload_bytes": m.cpu_offload_bytes,
        "trainable_params": m.trainable_params,
        "total_params": m.total_params,
        "notes": list(m.notes) + list(plan.notes),
        "peak_reserved_bytes": plan.peak_reserved_bytes,
        "device_bytes": plan.device_bytes,
        "tokens_per_s": s.tokens_per_s,
        "step_seconds": s.step_seconds,
        "mfu": s.mfu,
        "flops_per_token": s.flops_per_token,
        "parts_seconds": dict(s.parts_seconds),
    }


def snapshot_rows() -> list[dict]:
    rows = []
    for i, (cid, model, train) in enumerate(reference_configs()):
        gpu = GPUS[i % len(GPUS)]
        try:
            pred = predict(model, train, gpu)
        except ValueError as e:  # a combination the configuration refuses is part of the snapshot too
            pred = {"error": str(e)}
        rows.append({"id": cid, "model": model, "gpu": gpu, "train": train, "prediction": pred})
    return rows


def differences(expected, actual, path: str = "", rel: float = 1e-9) -> list[str]:
    """Where `actual` departs from `expected`: integers and strings exactly, floats to `rel`."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for k in sorted(set(expected) | set(actual)):
            if k not in expected or k not in actual:
                out.append(f"{path}.{k}: {'missing' if k not in actual else 'new'}")
            else:
                out += differences(expected[k], actual[k], f"{path}.{k}", rel)
        return out
    if isinstance(expected, float) or isinstance(actual, float):
        if not isinstance(actual, (int, float)) or isinstance(actual, bool):
            return [f"{path}: {expected!r} != {actual!r}"]
        if abs(expected - actual) > rel * max(abs(expected), abs(actual), 1e-300):
            return [f"{path}: {expected!r} != {actual!r}"]
        return []
    return [] if expected == actual else [f"{path}: {expected!r} != {actual!r}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite the snapshot (on purpose only)")
    args = ap.parse_args(argv)
    rows = snapshot_rows()
    if args.write:
        tmp = SNAPSHOT.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        tmp.replace(SNAPSHOT)
        print(f"wrote {len(rows)} rows to {SNAPSHOT.relative_to(ROOT)}")
        return 0
    expected = [json.loads(line) for line in SNAPSHOT.read_text().splitlines() if line.strip()]
    bad = 0
    for e, a in zip(expected, rows):
        diff = differences(e, a)
        if diff:
            bad += 1
            print(e["id"], "; ".join(diff[:5]))
    if len(expected) != len(rows):
        print(f"row count {len(expected)} != {len(rows)}")
        bad += 1
    print(f"{len(rows)} rows, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
