"""`ftplan calibrate fit`: learn, per GPU architecture, the few quantities the throughput model cannot derive.

The model (planner/cost.py, planner/kernels.py) times every kernel of a step from the GPU's physical figures
(dense tensor-core and fp32 peaks, memory bandwidth, SM count) and the shapes and bytes of the ops the memory
model replays. What is fitted (`planner.cost.FITTED`, each one physical quantity of the architecture, none per
configuration, none per method):

- `gemm_efficiency`: the fraction of the dense peak a full wave of large GEMM tiles reaches;
- `bandwidth_efficiency`: the achieved fraction of memory bandwidth by bandwidth-bound kernels;
- `launch_seconds`: what each kernel costs beyond its work (launch, the eager framework's per-op CPU time);
- `fp32_efficiency`: the fraction of the fp32 CUDA-core peak that fp32 GEMMs reach (peft's fp32 LoRA matrices,
  QLoRA's fp32 lm_head);
- `allocator_overhead`: the median of measured peak reserved / peak allocated - 1 (memory, not time);
- `cuda_context_bytes`: the median CUDA context NVML saw outside the allocator (records that measured it).

The attention efficiencies keep their published priors (`planner.cost.ATTENTION_EFFICIENCY`).

How: maximum a posteriori on log(tokens/s) - a robust (Huber beyond 2 sigma) least-squares fit of the records'
log throughput (each record's error weighted as a 10% measurement spread) plus weak log-normal priors that keep
each parameter physical when the records say little: gemm_efficiency ~ 0.7 (x/÷ 1.5), bandwidth_efficiency ~ 0.7
(x/÷ 1.25), launch_seconds ~ 10 us (x/÷ 3), fp32_efficiency ~ 0.6 (x/÷ 1.5). Caps: gemm efficiency <= 0.85 of the dense peak, bandwidth <= 0.9.

Because the values are per architecture (fractions of each GPU's own peaks), a fit on one GPU times every GPU of
its architecture (`planner.cost.throughput_params`: calibrated / transferred / extrapolated). The expected error
of each is written to the file:
- calibrated: the leave-one-out median error (each record predicted by a fit to the others);
- transferred: where other GPUs of the architecture have records, the median error of this fit on them (each
  timed from its own profile); otherwise sqrt(loo^2 + TRANSFER_ERROR^2), TRANSFER_ERROR = 10% the assumed spread
  between GPUs of one architecture that the physical inputs do not capture (sustained clocks under each SKU's
  power limit);
- extrapolated: likewise measured on other architectures' records where they exist; otherwise sqrt(loo^2 +
  EXTRAPOLATION_ERROR^2) with 35%: the cross-architecture error of borrowing one calibration that issue 14 found
  against public A100, L40S and RTX 4090 figures (30-65% median for the former model; the physical inputs remove
  part of it).

Pure Python (no numpy): the problem has four parameters.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

from planner.arch import arch_from_config
from planner.config import TrainConfig
from planner.cost import (
    FITTED,
    ThroughputParams,
    calibration_dir,
    method_key,
    _calibrations,
    throughput,
    throughput_params,
)
from planner.fileio import write_text
from planner.profiles import load_gpu

from .validate import compare, summarize

SIGMA_MEASURE = math.log(1.10)  # spread of one record's tokens/s around the model (10%)
PRIORS = {  # (median, log sigma) of each fitted parameter
    "gemm_efficiency": (0.7, math.log(1.5)),
    "bandwidth_efficiency": (0.7, math.log(1.25)),
    "launch_seconds": (20e-6, math.log(3.0)),
    "fp32_efficiency": (0.6, math.log(1.5)),
}
BOUNDS = {"gemm_efficiency": (0.05, 0.85), "bandwidth_efficiency": (0.2, 0.9), "launch_seconds": (1e-7, 2e-4),
          "fp32_efficiency": (0.05, 0.85)}
MAX_EFFICIENCY = BOUNDS["gemm_efficiency"][1]  # cuBLAS bf16 GEMMs reach ~75-80% of the dense peak on large matrices
MAX_BANDWIDTH = BOUNDS["bandwidth_efficiency"][1]  # streaming kernels reach ~90% of HBM bandwidth
TRANSFER_ERROR = 0.10  # assumed spread between GPUs of one architecture (see the module docstring)
EXTRAPOLATION_ERROR = 0.35  # assumed cross-architecture error (see the module docstring)


@dataclass
class Row:
    """One record usable for the throughput fit."""

    id: str
    arch: object
    tc: TrainConfig
    key: str
    tokens_per_s: float


@dataclass
class Parameter:
    name: str
    value: float
    how: str  # "fitted" | "prior" | "median" | "default"
    note: str = ""


@dataclass
class FitResult:
    gpu: str
    gpu_display: str
    architecture: str
    params: ThroughputParams
    before: ThroughputParams
    defaults: ThroughputParams
    parameters: list[Parameter]
    record_ids: list[str]
    kinds: dict
    excluded: list[str]
    errors: dict  # label -> {"tokens_per_s": {n, median, max}, "reserved": {...}}
    expected_error: dict = field(default_factory=dict)  # calibrated / transferred / extrapolated -> median error
    rows: list[dict] = field(default_factory=list)  # per record: id, config, measured, before, after, loo

    def to_dict(self) -> dict:
        return {
            "gpu": self.gpu,
            "architecture": self.architecture,
            "parameters": [vars(p) for p in self.parameters],
            "params": _params_dict(self.params),
            "records": list(self.record_ids),
            "kinds": dict(self.kinds),
            "excluded": list(self.excluded),
            "errors": self.errors,
            "expected_error": dict(self.expected_error),
            "rows": self.rows,
        }


def _params_dict(p: ThroughputParams) -> dict:
    return {k: getattr(p, k) for k in (*FITTED, "fp32_efficiency", "allocator_overhead", "cuda_context_bytes",
                                        "architecture", "source")}


# -- which records ------------------------------------------------------------------------------------------------


def gpus_in(records: list[dict]) -> list[str]:
    """GPU profiles that have CUDA records."""
    return sorted({r["meta_info"].get("gpu_profile") for r in records
                   if r["measured"].get("device") == "cuda" and r["meta_info"].get("gpu_profile")})


def cuda_records(records: list[dict], gpu: str) -> list[dict]:
    return [r for r in records if r["status"] == "ok" and r["measured"].get("device") == "cuda"
            and r["meta_info"].get("gpu_profile") == gpu]


def throughput_rows(records: list[dict]) -> tuple[list[Row], list[str]]:
    """(rows for the throughput fit, ids excluded with the reason). Single-GPU records with tokens/s only: a
    multi-GPU record would fit communication into the kernel efficiencies."""
    rows, excluded = [], []
    for r in records:
        tps = r["measured"].get("tokens_per_s")
        tc = TrainConfig.from_dict(r["train"])
        if not tps:
            excluded.append(f"{r['id']}: no tokens/s")
            continue
        if tc.num_gpus > 1:
            excluded.append(f"{r['id']}: {tc.num_gpus} GPUs (the fit is single-device)")
            continue
        arch = arch_from_config(r["model"]["config"], name=r["model"]["name"])
        rows.append(Row(r["id"], arch, tc, method_key(tc), float(tps)))
    return rows, excluded


# -- the throughput fit -------------------------------------------------------------------------------------------


def _params(x: list[float], base: ThroughputParams) -> ThroughputParams:
    return replace(base, **{k: math.exp(v) for k, v in zip(FITTED, x)})


def _clamp(x: list[float]) -> list[float]:
    return [min(max(v, math.log(BOUNDS[k][0])), math.log(BOUNDS[k][1])) for k, v in zip(FITTED, x)]


def _log_errors(rows: list[Row], gpu, params: ThroughputParams) -> list[float]:
    return [math.log(throughput(r.arch, r.tc, gpu, params).tokens_per_s / r.tokens_per_s) for r in rows]


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (a is small and symmetric positive definite)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        if abs(m[c][c]) < 1e-300:
            continue
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for k in range(c, n + 1):
                m[r][k] -= f * m[c][k]
    x = [0.0] * n
    for c in range(n - 1, -1, -1):
        s = m[c][n] - sum(m[c][k] * x[k] for k in range(c + 1, n))
        x[c] = s / m[c][c] if abs(m[c][c]) > 1e-300 else 0.0
    return x


HUBER_K = 2.0  # record residuals beyond 2 measurement sigmas (~20%) count linearly, not squared


def _huber(r: float) -> float:
    """A residual whose square is the Huber loss: r inside +-k, sqrt(2k|r| - k^2) beyond. A record the physical
    parameters cannot explain (an outlier, or a mechanism the model lacks) then pulls on the fit linearly instead
    of bending every parameter towards it; the fit's report still shows its error."""
    a = abs(r)
    if a <= HUBER_K:
        return r
    return math.copysign(math.sqrt(2.0 * HUBER_K * a - HUBER_K * HUBER_K), r)


