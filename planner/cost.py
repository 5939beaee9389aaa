"""Throughput, training time and dollars of a configuration on a GPU.

A micro-step is timed kernel by kernel from the ops of the graph the memory model replays (`planner.kernels`:
the same ops, so a new method or recipe option times itself), from the GPU's physical figures (dense tensor-core
and fp32 peaks, memory bandwidth, SM count: `profiles/gpus/*.toml`) and a few parameters fitted per architecture
(`ThroughputParams`, `ftplan calibrate fit`). Parts (`Throughput.parts_seconds`, per optimizer step):

- `gemm`: tensor-core GEMMs by shape (M = tokens, N and K from the layer's weights; forward, input gradient,
  weight gradient of trained weights, checkpointed recompute), each the waves of its best tile over the SMs
  (`gemm_seconds`: tile and wave quantization, split-K) at `gemm_efficiency` x the dense bf16/fp16 peak;
- `fp32_gemm`: GEMMs with fp32 operands on the CUDA cores (torch keeps TF32 off): peft's fp32 LoRA matrices,
  QLoRA's fp32 lm_head, `--precision fp32`, at `fp32_efficiency` x the fp32 peak;
- `attention`: sdpa's FLOPs (4 x q_dim x keys per token forward, 2.5x backward; flash skips the causal half) at
  the published FlashAttention efficiency of the architecture (`ATTENTION_EFFICIENCY`), the memory-efficient
  kernel (a materialized mask, fp32 operands) at half of it;
- `memory`: every other op by the bytes its operands move (norms, activations, rotary, casts, dropout, the loss,
  peft's adapter arithmetic) at `bandwidth_efficiency` x the memory bandwidth;
- `dequant`: bitsandbytes dequantizing each NF4 weight per pass (read 0.5, write 2 bytes per element);
- `launch`: the time the GPU waits for the host: eager PyTorch issues every kernel from the CPU
  (`launch_seconds` each), asynchronously, so a micro-step takes max(GPU work, kernels x launch_seconds); this
  part is the excess of the host over the GPU (small models at short sequences are host-bound);
- `optimizer`: the optimizer step and gradient clipping by the bytes their passes move (`optimizer_bytes_per_step`);
- `host_transfer` (offloaded checkpoints, activation offloading): each layer input (TRL's offloading: each tensor
  its hooks offload) copied to pinned host memory in forward and back in backward, on the compute stream (transformers 5.17 `gradient_checkpointing_enable(offload=True)` docstring:
  "Both copies run on the compute stream, so the step gets slower"), over the card's PCIe link (`planner.comm.topology`).
- `communication`: DDP all-reduces gradients (2 (n-1)/n x G), ZeRO-3/FSDP all-gather weights twice and
  reduce-scatter gradients ((n-1)/n x (2W + G)) over the slowest link the ring crosses (NVLink/PCIe in a node, the
  NIC share between nodes), minus what the compute hides (FSDP2 prefetch, DDP/ZeRO buckets in backward), plus CPU
  offload's PCIe transfers: `planner.comm`.

The fitted values are fractions of each GPU's own peaks (and one host cost per kernel), so a calibration on one
GPU times every GPU of its architecture (`throughput_params`: calibrated, transferred, extrapolated, each with
its expected error). `flops_per_token` (the model FLOPs behind MFU) is counted separately from the kernels.
"""

from __future__ import annotations

import functools
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .arch import ModelArch
from .config import TrainConfig
from .kernels import step_ops
from .layers import regime
from .methods import trainable_params
from .memory import _piece_key, batch_free, gradient_bytes, optimizer_state_bytes
from .comm import communication_time, topology
from .moe import active_matmul_params as moe_active_matmul_params
from .strategies import OPTIMIZER_STATE, strategy_of

# -- FLOPs ----------------------------------------------------------------------------------------------------------


def matmul_params(arch: ModelArch) -> int:
    """Weights that take part in a matmul per token: every decoder linear and the output projection
    (lm_head, tied or not). Norms, biases and the embedding lookup are not matmuls. A MoE model counts the
    *active* feed-forward weights of a token (router, top_k experts, shared expert: `planner.moe`), not all
    experts: memory holds every expert, each token's FLOPs go through top_k of them."""
    n = arch.num_layers * sum(lin.in_features * lin.out_features for lin in arch.linears) + arch.vocab_size * arch.hidden_size
    return n + (moe_active_matmul_params(arch) if arch.moe else 0)


