"""DeepSpeed ZeRO stages 1, 2 and 3 (arXiv:1910.02054) in DeepSpeed's bf16 mode, as `ftplan run` configures them
(trainer/launch.py `deepspeed_config`: `bf16.enabled`, overlap_comm, contiguous_gradients, and the bucket sizes of
`zero_buckets`), launched through accelerate's DEEPSPEED plugin.

Model states per device follow DeepSpeed's bf16 mode (DeepSpeed 38327e0, deepspeed/runtime/zero/stage_1_and_2.py
`DeepSpeedZeroOptimizer`, stage3.py `DeepSpeedZeroOptimizer_Stage3`; `deepspeed/runtime/engine.py` casts the model
to bf16 when `bf16.enabled`): bf16 weights (all of them for stages 1/2, a 1/N partition for stage 3), bf16
gradients (whole for stage 1, the 1/N partition for stages 2/3), fp32 master weights of the trainable parameters and
the optimizer's fp32 state (AdamW: 8 B/param), both partitioned 1/N, and the fp32 gradient partition the optimizer
step builds (`single_grad_partition`). For full fine-tuning with AdamW that is DeepSpeed's own estimate,
`estimate_zero2_model_states_mem_needs` (2P + 18P/N) and `estimate_zero3_model_states_mem_needs`
(4 x largest layer + 18P/N) without offload; tests/test_strategies_deepspeed.py holds the formulas to them. The
per-GPU peaks are held to the real engine (calibrate/trace_zero.py: ZeRO-2/3 on 2 CPU processes, rank 0's
storages counted) by tests/test_trace_zero.py, which showed where the engine departs from the estimators
(`zero3_kept_params`, `zero3_gradient_partition`).
"""

from __future__ import annotations

import functools

from .base import (GRADIENTS, OPTIMIZER_STATE, WEIGHTS, Launcher, Strategy, all_reduce_bytes, layer_gather_step_bytes)
from .registry import register

MAX_LIVE_PARAMETERS = 1_000_000_000  # stage3_max_live_parameters: DeepSpeed's default, written explicitly


def zero_buckets(hidden_size: int) -> dict:
    """The bucket sizes (elements) `ftplan run` writes into ds_config.json: accelerate's "auto" rule
    (accelerate/utils/deepspeed.py `deepspeed_config_process`: reduce_bucket_size = hidden^2,
    stage3_prefetch_bucket_size = 0.9 hidden^2, stage3_param_persistence_threshold = 10 hidden), which ftplan
    writes as numbers because it hands DeepSpeed a file, not a model to derive them from; the all-gather bucket of
    stages 1/2 takes the reduce bucket's size. Left unset, DeepSpeed would use 5e8-element buckets (1 GB each
    in bf16)."""
    h2 = hidden_size * hidden_size
    return {"reduce_bucket_size": h2, "allgather_bucket_size": h2, "stage3_prefetch_bucket_size": int(0.9 * h2),
            "stage3_param_persistence_threshold": 10 * hidden_size,
            "stage3_max_live_parameters": MAX_LIVE_PARAMETERS}


def deepspeed_bf16(tc) -> bool:
    """ds_config's `bf16.enabled` (trainer/launch.py): bf16 weights, bf16 autocast (DeepSpeed then casts the whole
    model to bf16: its bf16 mode has no fp32 weights on the device) or a 4-bit base."""
    return tc.precision in ("bf16", "mixed") or tc.base_quant.quantized


def zero_reduce_bucket_bytes(arch, grad_bytes_per_elem: int) -> int:
    """One reduce bucket (`reduce_bucket_size` elements, hidden^2) in the gradients' dtype."""
    from ..layers import param_bytes

    return param_bytes(zero_buckets(arch.hidden_size)["reduce_bucket_size"], grad_bytes_per_elem)


