"""Throughput, training time and dollars of a configuration on a GPU.

Step time on one device = matmul FLOPs / (dense peak x efficiency) + memory-bound terms / bandwidth:

- FLOPs per token (`flops_per_token`): 2 per multiply-add; forward 2N over the matmul weights (decoder linears
  and lm_head; the embedding lookup is free), backward 2N for input gradients plus 2N for the weight gradients
  of *trained* weights only (frozen weights skip theirs: LoRA's backward is ~2/3 of full FT's), causal
  attention 2 x q_dim x S forward per layer (flash skips the masked half) and 2.5x that backward, adapters'
  own matmuls, and one more forward of every layer with checkpointing (Chinchilla appendix F /
  arXiv:2203.15556; Korthikanti et al. arXiv:2205.05198 for recomputation).
- QLoRA dequantizes every 4-bit weight to bf16 in each forward and backward (a third time when checkpointing
  recomputes): read N/2 + write 2N bytes per pass, bandwidth-bound (`dequant_bytes_per_micro_step`).
- The optimizer step reads and writes parameters, gradients and state once per step (`optimizer_bytes_per_step`).
- Multi-GPU: DDP all-reduces gradients (2 (n-1)/n x G), ZeRO-3/FSDP all-gather weights twice and reduce-scatter
  gradients ((n-1)/n x (2W + G)) over the interconnect, half of it hidden behind compute.

The efficiency (achieved fraction of the dense peak) depends on the method and on the width of the matmuls;
defaults below, per-GPU values fitted by `ftplan calibrate fit` from measured records
(`profiles/calibration/<gpu>.toml`) replace them.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from .arch import ModelArch
from .config import TrainConfig
from .layers import regime
from .methods import lora_targets, trainable_params
from .memory import gradient_bytes, optimizer_state_bytes

# -- FLOPs ----------------------------------------------------------------------------------------------------------


def matmul_params(arch: ModelArch) -> int:
    """Weights that take part in a matmul per token: every decoder linear and the output projection
    (lm_head, tied or not). Norms, biases and the embedding lookup are not matmuls."""
    return arch.num_layers * sum(lin.in_features * lin.out_features for lin in arch.linears) + arch.vocab_size * arch.hidden_size


def attention_flops_per_token(arch: ModelArch, tc: TrainConfig) -> float:
    """Forward attention matmuls (QK^T and AV) per token: 2 x 2 x q_dim x keys, halved by causal masking
    (prefix keys are all visible)."""
    seq = tc.seq_len + (tc.num_virtual_tokens if tc.method == "prompt" else 0)
    keys = seq / 2 + (tc.num_virtual_tokens if tc.method == "prefix" else 0)
    return 4.0 * arch.q_dim * keys * arch.num_layers


def adapter_matmul_params(arch: ModelArch, tc: TrainConfig) -> int:
    """LoRA's own matmul weights per token (r x (in + out) per adapted linear); other methods add none."""
    if tc.method not in ("lora", "qlora"):
        return 0
    return arch.num_layers * sum(tc.rank * (lin.in_features + lin.out_features) for lin in lora_targets(arch, tc))


def flops_per_token(arch: ModelArch, tc: TrainConfig) -> dict[str, float]:
    """Matmul FLOPs per trained token, by pass. Input gradients are needed through the whole network for every
    method (the adapters sit in every layer); weight gradients only for trained weights."""
    n = matmul_params(arch)
    a = adapter_matmul_params(arch, tc)
    attn = attention_flops_per_token(arch, tc)
    fwd = 2.0 * (n + a) + attn
    bwd_input = 2.0 * (n + a) + 2.5 * attn  # flash backward: 5 matmuls (scores recomputed, dV, dP, dQ, dK) to 2
    bwd_weight = 2.0 * (n if tc.method == "full" else a)
    recompute = (2.0 * (n - arch.vocab_size * arch.hidden_size + a) + attn) if tc.grad_ckpt else 0.0
    scale = (tc.seq_len + (tc.num_virtual_tokens if tc.method == "prompt" else 0)) / tc.seq_len
    out = {"forward": fwd * scale, "backward": (bwd_input + bwd_weight) * scale, "recompute": recompute * scale}
    out["total"] = out["forward"] + out["backward"] + out["recompute"]
    return out


