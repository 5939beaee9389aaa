"""`ftplan calibrate fit`: learn, per GPU, the few quantities an analytic model cannot know from first principles.

What is fitted (all named in `planner.cost.ThroughputParams`, each one physical quantity, none per configuration):

- `matmul_efficiency[key]`: the achieved fraction of the dense bf16 peak per method key (`full`, `full-mixed`,
  `lora`, `qlora`, `prefix`, `prompt`, `ia3`) for large matmuls. A method's own value is fitted only from at least
  two of its records; otherwise it is its default times `efficiency_scale`, one factor per GPU fitted from all the
  records (a method's single record would otherwise be reproduced exactly, hiding any modelling error);
- `width_half`: how efficiency falls for small matmuls (e x s / (s + width_half), s = hidden size x tokens per
  micro-step / 4096), fitted only when the records span at least two sizes;
- `bandwidth_efficiency`: the achieved fraction of HBM bandwidth in bandwidth-bound parts, fitted only when those
  parts make at least 30% of some record's step (otherwise the records cannot tell it from the matmul efficiency);
- `allocator_overhead`: the median of measured peak reserved / peak allocated - 1 (the caching allocator's
  rounding and fragmentation);
- `cuda_context_bytes`: the median CUDA context that NVML saw outside the allocator, from records that measured
  it (`ftplan calibrate` on a GPU); otherwise the documented ~0.5 GiB default stays.

`fp32_efficiency` (fp32 matmuls on the CUDA cores) keeps its prior: too few records run fp32 matmuls to tell it
from the method efficiency.

How: maximum a posteriori on log(tokens/s) - a robust (Huber, beyond 2 sigma) least-squares fit of the records' log
throughput (each record's error weighted as a 10% measurement spread) plus weak priors that keep every parameter physical when the records
say little about it: a GPU-level scale s ~ logN(0, ln 3), each method's efficiency e_key ~ logN(s x default_key,
ln 2) (methods differ from the default ratios by up to ~2x; only for methods with two records or more),
width_half ~ logN(1024, ln 2), bandwidth efficiency ~ logN(0.7, ln 1.25). Physical caps: matmul efficiency <= 0.8 of the dense peak (what cuBLAS reaches on large bf16
GEMMs), bandwidth efficiency <= 0.9.

The in-sample error flatters any fit; the fit also reports the leave-one-out error (each record predicted by a fit
to the others), the honest figure for configurations not measured. Pure Python (no numpy): the problem has a
handful of parameters.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

from planner.arch import arch_from_config
from planner.config import TrainConfig
from planner.cost import (
    DEFAULT_EFFICIENCY,
    REFERENCE_TOKENS,
    ThroughputParams,
    calibration_dir,
    method_key,
    throughput,
    throughput_params,
)
from planner.fileio import write_text
from planner.profiles import load_gpu

from .validate import compare, summarize

SIGMA_MEASURE = math.log(1.10)  # spread of one record's tokens/s around the model (10%)
PRIOR_SCALE = (0.0, math.log(3.0))  # log of the GPU-level efficiency scale relative to DEFAULT_EFFICIENCY
PRIOR_METHOD_SIGMA = math.log(2.0)  # full fine-tuning's efficiency around scale x its default
# Frozen-base methods (LoRA, QLoRA, prefix, prompt, IA3) run the very GEMMs of full fine-tuning (minus the weight
# gradients, which the FLOP count already drops); what they add is extra kernels, modelled as bandwidth-bound
# traffic. So their matmul efficiency may differ from full fine-tuning's by little: within ~x1.3, not x2. Without
# this, one slow small-model record (qwen2.5-0.5b LoRA q,v runs slower than its full fine-tuning) halves LoRA's
# efficiency for every model and predicts 7B LoRA slower than 7B full fine-tuning.
PRIOR_FROZEN_BASE_SIGMA = math.log(1.1)
PRIOR_WIDTH_HALF = (1024.0, math.log(2.0))
PRIOR_BANDWIDTH = (0.7, math.log(1.25))
MAX_EFFICIENCY = 0.8  # cuBLAS bf16 GEMMs reach ~75-80% of the dense peak on large matrices
MAX_BANDWIDTH = 0.9  # streaming kernels reach ~90% of HBM bandwidth
KEYS = ("full", "full-mixed", "lora", "qlora", "prefix", "prompt", "ia3")
MIN_METHOD_RECORDS = 2  # a method's own efficiency needs two records: from one it would just reproduce that record


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
    params: ThroughputParams
    before: ThroughputParams
    defaults: ThroughputParams
    parameters: list[Parameter]
    record_ids: list[str]
    kinds: dict
    excluded: list[str]
    errors: dict  # label -> {"tokens_per_s": {n, median, max}, "reserved": {...}}
    rows: list[dict] = field(default_factory=list)  # per record: id, config, measured, before, after, loo

    def to_dict(self) -> dict:
        return {
            "gpu": self.gpu,
            "parameters": [vars(p) for p in self.parameters],
            "params": _params_dict(self.params),
            "records": list(self.record_ids),
            "kinds": dict(self.kinds),
            "excluded": list(self.excluded),
            "errors": self.errors,
            "rows": self.rows,
        }


def _params_dict(p: ThroughputParams) -> dict:
    return {
        "matmul_efficiency": dict(p.matmul_efficiency),
        "width_half": p.width_half,
        "bandwidth_efficiency": p.bandwidth_efficiency,
        "fp32_efficiency": p.fp32_efficiency,
        "allocator_overhead": p.allocator_overhead,
        "cuda_context_bytes": p.cuda_context_bytes,
        "source": p.source,
    }


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
    multi-GPU record would fit communication into the matmul efficiency."""
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


