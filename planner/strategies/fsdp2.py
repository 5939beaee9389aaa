"""PyTorch FSDP2 full shard (`fully_shard`, reshard after forward) as `ftplan run` launches it: accelerate 1.15's
FSDP plugin with `fsdp_version: 2` (accelerate/utils/fsdp_utils.py `fsdp2_prepare_model`) and the mixed-precision
policy below. The stored name is "fsdp".

The units accelerate 1.15 makes: one per decoder layer (resharded after forward); the untied input embedding alone
(resharded after forward); the tail [final norm, lm_head (+ the embedding when tied)] with
reshard_after_forward=False, so it stays gathered from its forward to its backward (tied: from the first forward
op to the embedding's backward); the root (no parameters of its own left). What each rank holds beyond its shards
follows torch 2.13's FSDP2 (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py, _fsdp_collectives.py):

- forward: a unit's all-gather output (flat, param dtype) is kept after its copy-out into the per-parameter
  unsharded tensors until the next unit's copy-out (`all_gather_state`, the implicit forward prefetch): two
  unit-sized buffers while a layer computes;
- backward: a unit's pre-backward prefetches the unit before it (`_backward_prefetch`: its flat all-gather
  output); its post-backward copies the unsharded gradients into a reduce-scatter input in the reduce dtype (fp32
  here), kept until the next unit's post-backward (`reduce_scatter_states`, `reduce_scatter_max_input_buffers`
  = 1), and leaves a sharded gradient in the parameter's own dtype;
- optimizer step: nothing gathered; gradients and state are the local shards.

Checked against the multi-GPU trace (calibrate/trace_multigpu.py: the real FSDP2 on a fake process group) on
calibrate/reference/trace-points-multigpu.jsonl.
"""

from __future__ import annotations

import functools
from types import MappingProxyType

from .base import (GRADIENTS, OPTIMIZER_STATE, WEIGHTS, Launcher, Strategy, compute_bytes, layer_gather_step_bytes,
                   weight_bytes)
from .registry import register

REDUCE_BYTES = 4  # reduce_dtype fp32 (mixed_precision_policy)


def mixed_precision_policy(tc) -> dict:
    """The `torch.distributed.fsdp.MixedPrecisionPolicy` `ftplan run` launches FSDP2 with (dtype names):
    parameters gathered in the compute dtype (bf16 under bf16 weights, bf16 autocast or a 4-bit base; fp32 in fp32)
    and gradients reduced in fp32. What users of FSDP2 mixed precision ask for (torchtitan's default,
    `mixed_precision_param = bfloat16`, `mixed_precision_reduce = float32`): half the gather traffic and memory,
    and a reduction that does not round at every rank. `trainer.dist` hands it to accelerate's FSDP plugin,
    `calibrate.trace_multigpu` traces it, and the formulas below count its buffers."""
    return {"param_dtype": "bfloat16" if compute_bytes(tc) == 2 else "float32", "reduce_dtype": "float32"}


@functools.lru_cache(maxsize=4096)
def fsdp_units(arch, tc) -> MappingProxyType:
    """Element counts of accelerate 1.15's FSDP2 units: `layer` (one decoder layer with its adapters), `tail`
    (final norm + lm_head, + the embedding when tied), `embed` (0 when tied: it is in the tail), and the trainable
    elements of each (`*_trainable`): what is gathered and what is reduce-scattered. Under a 4-bit base a linear
    weight gathers as its packed bytes (bnb_4bit_quant_storage=bf16: numel / 4 bf16 elements). Cached: every event of
    a step's timeline asks (read-only view)."""
    from ..layers import regime

    trainable = tc.spec.trainable_params(arch, tc)
    adapters = 0 if tc.spec.trains_base else trainable
    layer_linear = arch.layer_linear_params // 4 if regime(tc).quantized else arch.layer_linear_params
    layer = layer_linear + arch.layer_norm_params + adapters // arch.num_layers
    embed = 0 if arch.tie_word_embeddings else arch.embedding_params
    tail = arch.hidden_size + (arch.embedding_params if arch.tie_word_embeddings else arch.lm_head_params)
    if tc.spec.trains_base:
        return MappingProxyType(dict(layer=layer, tail=tail, embed=embed, layer_trainable=layer, tail_trainable=tail,
                                     embed_trainable=embed))
    return MappingProxyType(dict(layer=layer, tail=tail, embed=embed, layer_trainable=adapters // arch.num_layers,
                                 tail_trainable=0, embed_trainable=0))