def fit_throughput(rows: list[Row], gpu, base: ThroughputParams | None = None, iterations: int = 60) -> ThroughputParams:
    """MAP fit of `FITTED` to `rows` (Levenberg-Marquardt on log tokens/s plus the priors). Rows may be empty:
    the priors alone. The step is max(GPU work, host time), so the cost has a kink where a record turns
    host-bound: the fit starts from the prior and from launch_seconds 4x below and above it, and keeps the best."""
    base = base or ThroughputParams()

    def residuals(x):
        p = _params(x, base)
        out = [_huber(e / SIGMA_MEASURE) for e in _log_errors(rows, gpu, p)]
        return out + [(v - math.log(PRIORS[k][0])) / PRIORS[k][1] for k, v in zip(FITTED, x)]

    prior = [math.log(PRIORS[k][0]) for k in FITTED]
    at = FITTED.index("launch_seconds")
    best = None
    for shift in (0.0, -math.log(4.0), math.log(4.0)):
        x0 = list(prior)
        x0[at] += shift
        x, cost = _levenberg_marquardt(residuals, _clamp(x0), iterations)
        if best is None or cost < best[1] - 1e-9:
            best = (x, cost)
    return _params(best[0], base)


def _levenberg_marquardt(residuals, x: list[float], iterations: int) -> tuple[list[float], float]:
    r = residuals(x)
    cost = sum(v * v for v in r)
    lam = 1e-2
    for _ in range(iterations):
        n = len(x)
        jac = []
        for j in range(n):
            xh = list(x)
            xh[j] += 1e-5
            rh = residuals(xh)
            jac.append([(rh[i] - r[i]) / 1e-5 for i in range(len(r))])
        jtj = [[sum(jac[a][i] * jac[b][i] for i in range(len(r))) for b in range(n)] for a in range(n)]
        jtr = [sum(jac[a][i] * r[i] for i in range(len(r))) for a in range(n)]
        improved = done = False
        for _ in range(12):
            a = [[jtj[i][j] + (lam * (jtj[i][i] + 1e-9) if i == j else 0.0) for j in range(n)] for i in range(n)]
            step = _solve(a, [-v for v in jtr])
            xn = _clamp([x[i] + step[i] for i in range(n)])
            rn = residuals(xn)
            cn = sum(v * v for v in rn)
            if cn < cost:
                done = cost - cn < 1e-12 * max(1.0, cost)
                x, r, cost = xn, rn, cn
                lam = max(lam / 3, 1e-9)
                improved = True
                break
            lam *= 4
        if not improved or done:
            break
    return x, cost