def _size(r: Row) -> float:
    return r.arch.hidden_size * r.tc.seq_len * r.tc.batch_size / REFERENCE_TOKENS


class _Space:
    """Maps a parameter vector (logs: the GPU scale, the methods' efficiencies, then width_half and the bandwidth
    efficiency when fitted) to ThroughputParams, and to the prior residuals."""

    def __init__(self, keys: list[str], fit_width: bool, fit_bandwidth: bool, base: ThroughputParams):
        self.keys = keys
        self.base = base
        self.names = ["scale"] + [f"e:{k}" for k in keys] + (["width_half"] if fit_width else []) + (
            ["bandwidth"] if fit_bandwidth else [])
        self.at = {n: i for i, n in enumerate(self.names)}

    def start(self) -> list[float]:
        prior = {"scale": 0.0, "width_half": math.log(PRIOR_WIDTH_HALF[0]), "bandwidth": math.log(PRIOR_BANDWIDTH[0])}
        return [prior[n] if n in prior else math.log(DEFAULT_EFFICIENCY[n[2:]]) for n in self.names]

    def clamp(self, x: list[float]) -> list[float]:
        x = list(x)
        for n, i in self.at.items():
            if n.startswith("e:"):
                x[i] = min(x[i], math.log(MAX_EFFICIENCY))
            elif n == "width_half":
                x[i] = min(max(x[i], math.log(16.0)), math.log(65536.0))
            elif n == "bandwidth":
                x[i] = min(max(x[i], math.log(0.2)), math.log(MAX_BANDWIDTH))
        return x

    def params(self, x: list[float]) -> ThroughputParams:
        scale = math.exp(x[0])
        eff = {k: min(MAX_EFFICIENCY, scale * DEFAULT_EFFICIENCY[k]) for k in KEYS}
        for k in self.keys:
            eff[k] = math.exp(x[self.at["e:" + k]])
        width = math.exp(x[self.at["width_half"]]) if "width_half" in self.at else PRIOR_WIDTH_HALF[0]
        bw = math.exp(x[self.at["bandwidth"]]) if "bandwidth" in self.at else PRIOR_BANDWIDTH[0]
        return replace(self.base, matmul_efficiency=eff, width_half=width, bandwidth_efficiency=bw)

    def prior_residuals(self, x: list[float]) -> list[float]:
        out = [(x[0] - PRIOR_SCALE[0]) / PRIOR_SCALE[1]]
        for k in self.keys:
            if not k.startswith("full") and "e:full" in self.at:
                # a frozen-base method around full fine-tuning's own fitted efficiency (same GEMMs)
                out.append((x[self.at["e:" + k]] - x[self.at["e:full"]]) / PRIOR_FROZEN_BASE_SIGMA)
                continue
            sigma = PRIOR_METHOD_SIGMA if k.startswith("full") else PRIOR_FROZEN_BASE_SIGMA
            out.append((x[self.at["e:" + k]] - x[0] - math.log(DEFAULT_EFFICIENCY[k])) / sigma)
        if "width_half" in self.at:
            out.append((x[self.at["width_half"]] - math.log(PRIOR_WIDTH_HALF[0])) / PRIOR_WIDTH_HALF[1])
        if "bandwidth" in self.at:
            out.append((x[self.at["bandwidth"]] - math.log(PRIOR_BANDWIDTH[0])) / PRIOR_BANDWIDTH[1])
        return out


BANDWIDTH_SHARE = 0.3  # the bandwidth efficiency is fitted only when bandwidth-bound parts make this much of a step