def reduce_grad_bytes_per_elem(tc) -> int:
    """The gradients' dtype: bf16 in DeepSpeed's bf16 mode (the model is cast whole, adapters included), else the
    weights' (peft adapters are fp32)."""
    from ..layers import regime

    if deepspeed_bf16(tc):
        return 2
    return regime(tc).weight if tc.spec.trains_base else 4


def bf16_model_states(arch, tc, static: dict, grads: int, opt_temp: int, stage3: bool = False):
    """Static terms, gradients and optimizer-step scratch of one unsharded device in DeepSpeed's bf16 mode
    (module docstring), before partitioning. P = trainable parameters:
    weights and adapters in bf16; gradients 2P; optimizer state 4P fp32 master + the optimizer's state in fp32
    (AdamW 8P; 8-bit optimizers keep their own layout); optimizer-step scratch: the fp32 gradient partition 4P plus
    the optimizer's own scratch in fp32 (AdamW foreach: 4P). Stage 3 likewise on the device (traced,
    calibrate/trace_zero.py): its gradient partition `grad_partitions_flat_buffer` is in
    `gradient_accumulation_dtype`, the model's bf16 unless ds_config sets data_types.grad_accum_dtype
    (engine.py `get_data_types`), and the step makes the fp32 copy (stage3.py `_prepare_fp32_grad_for_sub_group`);
    DeepSpeed's estimator counts 18P/N for stage 3 (2 bf16 weights + 4 fp32 gradients + 4 master + 8 Adam), the
    engine holds 2 + 2 + 4 + 8 and 4 more during the step. With CPU offload stage 3 reduces into an fp32 host
    partition (gradients 4P, no separate copy at the step)."""
    from ..layers import regime

    if not deepspeed_bf16(tc):
        return static, grads, opt_temp
    P = tc.spec.trainable_params(arch, tc)
    R = regime(tc)
    static = dict(static)
    if R.weight == 4 and not R.quantized:  # fp32 weights under autocast: DeepSpeed casts them to bf16
        static["weights"] = static["weights"] // 2
    if R.quantized:
        pass  # the 4-bit storage stays; the non-quantized bf16/fp32 rest is small
    static["trainable_weights"] = 2 * (P if not tc.spec.trains_base else 0)
    state_per_param = {"adamw": 8, "sgd": 0}.get(tc.optimizer)
    state = P * state_per_param if state_per_param is not None else static["optimizer_state"]
    static["optimizer_state"] = 4 * P + state
    foreach = 4 * P if tc.optimizer == "adamw" else 0
    if stage3 and tc.cpu_offload:  # stage3.py: gradients reduce-scattered into the host partition in fp32
        return static, 4 * P, foreach + _clip_bytes(arch, tc)
    # stage 2 (and stage 3 on the device: `zero3_gradient_partition`): bf16 gradients, an fp32 copy at the step
    return static, 2 * P, 4 * P + foreach + _clip_bytes(arch, tc)


ZERO3_QLORA_NOTE = ("ZeRO-3 QLoRA: the 4-bit weights, stored as bf16 (bnb_4bit_quant_storage), partitioned like any "
                    "parameter and gathered per layer; quantization constants whole on every GPU; not traced")