def attention_flops_per_token(arch: ModelArch, tc: TrainConfig) -> float:
    """Forward attention matmuls (QK^T and AV) per token: 2 x 2 x q_dim x keys, halved by causal masking
    (prefix keys are all visible)."""
    extra_seq, extra_kv = tc.spec.virtual_tokens(tc)
    seq = tc.seq_len + extra_seq
    keys = seq / 2 + extra_kv
    return 2.0 * _qk_v_width(arch) * keys * arch.num_layers


def _qk_v_width(arch: ModelArch) -> int:
    """Elements per token and key of QK^T plus AV: 2 x q_dim; MLA H x (qk_head_dim + v_head_dim) (planner.mla)."""
    return arch.mla.attention_matmul_width(arch.num_heads) if arch.mla else 2 * arch.q_dim


def adapter_matmul_params(arch: ModelArch, tc: TrainConfig) -> int:
    """The method's own matmul weights per token (LoRA: r x (in + out) per adapted linear; most methods none)."""
    return tc.spec.adapter_matmul_params(arch, tc)


def saved_copy_matmul_params(arch: ModelArch, tc: TrainConfig) -> int:
    """Weights whose gradient GEMM a trained lm_head copy adds per token (peft `modules_to_save`: `grad_logits^T @ x`,
    V x h); a trained embedding copy's gradient is a scatter-add, not a matmul."""
    return arch.vocab_size * arch.hidden_size if "lm_head" in tc.recipe.modules_to_save else 0


def flops_per_token(arch: ModelArch, tc: TrainConfig) -> dict[str, float]:
    """Matmul FLOPs per trained token, by pass. Input gradients are needed through the whole network for every
    method (the adapters sit in every layer); weight gradients only for trained weights."""
    n = matmul_params(arch)
    a = adapter_matmul_params(arch, tc)
    attn = attention_flops_per_token(arch, tc)
    fwd = 2.0 * (n + a) + attn
    bwd_input = 2.0 * (n + a) + 2.5 * attn  # flash backward: 5 matmuls (scores recomputed, dV, dP, dQ, dK) to 2
    bwd_weight = 2.0 * (n if tc.spec.trains_base else a + saved_copy_matmul_params(arch, tc))
    recompute = (2.0 * (n - arch.vocab_size * arch.hidden_size + a) + attn) if tc.grad_ckpt else 0.0
    scale = (tc.seq_len + tc.spec.virtual_tokens(tc)[0]) / tc.seq_len
    out = {"forward": fwd * scale, "backward": (bwd_input + bwd_weight) * scale, "recompute": recompute * scale}
    out["total"] = out["forward"] + out["backward"] + out["recompute"]
    return out


def optimizer_bytes_per_step(arch: ModelArch, tc: TrainConfig) -> int:
    """Bytes the optimizer step and the gradient clipping before it read and write (bandwidth-bound).

    Per trained element with parameter/gradient bytes p (= g) and state bytes s per moment (G = gradient bytes, S =
    state bytes of both moments = 2s per element):
    - `adamw`: torch's foreach AdamW (torch 2.13 `optim/adam.py` `_multi_tensor_adam`, capturable off): weight
      decay `_foreach_mul_(params)` 2p, `lerp_(exp_avg, grad)` 2s + g, `mul_(exp_avg_sq)` 2s, `addcmul_` 2s + g,
      `sqrt` 2s, `div_` 2s, `add_(eps)` 2s, `addcdiv_(params, exp_avg, denom)` 2p + 2s: 4p + 2g + 12s = 6G + 6S;
    - bitsandbytes 8-bit AdamW: one fused kernel reads and writes the parameter and both 8-bit moments and reads
      the gradient: 2p + g + 2S = 3G + 2S;
    - others: parameters read and written, gradients read, state read and written: 3G + 2S;
    plus `clip_grad_norm_` (torch 2.13 `nn/utils/clip_grad.py`, foreach): the norms read every gradient and
    `_foreach_mul_` scales them in place: 3G."""
    return _optimizer_bytes_per_step(arch, batch_free(tc))


