"""Throughput, training time and dollars of a configuration on a GPU.

Step time on one device is a sum of named parts (`Throughput.parts_seconds`), each work / (peak x efficiency):

- `compute`: bf16 tensor-core matmul FLOPs / (dense bf16 peak x matmul efficiency). FLOPs per token
  (`flops_per_token`): 2 per multiply-add; forward 2N over the matmul weights (decoder linears and lm_head; the
  embedding lookup is free), backward 2N for input gradients plus 2N for the weight gradients of *trained* weights
  only (frozen weights skip theirs: LoRA's backward is ~2/3 of full FT's), causal attention 2 x q_dim x S forward
  per layer (flash skips the masked half) and 2.5x that backward, adapters' own matmuls, and one more forward of
  every layer with checkpointing (Chinchilla appendix F / arXiv:2203.15556; Korthikanti et al. arXiv:2205.05198).
- `fp32_compute`: matmuls that run in fp32 on the CUDA cores (torch keeps TF32 off for matmuls by default), at the
  fp32 peak x `fp32_efficiency`: every matmul with `--precision fp32`; with QLoRA the lm_head (fp32 after peft's
  `prepare_model_for_kbit_training`) and attention (bitsandbytes' `Linear4bit` returns its input's dtype, so
  q, k and v are fp32 and sdpa runs its fp32 kernel; `fp32_flops_per_token`).
- `adapters`: bandwidth-bound traffic of the adapters' elementwise ops per token (`adapter_bytes_per_token`): peft
  keeps LoRA and IA3 weights in fp32, so each adapted linear casts its input to fp32, applies dropout, scales, adds
  and casts back, in forward and backward, on (tokens x in) and (tokens x out) tensors.
- `dequant`: QLoRA dequantizes every 4-bit weight to bf16 in each forward and backward (a third time when
  checkpointing recomputes): read N/2 + write 2N bytes per pass (`dequant_bytes_per_micro_step`), plus the casts
  around each 4-bit linear (fp32 input to bf16 and the bf16 output back to fp32, `quantized_cast_bytes_per_token`).
- `optimizer`: the optimizer step reads and writes parameters, gradients and state once per step
  (`optimizer_bytes_per_step`).
- `communication`: DDP all-reduces gradients (2 (n-1)/n x G), ZeRO-3/FSDP all-gather weights twice and
  reduce-scatter gradients ((n-1)/n x (2W + G)) over the interconnect, half of it hidden behind compute.

Bandwidth-bound parts run at HBM bandwidth x `bandwidth_efficiency`. The matmul efficiency (achieved fraction of the
dense peak) depends on the method and on the size of the matmuls: e_method x s / (s + width_half) with s = hidden
size x tokens per micro-step / 4096. Defaults below;
per-GPU values fitted by `ftplan calibrate fit` from measured records (`profiles/calibration/<gpu>.toml`) replace
them. Every parameter is one named physical quantity; none is per configuration.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .arch import ModelArch
from .config import TrainConfig
from .layers import regime
from .methods import trainable_params
from .memory import batch_free, gradient_bytes, optimizer_state_bytes
from .strategies import OPTIMIZER_STATE, strategy_of

# -- FLOPs ----------------------------------------------------------------------------------------------------------


def matmul_params(arch: ModelArch) -> int:
    """Weights that take part in a matmul per token: every decoder linear and the output projection
    (lm_head, tied or not). Norms, biases and the embedding lookup are not matmuls."""
    return arch.num_layers * sum(lin.in_features * lin.out_features for lin in arch.linears) + arch.vocab_size * arch.hidden_size


def attention_flops_per_token(arch: ModelArch, tc: TrainConfig) -> float:
    """Forward attention matmuls (QK^T and AV) per token: 2 x 2 x q_dim x keys, halved by causal masking
    (prefix keys are all visible)."""
    extra_seq, extra_kv = tc.spec.virtual_tokens(tc)
    seq = tc.seq_len + extra_seq
    keys = seq / 2 + extra_kv
    return 4.0 * arch.q_dim * keys * arch.num_layers


def adapter_matmul_params(arch: ModelArch, tc: TrainConfig) -> int:
    """The method's own matmul weights per token (LoRA: r x (in + out) per adapted linear; most methods none)."""
    return tc.spec.adapter_matmul_params(arch, tc)