def dequant_bytes_per_micro_step(arch: ModelArch, tc: TrainConfig) -> int:
    """QLoRA: bytes moved dequantizing every NF4 weight to bf16 (read 0.5 + write 2 bytes per element) once in
    forward, once in backward, once more in a checkpointed recomputation."""
    if tc.method != "qlora":
        return 0
    n = arch.num_layers * sum(lin.in_features * lin.out_features for lin in arch.linears)
    passes = 3 if tc.grad_ckpt else 2
    return int(passes * 2.5 * n)


@functools.lru_cache(maxsize=4096)
def optimizer_bytes_per_step(arch: ModelArch, tc: TrainConfig) -> int:
    """Bytes the optimizer step reads and writes: parameters (read, write), gradients (read), state (read,
    write), once per optimizer step; bitsandbytes 8-bit and AdamW alike are bandwidth-bound."""
    grads = gradient_bytes(arch, tc)
    state = optimizer_state_bytes(arch, tc)
    state_bytes = state["state"] + state["paged"]
    return 3 * grads + 2 * state_bytes


def comm_bytes_per_step(arch: ModelArch, tc: TrainConfig) -> int:
    """Bytes each device sends per optimizer step (ring collectives)."""
    n = tc.num_gpus
    if n == 1:
        return 0
    grads = gradient_bytes(arch, tc)
    frac = (n - 1) / n
    if tc.strategy in ("ddp", "zero2"):
        return int(2 * frac * grads)
    R = regime(tc)
    weights = arch.total_params * (2 if (R.autocast or R.weight == 2 or R.quantized) else 4)
    if R.quantized:
        weights = arch.total_params // 2
    return int(frac * (2 * weights * tc.grad_accum + grads))


# -- efficiency -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThroughputParams:
    """Fitted, physically meaningful throughput parameters of one GPU (see `ftplan calibrate fit`).

    Args:
        matmul_efficiency: achieved fraction of the dense bf16 peak per method (mixed precision full FT is its own
            key, `full-mixed`), for wide models; narrower models reach less (see `width_half`).
        width_half: hidden size at which efficiency is half its wide-model value (small matrices and launch-bound
            elementwise kernels): efficiency(h) = e x h / (h + width_half).
        bandwidth_efficiency: achieved fraction of HBM bandwidth in bandwidth-bound phases.
        allocator_overhead: peak reserved / peak allocated - 1 (caching-allocator rounding and fragmentation).
        cuda_context_bytes: device memory the CUDA context holds outside the allocator (seen by NVML).
        source: where the values come from.
    """

    matmul_efficiency: dict = field(default_factory=dict)
    width_half: float = 1024.0
    bandwidth_efficiency: float = 0.7
    allocator_overhead: float = 0.06
    cuda_context_bytes: int = 536_870_912
    source: str = "defaults"

    def efficiency(self, arch: ModelArch, tc: TrainConfig) -> float:
        key = "full-mixed" if tc.method == "full" and tc.precision != "bf16" else tc.method
        e = self.matmul_efficiency.get(key, self.matmul_efficiency.get(tc.method, DEFAULT_EFFICIENCY[tc.method]))
        return e * arch.hidden_size / (arch.hidden_size + self.width_half)


# Wide-model efficiencies before any fit (a plausible prior; `ftplan calibrate fit` replaces them per GPU).
DEFAULT_EFFICIENCY = {"full": 0.45, "full-mixed": 0.35, "lora": 0.35, "qlora": 0.3, "prefix": 0.4, "prompt": 0.4, "ia3": 0.4}


def calibration_dir() -> Path:
    from .profiles import profiles_dir

    return profiles_dir() / "calibration"


