"""Which GPU to rent: `recommend` over several GPU types, every fitting plan ranked by the job's cost (or time, or
quality), and for each GPU that runs no plan at all, why.

For each GPU type the candidates are exactly `planner.recommend`'s (method x precision x rank x optimizer x
micro-batch x checkpointing x GPU count x strategy, at most `max_gpus` GPUs). Then all GPUs' fitting plans are
ranked together:

- cost (the default over several GPUs): the job's dollars when the workload is known (`--dataset-tokens` or
  `--data`, times `--epochs`), else dollars per million trained tokens: usd_per_gpu_hour x num_gpus /
  (tokens_per_s x 3600) x 10^6. Either way, the price is the cheapest row of `profiles/prices.toml` for that GPU
  (or the `--provider`'s), shown with its provider, date and source; a GPU without a price ranks after the priced
  ones (by time);
- time: hours for the job (or seconds per million tokens), then cost;
- quality: `recommend.quality_score`, then time, then cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from .plan import Plan
from .profiles import GPUProfile, Price, prices_for
from .recommend import Request, Result, quality_score, recommend

MILLION = 1_000_000


@dataclass
class GpuVerdict:
    """One GPU type's outcome: its price row (None: no price) and, when no plan fits, why."""

    gpu: GPUProfile
    price: Price | None
    result: Result
    reason: str | None = None  # None: at least one plan fits
    needs_gpus: int | None = None  # fewest GPUs of this type that some method needs (ZeRO-3), when none fits


@dataclass
class Comparison:
    request: Request  # the template (its `gpu` is the first of `gpus`)
    gpus: list  # GPUProfile, in the order asked
    ranked: list  # fitting plans of every GPU, best first
    verdicts: list  # GpuVerdict per GPU, in the order asked
    evaluated: int
    seconds: float

    @property
    def best(self) -> Plan | None:
        return self.ranked[0] if self.ranked else None

    def verdict(self, gpu_name: str) -> GpuVerdict:
        return next(v for v in self.verdicts if v.gpu.name == gpu_name)


def usd_per_million_tokens(p: Plan, price: Price | None) -> float | None:
    """Dollars per million trained tokens: usd_per_gpu_hour x num_gpus / (tokens_per_s x 3600) x 10^6."""
    if price is None or not p.speed or p.speed.tokens_per_s <= 0:
        return None
    return price.usd_per_gpu_hour * p.train.num_gpus / (p.speed.tokens_per_s * 3600.0) * MILLION


def seconds_per_million_tokens(p: Plan) -> float:
    return MILLION / p.speed.tokens_per_s


def job_cost(p: Plan, price: Price | None) -> float | None:
    """The job's dollars when the plan has a workload, else dollars per million tokens (see the module docstring)."""
    if p.cost_usd is not None:
        return p.cost_usd
    if p.hours is not None and price is not None:
        return p.hours * p.train.num_gpus * price.usd_per_gpu_hour
    return usd_per_million_tokens(p, price)


def job_time(p: Plan) -> float:
    """Hours for the job when known, else seconds per million tokens (the order is the same)."""
    return p.hours if p.hours is not None else seconds_per_million_tokens(p)


def compare_key(objective: str, prices: dict):
    """Sort key over plans of several GPUs; an unpriced GPU's plans come after the priced ones under `cost`."""

    def key(p: Plan):
        cost = job_cost(p, prices.get(p.gpu.name))
        hours = job_time(p)
        c = (cost is None, cost if cost is not None else 0.0)
        if objective == "cost":
            return (*c, hours, quality_score(p.train))
        if objective == "time":
            return (hours, *c, quality_score(p.train))
        return (quality_score(p.train), hours, *c)

    return key


def _why_not(res: Result, max_gpus: int) -> tuple[str, int | None]:
    """Why no plan fits on this GPU type: the fewest GPUs any method needs (ZeRO-3, offload if needed), or that
    none fits even on 1024."""
    needs = [nf.needs_gpus for nf in res.not_fitting if nf.needs_gpus]
    if not needs:
        return "no method fits even on 1024 GPUs with ZeRO-3 + offload (activations alone exceed the GPU)", None
    n = min(needs)
    who = next(nf for nf in res.not_fitting if nf.needs_gpus == n)
    per = who.needs_plan.device_bytes / 2**30
    off = " + CPU offload" if who.needs_plan.train.cpu_offload else ""
    smallest = min(nf.best.device_bytes for nf in res.not_fitting) / 2**30
    head = (f"needs {n} GPUs (> --max-gpus {max_gpus}): {who.label.rsplit(', AdamW', 1)[0]} with ZeRO-3{off}, "
            f"{per:.1f} GiB each")
    return head + f"; on one GPU the smallest plan takes {smallest:.1f} GiB", n


def compare(template: Request, gpus: list, data_time=None) -> Comparison:
    """Run `recommend` for each GPU type of `gpus` (the template's other fields held) and rank all fitting plans
    together by `template.objective` (see the module docstring). `data_time(plan) -> Plan`, when given, replaces
    each fitting plan's hours and cost by those of a real dataset (`planner.dataset`)."""
    t0 = time.perf_counter()
    ranked, verdicts, prices, evaluated = [], [], {}, 0
    for g in gpus:
        res = recommend(replace(template, gpu=g, objective="quality"))
        evaluated += res.evaluated
        rows = prices_for(g.name, template.provider)
        price = rows[0] if rows else None
        prices[g.name] = price
        plans = [data_time(p) for p in res.ranked] if data_time else res.ranked
        ranked += plans
        v = GpuVerdict(g, price, res)
        if not res.ranked:
            v.reason, v.needs_gpus = _why_not(res, template.max_gpus)
        verdicts.append(v)
    ranked.sort(key=compare_key(template.objective, prices))
    return Comparison(template, list(gpus), ranked, verdicts, evaluated, time.perf_counter() - t0)


def best_per_gpu(plans: list) -> list:
    """The first (best-ranked) plan of each GPU type, in rank order: one row per GPU answers "which GPU"."""
    seen, out = set(), []
    for p in plans:
        if p.gpu.name not in seen:
            seen.add(p.gpu.name)
            out.append(p)
    return out