# -- the whole fit of one GPU -------------------------------------------------------------------------------------


def _median(values):
    return statistics.median(values) if values else None


def allocator_overhead(records: list[dict]) -> tuple[float | None, list[float]]:
    ratios = [r["measured"]["peak_reserved_bytes"] / r["measured"]["peak_allocated_bytes"] - 1.0 for r in records
              if r["measured"].get("peak_reserved_bytes") and r["measured"].get("peak_allocated_bytes")]
    return _median(ratios), ratios


def cuda_context(records: list[dict]) -> tuple[int | None, int]:
    """Median measured CUDA context (records with paged optimizers excluded: their managed memory sits in the
    same NVML figure)."""
    vals = [r["measured"]["cuda_context_bytes"] for r in records if r["measured"].get("cuda_context_bytes")
            and "paged" not in r["train"].get("optimizer", "")]
    return (int(statistics.median(vals)) if vals else None), len(vals)


def _errors(comparisons) -> dict:
    s = summarize(comparisons, by="gpu")
    if not s:
        return {"tokens_per_s": {"n": 0, "median": None, "max": None}, "reserved": {"n": 0, "median": None, "max": None}}
    (entry,) = s.values()
    return {"tokens_per_s": entry["tokens_per_s"], "reserved": entry["reserved"]}


