"""`recommend`: enumerate candidate plans for a model, GPU and workload; keep those that fit; rank them.

Candidates: method x precision x LoRA rank x optimizer x micro-batch (grad-accum keeps the effective batch) x
checkpointing x GPU count x strategy. A plan fits when its device memory leaves `margin` of the GPU free.

Ranking (`objective`):
- quality (default): the method's quality score first (`quality_score`), then training time, then cost;
- time: training time, then cost;  cost: cost, then time.

The quality score is a stated heuristic, not a measurement: full fine-tuning with fp32 master weights (mixed)
1.0, in pure bf16 1.2 (bf16 AdamW updates lose small steps), LoRA 2.0 at rank >= 64 rising to 2.2 at rank 8,
QLoRA +0.3 over LoRA at the same rank (4-bit base), IA3 3.0, prefix / prompt tuning 4.0; 8-bit optimizer
state +0.05, Adafactor without momentum +0.1, SGD without momentum +0.3. Lower is better. Sources: LoRA
arXiv:2106.09685, QLoRA arXiv:2305.14314, "LoRA Learns Less and Forgets Less" arXiv:2405.09673, IA3
arXiv:2205.05638, prefix/prompt tuning arXiv:2101.00190 / 2104.08691.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .arch import ModelArch
from .config import TrainConfig
from .methods import ALIASES, get_method, method_label
from .plan import DEFAULT_MARGIN, Plan, Workload, make_plan
from .profiles import GPUProfile
from .recipe import Recipe
from .strategies import most_sharded, recommend_layouts

OBJECTIVES = ("quality", "time", "cost")
QUANT_RANKS = {"nf4": (16, 64)}  # over a 4-bit base recommend tries fewer ranks (its speed barely depends on r)
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)


def quality_score(tc: TrainConfig) -> float:
    """Lower is better: the method's tier (`Method.quality`, with its reason), the base quantization's penalty
    (`BaseQuant.quality_penalty`) and the optimizer's; see the module docstring for the scale and its sources."""
    s = tc.spec.quality(tc) + tc.base_quant.quality_penalty
    if tc.optimizer in ("adamw8bit", "paged_adamw8bit"):
        s += 0.05
    elif tc.optimizer == "adafactor":
        s += 0.1  # no first moment (beta1=None, as the Trainer sets it up), factored second moment
    elif tc.optimizer == "sgd":
        s += 0.3  # no momentum (the Trainer default): slow to converge on transformers
    return round(s, 3)


@dataclass
class Request:
    """What `recommend` is asked. `effective_batch`: sequences per optimizer step over all GPUs."""

    arch: ModelArch
    gpu: GPUProfile
    seq_len: int = 2048
    workload: Workload = field(default_factory=Workload)
    effective_batch: int = 16
    objective: str = "quality"
    margin: float = DEFAULT_MARGIN
    max_gpus: int = 1
    methods: tuple = ("full", "lora", "qlora", "ia3", "prefix", "prompt")
    provider: str | None = None
    model_ref: str = ""
    recipe: Recipe = Recipe.REFERENCE  # how every candidate's step runs (a --config file's attention, loss...)


@dataclass
class NotFit:
    """A notable plan that does not fit, and what it would need."""

    label: str
    best: Plan  # its smallest-memory configuration on the allowed GPUs
    needs_gpus: int | None  # GPUs of this type with ZeRO-3 (offload if needed) to fit; None: not found
    needs_plan: Plan | None


@dataclass
class Result:
    request: Request
    ranked: list  # fitting plans, best first
    not_fitting: list  # NotFit, one per method family that has no fitting plan
    evaluated: int
    seconds: float

    @property
    def best(self) -> Plan | None:
        return self.ranked[0] if self.ranked else None


