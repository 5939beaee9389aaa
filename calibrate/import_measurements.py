"""Import measured rows (JSON lines as in shared/measurements) as `kind: import` records.

    python -m calibrate.import_measurements ../shared/measurements/h100-sxm-80gb.jsonl --gpu h100-sxm-80gb \
        --versions torch=2.11.0+cu130,transformers=5.17.0,peft=0.21.0,bitsandbytes=0.50.2

Row fields: name, model, model_config, method, precision, rank, num_virtual_tokens, target_modules, seq_len,
batch_size, grad_ckpt, optimizer, peak_allocated_gib, peak_reserved_gib (GiB = 2^30 bytes, 2 decimals),
tokens_per_s. Each becomes one record (bytes rounded from the GiB figures: +-0.005 GiB).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from planner.arch import arch_from_config
from planner.config import TrainConfig, parse_target_modules
from planner.plan import make_plan
from planner.profiles import load_gpu

from .record import new_record, write_record

GIB = 2**30


def row_to_train(row: dict) -> TrainConfig:
    kw = dict(method=row["method"], precision=row["precision"], seq_len=row["seq_len"], batch_size=row["batch_size"],
              grad_ckpt=bool(row["grad_ckpt"]), optimizer=row["optimizer"])
    if row.get("rank"):
        kw["rank"] = row["rank"]
    if row.get("target_modules"):
        kw["target_modules"] = parse_target_modules(row["target_modules"])
    if row.get("num_virtual_tokens"):
        kw["num_virtual_tokens"] = row["num_virtual_tokens"]
    return TrainConfig(**kw)


def row_record(row: dict, gpu_name: str, versions: dict | None = None, source: str = "",
               max_position_embeddings: int = 16384) -> dict:
    """One measured row as a `kind: import` record (in memory), with the current planner's prediction."""
    gpu = load_gpu(gpu_name)
    tc = row_to_train(row)
    config = dict(row["model_config"], max_position_embeddings=max_position_embeddings)
    plan = make_plan(arch_from_config(config, name=row["model"]), tc, gpu)
    return new_record(
        kind="import",
        model_name=row["model"],
        model_config=config,
        train=tc.to_dict(),
        measured={
            "device": "cuda",
            "peak_allocated_bytes": int(round(row["peak_allocated_gib"] * GIB)),
            "peak_reserved_bytes": int(round(row["peak_reserved_gib"] * GIB)) if row.get("peak_reserved_gib") else None,
            "tokens_per_s": float(row["tokens_per_s"]) if row.get("tokens_per_s") else None,
            "steps": 6,
            "warmup_steps": 2,
        },
        prediction={
            "peak_allocated_bytes": plan.peak_allocated_bytes,
            "peak_reserved_bytes": plan.peak_reserved_bytes,
            "device_bytes": plan.device_bytes,
            "tokens_per_s": plan.speed.tokens_per_s,
        },
        meta_info={"gpu_name": gpu.display_name, "gpu_profile": gpu.name, "gpu_total_bytes": gpu.memory_bytes,
                   "versions": dict(versions or {}), "note": "GiB figures given to 2 decimals (+-0.005 GiB)"},
        command=f"python -m calibrate.import_measurements {source.split('#')[0]} --gpu {gpu_name}",
        source=source,
    )


def read_rows(path: Path, gpu_name: str, versions: dict | None = None) -> list[dict]:
    """Every row of a measurements JSON-lines file as a record; a malformed line is an error naming file:line."""
    out = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(row_record(row, gpu_name, versions, f"{Path(path).name}#{row.get('name', line_no)}"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{line_no}: not a measurement row ({e})") from None
    return out


def import_rows(path: Path, gpu_name: str, versions: dict, out_dir=None, max_position_embeddings: int = 16384) -> list[Path]:
    """Write every row of `path` as a record file (calibrate/results/<gpu>/ by default)."""
    return [write_record(rec, out_dir) for rec in read_rows(path, gpu_name, versions)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Import measured rows as ftplan records.")
    ap.add_argument("jsonl", type=Path)
    ap.add_argument("--gpu", required=True, help="GPU profile the rows were measured on")
    ap.add_argument("--versions", default="", help="name=version,... of the measuring stack")
    ap.add_argument("--out", default=None, help="results folder (default calibrate/results)")
    args = ap.parse_args(argv)
    versions = dict(kv.split("=", 1) for kv in args.versions.split(",") if "=" in kv)
    paths = import_rows(args.jsonl, args.gpu, versions, args.out)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