def _loo(rows: list[Row], gpu, base: ThroughputParams) -> dict[str, float]:
    """Signed tokens/s error of each row predicted by a fit to the other rows."""
    out = {}
    for i, row in enumerate(rows):
        p = fit_throughput(rows[:i] + rows[i + 1:], gpu, base)
        pred = throughput(row.arch, row.tc, gpu, p).tokens_per_s
        out[row.id] = (pred - row.tokens_per_s) / row.tokens_per_s
    return out


def expected_errors(loo_median: float | None, measured: dict | None = None) -> dict:
    """The median tokens/s error to expect where the fit is used as calibrated, transferred to another GPU of its
    architecture, or extrapolated to another architecture (module docstring): `measured` (from `transfer_errors`)
    where other GPUs have records, else the leave-one-out error widened by the assumed spread."""
    if loo_median is None:
        return {}
    measured = measured or {}
    return {"calibrated": loo_median,
            "transferred": measured.get("transferred", math.hypot(loo_median, TRANSFER_ERROR)),
            "extrapolated": measured.get("extrapolated", math.hypot(loo_median, EXTRAPOLATION_ERROR))}


def transfer_errors(records: list[dict], gpu, params: ThroughputParams) -> tuple[dict, dict]:
    """The median |tokens/s error| of `params` (fitted on `gpu`) on the records of *other* GPUs: those of the same
    architecture ("transferred") and of other architectures ("extrapolated"), each timed from its own profile.
    Returns (errors, record counts); a kind without records is absent (the assumed spread stays)."""
    errs: dict = {"transferred": [], "extrapolated": []}
    for name in gpus_in(records):
        if name == gpu.name:
            continue
        other = load_gpu(name)
        rows, _ = throughput_rows(cuda_records(records, name))
        kind = "transferred" if other.architecture == gpu.architecture else "extrapolated"
        errs[kind] += [abs(e) for e in _relative_errors(rows, other, params)]
    return ({k: statistics.median(v) for k, v in errs.items() if v}, {k: len(v) for k, v in errs.items() if v})


def _relative_errors(rows: list[Row], gpu, params: ThroughputParams) -> list[float]:
    return [throughput(r.arch, r.tc, gpu, params).tokens_per_s / r.tokens_per_s - 1.0 for r in rows]