def _families(req: Request) -> list[dict]:
    """Method-level settings (method, quant, precision, rank, targets, virtual tokens) of each requested method
    name or alias, from the method's own `families()`."""
    out = []
    for m in req.methods:
        method, quant = ALIASES.get(m, (m, "none"))
        for fam in get_method(method).families():
            if quant != "none":
                if "rank" in fam and fam["rank"] not in QUANT_RANKS.get(quant, (fam["rank"],)):
                    continue
                fam = dict(fam, quant=quant)
            if fam.get("precision") == "mixed" and not req.gpu.supports_bf16:
                fam = dict(fam, precision="fp16")  # no bf16 tensor cores (T4, V100): fp16 autocast + GradScaler
            out.append(fam)
    if req.arch.moe is not None:
        # a MoE model: all-linear where peft adapts nn.Linears only (Qwen2-MoE, gpt-oss); the attention projections
        # where it would wrap the fused experts (Mixtral, Qwen3-MoE: target_parameters, which refuse the recipe's
        # lora_dropout 0.05, planner.moe); and only what its graph models (planner.moe.unsupported)
        from .moe import EXPERTS_WRAPPED

        wraps = req.arch.model_type in EXPERTS_WRAPPED
        out = [dict(fam, target_modules=req.arch.linear_names)
               if wraps and fam.get("target_modules") == ("all-linear",) else fam for fam in out]
        out = [fam for fam in out if _moe_modelled(req, fam)]
    return out


def _checkpointing(req: Request, method: str) -> tuple:
    """Gradient checkpointing off and on where the method supports it; on only when the recipe offloads the
    checkpoints (`Recipe.offload_checkpoints` needs them)."""
    options = (False, True) if get_method(method).supports_grad_ckpt else (False,)
    return tuple(c for c in options if c) if req.recipe.offload_checkpoints else options


def _moe_modelled(req: Request, fam: dict) -> bool:
    from .methods import TargetError, lora_targets
    from .moe import unsupported

    tc = TrainConfig(seq_len=req.seq_len, **fam)
    if unsupported(req.arch, tc):
        return False
    try:
        if tc.spec.uses_rank:
            lora_targets(req.arch, tc)
    except TargetError:
        return False
    return True


def _optimizers(method: str) -> tuple:
    if get_method(method).trains_base:
        return ("adamw", "adamw8bit", "paged_adamw8bit", "adafactor")
    return ("adamw", "paged_adamw8bit")


def _layouts(req: Request) -> list[tuple[int, str, bool]]:
    """(num_gpus, strategy, cpu_offload) allowed by `max_gpus`."""
    out = [(1, "ddp", False)]
    if req.recipe.modules_to_save:  # modelled on one GPU (planner.modules_to_save.validate)
        return out
    for n in GPU_COUNTS[1:]:
        if n > req.max_gpus:
            break
        out += [(n, strategy, offload) for strategy, offload in _STRATEGY_LAYOUTS]
    return out


_STRATEGY_LAYOUTS = recommend_layouts()  # ddp, zero2, zero3, fsdp, then zero3 + offload (planner.strategies)


def sort_key(objective: str):
    def key(p: Plan):
        hours = p.hours if p.hours is not None else p.speed.step_seconds / p.train.tokens_per_step
        cost = p.cost_usd if p.cost_usd is not None else hours * p.train.num_gpus
        if objective == "time":
            return (hours, cost, quality_score(p.train))
        if objective == "cost":
            return (cost, hours, quality_score(p.train))
        return (quality_score(p.train), hours, cost)

    return key


def _micro_batches(req: Request) -> tuple:
    """The micro-batches searched: one row only for packed rows under flash_attention_2 (transformers 5.17
    `_is_packed_sequence` detects packing in a one-row batch only; planner.config refuses more)."""
    if req.recipe.packing and req.recipe.attn_implementation == "flash_attention_2":
        return (1,)
    return MICRO_BATCHES