@functools.lru_cache(maxsize=4096)
def _optimizer_bytes_per_step(arch: ModelArch, tc: TrainConfig) -> int:
    grads = gradient_bytes(arch, tc)
    state = optimizer_state_bytes(arch, tc)
    state_bytes = state["state"] + state["paged"]
    if tc.optimizer == "adamw":
        step = 6 * grads + 6 * state_bytes
    else:
        step = 3 * grads + 2 * state_bytes
    return step + 3 * grads


def comm_bytes_per_step(arch: ModelArch, tc: TrainConfig) -> int:
    """Bytes each device sends per optimizer step (ring collectives): the strategy's
    `Strategy.comm_bytes_per_step` (`planner.strategies`)."""
    S = strategy_of(tc)
    return S.comm_bytes_per_step(arch, tc, gradient_bytes(arch, tc)) if S.multi_gpu else 0


# -- GEMMs: tiles, waves, split-K ----------------------------------------------------------------------------------

# Thread-block tiles cuBLAS/CUTLASS pick from for bf16/fp16 GEMMs (NVIDIA "Matrix Multiplication Background User's
# Guide" DU-09799-001 §2.3 "Typical Tile Dimensions In cuBLAS": 256x128, 128x256, 128x128, 64x128 ...; the cuBLASLt
# `cublasLtMatmulTile_t` enum lists the same shapes, and thin ones down to 32 for skinny outputs such as LoRA's). Larger tiles reuse each loaded element more (arithmetic
# intensity tm x tn / (tm + tn) per element of A and B), so they reach more of the peak; smaller ones waste less on
# partial tiles and waves (§3.1 tile quantization, §3.2 wave quantization).
TILES = ((128, 256), (256, 128), (128, 128), (64, 128), (128, 64), (64, 64), (128, 32), (32, 128), (64, 32), (32, 64))
SPLITS = (1, 2, 4, 8, 16)  # split-K factors cuBLAS uses when the output has too few tiles for the SMs
_TILE_INTENSITY_HALF = 16.0  # intensity (elements) at which a tile's main loop would reach half its peak


def tile_efficiency(tm: int, tn: int) -> float:
    """Fraction of a 128x256 tile's throughput that a tm x tn tile reaches: i / (i + 16) relative, with i = tm tn /
    (tm + tn) the elements of C computed per element of A and B loaded (128x128: 0.95, 64x64: 0.79)."""
    i = tm * tn / (tm + tn)
    ref = 128 * 256 / 384
    return (i / (i + _TILE_INTENSITY_HALF)) / (ref / (ref + _TILE_INTENSITY_HALF))


