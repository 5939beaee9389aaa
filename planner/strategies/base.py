"""A multi-GPU strategy as one object: what it shards, gathers, buffers, sends and offloads, and how it launches.

Each strategy is a frozen dataclass (a subclass of `Strategy`) registered in `planner.strategies.registry`. The
planner asks it instead of comparing strategy names:

- memory: `shard_static` divides the static terms it shards, adds its buffers (`buffer_bytes`) and moves what CPU
  offload moves (`planner.sharding.shard_static`); `ways(term, n)` answers "is this sharded, and how many ways"
  (gradients held during backward, paged optimizer state: `planner.memory`);
- time: `comm_bytes_per_step` (what each device sends per optimizer step) and `offload_bytes_per_step` (what CPU
  offload moves over PCIe), `ways(OPTIMIZER_STATE, n)` (the share of the optimizer step each device runs:
  `planner.cost`);
- search: `recommend_offload` (the offload variants `recommend` tries; empty: not tried);
- run: `launcher` (accelerate's distributed_type, the DeepSpeed stage, the FSDP version: `trainer.launch`).

FSDP2's per-moment buffers (`step_buffers`) follow torch's FSDP2 and are held to the multi-GPU trace
(calibrate/trace_multigpu.py, calibrate/reference/trace-points-multigpu.jsonl); ZeRO's model states follow
DeepSpeed's bf16 mode and are held to DeepSpeed's own estimators (tests/test_strategies_deepspeed.py); DDP's
buckets and the communication volumes are first-order formulas from the designs (arXiv:1910.02054 Sec. 5 and 7;
arXiv:2304.11277), not yet checked against measurements. Pure planner code: no torch, and no planner import at module level (`planner.config` imports
the registry for its choice list, and `planner.layers` imports `planner.config`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..frozen import memo

# What a strategy can shard across devices, and what CPU offload can move (keys of the static memory terms).
OPTIMIZER_STATE = "optimizer_state"
GRADIENTS = "gradients"
WEIGHTS = "weights"
# Static terms that are sharded with the weights: the base weights (QLoRA's packed 4-bit ones included), the adapters.
# QLoRA's quantization constants are not: bitsandbytes keeps them in a `QuantState` attribute of the weight and of
# its `Linear4bit` (bitsandbytes 0.50 nn/modules.py `fix_4bit_weight_quant_state_from_module`), not a parameter or
# buffer, so neither FSDP2's `fully_shard` nor DeepSpeed ZeRO-3's parameter partitioning sees them: every device
# holds all of them (the multi-GPU trace's QLoRA points).
WEIGHT_TERMS = ("weights", "trainable_weights")

OFFLOAD_NOTES = {
    OPTIMIZER_STATE: "CPU offload: optimizer state and step on the host",
    WEIGHTS: "CPU offload: sharded parameters on the host, gathered per layer",
}


@dataclass(frozen=True)
class Launcher:
    """How `ftplan run` starts the strategy (`trainer/launch.py`; accelerate 1.15 config keys).

    Args:
        distributed_type: accelerate's `distributed_type`: MULTI_GPU (DDP), DEEPSPEED, FSDP; NO for one process.
        deepspeed_stage: `zero_optimization.stage` of ds_config.json (DEEPSPEED only).
        fsdp_version: `fsdp_config.fsdp_version` (FSDP only).
        fsdp_reshard_after_forward: FULL_SHARD (True: free the gathered weights after forward) or SHARD_GRAD_OP.
    """

    distributed_type: str = "NO"
    deepspeed_stage: int | None = None
    fsdp_version: int | None = None
    fsdp_reshard_after_forward: bool = False


@dataclass(frozen=True)
class Strategy:
    """One way of running a training step on `num_gpus` devices (the base class is a full replica: nothing sharded).

    A family overrides `buffer_bytes` and `comm_bytes_per_step` in a subclass that adds methods only, not fields
    (so it needs no decorator of its own: its instances are frozen dataclasses of these fields).

    Args:
        name: the stored value (`TrainConfig.strategy`, plan files, records) and the `--strategy` choice.
        label: display name, first word of the memory note.
        summary: the rest of the memory note; `{n}` is the GPU count.
        shards: terms split `num_gpus` ways (OPTIMIZER_STATE, GRADIENTS, WEIGHTS).
        gathers: what is gathered unsharded, and when ("" when nothing is).
        offloads: what `cpu_offload` moves to the host, in order; empty: CPU offload is not valid with it.
        multi_gpu: needs num_gpus > 1 (False only for the implicit one-device strategy).
        launcher: how `ftplan run` launches it.
        recommend_offload: the `cpu_offload` values `recommend` tries with it, in order; empty: not tried.
    """

    name: str
    label: str
    summary: str = ""
    shards: frozenset = frozenset()
    gathers: str = ""
    offloads: tuple = ()
    multi_gpu: bool = True
    launcher: Launcher = Launcher()
    recommend_offload: tuple = (False,)

    # -- what is sharded ----------------------------------------------------------------------------------------
    def ways(self, term: str, num_gpus: int) -> int:
        """How many ways `term` (OPTIMIZER_STATE, GRADIENTS, WEIGHTS) is split across devices: num_gpus or 1."""
        return num_gpus if term in self.shards else 1

    def offloads_gradients(self, tc) -> bool:
        """The sharded gradients go to the host as backward makes them (none held on the device)."""
        return False

    def preallocates_gradients(self, tc) -> bool:
        """The gradient shards are written into a buffer counted in `buffer_bytes` from the start (ZeRO-3), so
        backward adds none."""
        return False

    def offloads_optimizer(self, tc) -> bool:
        """The optimizer state and step live on the host (the device's optimizer step is free)."""
        return tc.cpu_offload and OPTIMIZER_STATE in self.offloads

    # -- memory -------------------------------------------------------------------------------------------------
    def buffer_bytes(self, arch, tc, grads: int) -> int:
        """Per-device bytes of the strategy's own buffers (`sharding_buffers`); `grads` is unsharded."""
        return 0

    def step_buffers(self, arch, tc, moment: str, layer: int | None = None) -> int:
        """Per-device bytes of the strategy's buffers that live only at `moment` of the step (gathered
        parameters, reduce-scatter inputs), on top of `buffer_bytes` (live throughout). Moments, in step order:
        "forward" (the last decoder layer's forward), "forward_loss", "loss_backward", "head_backward" (the
        lm_head's and final norm's backward, once the lm_head output's gradient exists), "layer_backward" (of
        decoder layer `layer`), "embedding_backward", "optimizer"."""
        return 0

    def notes(self, num_gpus: int, cpu_offload: bool) -> list[str]:
        notes = [f"{self.label}: {self.summary.format(n=num_gpus)}"]
        if cpu_offload:
            notes += [OFFLOAD_NOTES[term] for term in self.offloads]
        return notes

    def shard_static(self, arch, tc, static: dict, grads: int, opt_temp: int):
        """Apply the strategy to one device's static terms, gradients and optimizer-step scratch.

        Sharded terms become ceil(x / n) (the last rank's share of a flat buffer); the optimizer-step scratch is
        sharded with the optimizer state (each rank steps its partition). The buffers are added as
        `sharding_buffers`. CPU offload then moves the (sharded) terms in `offloads` to the host (the optimizer's
        scratch goes with its state). Returns (static, grads, opt_temp, cpu_offload_bytes, notes)."""
        if not self.multi_gpu:
            return static, grads, opt_temp, 0, []
        n = tc.num_gpus
        static = dict(static)
        if WEIGHTS in self.shards:
            for k in WEIGHT_TERMS:
                static[k] = -(-static[k] // n)
        static["sharding_buffers"] = self.buffer_bytes(arch, tc, grads)
        if OPTIMIZER_STATE in self.shards:
            static["optimizer_state"] = -(-static["optimizer_state"] // n)
            opt_temp = -(-opt_temp // n)
        if GRADIENTS in self.shards:
            grads = -(-grads // n)
        offload = 0
        if tc.cpu_offload:
            for term in self.offloads:
                offload += static[term]
                static[term] = 0
                if term == OPTIMIZER_STATE:
                    opt_temp = 0
        return static, grads, opt_temp, offload, self.notes(n, tc.cpu_offload)

    # -- time ---------------------------------------------------------------------------------------------------
    def comm_bytes_per_step(self, arch, tc, grads: int) -> int:
        """Bytes each device sends per optimizer step; `grads` is the unsharded gradient bytes."""
        return 0

    def offload_bytes_per_step(self, tc, state_bytes: int) -> float:
        """Bytes each device moves over PCIe per optimizer step under CPU offload: its share of the optimizer state
        (`state_bytes` is the unsharded total), there and back: 2 x state / n. A float: an average share."""
        if not self.offloads_optimizer(tc):
            return 0.0
        return 2 * state_bytes / tc.num_gpus


# -- collectives and gathers shared by several strategies ----------------------------------------------------------


def all_reduce_bytes(nbytes: int, num_gpus: int) -> int:
    """Ring all-reduce (NCCL; or a reduce-scatter then an all-gather of the same tensor, ZeRO-1/2's pattern,
    arXiv:1910.02054 Sec. 7.2.1): each device sends 2 (n-1)/n x bytes."""
    return int(2 * ((num_gpus - 1) / num_gpus) * nbytes)


def compute_bytes(tc) -> int:
    """Bytes per element the decoder computes in (what a gathered weight is cast to): 2 under bf16 weights, bf16
    autocast or QLoRA; 4 in fp32. Kept on the config (`planner.frozen.memo`): every event of a timeline asks."""
    return memo(tc, "_compute_bytes", _compute_bytes)


def weight_bytes(tc) -> int:
    """Bytes per element of the base weights as stored (`planner.layers.regime(tc).weight`), kept on the config."""
    return memo(tc, "_weight_bytes", _weight_bytes)


def _weight_bytes(tc) -> int:
    from ..layers import regime

    return regime(tc).weight


def _compute_bytes(tc) -> int:
    from ..layers import regime

    R = regime(tc)
    return 2 if R.autocast or R.weight == 2 or R.quantized else 4


def layer_param_bytes(arch, dtype_bytes: int) -> int:
    """One decoder layer's parameters, unsharded, in `dtype_bytes` (what ZeRO-3/FSDP gathers per layer)."""
    from ..layers import param_bytes

    return param_bytes(arch.layer_params, dtype_bytes)


def gathered_param_bytes(arch, tc) -> int:
    """ZeRO-3 / FSDP full shard: the layer being computed plus the one prefetched, unsharded in the compute dtype,
    and one layer's unsharded gradient before its reduce-scatter; or the embedding when it is larger."""
    from ..layers import param_bytes, regime

    compute = compute_bytes(tc)
    layer = layer_param_bytes(arch, compute)
    emb = param_bytes(arch.embedding_params, compute)
    grad_layer = layer_param_bytes(arch, regime(tc).weight) if tc.spec.trains_base else 0
    return max(2 * layer + grad_layer, emb + layer)


def gathered_weight_bytes(arch, tc) -> int:
    """The whole model as it is all-gathered: every parameter in the compute dtype, or 4-bit packed (N/2 bytes)
    under QLoRA."""
    from ..layers import regime

    if regime(tc).quantized:
        return arch.total_params // 2
    return arch.total_params * compute_bytes(tc)


def layer_gather_step_bytes(arch, tc, grads: int) -> int:
    """Weights sharded and gathered a layer at a time (ZeRO-3, FSDP full shard): each micro-step all-gathers the
    weights twice (forward, backward: resharded after forward), and the step reduce-scatters the gradients:
    (n-1)/n x (2 W x grad_accum + G) (arXiv:1910.02054 Sec. 7.2.2; arXiv:2304.11277 Sec. 3)."""
    n = tc.num_gpus
    return int((n - 1) / n * (2 * gathered_weight_bytes(arch, tc) * tc.grad_accum + grads))