def flops_per_token(arch: ModelArch, tc: TrainConfig) -> dict[str, float]:
    """Matmul FLOPs per trained token, by pass. Input gradients are needed through the whole network for every
    method (the adapters sit in every layer); weight gradients only for trained weights."""
    n = matmul_params(arch)
    a = adapter_matmul_params(arch, tc)
    attn = attention_flops_per_token(arch, tc)
    fwd = 2.0 * (n + a) + attn
    bwd_input = 2.0 * (n + a) + 2.5 * attn  # flash backward: 5 matmuls (scores recomputed, dV, dP, dQ, dK) to 2
    bwd_weight = 2.0 * (n if tc.spec.trains_base else a)
    recompute = (2.0 * (n - arch.vocab_size * arch.hidden_size + a) + attn) if tc.grad_ckpt else 0.0
    scale = (tc.seq_len + tc.spec.virtual_tokens(tc)[0]) / tc.seq_len
    out = {"forward": fwd * scale, "backward": (bwd_input + bwd_weight) * scale, "recompute": recompute * scale}
    out["total"] = out["forward"] + out["backward"] + out["recompute"]
    return out


def dequant_bytes_per_micro_step(arch: ModelArch, tc: TrainConfig) -> int:
    """A 4-bit base (QLoRA): bytes moved dequantizing every NF4 weight to bf16 (read 0.5 + write 2 bytes per
    element) once in forward, once in backward, once more in a checkpointed recomputation."""
    if not tc.base_quant.quantized:
        return 0
    n = arch.num_layers * sum(lin.in_features * lin.out_features for lin in arch.linears)
    passes = 3 if tc.grad_ckpt else 2
    return int(passes * 2.5 * n)


def fp32_flops_per_token(arch: ModelArch, tc: TrainConfig) -> float:
    """The part of `flops_per_token(...)["total"]` that runs in fp32 (CUDA cores, not tensor cores).

    `--precision fp32`: all of it. QLoRA: the lm_head (fp32 after `prepare_model_for_kbit_training`, frozen: forward
    and input gradient, 4 x V x h) and attention (fp32 q, k, v: forward, backward, and the checkpointed recompute).
    Other configurations: none (bf16, autocast's bf16 for `mixed`, QLoRA without k-bit preparation)."""
    if tc.precision == "fp32" and not tc.base_quant.quantized:
        return flops_per_token(arch, tc)["total"]
    if not tc.base_quant.quantized or not tc.recipe.kbit_preparation:
        return 0.0
    attn = attention_flops_per_token(arch, tc)
    return 4.0 * arch.vocab_size * arch.hidden_size + attn * (2.5 + (1.0 if tc.grad_ckpt else 0.0))


def adapter_bytes_per_token(arch: ModelArch, tc: TrainConfig) -> float:
    """Bandwidth-bound bytes per token that the adapters' elementwise ops move in one micro-step (all layers): the
    method's `Method.adapter_bytes_per_token` (LoRA's wrapper casts, dropout, scale and add; IA3's fp32 products;
    DoRA's combination; none for prefix and prompt tuning). Cached per configuration without batch."""
    return _adapter_bytes_per_token(arch, batch_free(tc))


@functools.lru_cache(maxsize=4096)
def _adapter_bytes_per_token(arch: ModelArch, tc: TrainConfig) -> float:
    return tc.spec.adapter_bytes_per_token(arch, tc, regime(tc).lin)


def quantized_cast_bytes_per_token(arch: ModelArch, tc: TrainConfig) -> float:
    """A 4-bit base: bitsandbytes' `Linear4bit` casts its fp32 input to bf16 and its bf16 output back to fp32
    (read 4 + write 2 bytes per element each way), forward and backward, on every decoder linear."""
    if not tc.base_quant.quantized or not tc.recipe.kbit_preparation:  # bf16 stream: the casts are no-ops
        return 0.0
    recompute = 2 if tc.grad_ckpt else 1
    widths = sum(lin.in_features + lin.out_features for lin in arch.linears)
    return (recompute + 1) * 6.0 * widths * arch.num_layers


