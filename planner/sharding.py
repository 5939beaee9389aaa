"""Per-device memory under data parallelism: DDP, ZeRO-2, ZeRO-3 / FSDP full shard, optional CPU offload.

Activations are per device and unchanged (each device runs its own micro-batch); what changes is which
static terms are sharded N ways and what communication buffers appear. These are first-order formulas from
the strategies' designs (ZeRO, arXiv:1910.02054 Sec. 5; PyTorch FSDP, arXiv:2304.11277; accelerate's "auto"
DeepSpeed values); unlike the single-device model they are not yet checked against measurements.
"""

from __future__ import annotations

from .arch import ModelArch
from .config import TrainConfig
from .layers import param_bytes, regime


def layer_param_bytes(arch: ModelArch, dtype_bytes: int) -> int:
    """One decoder layer's parameters, unsharded, in `dtype_bytes` (what ZeRO-3/FSDP gathers per layer)."""
    return param_bytes(arch.layer_params, dtype_bytes)


def ddp_bucket_bytes(grads: int) -> int:
    """DDP's reducer copies gradients into flat buckets (25 MiB each) covering every gradient, unless
    `gradient_as_bucket_view=True` (accelerate's default is False): one more gradient-sized buffer."""
    return grads


def zero_reduce_bucket_bytes(arch: ModelArch, grad_bytes_per_elem: int) -> int:
    """DeepSpeed's reduce bucket with accelerate's 'auto' size: hidden_size^2 elements."""
    return param_bytes(arch.hidden_size**2, grad_bytes_per_elem)


def gathered_param_bytes(arch: ModelArch, tc: TrainConfig) -> int:
    """ZeRO-3 / FSDP full shard: the layer being computed plus the one prefetched, unsharded in the compute dtype,
    and one layer's unsharded gradient before its reduce-scatter; or the embedding when it is larger."""
    R = regime(tc)
    compute = 2 if R.autocast or R.weight == 2 or R.quantized else 4
    layer = layer_param_bytes(arch, compute)
    emb = param_bytes(arch.embedding_params, compute)
    grad_layer = layer_param_bytes(arch, R.weight) if tc.method == "full" else 0
    return max(2 * layer + grad_layer, emb + layer)


def shard_static(arch: ModelArch, tc: TrainConfig, static: dict, grads: int, opt_temp: int):
    """Apply the strategy to the static terms. Returns (static, grads, opt_temp, cpu_offload_bytes, notes)."""
    n = tc.num_gpus
    if n == 1:
        return static, grads, opt_temp, 0, []
    static = dict(static)
    notes = []
    offload = 0
    if tc.strategy == "ddp":
        static["sharding_buffers"] = ddp_bucket_bytes(grads)
        notes.append(f"DDP: full replica per GPU plus gradient buckets ({n} GPUs)")
        return static, grads, opt_temp, 0, notes
    state = static["optimizer_state"]
    sharded_state = -(-state // n)
    sharded_grads = -(-grads // n)
    sharded_temp = -(-opt_temp // n)
    if tc.strategy == "zero2":
        grad_elem = regime(tc).weight if tc.method == "full" else 4
        static["sharding_buffers"] = zero_reduce_bucket_bytes(arch, grad_elem)
        notes.append(f"ZeRO-2: optimizer state and gradients sharded {n} ways, weights replicated")
    else:  # zero3, fsdp
        for k in ("weights", "quant_constants", "trainable_weights"):
            static[k] = -(-static[k] // n)
        static["sharding_buffers"] = gathered_param_bytes(arch, tc)
        label = "ZeRO-3" if tc.strategy == "zero3" else "FSDP full shard"
        notes.append(f"{label}: weights, gradients and optimizer state sharded {n} ways; one layer gathered at a time")
    static["optimizer_state"] = sharded_state
    if tc.cpu_offload:
        offload = sharded_state
        static["optimizer_state"] = 0
        sharded_temp = 0
        notes.append("CPU offload: optimizer state and step on the host")
        if tc.strategy in ("zero3", "fsdp"):
            offload += static["weights"]
            static["weights"] = 0
            notes.append("CPU offload: sharded parameters on the host, gathered per layer")
    return static, sharded_grads, sharded_temp, offload, notes