def fit_gpu(records: list[dict], gpu_name: str, *, loo: bool = True) -> FitResult:
    """Fit the throughput parameters of `gpu_name`'s architecture and its allocator figures from its CUDA records.
    Raises ValueError when there are none."""
    gpu = load_gpu(gpu_name)
    recs = cuda_records(records, gpu.name)
    if not recs:
        raise ValueError(f"no successful CUDA records of {gpu.name}")
    defaults = ThroughputParams(architecture=gpu.architecture)
    throughput_params.cache_clear()
    before = throughput_params(gpu.name)
    rows, excluded = throughput_rows(recs)
    fitted = fit_throughput(rows, gpu, defaults)
    parameters: list[Parameter] = []
    for k in FITTED:
        v = getattr(fitted, k)
        med, sig = PRIORS[k]
        lo, hi = BOUNDS[k]
        cap = " (at a bound)" if v <= lo * 1.001 or v >= hi * 0.999 else ""
        how = "fitted" if rows else "prior"
        parameters.append(Parameter(k, v, how, f"{len(rows)} records; prior {med:g} within x{math.exp(sig):.2f}{cap}"))
    overhead, ratios = allocator_overhead(recs)
    if overhead is not None:
        fitted = replace(fitted, allocator_overhead=overhead)
        parameters.append(Parameter("allocator_overhead", overhead, "median",
                                    f"{len(ratios)} record(s), {100 * min(ratios):.1f}% .. {100 * max(ratios):.1f}%"))
    else:
        parameters.append(Parameter("allocator_overhead", fitted.allocator_overhead, "default",
                                    "no record has reserved and allocated"))
    ctx, n_ctx = cuda_context(recs)
    if ctx is not None:
        fitted = replace(fitted, cuda_context_bytes=ctx)
        parameters.append(Parameter("cuda_context_bytes", ctx, "median", f"{n_ctx} NVML measurement(s)"))
    else:
        parameters.append(Parameter("cuda_context_bytes", fitted.cuda_context_bytes, "default",
                                    "no record measured it with NVML: the documented ~0.5 GiB default"))
    fitted = replace(fitted, source=f"profiles/calibration/{gpu.name}.toml", provenance="calibrated")

    errors = {
        "defaults": _errors(compare(recs, {gpu.name: defaults})),
        "before": _errors(compare(recs, {gpu.name: before})),
        "after": _errors(compare(recs, {gpu.name: fitted})),
    }
    per_row = []
    comp_before = {c.id: c for c in compare(recs, {gpu.name: before})}
    comp_after = {c.id: c for c in compare(recs, {gpu.name: fitted})}
    loo_err = _loo(rows, gpu, defaults) if loo and len(rows) >= 2 else {}
    expected = {}
    if loo_err:
        vals = [abs(v) for v in loo_err.values()]
        errors["leave_one_out"] = {"tokens_per_s": {"n": len(vals), "median": statistics.median(vals), "max": max(vals)}}
        measured, counts = transfer_errors(records, gpu, fitted)
        expected = expected_errors(statistics.median(vals), measured)
        expected.update({f"{k}_records": n for k, n in counts.items()})
        fitted = replace(fitted, expected_error=expected["calibrated"])
    for r in recs:
        cb, ca = comp_before[r["id"]], comp_after[r["id"]]
        per_row.append({
            "id": r["id"], "model": r["model"]["name"], "config": ca.config,
            "measured_tokens_per_s": ca.measured_tokens_per_s,
            "before_tokens_per_s": cb.predicted_tokens_per_s, "after_tokens_per_s": ca.predicted_tokens_per_s,
            "error_before": cb.error_tokens_per_s, "error_after": ca.error_tokens_per_s,
            "error_leave_one_out": loo_err.get(r["id"]),
            "error_reserved_before": cb.error_reserved, "error_reserved_after": ca.error_reserved,
        })
    kinds: dict[str, int] = {}
    for r in recs:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    return FitResult(gpu=gpu.name, gpu_display=gpu.display_name, architecture=gpu.architecture, params=fitted,
                     before=before, defaults=defaults, parameters=parameters, record_ids=[r["id"] for r in recs],
                     kinds=kinds, excluded=excluded, errors=errors, expected_error=expected, rows=per_row)


# -- the TOML file ------------------------------------------------------------------------------------------------


def _pct(v) -> str:
    return "   -  " if v is None else f"{100 * v:5.1f}%"


def error_table(errors: dict) -> list[str]:
    lines = [f"{'':28s} {'tokens/s median':>15s} {'max':>7s}   {'reserved median':>15s} {'max':>7s}"]
    labels = {"defaults": "defaults (no calibration)", "before": "before (in effect)", "after": "after (this fit)",
              "leave_one_out": "leave-one-out (held out)"}
    for key, label in labels.items():
        if key not in errors:
            continue
        e = errors[key]
        t = e.get("tokens_per_s", {})
        rs = e.get("reserved", {})
        lines.append(f"{label:28s} {_pct(t.get('median')):>15s} {_pct(t.get('max')):>7s}   "
                     f"{_pct(rs.get('median')):>15s} {_pct(rs.get('max')):>7s}")
    return lines


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}" if abs(v) < 1e6 else str(int(round(v)))