@functools.lru_cache(maxsize=65536)
def gemm_seconds(m: int, n: int, k: int, dtype: int, sms: int, peak_flops: float, efficiency: float,
                 bandwidth: float) -> float:
    """Time of one (m x k) @ (k x n) GEMM on `sms` SMs: the best tile and split-K of `TILES` x `SPLITS`. Each
    runs ceil(tiles x split / sms) waves; a wave takes one tile's main loop, 2 tm tn k / split FLOPs at the SM's
    share of `peak_flops` x `efficiency` x `tile_efficiency`, plus its epilogue, writing the tm x tn tile of C
    (`dtype` bytes; fp32 partial sums under split-K) at the SM's share of `bandwidth`; never less than moving A,
    B and C once at `bandwidth`. Sources: NVIDIA Matrix Multiplication Background guide §3 (tile and wave
    quantization: a GEMM's time is its waves times a tile's time); CUTLASS `GemmSplitKParallel` / cuBLAS split-K
    for skinny outputs with a long reduction (the weight gradient of a LoRA matrix: r x in, over every token)."""
    per_sm = peak_flops * efficiency / sms
    per_sm_bw = bandwidth / sms
    best = math.inf
    for tm, tn in TILES:
        tiles = -(-m // tm) * -(-n // tn)
        rate = per_sm * tile_efficiency(tm, tn)
        for split in SPLITS:
            if split > 1 and tiles * split > 2 * sms:
                break
            waves = -(-(tiles * split) // sms)
            epilogue = tm * tn * (4 if split > 1 else dtype) / per_sm_bw
            t = waves * (2.0 * tm * tn * -(-k // split) / rate + epilogue)
            best = min(best, t)
    return max(best, dtype * (m * k + k * n + m * n) / bandwidth)


# -- parameters -----------------------------------------------------------------------------------------------------


# FlashAttention-2's fraction of the dense peak (torch's sdpa flash backend runs FA2 kernels): 50-73% of the A100's
# peak forward, lower backward (Dao, arXiv:2307.08691 §4.1); 35% of the H100's (Shah et al., FlashAttention-3,
# arXiv:2407.08608 §1). Ada: taken as Ampere's (same FA2 kernels, sm8x); Volta/Turing have no flash kernel (sdpa
# falls back to the memory-efficient one): half of that. Not fitted: the records' attention is a few % of a step.
ATTENTION_EFFICIENCY = {"hopper": 0.35, "ampere": 0.5, "ada": 0.5, "turing": 0.25, "volta": 0.25}


@dataclass(frozen=True)
class ThroughputParams:
    """The few fitted throughput parameters of one GPU architecture (see `ftplan calibrate fit`), plus the
    allocator figures of the GPU the calibration was measured on.

    Args:
        gemm_efficiency: fraction of the dense tensor-core peak that a full wave of large (128x256) tiles reaches
            on a long reduction (cuBLAS reaches ~70-80%); the same fraction of the CUDA-core peak for fp32 GEMMs
            is `fp32_efficiency`.
        bandwidth_efficiency: achieved fraction of the memory bandwidth by bandwidth-bound kernels (elementwise
            ops, norms, casts, the loss, the optimizer step, dequantization).
        launch_seconds: time each kernel adds beyond its work: launch latency and the eager framework's per-op
            CPU time that the GPU waits for when kernels are short (small models).
        fp32_efficiency: fraction of the fp32 CUDA-core peak reached by fp32 GEMMs (SGEMM: ~50-70%).
        allocator_overhead: peak reserved / peak allocated - 1 (caching-allocator rounding and fragmentation).
        cuda_context_bytes: device memory the CUDA context holds outside the allocator (seen by NVML).
        architecture: the architecture these values were fitted on ("" for the defaults).
        provenance: "calibrated" (fitted on this GPU's records), "transferred" (fitted on another GPU of the same
            architecture), "extrapolated" (fitted on another architecture) or "default" (no calibration).
        expected_error: the median relative tokens/s error to expect (see `calibrate.fit`), None without records.
        source: where the values come from.
    """

    gemm_efficiency: float = 0.7
    bandwidth_efficiency: float = 0.7
    launch_seconds: float = 20e-6
    fp32_efficiency: float = 0.7
    allocator_overhead: float = 0.06
    cuda_context_bytes: int = 536_870_912
    architecture: str = ""
    provenance: str = "default"
    expected_error: float | None = None
    source: str = "defaults"

    def attention_efficiency(self, gpu) -> float:
        return ATTENTION_EFFICIENCY.get(gpu.architecture, 0.35)


FITTED = ("gemm_efficiency", "bandwidth_efficiency", "launch_seconds", "fp32_efficiency")  # what `calibrate fit` learns


def method_key(tc: TrainConfig) -> str:
    """A configuration's method with its base quantization (`qlora` for LoRA over NF4), and full fine-tuning under
    fp32 master weights apart as `full-mixed`: how records and errors are grouped."""
    return tc.spec.efficiency_key(tc)


def calibration_dir() -> Path:
    from .profiles import profiles_dir

    return profiles_dir() / "calibration"


def _read_calibration(path: Path) -> dict:
    with path.open("rb") as f:
        return tomllib.load(f)


@functools.cache
def _calibrations(folder: str) -> dict:
    """gpu name -> its calibration file's contents, for every file in profiles/calibration/."""
    return {p.stem: _read_calibration(p) for p in sorted(Path(folder).glob("*.toml"))}


# A GPU without a calibration of its own takes one of the same architecture, else this order (nearest first).
ARCHITECTURE_ORDER = ("hopper", "ada", "ampere", "turing", "volta")


@functools.cache
def throughput_params(gpu_name: str | None) -> ThroughputParams:
    """The parameters that time `gpu_name`, with their provenance:

    - calibrated: profiles/calibration/<gpu>.toml exists (fitted on this GPU's records);
    - transferred: another GPU of the same architecture has one (its fitted values are per architecture: a
      fraction of *this* GPU's peaks, bandwidth and SM count); its expected error is the calibration's own
      held-out error widened by the transfer error (`[transfer]` in the file, see `calibrate.fit`);
    - extrapolated: only another architecture has one (the nearest in `ARCHITECTURE_ORDER`): its values, with
      the wider cross-architecture error;
    - default: no calibration file at all.
    The allocator figures (memory) come from the same file (as before: borrowed across GPUs)."""
    from .profiles import load_gpu

    if gpu_name is None:
        gpu_name = "h100-sxm-80gb"
    cals = _calibrations(str(calibration_dir()))
    if not cals:
        return ThroughputParams()
    arch = load_gpu(gpu_name).architecture
    if gpu_name in cals:
        name, how = gpu_name, "calibrated"
    else:
        same = [n for n, d in cals.items() if d.get("architecture") == arch]
        if same:
            name, how = same[0], "transferred"
        else:
            order = {a: i for i, a in enumerate(ARCHITECTURE_ORDER)}
            here = order.get(arch, len(order))
            name = min(cals, key=lambda n: (abs(order.get(cals[n].get("architecture", ""), 99) - here), n))
            how = "extrapolated"
    d = cals[name]
    err = d.get("expected_error", {})
    defaults = ThroughputParams()
    return ThroughputParams(
        gemm_efficiency=float(d.get("gemm_efficiency", defaults.gemm_efficiency)),
        bandwidth_efficiency=float(d.get("bandwidth_efficiency", defaults.bandwidth_efficiency)),
        launch_seconds=float(d.get("launch_seconds", defaults.launch_seconds)),
        fp32_efficiency=float(d.get("fp32_efficiency", defaults.fp32_efficiency)),
        allocator_overhead=float(d.get("allocator_overhead", defaults.allocator_overhead)),
        cuda_context_bytes=int(d.get("cuda_context_bytes", defaults.cuda_context_bytes)),
        architecture=d.get("architecture", ""),
        provenance=how,
        expected_error=err.get(how),
        source=f"profiles/calibration/{name}.toml" + (", calibrated" if name == gpu_name else f", {how} to {gpu_name}")
        + (f", expected error {100 * err[how]:.0f}%" if how in err else ""),
    )


# -- time and money -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    step_seconds: float  # one optimizer step (grad_accum micro-steps) on each device
    tokens_per_s: float  # all devices together
    tokens_per_s_per_gpu: float
    mfu: float  # model FLOPs utilization (matmul FLOPs / peak)
    flops_per_token: float
    parts_seconds: dict  # see PARTS, per optimizer step
    provenance: str = "default"  # calibrated / transferred / extrapolated / default (`throughput_params`)
    expected_error: float | None = None  # median relative error to expect on tokens/s


PARTS = ("gemm", "fp32_gemm", "attention", "memory", "dequant", "launch", "optimizer", "communication")


# The memory-efficient (CUTLASS) sdpa kernel runs at about half FlashAttention-2's speed (Dao, arXiv:2307.08691
# Fig. 4-6: xformers' cutlass kernel vs FlashAttention-2, forward + backward).
EFFICIENT_ATTENTION_SPEED = 0.5


def attention_seconds(arch: ModelArch, tc: TrainConfig, batch: int, kernel: str, causal: bool, gpu,
                      params: ThroughputParams) -> float:
    """One forward sdpa call of one layer: 2 x 2 x q_dim x keys FLOPs per token (QK^T and AV), keys = the
    sequence (plus prefix keys), halved when the kernel skips the causally masked half (flash with `is_causal`);
    flash at `ATTENTION_EFFICIENCY` of the bf16 peak, the memory-efficient kernel at half that (of the fp32 peak
    for fp32 operands). Backward: 2.5x (five matmuls to two)."""
    extra_seq, extra_kv = tc.spec.virtual_tokens(tc)
    seq = tc.seq_len + extra_seq
    keys = (seq / 2 if causal else seq) + extra_kv
    flops = 2.0 * _qk_v_width(arch) * keys * seq * batch
    eff = params.attention_efficiency(gpu)
    peak16, tensor_cores = tensor_peak(gpu, tc)
    if kernel == "flash" and tensor_cores:
        return flops / (peak16 * eff)
    if kernel == "efficient" and tensor_cores:
        return flops / (peak16 * eff * EFFICIENT_ATTENTION_SPEED)
    peak32 = (gpu.fp32_tflops or gpu.peak_tflops / 16) * 1e12
    return flops / (peak32 * params.fp32_efficiency * EFFICIENT_ATTENTION_SPEED)


def tensor_peak(gpu, tc: TrainConfig) -> tuple[float, bool]:
    """(FLOP/s of the 16-bit tensor cores the step's GEMMs use, whether it has them): the bf16 peak where the GPU
    has bf16 tensor cores; with `--precision fp16` (fp16 autocast, GradScaler) the fp16 peak, which every profiled
    GPU has (T4, V100 included); otherwise none (bf16 on sm75/sm70 runs on the CUDA cores)."""
    if tc.precision == "fp16" and not tc.base_quant.quantized:
        return gpu.fp16_dense_tflops * 1e12, gpu.fp16_dense_tflops > 0
    return gpu.peak_tflops * 1e12, bool(gpu.supports_bf16)


@functools.lru_cache(maxsize=65536)
def _micro_step(arch: ModelArch, tc: TrainConfig, batch: int, gpu, params: ThroughputParams) -> tuple:
    """Seconds of one micro-step (forward and backward) by part, for `tc` without its batch at micro-batch
    `batch` (`planner.kernels.step_ops`)."""
    ops = step_ops(arch, _piece_key(tc))  # the graph depends on no batch, optimizer or GPU count
    peak32 = (gpu.fp32_tflops or gpu.peak_tflops / 16) * 1e12
    peak16, tensor_cores = tensor_peak(gpu, tc)
    peak16 = peak16 if tensor_cores else peak32
    bw = gpu.hbm_bandwidth_gb_per_s * 1e9 * params.bandwidth_efficiency
    sms = gpu.sm_count
    gemm = gemm32 = 0.0
    for g in ops.gemms:
        tensor = g.dtype <= 2 and tensor_cores
        peak, eff = (peak16, params.gemm_efficiency) if tensor else (peak32, params.fp32_efficiency)
        if g.phase == "fixed":  # batch-independent (a LoRA-wrapped expert stack's fold: planner.kernels)
            m, n, k = g.tokens, g.n, g.k
        elif g.phase == "weight_grad":
            m, n, k = g.n, g.k, g.tokens * batch
        elif g.phase == "input_grad":
            m, n, k = g.tokens * batch, g.n, g.k
        else:
            m, n, k = g.tokens * batch, g.n, g.k
        t = g.count * gemm_seconds(m, n, k, g.dtype, sms, peak, eff, bw)
        if tensor:
            gemm += t
        else:
            gemm32 += t
    attention = sum(c * f * attention_seconds(arch, tc, batch, kernel, causal, gpu, params)
                    for kernel, causal, fwd_calls, bwd_calls in ops.attention
                    for c, f in ((fwd_calls, 1.0), (bwd_calls, 2.5)))
    memory = (ops.memory_bytes[0] * batch + ops.memory_bytes[1]) / bw
    dequant = ops.dequant_bytes / bw
    # the GPU waits for the host when issuing the kernels takes longer than running them (eager PyTorch: small
    # models are bound by the framework's per-op CPU time); kernels are issued asynchronously, so the two overlap
    cpu = (ops.kernels[0] + ops.kernels[1]) * params.launch_seconds
    launch = max(0.0, cpu - (gemm + gemm32 + attention + memory + dequant))
    return gemm, gemm32, attention, memory, dequant, launch


def throughput(arch: ModelArch, tc: TrainConfig, gpu, params: ThroughputParams | None = None) -> Throughput:
    """Predicted step time and tokens per second of `tc` on `gpu` (parts: see the module docstring)."""
    params = params or throughput_params(gpu.name)
    free = batch_free(tc)
    micro = _micro_step(arch, free, tc.batch_size, gpu, params)
    parts = {k: tc.grad_accum * v for k, v in zip(PARTS, micro)}
    f = flops_per_token(arch, tc)
    tokens_step = tc.grad_accum * tc.seq_len * tc.batch_size
    bw = gpu.hbm_bandwidth_gb_per_s * 1e9 * params.bandwidth_efficiency
    S = strategy_of(tc)  # each device steps its share of a sharded optimizer state, none when it is offloaded
    opt_bytes = optimizer_bytes_per_step(arch, tc) // S.ways(OPTIMIZER_STATE, tc.num_gpus)
    parts["optimizer"] = 0.0 if S.offloads_optimizer(tc) else opt_bytes / bw
    if S.multi_gpu:  # planner/comm.py: the ring's links, what the compute hides, host transfers over PCIe
        offload = S.offload_bytes_per_step(tc, optimizer_state_bytes(arch, tc)["state"])
        busy = sum(v for k, v in parts.items() if k != "optimizer")  # the GPU work collectives can hide behind
        ct = communication_time(S, arch, tc, gpu, busy, comm_bytes_per_step(arch, tc), offload)
        parts["communication"] = ct.exposed_seconds + ct.host_seconds
    else:
        parts["communication"] = 0.0
    host = host_transfer_bytes_per_step(arch, tc)
    if host:  # only offloading recipes have the part (the reference's parts stay as they were)
        parts["host_transfer"] = host / (topology(gpu).host_link_gb_per_s * 1e9)
    step = sum(parts.values())
    per_gpu = tokens_step / step
    peak16, tensor_cores = tensor_peak(gpu, tc)
    peak = peak16 if tensor_cores else (gpu.fp32_tflops or gpu.peak_tflops / 16) * 1e12
    return Throughput(
        step_seconds=step,
        tokens_per_s=per_gpu * tc.num_gpus,
        tokens_per_s_per_gpu=per_gpu,
        mfu=per_gpu * (f["forward"] + f["backward"]) / peak,
        flops_per_token=f["total"],
        parts_seconds=parts,
        provenance=params.provenance,
        expected_error=params.expected_error,
    )


def host_transfer_bytes_per_step(arch: ModelArch, tc: TrainConfig) -> int:
    """Bytes copied between device and pinned host memory per optimizer step: with offloaded checkpoints, every
    layer input (B x S x h in the residual stream's dtype) once to the host in forward and once back in backward;
    with TRL's activation offloading, every tensor its hooks offload (`planner.memory.activation_offload_host_bytes`)
    likewise. Counted serial with the compute: TRL copies to the host on a second stream, but brings each tensor
    back right when its backward node needs it (`s0.wait_stream(s1)` in `unpack_tensor_with_streams`)."""
    total = 0
    if tc.recipe.activation_offload:
        from .memory import activation_offload_host_bytes

        total += 2 * tc.grad_accum * activation_offload_host_bytes(arch, tc, copied=True)
    if not (tc.grad_ckpt and tc.recipe.offload_checkpoints):
        return total
    seq = tc.seq_len + tc.spec.virtual_tokens(tc)[0]
    return total + 2 * tc.grad_accum * arch.num_layers * tc.batch_size * seq * arch.hidden_size * regime(tc).act


def training_hours(total_tokens: int, tokens_per_s: float) -> float:
    return total_tokens / tokens_per_s / 3600.0


def cost_usd(hours: float, num_gpus: int, usd_per_gpu_hour: float) -> float:
    return hours * num_gpus * usd_per_gpu_hour




__all__ = [
    "Throughput",
    "ThroughputParams",
    "flops_per_token",
    "method_key",
    "throughput",
    "throughput_params",
    "training_hours",
    "cost_usd",
    "trainable_params",
]