def optimizer_bytes_per_step(arch: ModelArch, tc: TrainConfig) -> int:
    """Bytes the optimizer step reads and writes: parameters (read, write), gradients (read), state (read,
    write), once per optimizer step; bitsandbytes 8-bit and AdamW alike are bandwidth-bound."""
    return _optimizer_bytes_per_step(arch, batch_free(tc))


@functools.lru_cache(maxsize=4096)
def _optimizer_bytes_per_step(arch: ModelArch, tc: TrainConfig) -> int:
    grads = gradient_bytes(arch, tc)
    state = optimizer_state_bytes(arch, tc)
    state_bytes = state["state"] + state["paged"]
    return 3 * grads + 2 * state_bytes


def comm_bytes_per_step(arch: ModelArch, tc: TrainConfig) -> int:
    """Bytes each device sends per optimizer step (ring collectives): the strategy's
    `Strategy.comm_bytes_per_step` (`planner.strategies`)."""
    S = strategy_of(tc)
    return S.comm_bytes_per_step(arch, tc, gradient_bytes(arch, tc)) if S.multi_gpu else 0


# -- efficiency -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThroughputParams:
    """Fitted, physically meaningful throughput parameters of one GPU (see `ftplan calibrate fit`).

    Args:
        matmul_efficiency: achieved fraction of the dense bf16 peak per method (mixed precision full FT is its own
            key, `full-mixed`), for large matmuls; smaller ones reach less (see `width_half`).
        width_half: hidden size (at 4096 tokens per micro-step) at which efficiency is half its large-matmul value
            (few output tiles leave SMs idle; launch-bound elementwise kernels): efficiency = e x size /
            (size + width_half), size = hidden size x tokens per micro-step / 4096.
        bandwidth_efficiency: achieved fraction of HBM bandwidth in bandwidth-bound phases (optimizer step,
            dequantization, adapters' elementwise traffic).
        fp32_efficiency: achieved fraction of the fp32 (CUDA-core) peak by fp32 matmuls (SGEMM reaches ~70% on
            large matrices); the same width dependence applies.
        allocator_overhead: peak reserved / peak allocated - 1 (caching-allocator rounding and fragmentation).
        cuda_context_bytes: device memory the CUDA context holds outside the allocator (seen by NVML).
        source: where the values come from.
    """

    matmul_efficiency: dict = field(default_factory=dict)
    width_half: float = 1024.0
    bandwidth_efficiency: float = 0.7
    fp32_efficiency: float = 0.7
    allocator_overhead: float = 0.06
    cuda_context_bytes: int = 536_870_912
    source: str = "defaults"

    def efficiency(self, arch: ModelArch, tc: TrainConfig) -> float:
        """Matmul efficiency of `tc` on `arch`: e_method x size / (size + width_half) (see `size_factor`). The key
        is `method_key(tc)`; a key without a fitted value falls back to the method's name (with its quantization), then to the method's
        `efficiency_keys`, then to the prior."""
        name = tc.base_quant.key_prefix + tc.method
        for key in (method_key(tc), name, *tc.spec.efficiency_keys):
            if key in self.matmul_efficiency:
                return self.matmul_efficiency[key] * self.size_factor(arch, tc)
        return DEFAULT_EFFICIENCY.get(name, DEFAULT_FROZEN_BASE_EFFICIENCY) * self.size_factor(arch, tc)

    def size_factor(self, arch: ModelArch, tc: TrainConfig) -> float:
        """How far the matmuls are from the wide-model efficiency: size / (size + width_half), size = hidden size x
        tokens per micro-step / 4096 (the GEMMs' output tiles grow with both: few tiles leave SMs idle and
        launch overhead exposed). At 4096 tokens per micro-step, size is the hidden size."""
        size = arch.hidden_size * tc.seq_len * tc.batch_size / REFERENCE_TOKENS
        return size / (size + self.width_half)


REFERENCE_TOKENS = 4096  # tokens per micro-step at which `width_half` is a hidden size


def method_key(tc: TrainConfig) -> str:
    """The efficiency key of a configuration, from its method (`planner.methods`): the method's name with its base
    quantization (`qlora` for LoRA over NF4), and full fine-tuning under fp32 master weights apart as `full-mixed`."""
    return tc.spec.efficiency_key(tc)