def render_toml(result: FitResult, command: str, results_dirs: list[str]) -> str:
    """The reviewed calibration file (deterministic: the same records give the same bytes)."""
    p = result.params
    notes = {q.name: q for q in result.parameters}
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(result.kinds.items()))
    out = [
        f"# Throughput and allocator calibration of the {result.gpu_display} ({result.gpu}), architecture",
        f"# {result.architecture}. Written by `{command}` from {len(result.record_ids)} successful CUDA records",
        f"# ({kinds}) under {', '.join(results_dirs)}. Review before committing; refit when records change.",
        "#",
        "# The model is planner/cost.py and planner/kernels.py (their docstrings): every kernel of the step from the",
        "# graph the memory model replays; GEMMs by shape over tiles, waves and SMs at gemm_efficiency x the dense",
        "# peak, bandwidth-bound ops by bytes at bandwidth_efficiency x the memory bandwidth, attention by FLOPs,",
        "# launch_seconds per kernel. The values are per architecture (fractions of each GPU's own peaks): every",
        "# GPU of this architecture without a file of its own uses them (transferred), other architectures too",
        "# when none of theirs has one (extrapolated); [expected_error] says what to expect in each case.",
        "#",
        "# |predicted - measured| / measured over these records:",
    ]
    out += ["#   " + line for line in error_table({k: v for k, v in result.errors.items() if k != "before"})]
    out += ["#", "# Per record (tokens/s: measured, after this fit, error; error held out):"]
    for row in result.rows:
        meas, after = row["measured_tokens_per_s"], row["after_tokens_per_s"]
        if meas is None or after is None:
            continue
        loo = row["error_leave_one_out"]
        out.append(f"#   {row['model']:<14s} {row['config'][:52]:<52s} {meas:>9,.0f} {after:>9,.0f} "
                   f"{100 * row['error_after']:+6.1f}%" + (f"  {100 * loo:+6.1f}%" if loo is not None else ""))
    for ex in result.excluded:
        out.append(f"#   excluded: {ex}")
    out.append("")
    out.append(f'gpu = "{result.gpu}"')
    out.append(f'architecture = "{result.architecture}"')

    def line(name: str, value, unit: str = "") -> str:
        q = notes[name]
        return f"{name} = {_num(value)}  # {q.how}{unit}: {q.note}"

    out.append(line("gemm_efficiency", p.gemm_efficiency, " (of the dense peak, large tiles, full waves)"))
    out.append(line("bandwidth_efficiency", p.bandwidth_efficiency))
    out.append(line("launch_seconds", p.launch_seconds, " (per kernel)"))
    out.append(line("fp32_efficiency", p.fp32_efficiency, " (of the fp32 CUDA-core peak: fp32 GEMMs)"))
    out.append(line("allocator_overhead", p.allocator_overhead, " (peak reserved / peak allocated - 1)"))
    out.append(line("cuda_context_bytes", p.cuda_context_bytes))
    if result.expected_error:
        e = result.expected_error
        out.append("")
        out.append("[expected_error]  # median |tokens/s error| to expect (calibrate/fit.py docstring)")
        out.append(f"calibrated = {e['calibrated']:.4f}  # leave-one-out median on these records")
        for kind, assumed, where in (("transferred", TRANSFER_ERROR, "same architecture"),
                                     ("extrapolated", EXTRAPOLATION_ERROR, "other architectures")):
            n = e.get(f"{kind}_records")
            how = (f"measured on {n} records of other GPUs" if n else f"hypot(loo, {assumed:g} assumed)")
            out.append(f"{kind} = {e[kind]:.4f}  # {where}: {how}")
    out.append("")
    out.append("[fit]  # provenance (not read by the planner)")
    out.append(f'command = "{command}"')
    out.append("records = [")
    out += [f'  "{i}",' for i in result.record_ids]
    out.append("]")
    for key in ("defaults", "after", "leave_one_out"):
        e = result.errors.get(key, {}).get("tokens_per_s", {})
        if e.get("median") is not None:
            out.append(f"tokens_per_s_error_{key} = {{ median = {e['median']:.4f}, max = {e['max']:.4f} }}")
    return "\n".join(out) + "\n"


def write_toml(result: FitResult, command: str, results_dirs: list[str], folder: str | Path | None = None) -> Path:
    folder = Path(folder) if folder is not None else calibration_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{result.gpu}.toml"
    write_text(path, render_toml(result, command, results_dirs))
    throughput_params.cache_clear()
    _calibrations.cache_clear()
    return path