@functools.cache
def throughput_params(gpu_name: str | None) -> ThroughputParams:
    """The fitted parameters for `gpu_name` from `profiles/calibration/<gpu>.toml`; defaults when none exists.
    GPUs without their own fit borrow the H100 fit's efficiencies (a fraction of *their* peak)."""
    if gpu_name is None:
        gpu_name = "h100-sxm-80gb"
    for name in (gpu_name, "h100-sxm-80gb"):
        path = calibration_dir() / f"{name}.toml"
        if path.exists():
            with path.open("rb") as f:
                d = tomllib.load(f)
            p = ThroughputParams(
                matmul_efficiency=dict(d.get("matmul_efficiency", {})),
                width_half=float(d.get("width_half", 1024.0)),
                bandwidth_efficiency=float(d.get("bandwidth_efficiency", 0.7)),
                allocator_overhead=float(d.get("allocator_overhead", 0.06)),
                cuda_context_bytes=int(d.get("cuda_context_bytes", 536_870_912)),
                source=f"profiles/calibration/{path.name}" + ("" if name == gpu_name else f" (borrowed for {gpu_name})"),
            )
            return p
    return ThroughputParams()


# -- time and money -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    step_seconds: float  # one optimizer step (grad_accum micro-steps) on each device
    tokens_per_s: float  # all devices together
    tokens_per_s_per_gpu: float
    mfu: float  # model FLOPs utilization (matmul FLOPs / peak)
    flops_per_token: float
    parts_seconds: dict  # compute / dequant / optimizer / communication, per optimizer step


def throughput(arch: ModelArch, tc: TrainConfig, gpu, params: ThroughputParams | None = None) -> Throughput:
    """Predicted step time and tokens per second of `tc` on `gpu`."""
    params = params or throughput_params(gpu.name)
    peak = gpu.peak_tflops * 1e12
    eff = params.efficiency(arch, tc)
    f = flops_per_token(arch, tc)
    tokens_micro = tc.seq_len * tc.batch_size
    bw = gpu.hbm_bandwidth_gb_per_s * 1e9 * params.bandwidth_efficiency
    compute = tc.grad_accum * tokens_micro * f["total"] / (peak * eff)
    dequant = tc.grad_accum * dequant_bytes_per_micro_step(arch, tc) / bw
    opt_bytes = optimizer_bytes_per_step(arch, tc)
    if tc.num_gpus > 1 and tc.strategy != "ddp":
        opt_bytes //= tc.num_gpus
    optimizer = 0.0 if tc.cpu_offload else opt_bytes / bw
    comm = comm_bytes_per_step(arch, tc) / (gpu.interconnect_gb_per_s * 1e9) * 0.5
    if tc.cpu_offload:
        comm += 2 * optimizer_state_bytes(arch, tc)["state"] / tc.num_gpus / 25e9  # PCIe round trip of the state
    step = compute + dequant + optimizer + comm
    per_gpu = tc.grad_accum * tokens_micro / step
    return Throughput(
        step_seconds=step,
        tokens_per_s=per_gpu * tc.num_gpus,
        tokens_per_s_per_gpu=per_gpu,
        mfu=per_gpu * (f["forward"] + f["backward"]) / peak,
        flops_per_token=f["total"],
        parts_seconds={"compute": compute, "dequant": dequant, "optimizer": optimizer, "communication": comm},
    )


def training_hours(total_tokens: int, tokens_per_s: float) -> float:
    return total_tokens / tokens_per_s / 3600.0


def cost_usd(hours: float, num_gpus: int, usd_per_gpu_hour: float) -> float:
    return hours * num_gpus * usd_per_gpu_hour


def with_params(params: ThroughputParams, **changes) -> ThroughputParams:
    return replace(params, **changes)


__all__ = [
    "Throughput",
    "ThroughputParams",
    "flops_per_token",
    "throughput",
    "throughput_params",
    "training_hours",
    "cost_usd",
    "trainable_params",
]