# Large-matmul efficiencies before any fit (a plausible prior; `ftplan calibrate fit` replaces them per GPU, and
# scales them for methods with fewer than two records).
# Frozen-base methods run full fine-tuning's GEMMs (their extra work is counted as adapter traffic): same prior.
DEFAULT_EFFICIENCY = {"full": 0.45, "full-mixed": 0.35, "lora": 0.45, "qlora": 0.45, "prefix": 0.45, "prompt": 0.45, "ia3": 0.45}
DEFAULT_FROZEN_BASE_EFFICIENCY = 0.45


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
                fp32_efficiency=float(d.get("fp32_efficiency", 0.7)),
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
    """Predicted step time and tokens per second of `tc` on `gpu` (parts: see the module docstring)."""
    params = params or throughput_params(gpu.name)
    peak32 = (gpu.fp32_tflops or gpu.peak_tflops / 16) * 1e12
    # the recipe computes in bf16; without bf16 tensor cores (T4, V100) those GEMMs run on the CUDA cores;
    # `--precision fp16` (fp16 autocast) runs them on the fp16 tensor cores every profiled GPU has
    if tc.precision == "fp16" and not tc.base_quant.quantized:
        peak = gpu.fp16_dense_tflops * 1e12
    else:
        peak = gpu.peak_tflops * 1e12 if gpu.supports_bf16 else peak32
    width = params.size_factor(arch, tc)
    eff = params.efficiency(arch, tc)
    f = flops_per_token(arch, tc)
    f32 = min(fp32_flops_per_token(arch, tc), f["total"])
    tokens_micro = tc.seq_len * tc.batch_size
    tokens_step = tc.grad_accum * tokens_micro
    bw = gpu.hbm_bandwidth_gb_per_s * 1e9 * params.bandwidth_efficiency
    compute = tokens_step * (f["total"] - f32) / (peak * eff)
    fp32_compute = tokens_step * f32 / (peak32 * params.fp32_efficiency * width)
    adapters = tokens_step * adapter_bytes_per_token(arch, tc) / bw
    dequant_bytes = tc.grad_accum * dequant_bytes_per_micro_step(arch, tc)
    dequant = (dequant_bytes + tokens_step * quantized_cast_bytes_per_token(arch, tc)) / bw
    S = strategy_of(tc)  # each device steps its share of a sharded optimizer state, none when it is offloaded
    opt_bytes = optimizer_bytes_per_step(arch, tc) // S.ways(OPTIMIZER_STATE, tc.num_gpus)
    optimizer = 0.0 if S.offloads_optimizer(tc) else opt_bytes / bw
    comm = comm_bytes_per_step(arch, tc) / (gpu.interconnect_gb_per_s * 1e9) * 0.5
    if S.offloads_optimizer(tc):  # PCIe (25 GB/s)
        comm += S.offload_bytes_per_step(tc, optimizer_state_bytes(arch, tc)["state"]) / 25e9
    parts = {"compute": compute, "fp32_compute": fp32_compute, "adapters": adapters, "dequant": dequant,
             "optimizer": optimizer, "communication": comm}
    step = sum(parts.values())
    per_gpu = tokens_step / step
    return Throughput(
        step_seconds=step,
        tokens_per_s=per_gpu * tc.num_gpus,
        tokens_per_s_per_gpu=per_gpu,
        mfu=per_gpu * (f["forward"] + f["backward"]) / peak,
        flops_per_token=f["total"],
        parts_seconds=parts,
    )


def training_hours(total_tokens: int, tokens_per_s: float) -> float:
    return total_tokens / tokens_per_s / 3600.0


def cost_usd(hours: float, num_gpus: int, usd_per_gpu_hour: float) -> float:
    return hours * num_gpus * usd_per_gpu_hour




__all__ = [
    "Throughput",
    "ThroughputParams",
    "adapter_bytes_per_token",
    "flops_per_token",
    "fp32_flops_per_token",
    "method_key",
    "throughput",
    "throughput_params",
    "training_hours",
    "cost_usd",
    "trainable_params",
]
