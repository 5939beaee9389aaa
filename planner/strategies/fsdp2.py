"""PyTorch FSDP2 full shard (`fully_shard`, reshard after forward), through accelerate's FSDP plugin with
`fsdp_version: 2` and one unit per decoder layer (arXiv:2304.11277). The stored name is "fsdp".

Today its numbers equal ZeRO-3's; it is its own object so that they can differ (prefetch depth, unit sizes,
FSDP2's per-parameter sharding)."""

from __future__ import annotations

from .base import GRADIENTS, OPTIMIZER_STATE, WEIGHTS, Launcher, Strategy, gathered_param_bytes, layer_gather_step_bytes
from .registry import register


def mixed_precision_policy(tc) -> dict:
    """The `torch.distributed.fsdp.MixedPrecisionPolicy` `ftplan run` launches FSDP2 with (dtype names):
    parameters gathered in the compute dtype (bf16 under bf16 weights, bf16 autocast or a 4-bit base; fp32 in fp32)
    and gradients reduced in fp32. What users of FSDP2 mixed precision ask for (torchtitan's default,
    `mixed_precision_param = bfloat16`, `mixed_precision_reduce = float32`): half the gather traffic and memory,
    and a reduction that does not round at every rank. `trainer.dist` hands it to accelerate's FSDP plugin,
    `calibrate.trace_multigpu` traces it, and the formulas below count its buffers."""
    from .base import compute_bytes

    return {"param_dtype": "bfloat16" if compute_bytes(tc) == 2 else "float32", "reduce_dtype": "float32"}


class FSDP2(Strategy):
    def buffer_bytes(self, arch, tc, grads: int) -> int:
        return gathered_param_bytes(arch, tc)

    def comm_bytes_per_step(self, arch, tc, grads: int) -> int:
        return layer_gather_step_bytes(arch, tc, grads)


FSDP = register(FSDP2(
    name="fsdp", label="FSDP full shard",
    summary="weights, gradients and optimizer state sharded {n} ways; one layer gathered at a time",
    shards=frozenset({OPTIMIZER_STATE, GRADIENTS, WEIGHTS}),
    gathers="each decoder layer's weights before its forward and its backward, the next one prefetched",
    offloads=(OPTIMIZER_STATE, WEIGHTS),
    launcher=Launcher("FSDP", fsdp_version=2, fsdp_reshard_after_forward=True),
))