def zero3_qlora(tc) -> bool:
    """ZeRO-3 over a 4-bit base, as DeepSpeed 0.19.8 runs it (what the peft guide "DeepSpeed ZeRO-3 with QLoRA" and
    accelerate's DeepSpeed docs set up): transformers 5.17 skips `deepspeed.zero.Init` for a quantized model
    (modeling_utils.py: `is_deepspeed_zero3_enabled() and not is_quantized`), so each rank loads the whole 4-bit
    model, and the engine converts its parameters afterwards (runtime/zero/parameter_offload.py
    `_convert_to_zero_parameters` -> `zero.Init(module=...)`), partitioning every parameter, the packed weights
    included: they must be a floating dtype for ZeRO-3's flat bf16 partitions, hence `bnb_4bit_quant_storage=bf16`
    (`trainer.recipe.quant_storage_kwargs`); DeepSpeed keeps the parameter object, so `Params4bit.quant_state`
    survives the gather. The quantization constants live in that `QuantState`, not in a parameter, so they are not
    partitioned (`planner.strategies.base.WEIGHT_TERMS`). bf16 mode casts every floating parameter to bf16
    (engine.py `_configure_distributed_model` -> `_cast_module_mixed_precision`): the fp32 norms, embeddings and
    head of k-bit preparation and the adapters run in bf16 (`bf16_model_states` counts the adapters in bf16 and
    leaves the small fp32 rest as k-bit preparation made it; the layers' activations are still counted as the fp32
    recipe's, an over-estimate). Not traced (the trace follows FSDP2 only)."""
    return tc.num_gpus > 1 and tc.strategy == "zero3" and tc.base_quant.quantized


def shard_deepspeed(strategy, arch, tc, static: dict, grads: int, opt_temp: int):
    """`Strategy.shard_static` on DeepSpeed's bf16 model states; with CPU offload (ZeRO-Offload) the optimizer
    state (fp32 master weights included) and, for ZeRO-3, the parameter partitions move to the host, the gradients
    of stages 2/3 never stay on the device, and the host holds DeepSpeed's offload buffers: host bytes per device
    `zero_offload_host_bytes` (+ the moved parameter partitions), device buffers `zero_offload_device_bytes`."""
    stage3 = strategy.launcher.deepspeed_stage == 3
    static, grads, opt_temp = bf16_model_states(arch, tc, static, grads, opt_temp, stage3)
    static, grads, opt_temp, offload, notes = Strategy.shard_static(strategy, arch, tc, static, grads, opt_temp)
    if tc.cpu_offload and strategy.multi_gpu:
        # `offload` holds the moved optimizer state (and ZeRO-3's weights); the gradients are DeepSpeed's buffers
        offload += zero_offload_host_bytes(arch, tc, stage3)
        if GRADIENTS in strategy.shards:
            grads = 0
    if zero3_qlora(tc):
        notes = list(notes) + [ZERO3_QLORA_NOTE]
    return static, grads, opt_temp, offload, notes


# -- CPU offload (ZeRO-Offload: `offload_optimizer`, and `offload_param` for stage 3, both pin_memory=True as
# trainer/launch.py writes them), DeepSpeed 0.19.8 deepspeed/runtime/zero/ ------------------------------------------


def offloads_zero_gradients(strategy, tc) -> bool:
    """Stages 2/3 under CPU offload keep no gradient partition on the device: stage_1_and_2.py
    `copy_grads_in_partition` returns before `grads_in_partition` is ever allocated and copies each reduced slice
    to the host (`async_inplace_copy_grad_to_fp32_buffer_from_gpu`, then `clear_grad_attribute`); stage3.py
    `partition_grads` copies each partition into `grad_partitions_flat_buffer`, allocated on `self.device`, the
    CPU under offload_optimizer. Stage 1 reduces whole gradients at the step (kept on the device as before)."""
    return bool(tc.cpu_offload) and tc.num_gpus > 1 and GRADIENTS in strategy.shards


def largest_trainable_numel(arch, tc) -> int:
    """stage_1_and_2.py `largest_param_numel`: the most elements of one trainable parameter."""
    from ..memory import trainable_tensors

    return max((t.rows * t.cols for t in trainable_tensors(arch, tc)), default=0)


def zero_offload_device_bytes(arch, tc, stage3: bool) -> int:
    """Device buffers ZeRO-Offload adds: stages 1/2 allocate `temp_grad_buffer_for_gpu_offload`, the largest
    trainable parameter in the model dtype on the device (stage_1_and_2.py `__init__`, `if self.cpu_offload`;
    used to accumulate micro-steps); stage 3 allocates none (its partitions go to the host through the reduce
    buckets, counted by `buffer_bytes`)."""
    if stage3:
        return 0
    return largest_trainable_numel(arch, tc) * reduce_grad_bytes_per_elem(tc)