def prefetches_at_logits(tc) -> bool:
    """Whether the tail unit's pre-backward (and so its prefetch of the last decoder layer) waits for the lm_head
    output's gradient. torch 2.13 registers a unit's pre-backward as a tensor hook on the outputs of its forward
    (_fsdp_state.py `_post_forward` -> `_register_pre_backward_hook`: `t.register_hook(self._pre_backward)`); the
    grouped tail [final norm, lm_head] completes its forward at the lm_head, so the hook sits on the logits and
    fires when their gradient exists: after the loss's own backward (`logits.float()`, log_softmax, nll_loss),
    before the lm_head's. The losses that take the lm_head weight themselves (chunked, liger, cce) never call the
    lm_head module: the root's post-forward completes the tail unit on the root's output
    (`_force_complete_incomplete_states`), whose gradient is the backward's first, so the prefetch comes first."""
    return tc.recipe.loss == "plain"


def chunk_numel(rows: int, cols: int, num_gpus: int) -> int:
    """Elements of rank 0's shard of a (rows, cols) parameter (1-D: rows = 1, sharded along its cols): FSDP2 splits
    dim 0 with `torch.chunk` (torch 2.13 _fsdp_param.py `_init_sharded_param`: `_chunk_with_empty`) and pads every
    rank to chunk 0's size, ceil(dim0 / N) rows."""
    if rows == 1:
        return -(-cols // num_gpus)
    return -(-rows // num_gpus) * cols


def offloaded_host_bytes(arch, tc) -> int:
    """Host memory per rank under FSDP2 CPU offload (`CPUOffloadPolicy(pin_memory=True)`, what accelerate 1.15
    makes of `fsdp_offload_params`), torch 2.13 torch/distributed/fsdp/_fully_shard/:

    - every parameter's padded shard (frozen ones included; a 4-bit weight as its bf16-stored packed column,
      ((numel + 1) // 4, 1)) in its own pinned buffer (_fsdp_param.py
      `_init_sharded_param` / `reset_sharded_param`: `.cpu().pin_memory()`), and every trainable parameter's
      gradient shard in another (_fsdp_collectives.py `foreach_reduce`: `.to("cpu", non_blocking=True)`, which
      pins its output: aten/src/ATen/native/TensorConversions.cpp `_to_copy`); the pinned allocator takes the next
      power of two of each (`planner.memory.pinned_block_bytes`): Σ pow2(shard) over parameters + gradients;
    - the optimizer's state (pageable, exact): AdamW's exp_avg and exp_avg_sq in the parameter's dtype (2 x shard)
      and a 4-byte step per tensor; other optimizers their sharded device formula;
    - the step on the host runs torch's per-tensor loop (foreach is CUDA-only: optimizer.py
      `_default_to_fused_or_foreach`): AdamW's `denom = (exp_avg_sq.sqrt() / c).add_(eps)` holds two temporaries
      of one shard (adam.py `_single_tensor_adam`), the largest one at the peak (the previous tensor's `denom`,
      still referenced until reassigned, is left out: under 0.2 % of the host bytes on the grid).
    Held to calibrate/trace_multigpu.py's `cpu_offload_behaviour` on the multi-GPU grid."""
    from ..layers import regime
    from ..memory import optimizer_state_bytes, param_tensors, pinned_block_bytes, trainable_tensors

    n = tc.num_gpus
    R = regime(tc)
    trainable = [(t.rows, t.cols, t.count, t.dtype_bytes) for t in trainable_tensors(arch, tc)]
    frozen = []
    if not tc.spec.trains_base:
        for group, (r, c), k in param_tensors(arch):
            if R.quantized and group == "linear":  # packed: ((r c + 1) // 4, 1) bf16 (`_pack_4bit` in the trace)
                frozen.append(((r * c + 1) // 4, 1, k, 2))
            else:
                frozen.append((r, c, k, R.weight))
    host = 0
    for rows, cols, count, b in frozen + trainable:
        host += count * pinned_block_bytes(chunk_numel(rows, cols, n) * b)
    for rows, cols, count, b in trainable:
        host += count * pinned_block_bytes(chunk_numel(rows, cols, n) * b)
    if tc.optimizer == "adamw":
        host += sum(count * (2 * chunk_numel(rows, cols, n) * b + 4) for rows, cols, count, b in trainable)
        host += 2 * max(chunk_numel(rows, cols, n) * b for rows, cols, _c, b in trainable)
    else:
        host += -(-optimizer_state_bytes(arch, tc)["state"] // n)
    return host


class FSDP2(Strategy):
    def offloads_gradients(self, tc) -> bool:
        """CPU offload: each gradient shard goes to the host in its unit's reduce (`offloaded_host_bytes`)."""
        return bool(tc.cpu_offload) and tc.num_gpus > 1

    def shard_static(self, arch, tc, static: dict, grads: int, opt_temp: int):
        """With CPU offload the sharded parameters, their gradients and the optimizer state and step live on the
        host; host bytes per device: `offloaded_host_bytes`."""
        static, grads, opt_temp, offload, notes = super().shard_static(arch, tc, static, grads, opt_temp)
        if self.offloads_gradients(tc):
            offload = offloaded_host_bytes(arch, tc)
            grads = 0
            static = dict(static, trainable_weights=0)  # the adapters are FSDP parameters too: on the host
        return static, grads, opt_temp, offload, notes

    def buffer_bytes(self, arch, tc, grads: int) -> int:
        return 0  # everything FSDP2 adds lives only at some moments: `step_buffers`

    def step_buffers(self, arch, tc, moment: str, layer: int | None = None) -> int:
        """Gathered units, unsharded gradients and reduce-scatter (RS) inputs live at `moment` (module docstring),
        in the gather dtype g (`mixed_precision_policy`); an RS input is its unit's trainable elements x 4 B:

        forward (a decoder layer):  2 x layer  (+ tail when tied: gathered at the first op)
        forward_loss:               untied 2 x tail; tied tail + the last layer's kept all-gather output
        loss_backward:              tail (+ layer when the prefetch comes first: `prefetches_at_logits`)
        head_backward:              tail + layer (prefetched by the tail's pre-backward, on the logits' gradient);
                                    tied, both: tail (its unit ran its post-forward first, at the embedding, so
                                    `_backward_prefetch` has no earlier unit to fetch)
        tail_reduce (untied):       the tail's unsharded gradient, its fp32 RS input and output, the prefetched
                                    layer (its parameters freed first: reshard before reduce)
        layer_backward i:           layer + prefetched (layer; the embedding at i = 0 when untied)
                                    + RS input of the unit after i (untied: the tail's at i = L-1)
                                    + tied: the tail and its unsharded gradient (reduced only after the embedding's
                                    backward, the tail unit's last use)
        embedding_backward:         the embedding's unit gathered, + layer 0's RS input (tied: + the tail's
                                    unsharded gradient)
        embedding_reduce:           the post-backward of the unit holding the embedding: its unsharded gradient,
                                    its fp32 RS input and output
        optimizer:                  0

        The RS output is counted at the reduce moments only when it is not the gradient shard the timeline keeps:
        parameters of fp32 (mixed, fp32) keep it as their gradient (no cast to the parameter's dtype).
        CPU offload (`offloads_gradients`): the gradient shards are on the host, so the timeline counts none on the
        device; a unit's reduce still makes its shard on the device (the fp32 RS output, cast to the parameter's
        dtype when it differs, `foreach_reduce`) before the copy to the host, counted at tail_reduce and
        embedding_reduce; the
        tied tail's unsharded gradient is counted whole. Gathering copies each host shard to the device first
        (`FSDPParam.all_gather_inputs`), a transient 1/N of a unit not counted: it is freed before the unit
        computes."""
        u = fsdp_units(arch, tc)
        g = compute_bytes(tc)
        tied = arch.tie_word_embeddings
        tail_g = u["tail"] * g
        layer_g = u["layer"] * g
        rs_layer = u["layer_trainable"] * REDUCE_BYTES
        # tied: the tail's gradient stays unsharded through backward; the timeline counts 1/N of it already
        offload = self.offloads_gradients(tc)
        # a unit's reduce: the fp32 RS output is cast to the parameters' own dtype w (`foreach_reduce`); when w is
        # fp32 (mixed, fp32) it is the sharded gradient itself, which the timeline counts unless offloaded
        w = weight_bytes(tc) if tc.spec.trains_base else 4

        def rs_output(t: int) -> int:
            return -(-t * REDUCE_BYTES // tc.num_gpus) if (offload or w != REDUCE_BYTES) else 0

        def own_shard(t: int) -> int:  # the cast shard, on the device until its copy to the host
            return -(-t * w // tc.num_gpus) if (offload and w != REDUCE_BYTES) else 0

        # (under offload the timeline counts none of it: the whole)
        counted = 0 if offload else -(-u["tail_trainable"] * g // tc.num_gpus)
        tail_grad = u["tail_trainable"] * g - counted if tied else 0
        tied_tail = tail_g + tail_grad if tied else 0
        if moment == "forward":
            return 2 * layer_g + (tail_g if tied else 0)
        if moment == "forward_loss":
            return tail_g + layer_g if tied else 2 * tail_g
        if moment == "loss_backward":  # tied: the tail unit's post-forward came first, so it prefetches nothing
            return tail_g if (tied or prefetches_at_logits(tc)) else tail_g + layer_g
        if moment == "head_backward":
            return tail_g if tied else tail_g + layer_g
        if moment == "tail_reduce":  # untied: the tail's post-backward, the last layer prefetched (flat)
            if tied or not u["tail_trainable"]:
                return 0
            t = u["tail_trainable"]
            return t * g + t * REDUCE_BYTES + rs_output(t) + layer_g + own_shard(t)
        if moment == "layer_backward":
            prefetched = layer_g if layer else u["embed"] * g
            if layer < arch.num_layers - 1:
                rs_after = rs_layer
            else:
                rs_after = 0 if tied else u["tail_trainable"] * REDUCE_BYTES
            return layer_g + prefetched + rs_after + tied_tail
        if moment == "embedding_backward":
            return (tied_tail if tied else u["embed"] * g) + rs_layer
        if moment == "embedding_reduce":  # its parameters freed first (reshard before reduce)
            t = u["tail_trainable"] if tied else u["embed_trainable"]
            return t * g + t * REDUCE_BYTES + rs_output(t) + own_shard(t)
        return 0

    def comm_bytes_per_step(self, arch, tc, grads: int) -> int:
        return layer_gather_step_bytes(arch, tc, grads)


FSDP = register(FSDP2(
    name="fsdp", label="FSDP full shard",
    summary="weights, gradients and optimizer state sharded {n} ways; one layer gathered at a time",
    shards=frozenset({OPTIMIZER_STATE, GRADIENTS, WEIGHTS}),
    gathers="each decoder layer's weights before its forward and its backward, the next one prefetched",
    offloads=(OPTIMIZER_STATE, WEIGHTS),
    launcher=Launcher("FSDP", fsdp_version=2, fsdp_reshard_after_forward=True),
    recommend_offload=(False, True),  # FSDP + CPU offload: QLoRA of a 70B on two 24 GB GPUs (issue 12)
))
