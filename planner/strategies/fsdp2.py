"""PyTorch FSDP2 full shard (`fully_shard`, reshard after forward), through accelerate's FSDP plugin with
`fsdp_version: 2` and one unit per decoder layer (arXiv:2304.11277). The stored name is "fsdp".

Today its numbers equal ZeRO-3's; it is its own object so that they can differ (prefetch depth, unit sizes,
FSDP2's per-parameter sharding)."""

from __future__ import annotations

from .base import GRADIENTS, OPTIMIZER_STATE, WEIGHTS, Launcher, Strategy, gathered_param_bytes, layer_gather_step_bytes
from .registry import register


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