def recommend(req: Request) -> Result:
    """Enumerate, evaluate and rank. Memory grows with the micro-batch, so for each configuration the batch
    sweep stops at the first size that does not fit."""
    if req.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}")
    t0 = time.perf_counter()
    limit = req.gpu.memory_bytes * (1.0 - req.margin)
    fitting: list[Plan] = []
    evaluated = 0
    for fam in _families(req):
        for n, strategy, offload in _layouts(req):
            if req.effective_batch % n:
                continue
            per_gpu = req.effective_batch // n
            for opt in _optimizers(fam["method"]):
                for ckpt in _checkpointing(req, fam["method"]):
                    for b in _micro_batches(req):
                        if b > per_gpu or per_gpu % b:
                            continue
                        tc = TrainConfig(seq_len=req.seq_len, batch_size=b, grad_accum=per_gpu // b, grad_ckpt=ckpt,
                                         optimizer=opt, num_gpus=n, strategy=strategy, cpu_offload=offload,
                                         recipe=req.recipe, **fam)
                        p = make_plan(req.arch, tc, req.gpu, req.workload, provider=req.provider, model_ref=req.model_ref)
                        evaluated += 1
                        if p.device_bytes > limit:
                            break
                        fitting.append(p)
    fitting.sort(key=sort_key(req.objective))
    fitting_labels = {_family_label(_fam_of(p.train)) for p in fitting}
    not_fitting = []
    for fam in _families(req):
        label = _family_label(fam)
        if label in fitting_labels:
            continue
        # report the standard recipe (AdamW, micro-batch 1, checkpointing where allowed) on one GPU
        tc = TrainConfig(seq_len=req.seq_len, batch_size=1, grad_accum=req.effective_batch,
                         grad_ckpt=get_method(fam["method"]).supports_grad_ckpt, optimizer="adamw", recipe=req.recipe,
                         **fam)
        p = make_plan(req.arch, tc, req.gpu, req.workload, provider=req.provider, model_ref=req.model_ref)
        evaluated += 1
        n, plan = gpus_needed(req, p.train)
        not_fitting.append(NotFit(f"{label}, AdamW", p, n, plan))
    not_fitting.sort(key=lambda nf: quality_score(nf.best.train))
    return Result(req, fitting, not_fitting, evaluated, time.perf_counter() - t0)


def _fam_of(tc: TrainConfig) -> dict:
    d = dict(method=tc.method)
    if tc.quant != "none":
        d["quant"] = tc.quant
    if tc.spec.trains_base:
        d["precision"] = tc.precision
    if tc.spec.uses_rank:
        d["rank"] = tc.rank
        if not tc.all_linear:  # a MoE model's attention projections
            d["target_modules"] = tuple(tc.target_modules)
    return d


def _family_label(fam: dict) -> str:
    return get_method(fam["method"]).family_label(fam)


def gpus_needed(req: Request, tc: TrainConfig) -> tuple[int | None, Plan | None]:
    """Fewest GPUs of the requested type (powers of two up to 1024) that fit `tc`'s method with the most sharded
    strategy, ZeRO-3 (then with CPU offload), at micro-batch 1 with checkpointing."""
    if tc.recipe.modules_to_save:  # modelled on one GPU only: no answer rather than a guess
        return None, None
    limit = req.gpu.memory_bytes * (1.0 - req.margin)
    base = tc.replace(batch_size=1, grad_ckpt=tc.spec.supports_grad_ckpt, grad_accum=1)
    sharded = most_sharded()
    for offload in sharded.recommend_offload:
        for k in range(1, 11):
            n = 2**k
            cand = base.replace(num_gpus=n, strategy=sharded.name, cpu_offload=offload)
            p = make_plan(req.arch, cand, req.gpu, req.workload, provider=req.provider, model_ref=req.model_ref)
            if p.device_bytes <= limit:
                return n, p
    return None, None


def family_label(tc: TrainConfig) -> str:
    return _family_label(_fam_of(tc))


def best_per_family(plans: list) -> list:
    """The first (best-ranked) plan of each method family, in rank order."""
    seen, out = set(), []
    for p in plans:
        lab = family_label(p.train)
        if lab not in seen:
            seen.add(lab)
            out.append(p)
    return out


