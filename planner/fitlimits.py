"""The largest sequence length, micro-batch and LoRA/DoRA rank that fit a GPU, each with the rest of the
configuration held: integer bisection on the analytic model (`planner.plan.make_plan`). No torch.

"Fits" is what `ftplan recommend` keeps: `plan.device_bytes <= gpu.memory_bytes * (1 - margin)`, with
`planner.plan.DEFAULT_MARGIN` unless told. Device memory does not decrease when one of seq_len, batch_size or
rank grows with the rest fixed (activations and the KV cache scale with tokens, adapters and their optimizer state
with r), so the set of fitting values is an interval starting at 1 and bisection finds its end exactly; the tests
check that the answer fits and answer + 1 does not.

Bounds: the sequence search stops at the model's position cap (`planner.limits.position_cap`, less prefix/prompt
tuning's virtual tokens); the batch search at `MAX_BATCH`; the rank search at the smallest targeted layer's
min(in, out) (`planner.methods.lora.lora_targets`), and only for methods that use a rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TrainConfig
from .limits import position_cap, virtual_tokens
from .plan import DEFAULT_MARGIN, make_plan

MAX_BATCH = 4096


@dataclass(frozen=True)
class Limit:
    """One searched value. `value`: the largest that fits (0: not even 1 fits; None: not applicable).
    `bound`: the search's upper bound; `bound_reason`: why it is the bound. `at_bound`: the answer is the bound,
    not memory. `device_bytes` / `next_device_bytes`: device memory at `value` and at `value + 1` (None where
    there is no such configuration: value 0, or value + 1 past the bound)."""

    name: str
    value: int | None
    bound: int | None = None
    bound_reason: str = ""
    device_bytes: int | None = None
    next_device_bytes: int | None = None
    note: str = ""

    @property
    def at_bound(self) -> bool:
        return self.value is not None and self.bound is not None and self.value == self.bound

    def to_dict(self) -> dict:
        return {
            "value": self.value,
            "bound": self.bound,
            "bound_reason": self.bound_reason,
            "limited_by": None if self.value is None else ("bound" if self.at_bound else "memory"),
            "device_bytes": self.device_bytes,
            "next_device_bytes": self.next_device_bytes,
            "note": self.note,
        }


def limit_bytes(gpu, margin: float = DEFAULT_MARGIN) -> float:
    """The most device memory a fitting plan may use: `gpu.memory_bytes * (1 - margin)` (as `planner.recommend`)."""
    return gpu.memory_bytes * (1.0 - margin)


def device_bytes(arch, tc: TrainConfig, gpu) -> int:
    """Device memory of `tc` on `gpu` (`Plan.device_bytes`: reserved + CUDA context + paged state)."""
    return make_plan(arch, tc, gpu).device_bytes


def largest_fitting(value, limit: float, hi: int) -> int:
    """The largest n in 1..hi with value(n) <= limit, for a value non-decreasing in n (0 if value(1) > limit).

    A bracket search: (lo, bad) with value(lo) <= limit < value(bad) shrinks until bad = lo + 1, so the answer is
    exact whatever the steps. Steps alternate between the secant through the bracket's ends (memory is close to
    linear in each of seq_len, batch and rank, so this lands within a few units of the answer) and plain
    bisection (which bounds the worst case at twice bisection's O(log hi) probes). It checks hi first, the
    common case when a bound rather than memory limits."""
    if hi < 1:
        return 0
    v_lo = value(1)
    if v_lo > limit:
        return 0
    v_bad = value(hi)
    if v_bad <= limit:
        return hi
    lo, bad, secant = 1, hi, True
    while bad - lo > 1:
        mid = (lo + bad) // 2
        if secant and v_bad > v_lo:
            guess = lo + int((limit - v_lo) * (bad - lo) / (v_bad - v_lo))
            mid = min(max(guess, lo + 1), bad - 1)
        secant = not secant
        v = value(mid)
        if v <= limit:
            lo, v_lo = mid, v
            if mid + 1 < bad:  # the secant often lands just below the answer: test the next value at once
                v1 = value(mid + 1)
                if v1 > limit:
                    return mid
                lo, v_lo = mid + 1, v1
        else:
            bad, v_bad = mid, v
    return lo


def rank_bound(arch, tc: TrainConfig) -> int:
    """The largest rank the targeted layers accept: min over them of min(in_features, out_features)."""
    from .methods import lora_targets

    from .moe import expert_wrappers

    t = tc.replace(rank=1)
    dims = [min(lin.in_features, lin.out_features) for lin in lora_targets(arch, t)]
    dims += [min(n_in, n_out) for _, _, n_in, n_out, _ in expert_wrappers(arch, t)]  # MoE ParamWrappers
    return min(dims)


def _search(arch, tc: TrainConfig, gpu, field: str, hi: int, margin: float, reason: str) -> Limit:
    cap = limit_bytes(gpu, margin)
    seen: dict[int, int] = {}

    def dev(n: int) -> int:
        if n not in seen:
            seen[n] = device_bytes(arch, tc.replace(**{field: n}), gpu)
        return seen[n]

    value = largest_fitting(dev, cap, hi)
    return Limit(field, value, hi, reason, dev(value) if value else None,
                 dev(value + 1) if value + 1 <= hi or value == 0 else None)


def max_seq_len(arch, tc: TrainConfig, gpu, margin: float = DEFAULT_MARGIN) -> Limit:
    """The longest sequence (tokens) that fits at `tc`'s batch and rank, up to the position cap."""
    virtual = virtual_tokens(tc)
    hi = position_cap(arch) - virtual
    reason = "position cap (4 x max_position_embeddings" + (f", less {virtual} virtual tokens)" if virtual else ")")
    if not getattr(arch, "max_position_embeddings", 0):
        reason = "position cap (2^20: the config gives no max_position_embeddings)"
    return _search(arch, tc, gpu, "seq_len", hi, margin, reason)


def max_batch(arch, tc: TrainConfig, gpu, margin: float = DEFAULT_MARGIN, hi: int = MAX_BATCH) -> Limit:
    """The largest micro-batch (sequences per GPU) that fits at `tc`'s sequence length and rank, up to `hi`."""
    return _search(arch, tc, gpu, "batch_size", hi, margin, f"search bound {hi}")


def max_rank(arch, tc: TrainConfig, gpu, margin: float = DEFAULT_MARGIN) -> Limit:
    """The largest LoRA/DoRA rank that fits at `tc`'s sequence length and batch, up to the smallest targeted layer
    dimension; value None for methods without a rank (full, IA3, prefix, prompt)."""
    if not tc.spec.uses_rank:
        return Limit("rank", None, note=f"{tc.method} has no rank")
    hi = rank_bound(arch, tc)
    # lora_alpha left at its default (2 x rank) follows the rank; an explicit alpha stays: neither changes memory
    return _search(arch, tc, gpu, "rank", hi, margin, "smallest targeted layer dimension")


@dataclass(frozen=True)
class Limits:
    seq_len: Limit
    batch_size: Limit
    rank: Limit
    margin: float
    limit_bytes: int

    def to_dict(self) -> dict:
        return {
            "margin": self.margin,
            "limit_bytes": self.limit_bytes,
            "max_seq_len": self.seq_len.value,
            "max_batch_size": self.batch_size.value,
            "max_rank": self.rank.value,
            "seq_len": self.seq_len.to_dict(),
            "batch_size": self.batch_size.to_dict(),
            "rank": self.rank.to_dict(),
        }


def fit_limits(arch, tc: TrainConfig, gpu, margin: float = DEFAULT_MARGIN) -> Limits:
    """All three limits of `tc` on `gpu`, each with the other two held at `tc`'s values."""
    return Limits(max_seq_len(arch, tc, gpu, margin), max_batch(arch, tc, gpu, margin), max_rank(arch, tc, gpu, margin),
                  margin, int(limit_bytes(gpu, margin)))
