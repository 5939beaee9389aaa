"""Predicted vs measured for every record: the numbers behind `ftplan validate` and the accuracy report.

Pure Python (no torch): predictions come from the current planner (and the calibration in effect,
`profiles/calibration/<gpu>.toml`), not from the `prediction` stored in the record at measurement time (that one
is kept for history). Only CUDA records have comparable memory and tokens/s (CPU records are listed; the planner
predicts CUDA memory); an OOM record is checked against the planner's fit verdict instead."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from planner.arch import arch_from_config
from planner.config import TrainConfig
from planner.cost import ThroughputParams
from planner.plan import make_plan
from planner.profiles import ProfileError, load_gpu


@dataclass
class Comparison:
    """One record against the planner. Errors are signed fractions: (predicted - measured) / measured."""

    id: str
    path: str
    kind: str
    status: str
    gpu: str
    model: str
    method: str
    config: str
    measured_allocated_bytes: int | None
    predicted_allocated_bytes: int | None
    error_allocated: float | None
    measured_reserved_bytes: int | None
    predicted_reserved_bytes: int | None
    error_reserved: float | None
    measured_tokens_per_s: float | None
    predicted_tokens_per_s: float | None
    error_tokens_per_s: float | None
    predicted_fits: bool | None
    note: str = ""  # why something is not compared (cannot predict), or an OOM the planner said would fit

    def to_dict(self) -> dict:
        return asdict(self)


def _err(pred, meas):
    if pred is None or meas in (None, 0):
        return None
    return (pred - meas) / meas


def compare_record(rec: dict, params: ThroughputParams | None = None) -> Comparison:
    """Predict the record's configuration on the record's GPU and compare. CPU records and OOM records keep
    only what is comparable (an OOM record's prediction should say 'does not fit')."""
    tc = TrainConfig.from_dict(rec["train"])
    arch = arch_from_config(rec["model"]["config"], name=rec["model"]["name"])
    m = rec["measured"]
    gpu = None
    profile = rec["meta_info"].get("gpu_profile")
    if m.get("device") == "cuda" and profile:
        try:
            gpu = load_gpu(profile)
        except ProfileError:
            gpu = None
    plan = make_plan(arch, tc, gpu)
    if params is not None and gpu is not None:
        from planner.cost import throughput
        from planner.plan import reserved_bytes

        speed = throughput(arch, tc, gpu, params)
        pred_tps = speed.tokens_per_s
        pred_res = reserved_bytes(plan.peak_allocated_bytes, params)
    else:
        pred_tps = plan.speed.tokens_per_s if plan.speed else None
        pred_res = plan.peak_reserved_bytes
    cuda = m.get("device") == "cuda"
    meas_alloc = m.get("peak_allocated_bytes") if cuda else None
    meas_res = m.get("peak_reserved_bytes") if cuda else None
    meas_tps = m.get("tokens_per_s") if cuda and rec["status"] == "ok" else None
    return Comparison(
        id=rec["id"],
        path=rec.get("_path", ""),
        kind=rec["kind"],
        status=rec["status"],
        gpu=profile or ("cpu" if m.get("device") == "cpu" else "unknown"),
        model=rec["model"]["name"],
        method=tc.method_name,
        config=tc.describe(),
        measured_allocated_bytes=meas_alloc,
        predicted_allocated_bytes=plan.peak_allocated_bytes if cuda else None,
        error_allocated=_err(plan.peak_allocated_bytes, meas_alloc) if rec["status"] == "ok" else None,
        measured_reserved_bytes=meas_res,
        predicted_reserved_bytes=pred_res if cuda else None,
        error_reserved=_err(pred_res, meas_res) if rec["status"] == "ok" else None,
        measured_tokens_per_s=meas_tps,
        predicted_tokens_per_s=pred_tps if cuda else None,
        error_tokens_per_s=_err(pred_tps, meas_tps),
        predicted_fits=plan.fits,
        note=("out of memory, but the planner says it fits" if rec["status"] == "oom" and plan.fits else ""),
    )


def _uncomparable(rec: dict, reason: str) -> Comparison:
    m = rec.get("measured", {})
    cuda = m.get("device") == "cuda"
    return Comparison(
        id=rec["id"], path=rec.get("_path", ""), kind=rec["kind"], status=rec["status"],
        gpu=rec["meta_info"].get("gpu_profile") or ("cpu" if m.get("device") == "cpu" else "unknown"),
        model=rec["model"]["name"], method=rec["train"].get("method", "?"), config="?",
        measured_allocated_bytes=m.get("peak_allocated_bytes") if cuda else None, predicted_allocated_bytes=None,
        error_allocated=None, measured_reserved_bytes=m.get("peak_reserved_bytes") if cuda else None,
        predicted_reserved_bytes=None, error_reserved=None,
        measured_tokens_per_s=m.get("tokens_per_s") if cuda else None, predicted_tokens_per_s=None,
        error_tokens_per_s=None, predicted_fits=None, note=f"cannot predict: {reason}",
    )


def compare(records: list[dict], params_by_gpu: dict | None = None) -> list[Comparison]:
    """Compare every record; `params_by_gpu` overrides the throughput parameters per GPU (used by the fit to
    show the error before and after)."""
    out = []
    for r in records:
        params = (params_by_gpu or {}).get(r["meta_info"].get("gpu_profile"))
        try:
            out.append(compare_record(r, params))
        except ValueError as e:  # a model family or option the planner does not know: listed, not compared
            out.append(_uncomparable(r, str(e)))
    return out


def summarize(rows: list[Comparison], by: str = "gpu") -> dict:
    """Median and max absolute error per group (`gpu` or `method`) for allocated, reserved, tokens/s."""
    groups: dict[str, list[Comparison]] = {}
    for c in rows:
        groups.setdefault(getattr(c, by), []).append(c)
    out = {}
    for key, cs in sorted(groups.items()):
        entry = {"n": len(cs)}
        for metric in ("allocated", "reserved", "tokens_per_s"):
            errs = [abs(getattr(c, f"error_{metric}")) for c in cs if getattr(c, f"error_{metric}") is not None]
            entry[metric] = {"n": len(errs), "median": statistics.median(errs) if errs else None,
                             "max": max(errs) if errs else None}
        out[key] = entry
    return out


METRICS = ("allocated", "reserved", "tokens_per_s")


def exceeding(rows: list[Comparison], metric: str, max_error: float) -> list[Comparison]:
    """Rows whose absolute `metric` error is above `max_error` (a fraction)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    return [c for c in rows if getattr(c, f"error_{metric}") is not None and abs(getattr(c, f"error_{metric}")) > max_error]


def oom_disagreements(rows: list[Comparison]) -> list[Comparison]:
    """OOM records that the planner predicts would fit."""
    return [c for c in rows if c.status == "oom" and c.predicted_fits]


def report(rows: list[Comparison], metric: str = "allocated", max_error: float = 0.05) -> dict:
    """The `ftplan validate --json` document: every row, the summaries per GPU and per method, and the verdict."""
    bad = exceeding(rows, metric, max_error)
    return {
        "metric": metric,
        "max_error": max_error,
        "ok": not bad,
        "records": len(rows),
        "compared": {m: sum(1 for c in rows if getattr(c, f"error_{m}") is not None) for m in METRICS},
        "exceeding": [c.id for c in bad],
        "oom_but_predicted_fits": [c.id for c in oom_disagreements(rows)],
        "by_gpu": summarize(rows, by="gpu"),
        "by_method": summarize(rows, by="method"),
        "rows": [c.to_dict() for c in rows],
    }