def zero_offload_host_bytes(arch, tc, stage3: bool) -> int:
    """Host bytes per rank of ZeRO-Offload's gradient and staging buffers, beyond the optimizer state (the fp32
    master partition and the optimizer's state, moved by `Strategy.shard_static`); p = ceil(P / N) trainable
    elements of the rank's partition, lp the model dtype's bytes (bf16 mode: 2), one parameter group (trainer
    builds one). Pinned buffers take the pinned allocator's power of two (`planner.memory.pinned_block_bytes`:
    DeepSpeed's accelerator `pin_memory` is `tensor.pin_memory()` unless DS_PIN_MEMORY_BACKEND=native).

    Stages 1/2 (stage_1_and_2.py): the fp32 master partition is pinned (`weights_partition` ->
    `pin_memory`, so its rounding is added here); the fp32 gradient partition `single_partition_of_fp32_groups[i]
    .grad` (4p, pinned, `initialize_optimizer_states`); the lp staging copy of the partition the step writes back
    through (`param_buffer_of_bit16_for_cpu_offload_groups`, lp p, pinned); `temp_grad_buffer_for_cpu_offload`
    (the largest trainable parameter in lp, pinned).
    Stage 3 (stage3.py): `grad_partitions_flat_buffer` (p in `gradient_accumulation_dtype`, the model dtype unless
    ds_config's data_types.grad_accum_dtype, which ftplan leaves unset: lp p, pinned) and each subgroup's fp32
    gradient `subgroup_gradient_buffer` (4p, pinned, `_create_fp32_partitions`: one subgroup while p is under
    sub_group_size, 1e9); the fp32 master (`converted.clone()`) is pageable.
    DeepSpeedCPUAdam updates in place: no step scratch. For AdamW full fine-tuning in bf16 that is 18P/N (stage 2)
    and 20P/N with the parameters (stage 3) per rank, + the rounding: within DeepSpeed's estimators' host figures,
    which carry a 1.5 margin (`estimate_zero2_model_states_mem_needs`: max(4N, 16) P x 1.5 per node;
    `estimate_zero3_...`: 18 P x 1.5 with offload_param, 16 P x 1.5 without)."""
    from ..memory import pinned_block_bytes

    n = tc.num_gpus
    p = -(-tc.spec.trainable_params(arch, tc) // n)
    lp = reduce_grad_bytes_per_elem(tc)
    if stage3:
        return pinned_block_bytes(lp * p) + pinned_block_bytes(4 * p)
    master = 4 * p if deepspeed_bf16(tc) else 0  # counted unrounded in the moved optimizer state
    return (pinned_block_bytes(master) - master + pinned_block_bytes(4 * p) + pinned_block_bytes(lp * p)
            + pinned_block_bytes(largest_trainable_numel(arch, tc) * lp))


def _clip_bytes(arch, tc) -> int:
    """`clip_grad_norm_`'s per-tensor norms: what `optimizer_step_temp_bytes` counts beyond the optimizer's own
    scratch (one 512-byte block per trainable tensor, twice)."""
    from ..memory import trainable_tensors

    return 2 * 512 * sum(t.count for t in trainable_tensors(arch, tc))


class ZeroOptimizer(Strategy):
    """ZeRO-1 / ZeRO-2: weights replicated, optimizer state (and for stage 2 the gradients) partitioned."""

    def shard_static(self, arch, tc, static: dict, grads: int, opt_temp: int):
        return shard_deepspeed(self, arch, tc, static, grads, opt_temp)

    def offloads_gradients(self, tc) -> bool:
        return offloads_zero_gradients(self, tc)

    def buffer_bytes(self, arch, tc, grads: int) -> int:
        """overlap_comm with contiguous_gradients: two reduce (ipg) buckets, filled alternately
        (stage_1_and_2.py `ipg_buffer`); under CPU offload `zero_offload_device_bytes` too."""
        offload = zero_offload_device_bytes(arch, tc, False) if tc.cpu_offload else 0
        return 2 * zero_reduce_bucket_bytes(arch, reduce_grad_bytes_per_elem(tc)) + offload

    def comm_bytes_per_step(self, arch, tc, grads: int) -> int:
        """Reduce(-scatter) of the gradients and all-gather of the updated weights: DDP's volume, 2 (n-1)/n x G
        (arXiv:1910.02054 Sec. 7.2.1)."""
        return all_reduce_bytes(grads, tc.num_gpus)


MAX_REUSE_DISTANCE = 1_000_000_000  # stage3_max_reuse_distance: DeepSpeed's default (ftplan leaves it unset)


@functools.lru_cache(maxsize=4096)
def zero3_kept_params(arch, tc) -> int:
    """Parameters ZeRO-3 keeps gathered from their forward to their backward, from the second step on: DeepSpeed
    0.19.8 deepspeed/runtime/zero/partitioned_param_coordinator.py `__params_to_release`: once the first step has
    recorded the module order (`is_complete_trace`), a module's parameters are not released after its forward if
    they are used again within `stage3_max_reuse_distance` parameters of the recorded order (1e9 by default, which
    `ftplan run`'s ds_config keeps). A decoder unit in forward position k is next used by its own backward after
    the units behind it run forward and backward: kept when 2 x (parameters behind it) < 1e9, so every unit of a
    model under 0.5e9 parameters, the last ~0.5e9 parameters of a bigger one. A tied embedding is next used by the
    lm_head, after the layers' forward; an untied one only when its backward runs (`_embedding_backward_runs`).
    Counted per unit: the embedding, each decoder layer (the layers' mean), the
    final norm and an untied lm_head, all parameters (frozen ones and adapters too: ZeRO-3 partitions every
    parameter); persistent parameters (fewer than stage3_param_persistence_threshold elements, the norms) are
    small and counted with their layer."""
    P = arch.total_params + (tc.spec.trainable_params(arch, tc) if not tc.spec.trains_base else 0)
    head = arch.lm_head_params
    layers_total = P - arch.embedding_params - head
    per_layer = layers_total / arch.num_layers
    kept = head  # an untied lm_head is used again first thing in backward
    behind = head  # parameters after the current unit in forward order
    for _ in range(arch.num_layers):
        if 2 * behind < MAX_REUSE_DISTANCE:
            kept += per_layer
        behind += per_layer
    if arch.tie_word_embeddings:  # the lm_head uses it next, after the layers' forward
        if behind - head < MAX_REUSE_DISTANCE:
            kept += arch.embedding_params
    elif _embedding_backward_runs(tc) and 2 * behind < MAX_REUSE_DISTANCE:
        kept += arch.embedding_params
    return int(kept)


def _embedding_backward_runs(tc) -> bool:
    """Whether an untied input embedding is used again in backward, so ZeRO-3 keeps it (`zero3_kept_params`):
    DeepSpeed fetches a module's parameters for backward from a hook on its outputs (runtime/zero/
    parameter_offload.py `_pre_backward_module_hook`), which runs only when a gradient reaches that output: the
    embedding trains, or its output requires a gradient (`enable_input_require_grads`, which checkpointing calls
    for peft; prompt methods). A frozen embedding under LoRA without checkpointing is not in the backward order,
    so it is released after its forward (traced: calibrate/reference/trace-points-zero.jsonl)."""
    from ..modules_to_save import first_input_requires_grad

    return tc.spec.trains_base or tc.grad_ckpt or first_input_requires_grad(tc)


@functools.lru_cache(maxsize=4096)
def zero3_live_bytes(arch, tc) -> int:
    """ZeRO-3's gathered parameters at the end of the forward: what `zero3_kept_params` keeps, in the weights' dtype
    (bf16 in DeepSpeed's bf16 mode), or at least the largest unit being computed with the prefetch bucket
    (stage3_prefetch_bucket_size elements) gathered ahead of it when little is kept. Measured on the real engine
    (calibrate/trace_zero.py): the whole tiny model stays gathered from the second step's forward to its backward.
    DeepSpeed's own estimator counts 4 B x the largest layer instead (`estimate_zero3_model_states_mem_needs`),
    the first step's behaviour."""
    from ..layers import param_bytes

    nbytes = 2 if deepspeed_bf16(tc) else 4
    largest = max(arch.layer_params, arch.embedding_params)
    prefetch = zero_buckets(arch.hidden_size)["stage3_prefetch_bucket_size"]
    return max(param_bytes(zero3_kept_params(arch, tc), nbytes), param_bytes(largest + prefetch, nbytes))


def zero3_gradient_partition(arch, tc, grads: int) -> int:
    """Stage 3's gradient partition on the device: one flat buffer of this rank's share of every parameter's
    gradient, allocated with the model states (stage3.py `_setup_for_real_optimizer`: `grad_partitions_flat_buffer =
    torch.zeros(sum(p.partition_numel()), dtype=gradient_accumulation_dtype)`) and written by each reduce-scatter,
    so it is live throughout, not grown by backward. `grads`: the unsharded gradient bytes. 0 under CPU offload
    (the partition is on the host)."""
    if tc.cpu_offload:
        return 0
    return -(-grads // tc.num_gpus)


class Zero3(Strategy):
    """ZeRO-3: weights, gradients and optimizer state partitioned; each layer's weights gathered when used."""

    def shard_static(self, arch, tc, static: dict, grads: int, opt_temp: int):
        static, grads, opt_temp, offload, notes = shard_deepspeed(self, arch, tc, static, grads, opt_temp)
        if self.preallocates_gradients(tc):  # in `sharding_buffers` (`zero3_gradient_partition`) from the start
            grads = 0
        return static, grads, opt_temp, offload, notes

    def preallocates_gradients(self, tc) -> bool:
        """`zero3_gradient_partition`: backward fills a buffer that exists from the start."""
        return tc.num_gpus > 1 and not tc.cpu_offload

    def offloads_gradients(self, tc) -> bool:
        return offloads_zero_gradients(self, tc)

    def buffer_bytes(self, arch, tc, grads: int) -> int:
        """The gradient partition (`zero3_gradient_partition`) and one reduce bucket: stage 3 allocates a single
        ipg buffer per dtype even with overlap_comm (stage3.py `_setup_for_real_optimizer`: `bucket.buffer =
        torch.empty(self.reduce_bucket_size, ...)`; stage 1/2 double it)."""
        return zero_reduce_bucket_bytes(arch, reduce_grad_bytes_per_elem(tc)) + zero3_gradient_partition(arch, tc, grads)

    def step_buffers(self, arch, tc, moment: str, layer: int | None = None) -> int:
        """The gathered parameters (`zero3_live_bytes`) through forward and backward; none at the optimizer step
        (the last backward has released them: the module order does not reach into the next step). Counted whole
        at every backward moment, an upper bound once backward has released the later layers."""
        return 0 if moment == "optimizer" else zero3_live_bytes(arch, tc)

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
    summary="weights, gradients and optimizer state sharded {n} ways; each layer gathered for its forward stays "
            "gathered until its backward (stage3_max_reuse_distance)",
    shards=frozenset({OPTIMIZER_STATE, GRADIENTS, WEIGHTS}),
    gathers="each decoder layer's weights before its forward and its backward, the next one prefetched",
    offloads=(OPTIMIZER_STATE, WEIGHTS),
    launcher=Launcher("DEEPSPEED", deepspeed_stage=3),
    recommend_offload=(False, True),
))
