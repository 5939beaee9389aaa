"""The numbers behind each report chart: planner calls in, one pandas DataFrame per chart out.

Every frame holds what the planner returns, unrounded: sizes in integer bytes (`*_bytes`), speed in tokens/s,
time in hours, money in USD. Charts convert to GiB (2^30 bytes) when they draw; the CSV beside each chart is
`frame.to_csv()` of the very frame the chart was drawn from, so a test can recompute any cell with the planner.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd

from ..arch import ModelArch
from ..config import TrainConfig
from ..cost import cost_usd
from ..methods import method_label
from ..plan import DEFAULT_MARGIN, Plan, Workload, make_plan
from ..profiles import GPUProfile, list_gpus, prices_for
from ..recommend import OBJECTIVES, Request, Result, distinct_plans, plan_row, quality_score, recommend

# -- methods --------------------------------------------------------------------------------------------------------

# The seven methods the memory charts compare, in the order; every chart colours a method the same way.
METHOD_KEYS = ("full-mixed", "full-bf16", "lora", "qlora", "prefix", "prompt", "ia3")
METHOD_NAMES = {
    "full-mixed": "Full FT, mixed",
    "full-bf16": "Full FT, bf16",
    "lora": "LoRA",
    "qlora": "QLoRA",
    "prefix": "Prefix",
    "prompt": "Prompt",
    "ia3": "IA3",
}
ALL_METHODS = ("full", "lora", "qlora", "ia3", "prefix", "prompt")  # what recommend may choose from


def method_key(tc: TrainConfig) -> str:
    """The chart key of a configuration: `full-mixed` (fp32 master weights, also fp32), `full-bf16`, or the method."""
    if tc.spec.trains_base:
        return "full-bf16" if tc.precision == "bf16" else "full-mixed"
    return tc.method_name


# Memory terms (planner.memory.TERMS) grouped into the categories the memory chart stacks. The overheads also
# take what the planner adds on top of allocated bytes: the caching allocator's slack (reserved - allocated) and
# the CUDA context; paged 8-bit optimizer state (managed memory, outside allocated) counts as optimizer state.
# So the categories of a plan sum to its `device_bytes`, what must fit in the GPU's memory.
GROUPS = {
    "weights": ("weights", "quant_constants", "trainable_weights"),
    "gradients": ("gradients",),
    "optimizer_state": ("optimizer_state", "optimizer_temporaries"),
    "activations": ("activations", "weight_copies", "temporaries"),
    "logits": ("logits",),
    "overheads": ("cuda_workspace", "sharding_buffers"),
}
GROUP_NAMES = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "activations": "activations",
    "logits": "logits",
    "overheads": "overheads",
}
GROUPING_NOTE = (
    "weights = base weights + NF4 constants + adapter weights; optimizer state = state + optimizer.step() scratch "
    "(+ paged 8-bit state); activations = saved activations + autocast weight copies + temporaries at the peak; "
    "overheads = cuBLAS workspaces + multi-GPU buffers + caching-allocator slack (reserved - allocated) + CUDA context"
)
_TERM_GROUP = {t: g for g, terms in GROUPS.items() for t in terms}


def group_breakdown(plan: Plan) -> dict[str, int]:
    """Bytes per category (keys of GROUPS); they sum to `plan.device_bytes`. A breakdown term the grouping does
    not name (a new tensor kind) counts as activations: it is a live tensor at the peak."""
    out = dict.fromkeys(GROUPS, 0)
    for term, n in plan.memory.breakdown.items():
        out[_TERM_GROUP.get(term, "activations")] += n
    out["optimizer_state"] += plan.memory.paged_bytes
    out["overheads"] += plan.peak_reserved_bytes - plan.peak_allocated_bytes + plan.params.cuda_context_bytes
    return out


# -- conditions -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conditions:
    """What one report assumes; the page lists these next to the charts.

    Args:
        seq_len: tokens per sequence (every sequence full length) for the memory-by-method chart, the fit map and
            time/cost.
        batch_size: micro-batch of the memory-by-method and memory-vs-sequence charts.
        optimizer: optimizer of the memory charts.
        rank: LoRA/QLoRA rank (all-linear targets) of the memory charts.
        num_virtual_tokens: prefix/prompt tuning length.
        effective_batch: sequences per optimizer step for recommend (fit map, time/cost, ranked plans).
        margin: fraction of GPU memory a recommended plan must leave free.
        objective: recommend's ranking (quality, time, cost).
        dataset_tokens, epochs: the workload of the time and cost figures.
        provider: use only this provider's prices (None: every provider in profiles/prices.toml).
        max_gpus: the time/cost chart uses the fewest GPUs (1, 2, 4, ...) up to this that fit the method.
        seq_lens: sequence lengths of the memory-vs-sequence chart (capped at the model's context length).
    """

    seq_len: int = 2048
    batch_size: int = 1
    optimizer: str = "adamw"
    rank: int = 16
    num_virtual_tokens: int = 20
    effective_batch: int = 16
    margin: float = DEFAULT_MARGIN
    objective: str = "quality"
    dataset_tokens: int = 100_000_000
    epochs: float = 1.0
    provider: str | None = None
    max_gpus: int = 8
    seq_lens: tuple = (512, 1024, 2048, 4096, 8192, 16384, 32768)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")

    @property
    def workload(self) -> Workload:
        return Workload(self.dataset_tokens, self.epochs)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seq_lens"] = list(self.seq_lens)
        return d


def workload_text(tokens: int, epochs: float, exact: bool = False) -> str:
    """`100M tokens x 1 epoch` (`exact`: `100,000,000 tokens x 1 epoch`)."""
    from ..units import fmt_count

    t = f"{tokens:,}" if exact else fmt_count(tokens)
    return f"{t} tokens x {epochs:g} epoch{'' if epochs == 1 else 's'}"


def method_configs(cond: Conditions, grad_ckpt: bool = False) -> list[tuple[str, TrainConfig]]:
    """(key, TrainConfig) of the seven compared methods under `cond`. Prefix tuning never checkpoints (peft
    refuses it), so with `grad_ckpt` on its configuration keeps checkpointing off."""
    ck = grad_ckpt
    common = dict(seq_len=cond.seq_len, batch_size=cond.batch_size, optimizer=cond.optimizer)
    lora = dict(rank=cond.rank, target_modules=("all-linear",))
    virtual = dict(num_virtual_tokens=cond.num_virtual_tokens)
    specs = {
        "full-mixed": dict(method="full", precision="mixed"),
        "full-bf16": dict(method="full", precision="bf16"),
        "lora": dict(method="lora", **lora),
        "qlora": dict(method="qlora", **lora),
        "prefix": dict(method="prefix", **virtual),
        "prompt": dict(method="prompt", **virtual),
        "ia3": dict(method="ia3"),
    }
    out = []
    for k in METHOD_KEYS:
        tc = TrainConfig(**common, **specs[k])
        out.append((k, tc.replace(grad_ckpt=ck and tc.spec.supports_grad_ckpt)))
    return out


def _label(tc: TrainConfig) -> str:
    return method_label(tc) + (f", {tc.precision}" if tc.spec.trains_base else "")


# -- 1. memory by method --------------------------------------------------------------------------------------------


def memory_by_method(arch: ModelArch, gpu: GPUProfile, cond: Conditions) -> pd.DataFrame:
    """One row per method, without then with gradient checkpointing (prefix tuning only without: peft refuses
    it): the planner's breakdown terms, their categories (GROUPS, summing to `device_bytes`) and the totals."""
    rows = []
    for ck in (False, True):
        for key, tc in method_configs(cond, grad_ckpt=ck):
            if ck and not tc.grad_ckpt:
                continue
            p = make_plan(arch, tc, gpu)
            row = {"method": key, "label": _label(tc), "grad_ckpt": ck, "config": tc.describe()}
            row.update({f"{g}_bytes": v for g, v in group_breakdown(p).items()})
            row.update({f"breakdown_{t}_bytes": p.memory.breakdown.get(t, 0) for t in _all_terms(p)})
            row.update(
                peak_allocated_bytes=p.peak_allocated_bytes,
                peak_reserved_bytes=p.peak_reserved_bytes,
                allocator_slack_bytes=p.peak_reserved_bytes - p.peak_allocated_bytes,
                cuda_context_bytes=p.params.cuda_context_bytes,
                paged_bytes=p.memory.paged_bytes,
                device_bytes=p.device_bytes,
                gpu_memory_bytes=gpu.memory_bytes,
                fits=p.fits,
                peak_event=p.memory.peak_event,
                trainable_params=p.memory.trainable_params,
            )
            rows.append(row)
    return pd.DataFrame(rows).fillna({c: 0 for c in _breakdown_columns(rows)})


def _all_terms(p: Plan) -> list[str]:
    from ..memory import TERMS

    return list(TERMS) + [t for t in p.memory.breakdown if t not in TERMS]


def _breakdown_columns(rows: list[dict]) -> list[str]:
    return sorted({c for r in rows for c in r if c.startswith("breakdown_")})


# -- 3. memory vs sequence length -----------------------------------------------------------------------------------


def seq_lens_for(arch: ModelArch, cond: Conditions) -> list[int]:
    """The chart's sequence lengths: `cond.seq_lens` plus `cond.seq_len`, up to the model's context length."""
    cap = arch.max_position_embeddings or max(cond.seq_lens)
    return sorted({s for s in (*cond.seq_lens, cond.seq_len) if s <= cap})


def memory_vs_seq(arch: ModelArch, gpu: GPUProfile, cond: Conditions) -> pd.DataFrame:
    """Device memory of each method at each sequence length, without and with gradient checkpointing (prefix
    tuning only without: peft refuses checkpointing with it). Micro-batch `cond.batch_size`."""
    rows = []
    for ck in (False, True):
        for key, base in method_configs(cond, grad_ckpt=ck):
            if ck and not base.grad_ckpt:
                continue
            for s in seq_lens_for(arch, cond):
                p = make_plan(arch, base.replace(seq_len=s), gpu)
                rows.append({
                    "method": key, "label": _label(base), "grad_ckpt": ck, "seq_len": s, "batch_size": cond.batch_size,
                    "peak_allocated_bytes": p.peak_allocated_bytes, "device_bytes": p.device_bytes,
                    "gpu_memory_bytes": gpu.memory_bytes, "fits": p.fits,
                })
    return pd.DataFrame(rows)


# -- 2. fit map -----------------------------------------------------------------------------------------------------


def request_for(arch: ModelArch, gpu: GPUProfile, cond: Conditions, *, max_gpus: int = 1,
                methods: tuple = ALL_METHODS, model_ref: str = "") -> Request:
    return Request(arch=arch, gpu=gpu, seq_len=cond.seq_len, workload=cond.workload,
                   effective_batch=cond.effective_batch, objective=cond.objective, margin=cond.margin,
                   max_gpus=max_gpus, methods=tuple(methods), provider=cond.provider, model_ref=model_ref)


def _plan_fields(p: Plan) -> dict:
    tc = p.train
    return {
        "method": method_key(tc), "label": plan_row(p)["label"], "config": tc.describe(), "precision": tc.precision,
        "rank": tc.rank if tc.spec.uses_rank else None, "batch_size": tc.batch_size,
        "grad_accum": tc.grad_accum, "seq_len": tc.seq_len, "grad_ckpt": tc.grad_ckpt, "optimizer": tc.optimizer,
        "num_gpus": tc.num_gpus, "strategy": tc.strategy if tc.num_gpus > 1 else None, "cpu_offload": tc.cpu_offload,
        "device_bytes": p.device_bytes, "gpu_memory_bytes": p.gpu.memory_bytes,
        "tokens_per_s": p.speed.tokens_per_s, "hours": p.hours, "cost_usd": p.cost_usd,
        "provider": p.price.provider if p.price else None, "quality": quality_score(tc),
    }


_PLAN_COLUMNS = [  # the keys of _plan_fields
    "method", "label", "config", "precision", "rank", "batch_size", "grad_accum", "seq_len", "grad_ckpt", "optimizer",
    "num_gpus", "strategy", "cpu_offload", "device_bytes", "gpu_memory_bytes", "tokens_per_s", "hours", "cost_usd", "provider",
    "quality",
]


def fit_cell(arch: ModelArch, gpu: GPUProfile, cond: Conditions, model_ref: str = "") -> dict:
    """One cell of the fit map: recommend's best plan on one GPU, else the fewest GPUs (ZeRO-3, micro-batch 1,
    checkpointing) that any method would need."""
    res = recommend(request_for(arch, gpu, cond, model_ref=model_ref))
    cell = {"model": arch.name, "model_ref": model_ref or arch.name, "model_params": arch.total_params, "gpu": gpu.name, "gpu_display": gpu.display_name,
            "gpu_memory_bytes": gpu.memory_bytes}
    if res.best is not None:
        cell.update(status="fits", **{k: v for k, v in _plan_fields(res.best).items() if k != "gpu_memory_bytes"})
        cell.update(needs_gpus=None, needs_label=None, needs_device_bytes=None)
        return cell
    options = [nf for nf in res.not_fitting if nf.needs_gpus]
    cell.update({k: None for k in _PLAN_COLUMNS if k != "gpu_memory_bytes"})
    if not options:
        cell.update(status="none", needs_gpus=None, needs_label=None, needs_device_bytes=None)
        return cell
    nf = min(options, key=lambda nf: (nf.needs_gpus, quality_score(nf.best.train)))
    cell.update(status="needs", needs_gpus=nf.needs_gpus, needs_label=nf.label,
                needs_device_bytes=nf.needs_plan.device_bytes, method=method_key(nf.best.train),
                rank=nf.best.train.rank if nf.best.train.spec.uses_rank else None)
    return cell


def fit_map(models: list[tuple[str, ModelArch]], gpus: list[GPUProfile], cond: Conditions) -> pd.DataFrame:
    """One row per (model, GPU), models in the given order, then GPUs in the given order."""
    return pd.DataFrame([fit_cell(arch, g, cond, ref) for ref, arch in models for g in gpus])


# -- 4. time and cost -----------------------------------------------------------------------------------------------


def fewest_gpus_plan(arch: ModelArch, gpu: GPUProfile, cond: Conditions, methods: tuple = ALL_METHODS,
                     model_ref: str = "") -> tuple[Plan | None, Result]:
    """Recommend's best plan with the fewest GPUs (1, 2, 4, ... up to `cond.max_gpus`) at which any fits."""
    n = 1
    while True:
        res = recommend(request_for(arch, gpu, cond, max_gpus=n, methods=methods, model_ref=model_ref))
        if res.best is not None or n * 2 > cond.max_gpus:
            return res.best, res
        n *= 2


def priced_gpus() -> list[GPUProfile]:
    """Every GPU profile with at least one price row, smallest memory first."""
    return sorted((g for g in list_gpus() if prices_for(g.name)), key=lambda g: (g.memory_bytes, g.name))


def time_cost(arch: ModelArch, gpus: list[GPUProfile], cond: Conditions, method: str,
              model_ref: str = "") -> pd.DataFrame:
    """Hours and dollars of one method family on each GPU: recommend's best plan of `method` (full, lora, ...)
    with the fewest GPUs that fit, priced at every provider's on-demand rate (one row per GPU x provider)."""
    rows = []
    for g in gpus:
        best, res = fewest_gpus_plan(arch, g, cond, methods=(method,), model_ref=model_ref)
        base = {"gpu": g.name, "gpu_display": g.display_name}
        if best is None:  # the family's configuration that needs the fewest GPUs (ZeRO-3, micro-batch 1)
            options = [nf for nf in res.not_fitting if nf.needs_gpus]
            nf = min(options, key=lambda nf: nf.needs_gpus) if options else None
            rows.append({**base, "status": "needs" if nf else "none", **dict.fromkeys(_PLAN_COLUMNS),
                         "gpu_memory_bytes": g.memory_bytes, "label": nf.label if nf else None,
                         "method": method_key(nf.best.train) if nf else None, "max_gpus": cond.max_gpus,
                         "needs_gpus": nf.needs_gpus if nf else None, "provider": None, "usd_per_gpu_hour": None,
                         "price_as_of": None, "price_note": None})
            continue
        plan = {**_plan_fields(best), "needs_gpus": None}
        prices = prices_for(g.name, cond.provider)
        if not prices:
            rows.append({**base, "status": "fits", **plan, "provider": None, "usd_per_gpu_hour": None, "cost_usd": None,
                         "price_as_of": None, "price_note": None})
        for pr in prices:
            rows.append({**base, "status": "fits", **plan, "provider": pr.provider, "usd_per_gpu_hour": pr.usd_per_gpu_hour,
                         "cost_usd": cost_usd(best.hours, best.train.num_gpus, pr.usd_per_gpu_hour),
                         "price_as_of": pr.as_of, "price_note": pr.note})
    return pd.DataFrame(rows)


def chosen_method(arch: ModelArch, gpu: GPUProfile, cond: Conditions) -> str:
    """The method family the time/cost chart compares: that of recommend's best plan on the report's GPU (with the
    fewest GPUs that fit), else QLoRA."""
    best, _ = fewest_gpus_plan(arch, gpu, cond)
    return best.train.method_name if best is not None else "qlora"


# -- ranked plans (recommend --chart) -------------------------------------------------------------------------------


def ranked_plans(res: Result, top: int = 5) -> pd.DataFrame:
    """recommend's plans for a chart: the `top` best (distinct, best first), then the best plan of every other
    method family that fits (with its position in the full ranking), then each family that does not fit (its
    standard recipe on one GPU, and how many GPUs it needs)."""
    rows = []
    limit = int(res.request.gpu.memory_bytes * (1 - res.request.margin))
    ranked = distinct_plans(res.ranked)
    shown = set()
    for i, p in enumerate(ranked, 1):
        label = plan_row(p)["label"]
        if i <= top or label not in shown:
            rows.append({"position": i, "status": "fits", **_plan_fields(p), "limit_bytes": limit, "needs_gpus": None,
                         "needs_device_bytes": None})
        shown.add(label)
    for nf in res.not_fitting:
        rows.append({"position": None, "status": "needs" if nf.needs_gpus else "none", **_plan_fields(nf.best),
                     "label": nf.label, "limit_bytes": limit, "needs_gpus": nf.needs_gpus,
                     "needs_device_bytes": nf.needs_plan.device_bytes if nf.needs_plan else None})
    return pd.DataFrame(rows)


# -- 5. accuracy ----------------------------------------------------------------------------------------------------


def accuracy(records: list[dict]) -> pd.DataFrame:
    """`calibrate.validate.compare` of every record (current planner vs measured), one row each, with the
    chart's method key and the shape of the configuration."""
    from calibrate.validate import compare

    rows = []
    for rec, c in zip(records, compare(records)):
        tc = TrainConfig.from_dict(rec["train"])
        rows.append({**c.to_dict(), "method_key": method_key(tc), "precision": tc.precision, "seq_len": tc.seq_len,
                     "batch_size": tc.batch_size, "grad_ckpt": tc.grad_ckpt, "source": rec.get("source", "")})
    return pd.DataFrame(rows)


def error_stats(frame: pd.DataFrame, column: str) -> dict:
    """n, median and max of |signed error| in `column` (fractions), over rows that have one."""
    errs = frame[column].dropna().abs() if len(frame) and column in frame else pd.Series(dtype=float)
    if errs.empty:
        return {"n": 0, "median": None, "max": None}
    return {"n": int(errs.size), "median": float(errs.median()), "max": float(errs.max())}