def distinct_plans(plans: list) -> list:
    """Drop plans that differ from an earlier one only in a setting a table does not show (keeps the first)."""
    seen, out = set(), []
    for p in plans:
        d = plan_row(p)
        key = (method_label(p.train), d["precision"], d["batch"], d["gpus"], d["grad_ckpt"], d["optimizer"])
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def explain(res: Result) -> str:
    """Why the top plan wins, in a sentence or two."""
    best = res.best
    if best is None:
        return "Nothing fits on this GPU; the list below says what each method would need."
    tc = best.train
    req = res.request
    where = f"{tc.num_gpus} x {req.gpu.name}" if tc.num_gpus > 1 else f"one {req.gpu.name}"
    config = (f"micro-batch {tc.batch_size} x {tc.grad_accum} accumulation"
              + (f" on {tc.num_gpus} GPUs ({tc.strategy}{' + offload' if tc.cpu_offload else ''})" if tc.num_gpus > 1 else "")
              + (" with gradient checkpointing" if tc.grad_ckpt else " without checkpointing") + f" and {tc.optimizer}")
    label = family_label(tc)
    if req.objective == "quality":
        better = [nf for nf in res.not_fitting if quality_score(nf.best.train) < quality_score(tc)]
        if better:
            shown = ", ".join(f"{nf.label.rsplit(', AdamW', 1)[0]} ({_gib(nf.best.device_bytes)})" for nf in better[:3])
            why = f"it is the highest-quality method that fits on {where}; {shown} {'does' if len(better) == 1 else 'do'} not"
        else:
            why = f"no method on the list ranks higher, and it fits on {where}"
        siblings = sum(1 for p in res.ranked if family_label(p.train) == label)
        how = f"{config} is the fastest of its {siblings} configurations that fit" if siblings > 1 else f"{config} is its one configuration that fits"
        return f"{label} wins: {why}. {how[0].upper() + how[1:]}." + _across_gpus(res, best)
    if req.objective == "time":
        return f"{label} with {config} trains fastest of the {len(res.ranked)} plans that fit." + _across_gpus(res, best)
    return f"{label} with {config} is the cheapest of the {len(res.ranked)} plans that fit." + _across_gpus(res, best)


def _layout(p) -> str:
    """`8 x a100 with ZeRO-3 + CPU offload (41.2 GiB per GPU, 20.1 GiB host RAM per GPU)`."""
    from .strategies import strategy_of

    tc = p.train
    host = p.memory.host_bytes
    return (f"{tc.num_gpus} x {p.gpu.name if p.gpu else 'GPU'} with {strategy_of(tc).label}"
            + (" + CPU offload" if tc.cpu_offload else "") + f" ({_gib(p.device_bytes)} per GPU"
            + (f", {_gib(host)} host RAM per GPU" if host else "") + ")")


def _across_gpus(res: Result, best) -> str:
    """On several GPUs, which strategy the winner uses and why, and the fewest GPUs its method fits on (offloading
    trades speed for GPUs: the host RAM it needs is stated)."""
    tc = best.train
    if tc.num_gpus == 1:
        return ""
    same = [p for p in res.ranked if family_label(p.train) == family_label(tc)]
    fewest = min(same, key=lambda p: (p.train.num_gpus, p.train.cpu_offload, p.speed.step_seconds if p.speed else 0))
    text = f" Across GPUs: {_layout(best)} is its fastest layout."
    if fewest.train.num_gpus < tc.num_gpus:
        text += f" The fewest GPUs it fits on: {_layout(fewest)}, slower."
    return text


def _gib(n: int) -> str:
    return f"{n / 2**40:.2f} TiB" if n >= 2**40 else f"{n / 2**30:.0f} GiB"


def plan_row(p: Plan) -> dict:
    """The numbers a table shows for one plan."""
    return {
        "method": p.train.method,
        "label": _family_label(_fam_of(p.train)),
        "rank": p.train.rank if p.train.spec.uses_rank else None,
        "precision": p.train.base_quant.precision_label or p.train.precision,
        "batch": f"{p.train.batch_size}x{p.train.grad_accum}",
        "gpus": f"{p.train.num_gpus}" + (f" {p.train.strategy}" + ("+off" if p.train.cpu_offload else "") if p.train.num_gpus > 1 else ""),
        "grad_ckpt": p.train.grad_ckpt,
        "optimizer": p.train.optimizer,
        "peak_gib": p.device_bytes / 2**30,
        "gpu_gib": p.gpu.memory_bytes / 2**30,
        "tokens_per_s": p.speed.tokens_per_s,
        "hours": p.hours,
        "cost_usd": p.cost_usd,
        "quality": quality_score(p.train),
    }

