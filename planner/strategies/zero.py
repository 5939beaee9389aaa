"""DeepSpeed ZeRO stages 1, 2 and 3 (arXiv:1910.02054), launched through accelerate's DEEPSPEED plugin.

Stages 1 and 2 are DeepSpeed's `DeepSpeedZeroOptimizer` (deepspeed/runtime/zero/stage_1_and_2.py:
`partition_grads` is False for stage 1, True for stage 2): each rank steps its partition of the optimizer state;
gradients go through the reduce bucket (`ipg` buffer) - stage 2 keeps only its partition of them, stage 1 keeps
them whole until the step. Stage 3 (stage3.py) shards the weights too and gathers them a layer at a time.
"""

from __future__ import annotations

from .base import (GRADIENTS, OPTIMIZER_STATE, WEIGHTS, Launcher, Strategy, all_reduce_bytes, gathered_param_bytes,
                   layer_gather_step_bytes)
from .registry import register


def zero_reduce_bucket_bytes(arch, grad_bytes_per_elem: int) -> int:
    """DeepSpeed's reduce bucket with accelerate's 'auto' size: hidden_size^2 elements."""
    from ..layers import param_bytes

    return param_bytes(arch.hidden_size**2, grad_bytes_per_elem)


def reduce_grad_bytes_per_elem(tc) -> int:
    """The reduce bucket's dtype: the gradients' (the weights' for full fine-tuning; peft adapters are fp32)."""
    from ..layers import regime

    return regime(tc).weight if tc.spec.trains_base else 4


class ZeroOptimizer(Strategy):
    """ZeRO-1 / ZeRO-2: weights replicated, optimizer state (and for stage 2 the gradients) partitioned."""

    def buffer_bytes(self, arch, tc, grads: int) -> int:
        return zero_reduce_bucket_bytes(arch, reduce_grad_bytes_per_elem(tc))

    def comm_bytes_per_step(self, arch, tc, grads: int) -> int:
        """Reduce(-scatter) of the gradients and all-gather of the updated weights: DDP's volume, 2 (n-1)/n x G
        (arXiv:1910.02054 Sec. 7.2.1)."""
        return all_reduce_bytes(grads, tc.num_gpus)


class Zero3(Strategy):
    """ZeRO-3: weights, gradients and optimizer state partitioned; each layer's weights gathered when used."""

    def buffer_bytes(self, arch, tc, grads: int) -> int:
        return gathered_param_bytes(arch, tc)

    def comm_bytes_per_step(self, arch, tc, grads: int) -> int:
        return layer_gather_step_bytes(arch, tc, grads)


ZERO1 = register(ZeroOptimizer(
    name="zero1", label="ZeRO-1", summary="optimizer state sharded {n} ways, weights and gradients replicated",
    shards=frozenset({OPTIMIZER_STATE}), offloads=(OPTIMIZER_STATE,),
    launcher=Launcher("DEEPSPEED", deepspeed_stage=1),
    # same traffic and optimizer step as ZeRO-2 with whole gradients: never better here, so not searched
    recommend_offload=(),
))
ZERO2 = register(ZeroOptimizer(
    name="zero2", label="ZeRO-2", summary="optimizer state and gradients sharded {n} ways, weights replicated",
    shards=frozenset({OPTIMIZER_STATE, GRADIENTS}), offloads=(OPTIMIZER_STATE,),
    launcher=Launcher("DEEPSPEED", deepspeed_stage=2),
))
ZERO3 = register(Zero3(
    name="zero3", label="ZeRO-3",
    summary="weights, gradients and optimizer state sharded {n} ways; one layer gathered at a time",
    shards=frozenset({OPTIMIZER_STATE, GRADIENTS, WEIGHTS}),
    gathers="each decoder layer's weights before its forward and its backward, the next one prefetched",
    offloads=(OPTIMIZER_STATE, WEIGHTS),
    launcher=Launcher("DEEPSPEED", deepspeed_stage=3),
    recommend_offload=(False, True),
))
