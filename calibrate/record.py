"""Calibration records: one immutable JSON file per measured (or imported, or real-run) configuration.

Layout: `calibrate/results/<gpu>/<model>--<method>-s<seq>-b<batch>--<UTC timestamp>.json` (CPU runs use the
folder `cpu`). A record is never edited after it is written; a new measurement is a new file. Pure Python:
`ftplan validate` reads records without torch.

Schema `ftplan.record/1`:

    schema, id, status ("ok" | "oom" | "error"), kind ("calibrate" | "run" | "import"), created, command, source
    model:      {name, config}                         config.json fields the model was built from
    train:      TrainConfig fields
    measured:   {device, peak_allocated_bytes, peak_reserved_bytes, nvml_peak_used_bytes, cuda_context_bytes,
                 process_peak_rss_bytes, step_seconds [..], tokens_per_s, steps, warmup_steps}
    prediction: {peak_allocated_bytes, peak_reserved_bytes, device_bytes, tokens_per_s, planner_version}
    meta_info:  {gpu_name, gpu_profile, gpu_total_bytes, driver, versions {...}, git, host}
    error:      message when status is not "ok"
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from pathlib import Path

from planner.fileio import write_text

SCHEMA = "ftplan.record/1"
STATUSES = ("ok", "oom", "error")
KINDS = ("calibrate", "run", "import")
RESULTS_DIR = Path(__file__).resolve().parent / "results"

MEASURED_KEYS = ("device", "peak_allocated_bytes", "peak_reserved_bytes", "nvml_peak_used_bytes", "cuda_context_bytes",
                 "process_peak_rss_bytes", "step_seconds", "tokens_per_s", "steps", "warmup_steps")


class RecordError(ValueError):
    """A record file that does not follow the schema (the message names the file and the field)."""


def utc_stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"


def record_filename(record: dict) -> str:
    t = record["train"]
    model = _slug(Path(record["model"]["name"]).name if "/" in record["model"]["name"] else record["model"]["name"])
    stamp = record.get("id", "").rsplit("--", 1)[-1] or utc_stamp()
    return f"{model}--{t['method']}-s{t['seq_len']}-b{t['batch_size']}--{stamp}.json"


def new_record(*, kind: str, model_name: str, model_config: dict, train: dict, measured: dict, status: str = "ok",
               prediction: dict | None = None, meta_info: dict | None = None, command: str = "", source: str = "",
               error: str | None = None, created: str | None = None) -> dict:
    """A record dict (validated). `measured` may omit keys it did not measure (stored as null)."""
    stamp = utc_stamp()
    rec = {
        "schema": SCHEMA,
        "id": f"{_slug(model_name)}--{train['method']}-s{train['seq_len']}-b{train['batch_size']}--{stamp}",
        "status": status,
        "kind": kind,
        "created": created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "source": source,
        "model": {"name": model_name, "config": dict(model_config)},
        "train": dict(train),
        "measured": {k: measured.get(k) for k in MEASURED_KEYS},
        "prediction": dict(prediction or {}),
        "meta_info": dict(meta_info or {}),
        "error": error,
    }
    validate_record(rec)
    return rec


def validate_record(rec: dict, where: str = "record") -> None:
    """Raise RecordError naming the field if `rec` does not follow the schema."""
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: not a JSON object")
    for key in ("model", "train", "measured", "meta_info"):
        if key in rec and not isinstance(rec[key], dict):
            raise RecordError(f"{where}: '{key}' must be a JSON object")
    if rec.get("schema") != SCHEMA:
        raise RecordError(f"{where}: schema must be {SCHEMA!r}, got {rec.get('schema')!r}")
    for key in ("id", "status", "kind", "model", "train", "measured", "meta_info"):
        if key not in rec:
            raise RecordError(f"{where}: missing '{key}'")
    if rec["status"] not in STATUSES:
        raise RecordError(f"{where}: status must be one of {', '.join(STATUSES)}")
    if rec["kind"] not in KINDS:
        raise RecordError(f"{where}: kind must be one of {', '.join(KINDS)}")
    if not isinstance(rec["model"].get("config"), dict) or "model_type" not in rec["model"]["config"]:
        raise RecordError(f"{where}: model.config must hold the config.json fields (with model_type)")
    for key in ("method", "seq_len", "batch_size"):
        if key not in rec["train"]:
            raise RecordError(f"{where}: train.{key} missing")
    m = rec["measured"]
    if rec["status"] == "ok":
        if m.get("device") not in ("cuda", "cpu"):
            raise RecordError(f"{where}: measured.device must be cuda or cpu")
        if m["device"] == "cuda" and not isinstance(m.get("peak_allocated_bytes"), int):
            raise RecordError(f"{where}: measured.peak_allocated_bytes (int bytes) is required for a CUDA record")
    for key in ("peak_allocated_bytes", "peak_reserved_bytes", "nvml_peak_used_bytes", "cuda_context_bytes",
                "process_peak_rss_bytes"):
        v = m.get(key)
        if v is not None and (not isinstance(v, int) or v < 0):
            raise RecordError(f"{where}: measured.{key} must be a non-negative integer (bytes)")


def gpu_folder(record: dict) -> str:
    if record["measured"].get("device") == "cpu":
        return "cpu"
    return record["meta_info"].get("gpu_profile") or _slug(record["meta_info"].get("gpu_name") or "unknown-gpu")


def write_record(record: dict, out_dir: str | Path | None = None) -> Path:
    """Write `record` as a new file under `out_dir/<gpu>/` (never overwrites: exclusive create)."""
    validate_record(record)
    base = Path(out_dir) if out_dir is not None else RESULTS_DIR
    folder = base / gpu_folder(record)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / record_filename(record)
    # a record is written once (exclusive), whole (a temporary name renamed) and durable (fsync)
    write_text(path, json.dumps(record, indent=2, sort_keys=False) + "\n", fsync=True, exclusive=True)
    return path


def load_records(paths=None, skipped: list | None = None) -> list[dict]:
    """Every record under the given files/folders (default: calibrate/results), each with `_path` added.

    A file that cannot be read as a record (truncated, not JSON, not UTF-8, not the schema) raises RecordError
    naming the file; with a `skipped` list it is left out instead and `(path, reason)` appended to the list."""
    roots = [Path(p) for p in (paths or [RESULTS_DIR])]
    files = []
    out = []
    for r in roots:
        if r.is_file() and r.suffix == ".jsonl":
            out += _measurement_rows(r)
        elif r.is_dir():
            files += sorted(r.rglob("*.json"))
        elif r.is_file():
            files.append(r)
        else:
            raise RecordError(f"no records at {r}: no such file or folder (valid: record files or folders, e.g. "
                              "calibrate/results)")
    for f in files:
        try:
            rec = _read_record(f)
        except RecordError as e:
            if skipped is None:
                raise
            skipped.append((os.fspath(f), str(e)))
            continue
        rec["_path"] = os.fspath(f)
        out.append(rec)
    return out


def _read_record(f: Path) -> dict:
    try:
        rec = json.loads(f.read_bytes().decode("utf-8"))
    except OSError as e:
        raise RecordError(f"{f}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise RecordError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RecordError(f"{f}: invalid JSON ({e.msg} at line {e.lineno}; truncated?)") from None
    validate_record(rec, str(f))
    return rec


def _measurement_rows(path: Path) -> list[dict]:
    """A measurements JSON-lines file (the shared measurement format) read as import records, in memory; the GPU
    is the profile its file name names (`h100-sxm-80gb.jsonl`)."""
    from planner.profiles import ProfileError, load_gpu

    from .import_measurements import read_rows

    try:
        gpu = load_gpu(path.stem).name
    except ProfileError as e:
        raise RecordError(f"{path}: name the file after its GPU profile (e.g. h100-sxm-80gb.jsonl): {e}") from None
    try:
        recs = read_rows(path, gpu)
    except ValueError as e:
        raise RecordError(str(e)) from None
    for rec in recs:
        rec["_path"] = f"{path}#{rec['source'].split('#', 1)[-1]}"
    return recs


def records_frame(records: list[dict]):
    """All records as one pandas DataFrame (one row per record; train.*, measured.*, prediction.* columns)."""
    import pandas as pd

    rows = []
    for r in records:
        row = {"id": r["id"], "status": r["status"], "kind": r["kind"], "model": r["model"]["name"],
               "gpu": gpu_folder(r), "path": r.get("_path")}
        for sect in ("train", "measured", "prediction"):
            for k, v in r.get(sect, {}).items():
                if not isinstance(v, (list, dict)):
                    row[f"{sect}.{k}"] = v
        rows.append(row)
    return pd.DataFrame(rows)