def bandwidth_share(rows: list[Row], gpu, params: ThroughputParams | None = None) -> float:
    """The largest share of predicted step time that bandwidth-bound parts (optimizer, adapters, dequantization)
    take in any row: below BANDWIDTH_SHARE the records cannot tell the bandwidth efficiency from the matmul one."""
    params = params or ThroughputParams()
    best = 0.0
    for r in rows:
        t = throughput(r.arch, r.tc, gpu, params)
        bw = sum(t.parts_seconds[k] for k in ("optimizer", "adapters", "dequant"))
        best = max(best, bw / t.step_seconds)
    return best


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


def fit_throughput(rows: list[Row], gpu, base: ThroughputParams | None = None, iterations: int = 60) -> ThroughputParams:
    """MAP fit of the matmul efficiencies, width_half and bandwidth efficiency to `rows` (Levenberg-Marquardt on
    log tokens/s plus the priors). Rows may be empty: the priors alone (the defaults)."""
    return _fit(rows, gpu, base, iterations)[0]


HUBER_K = 2.0  # record residuals beyond 2 measurement sigmas (~20%) count linearly, not squared


def _huber(r: float) -> float:
    """A residual whose square is the Huber loss: r inside +-k, sqrt(2k|r| - k^2) beyond. A record the physical
    parameters cannot explain (an outlier, or a mechanism the model lacks) then pulls on the fit linearly instead
    of bending every parameter towards it; the fit's report still shows its error."""
    a = abs(r)
    if a <= HUBER_K:
        return r
    return math.copysign(math.sqrt(2.0 * HUBER_K * a - HUBER_K * HUBER_K), r)


def _fit(rows: list[Row], gpu, base: ThroughputParams | None, iterations: int = 60) -> tuple[ThroughputParams, float]:
    """(fitted params, the GPU-level efficiency scale)."""
    base = base or ThroughputParams()
    keys = [k for k in KEYS if sum(1 for r in rows if r.key == k) >= MIN_METHOD_RECORDS]
    fit_width = len({_size(r) for r in rows}) >= 2
    fit_bandwidth = bool(rows) and bandwidth_share(rows, gpu, base) >= BANDWIDTH_SHARE
    space = _Space(keys, fit_width, fit_bandwidth, base)

    def residuals(x):
        p = space.params(x)
        return [_huber(e / SIGMA_MEASURE) for e in _log_errors(rows, gpu, p)] + space.prior_residuals(x)

    x = space.clamp(space.start())
    r = residuals(x)
    cost = sum(v * v for v in r)
    lam = 1e-2
    for _ in range(iterations):
        n = len(x)
        jac = []
        for j in range(n):
            h = 1e-5
            xh = list(x)
            xh[j] += h
            rh = residuals(xh)
            jac.append([(rh[i] - r[i]) / h for i in range(len(r))])
        jtj = [[sum(jac[a][i] * jac[b][i] for i in range(len(r))) for b in range(n)] for a in range(n)]
        jtr = [sum(jac[a][i] * r[i] for i in range(len(r))) for a in range(n)]
        improved = False
        for _ in range(12):
            a = [[jtj[i][j] + (lam * (jtj[i][i] + 1e-9) if i == j else 0.0) for j in range(n)] for i in range(n)]
            step = _solve(a, [-v for v in jtr])
            xn = space.clamp([x[i] + step[i] for i in range(n)])
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
    return space.params(x), math.exp(x[0])


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


