"""A plan: one training configuration of one model on one GPU type, with its memory, fit, speed, time and cost.

`make_plan` is what `ftplan estimate` prints and what `ftplan recommend` ranks. Its `to_dict()` is the
`--json` interface other tools read (keys documented in README "JSON output").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .arch import ModelArch
from .config import TrainConfig
from .cost import Throughput, ThroughputParams, cost_usd, throughput, throughput_params, training_hours
from .memory import MemoryEstimate, estimate_memory
from .profiles import GPUProfile, Price, prices_for

DEFAULT_MARGIN = 0.05  # recommend keeps plans whose device memory leaves >= 5% of the GPU free


@dataclass(frozen=True)
class Workload:
    """What is trained: `dataset_tokens` x `epochs` tokens (None: no time/cost totals)."""

    dataset_tokens: int | None = None
    epochs: float = 1.0

    @property
    def total_tokens(self) -> int | None:
        return None if self.dataset_tokens is None else int(self.dataset_tokens * self.epochs)


@dataclass
class Plan:
    model: ModelArch
    train: TrainConfig
    memory: MemoryEstimate
    peak_reserved_bytes: int
    device_bytes: int
    gpu: GPUProfile | None = None
    fits: bool | None = None
    headroom_bytes: int | None = None
    speed: Throughput | None = None
    hours: float | None = None
    price: Price | None = None
    cost_usd: float | None = None
    params: ThroughputParams | None = None
    model_ref: str = ""
    notes: list = field(default_factory=list)

    @property
    def peak_allocated_bytes(self) -> int:
        return self.memory.peak_allocated_bytes

    def to_dict(self) -> dict:
        """The JSON interface. Keys `peak_allocated_bytes`, `peak_reserved_bytes`, `device_bytes`, `breakdown`,
        `trainable_params`, `total_params` always; `fits`, `headroom_bytes`, `tokens_per_s`, `step_seconds` when a
        GPU is given. All sizes are integer bytes, per GPU."""
        m = self.memory
        d = {
            "model": self.model.name,
            "model_ref": self.model_ref or self.model.name,
            "hf_id": self.model.hf_id,
            "config": self.train.to_dict(),
            "peak_allocated_bytes": m.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "device_bytes": self.device_bytes,
            "breakdown": dict(m.breakdown),
            "peak_event": m.peak_event,
            "events": dict(m.events),
            "paged_bytes": m.paged_bytes,
            "cpu_offload_bytes": m.cpu_offload_bytes,
            "host_pinned_bytes": m.host_pinned_bytes,
            "host_bytes": m.host_bytes,
            "trainable_params": m.trainable_params,
            "total_params": m.total_params,
            "notes": list(m.notes) + list(self.notes),
        }
        if self.gpu is not None:
            d.update(
                gpu=self.gpu.name,
                gpu_memory_bytes=self.gpu.memory_bytes,
                fits=self.fits,
                headroom_bytes=self.headroom_bytes,
            )
        if self.speed is not None:
            d.update(
                tokens_per_s=round(self.speed.tokens_per_s, 1),
                step_seconds=round(self.speed.step_seconds, 6),
                tokens_per_step=self.train.tokens_per_step,
                mfu=round(self.speed.mfu, 4),
                flops_per_token=self.speed.flops_per_token,
                calibration=self.params.source if self.params else None,
                tokens_per_s_provenance=self.speed.provenance,
                tokens_per_s_expected_error=(None if self.speed.expected_error is None
                                             else round(self.speed.expected_error, 4)),
            )
        if self.hours is not None:
            d["hours"] = round(self.hours, 4)
        if self.cost_usd is not None and self.price is not None:
            d.update(
                cost_usd=round(self.cost_usd, 2),
                usd_per_gpu_hour=self.price.usd_per_gpu_hour,
                provider=self.price.provider,
                price_as_of=self.price.as_of,
            )
        return d


def reserved_bytes(allocated: int, params: ThroughputParams) -> int:
    """Caching allocator's peak footprint: allocated plus its block rounding and fragmentation, a fitted
    fraction per GPU (`allocator_overhead`; measured 1-15% on H100 across the shared rows, median ~6%)."""
    return int(allocated * (1.0 + params.allocator_overhead))


def make_plan(
    arch: ModelArch,
    tc: TrainConfig,
    gpu: GPUProfile | None = None,
    workload: Workload | None = None,
    *,
    provider: str | None = None,
    model_ref: str = "",
) -> Plan:
    """Estimate `tc` for `arch` (per GPU), and when `gpu` is given: fit, throughput, time and cost."""
    mem = estimate_memory(arch, tc, gpu)
    params = throughput_params(gpu.name if gpu else None)
    reserved = reserved_bytes(mem.peak_allocated_bytes, params)
    device = reserved + params.cuda_context_bytes + mem.paged_bytes
    plan = Plan(model=arch, train=tc, memory=mem, peak_reserved_bytes=reserved, device_bytes=device, model_ref=model_ref,
                params=params)
    if arch.moe is not None:
        from .moe import model_notes

        plan.notes.extend(model_notes(arch, tc))
    if gpu is None:
        return plan
    plan.gpu = gpu
    plan.headroom_bytes = gpu.memory_bytes - device
    plan.fits = plan.headroom_bytes >= 0
    if not gpu.supports_bf16 and (tc.precision in ("bf16", "mixed") or tc.base_quant.quantized):
        plan.notes.append(f"{gpu.name} has no bf16 tensor cores: the recipe's bf16 matmuls run on the CUDA cores "
                          f"({gpu.fp32_tflops:g} TFLOP/s), which the speed estimate assumes")
    if arch.moe is not None:
        from .moe import expert_bytes_note

        from .layers import regime

        # the experts' dtype: bf16, fp32 master weights (mixed, fp32), fp32 after k-bit preparation (planner.moe)
        note = expert_bytes_note(arch, regime(tc).weight, gpu.memory_bytes)
        if note:
            plan.notes.append(note)
    plan.speed = throughput(arch, tc, gpu, params)
    total = (workload or Workload()).total_tokens
    if total:
        plan.hours = training_hours(total, plan.speed.tokens_per_s)
        rows = prices_for(gpu.name, provider)
        if rows:
            plan.price = rows[0]
            plan.cost_usd = cost_usd(plan.hours, tc.num_gpus, rows[0].usd_per_gpu_hour)
    return plan

