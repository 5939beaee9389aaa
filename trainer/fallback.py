"""The out-of-memory fallback: which plans follow the plan when a step runs out of memory (same effective batch),
how an out-of-memory error is recognised, and which plan a checkpoint continues with."""

from __future__ import annotations

import torch

from planner.config import TrainConfig

MICRO_FIELDS = ("batch_size", "grad_accum", "grad_ckpt", "optimizer")  # what a fallback plan may change


def fallback_chain(tc: TrainConfig, fallbacks: list[dict]) -> list[TrainConfig]:
    """The plan's `[[fallback]]` tables applied to `tc`, keeping those that are valid, new, and keep the effective
    batch (an override of --batch-size/--grad-accum can break that). When none is left, halve the micro-batch
    (doubling accumulation) down to 1, with gradient checkpointing on where the method allows it."""
    eff = tc.batch_size * tc.grad_accum

    def keep(candidates):
        out, seen = [], {micro(tc)}
        for c in candidates:
            if c.batch_size * c.grad_accum == eff and micro(c) not in seen:
                seen.add(micro(c))
                out.append(c)
        return out

    planned = []
    for fb in fallbacks:
        try:
            planned.append(tc.replace(**{k: v for k, v in fb.items() if k in MICRO_FIELDS}))
        except (ValueError, TypeError):
            continue
    chain = keep(planned)
    if chain:
        return chain
    ckpt = tc.spec.supports_grad_ckpt  # peft refuses checkpointing with prefix tuning
    synth = [tc.replace(grad_ckpt=True)] if ckpt and not tc.grad_ckpt else []
    b = tc.batch_size
    while b > 1:
        b //= 2
        if eff % b == 0:
            synth.append(tc.replace(batch_size=b, grad_accum=eff // b, grad_ckpt=ckpt or tc.grad_ckpt))
    return keep(synth)


OOM_MESSAGES = ("out of memory", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED")


def is_oom(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, and the allocation failures that surface as plain RuntimeErrors (CPU allocator,
    cuBLAS workspace)."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in OOM_MESSAGES))


def micro(tc: TrainConfig) -> tuple:
    """The fields a fallback plan may change, as a tuple."""
    return tuple(getattr(tc, k) for k in MICRO_FIELDS)


def fallback_tables(tc: TrainConfig, chain: list[TrainConfig]) -> list[dict]:
    """The `[[fallback]]` tables of `chain` relative to `tc` (the fields that differ), for a plan file."""
    return [{k: getattr(c, k) for k in MICRO_FIELDS if getattr(c, k) != getattr(tc, k)} for c in chain]


def chain_for_checkpoint(used: TrainConfig, chain: list[TrainConfig]) -> list[TrainConfig]:
    """The chain to go on with from a checkpoint written with the micro-batch settings of `used` (a fallback plan,
    or flags changed since): from that plan on when it is in the chain, else `chain[0]` with its settings."""
    if micro(used) == micro(chain[0]):
        return chain
    for i, c in enumerate(chain):
        if micro(c) == micro(used):
            return chain[i:]
    tc = chain[0].replace(**{k: getattr(used, k) for k in MICRO_FIELDS})
    return [tc] + [c for c in chain[1:] if micro(c) != micro(tc)]