def fit_gpu(records: list[dict], gpu_name: str, *, loo: bool = True) -> FitResult:
    """Fit the parameters of one GPU from its CUDA records. Raises ValueError when there are none."""
    gpu = load_gpu(gpu_name)
    recs = cuda_records(records, gpu.name)
    if not recs:
        raise ValueError(f"no successful CUDA records of {gpu.name}")
    defaults = ThroughputParams()
    throughput_params.cache_clear()
    before = throughput_params(gpu.name)
    rows, excluded = throughput_rows(recs)
    fitted, scale = _fit(rows, gpu, defaults)
    parameters: list[Parameter] = []
    counts = {k: sum(1 for r in rows if r.key == k) for k in KEYS}
    parameters.append(Parameter("efficiency_scale", scale, "fitted" if rows else "prior",
                                f"this GPU's factor on the default efficiencies, from all {len(rows)} records"))
    for k in KEYS:
        v = fitted.matmul_efficiency[k]
        if counts[k] >= MIN_METHOD_RECORDS:
            cap = f" (at the {MAX_EFFICIENCY:g} cap)" if v >= MAX_EFFICIENCY * 0.999 else ""
            parameters.append(Parameter(f"matmul_efficiency.{k}", v, "fitted", f"{counts[k]} records{cap}"))
        else:
            why = "no records" if not counts[k] else f"{counts[k]} record (fewer than {MIN_METHOD_RECORDS})"
            parameters.append(Parameter(f"matmul_efficiency.{k}", v, "scaled",
                                        f"{why}: default {DEFAULT_EFFICIENCY[k]:g} x efficiency_scale"))
    sizes = sorted({round(_size(r)) for r in rows})
    if len(sizes) >= 2:
        parameters.append(Parameter("width_half", fitted.width_half, "fitted",
                                    f"sizes (hidden x tokens / 4096) {', '.join(map(str, sizes))}"))
    else:
        parameters.append(Parameter("width_half", fitted.width_half, "prior", "records span fewer than two matmul sizes"))
    share = bandwidth_share(rows, gpu, defaults)
    if rows and share >= BANDWIDTH_SHARE:
        cap = f", at the {MAX_BANDWIDTH:g} cap" if fitted.bandwidth_efficiency >= MAX_BANDWIDTH * 0.999 else ""
        parameters.append(Parameter("bandwidth_efficiency", fitted.bandwidth_efficiency, "fitted",
                                    f"prior {PRIOR_BANDWIDTH[0]} within x{math.exp(PRIOR_BANDWIDTH[1]):.2f}{cap}"))
    else:
        parameters.append(Parameter("bandwidth_efficiency", fitted.bandwidth_efficiency, "prior",
                                    f"not fitted: bandwidth-bound parts are at most {100 * share:.0f}% of a record's "
                                    f"step (needs {100 * BANDWIDTH_SHARE:.0f}%)"))
    parameters.append(Parameter("fp32_efficiency", fitted.fp32_efficiency, "prior",
                                "not fitted: too few fp32 matmuls in the records to tell it from the method efficiency"))
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
    fitted = replace(fitted, source=f"profiles/calibration/{gpu.name}.toml")

    errors = {
        "defaults": _errors(compare(recs, {gpu.name: defaults})),
        "before": _errors(compare(recs, {gpu.name: before})),
        "after": _errors(compare(recs, {gpu.name: fitted})),
    }
    per_row = []
    comp_before = {c.id: c for c in compare(recs, {gpu.name: before})}
    comp_after = {c.id: c for c in compare(recs, {gpu.name: fitted})}
    loo_err = _loo(rows, gpu, defaults) if loo and len(rows) >= 2 else {}
    if loo_err:
        vals = [abs(v) for v in loo_err.values()]
        errors["leave_one_out"] = {"tokens_per_s": {"n": len(vals), "median": statistics.median(vals), "max": max(vals)}}
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
    return FitResult(gpu=gpu.name, gpu_display=gpu.display_name, params=fitted, before=before, defaults=defaults,
                     parameters=parameters, record_ids=[r["id"] for r in recs], kinds=kinds, excluded=excluded,
                     errors=errors, rows=per_row)


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
        f"# Throughput and allocator calibration of the {result.gpu_display} ({result.gpu}).",
        f"# Written by `{command}` from {len(result.record_ids)} successful CUDA records",
        f"# ({kinds}) under {', '.join(results_dirs)}. Review before committing; refit when records change.",
        "#",
        "# The model is planner/cost.py (its module docstring): step time = bf16 matmul FLOPs / (peak x e_method x",
        "# s / (s + width_half)), s = hidden size x tokens per micro-step / 4096, + fp32 matmuls / (fp32 peak x",
        "# fp32_efficiency) + bandwidth-bound bytes (optimizer, adapters' elementwise traffic, QLoRA dequantization)",
        "# / (HBM bandwidth x bandwidth_efficiency). Every value below is one named physical quantity, none is per",
        "# configuration. Fit: least squares on log tokens/s with weak priors (calibrate/fit.py docstring); a method",
        "# gets its own efficiency only from two records or more, else its default x efficiency_scale. The",
        "# leave-one-out row (each record predicted by a fit to the others) is the error to expect on",
        "# configurations not measured.",
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

    def line(name: str, value, unit: str = "") -> str:
        q = notes[name]
        return f"{name.split('.')[-1]} = {_num(value)}  # {q.how}{unit}: {q.note}"

    q = notes["efficiency_scale"]
    out.append(f"# efficiency_scale = {_num(q.value)}  ({q.how}: {q.note}; folded into [matmul_efficiency])")
    out.append(line("width_half", p.width_half, " (matmul size at which efficiency halves)"))
    out.append(line("bandwidth_efficiency", p.bandwidth_efficiency))
    out.append(line("fp32_efficiency", p.fp32_efficiency))
    out.append(line("allocator_overhead", p.allocator_overhead, " (peak reserved / peak allocated - 1)"))
    out.append(line("cuda_context_bytes", p.cuda_context_bytes))
    out.append("")
    out.append("[matmul_efficiency]  # fraction of the dense bf16 peak on large matmuls (full-mixed: fp32 master weights)")
    for k in KEYS:
        out.append(line(f"matmul_efficiency.{k}", p.matmul_efficiency[k]))
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
    return path
