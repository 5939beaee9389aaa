"""`ftplan estimate --trace --num-gpus N --strategy fsdp`: one rank of a real FSDP2 run, on fake tensors.

The single-device trace (`calibrate.trace`) runs the recipe's real model and step on FakeTensors. Here the same
model is first sharded exactly as `ftplan run` shards it: accelerate 1.15's own `fsdp2_prepare_model`
(accelerate/utils/fsdp_utils.py) with the FSDP plugin built from the fields `trainer.launch` writes into
accelerate_config.yaml, so `fully_shard` wraps each decoder layer, then the untied input embedding, then the tail
[final norm, lm_head (+ the tied embedding)] with reshard_after_forward=False, then the root. The process group is
torch's fake one (`torch.testing._internal.distributed.fake_pg`, backend "fake", world size N, rank 0): every
collective returns at once, but each buffer FSDP2 allocates for it (all-gather inputs and outputs, reduce-scatter
inputs and outputs, the mixed-precision casts) is a real allocation of the fake tensors, counted by the trace's
byte tracker (`calibrate.trace.LiveBytes`). N up to 64 traces on a CPU in seconds.

Two things the tracker must not count, as they are not rank 0's memory:
- DTensor's sharding propagation runs each op once more on global-shape fake tensors to learn the output's
  metadata (torch/distributed/tensor/_sharding_prop.py `_propagate_tensor_meta_non_cached`, which reuses the outer
  fake mode via `detect_fake_mode`); left alone, the optimizer step of a 1B full fine-tune at N=2 counts the
  whole unsharded model again. That propagation gets its own FakeTensorMode and the tracker ignores it.
- a DTensor is a wrapper: its bytes are its local shard (`_local_tensor`).

The same sharding and counting run on real tensors over gloo in `tests/test_trace_multigpu.py` (two processes, a
tiny model): the fake trace must see the same bytes, which is what makes it a check on the analytic model.

CPU offload (`cpu_offload_behaviour`): the fake tensors stand for device memory, so what FSDP2 puts on the host is
told apart by storage: the shards `pin_memory()` makes and the gradients `foreach_reduce` sends to the CPU are
host storages of the tracker (pinned: rounded to a power of two), the optimizer step's allocations pageable host
memory, and each gather's host-to-device copy a new device tensor. `host_bytes` is the host peak of the steps. Not
checked over gloo: pinning needs an accelerator.

A 4-bit base (QLoRA) is built as `ftplan run` loads it across GPUs, stored as bf16 (`_pack_4bit_on_meta`), and
sharded by the same `fsdp2_prepare_model`: real bitsandbytes `Params4bit` parameters go through `fully_shard`
(on the meta device, then `to_empty`). One step of bitsandbytes' cannot run on fake tensors: at each forward
`Linear4bit.forward` re-wraps the gathered weight in a `Params4bit` to give it back its quant state
(nn/modules.py `fix_4bit_weight_quant_state_from_module`), and `Tensor._make_subclass` refuses a FakeTensor ("the
raw Tensor object is already associated to a python object of type FakeTensor"); the re-wrap aliases the gathered
storage (no bytes), and the trace's `Linear4bit` stand-in (`calibrate.trace._linear4bit_forward`) does not read the
weight, so the bytes are those of the CUDA run.
"""

from __future__ import annotations

import contextlib
import time

import torch

from planner.config import TrainConfig
from trainer import recipe
from trainer.fsdp import shard
from trainer.step import TrainStep

from .trace import PHASE_TAGS, LiveBytes, TraceResult, _count_params, _round_block, cuda_behaviour

TRACED_STRATEGIES = ("fsdp",)


class ShardedLiveBytes(LiveBytes):
    """`LiveBytes` for sharded models: a DTensor counts its local shard; ops run by DTensor's sharding propagation
    (global shapes, metadata only) are not counted."""

    def __init__(self):
        super().__init__()
        self.ignoring = 0

    def track(self, t, tag: str | None = None) -> None:
        if self.ignoring:
            return
        local = getattr(t, "_local_tensor", None)
        super().track(local if local is not None else t, tag)


    def resized(self, t) -> None:
        """`t`'s storage was resized in place (FSDP2 frees and re-allocates its unsharded parameters and all-gather
        outputs with `untyped_storage().resize_`, which no op reports): count its new size."""
        if self.ignoring or self.paused:
            return
        st = t.untyped_storage()
        entry = self.live.get(id(st))
        if entry is None:
            if st.nbytes():
                self.track(t)
            return
        n_old, ref, tag = entry
        n = _round_block(st.nbytes())
        self.live[id(st)] = (n, ref, tag)
        self.current += n - n_old
        self.by_tag[tag] += n - n_old
        self._note_peak()


@contextlib.contextmanager
def storage_resizes(tracker: ShardedLiveBytes):
    """Report FSDP2's in-place storage frees and allocations (`alloc_storage`, `free_storage` of
    torch/distributed/fsdp/_fully_shard/_fsdp_param.py) to `tracker`."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param as fp
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as fpg

    alloc, free = fp.alloc_storage, fp.free_storage

    def alloc_storage(tensor):
        alloc(tensor)
        tracker.resized(tensor)

    def free_storage(tensor):
        free(tensor)
        tracker.resized(tensor)

    fp.alloc_storage, fp.free_storage, fpg.alloc_storage = alloc_storage, free_storage, alloc_storage
    try:
        yield
    finally:
        fp.alloc_storage, fp.free_storage, fpg.alloc_storage = alloc, free, alloc


@contextlib.contextmanager
def own_propagation_mode(tracker: ShardedLiveBytes):
    """Run DTensor's output-metadata propagation in a FakeTensorMode of its own, unseen by `tracker`."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.tensor import _sharding_prop as sp

    original = sp.ShardingPropagator._propagate_tensor_meta_non_cached
    saved_detect = sp.detect_fake_mode
    own = FakeTensorMode(allow_non_fake_inputs=True)

    def propagate(self, op_schema):
        tracker.ignoring += 1
        sp.detect_fake_mode = lambda *a, **k: own
        try:
            return original(self, op_schema)
        finally:
            sp.detect_fake_mode = saved_detect
            tracker.ignoring -= 1

    sp.ShardingPropagator._propagate_tensor_meta_non_cached = propagate
    try:
        yield
    finally:
        sp.ShardingPropagator._propagate_tensor_meta_non_cached = original
        sp.detect_fake_mode = saved_detect


class _PinnedHostCUDA(torch.utils._python_dispatch.TorchDispatchMode):
    """`Tensor.pin_memory()` and `is_pinned()` as on a CUDA machine, for fake CPU tensors (whose `_pin_memory`
    needs an accelerator): pinning copies into a new pinned host buffer (aten/src/ATen/native/Memory.cpp
    `_pin_memory`: `empty` on the pinned allocator, then `copy_`), counted in `tracker`'s host memory, rounded as
    the pinned allocator rounds; a storage is pinned when the tracker holds it as pinned host memory."""

    def __init__(self, tracker: LiveBytes):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._pin_memory.default:
            out = torch.ops.aten.clone.default(args[0])
            self.tracker._track_host(out.untyped_storage(), pinned=True)
            return out
        if func is torch.ops.aten.is_pinned.default:
            entry = self.tracker.host_live.get(id(args[0].untyped_storage()))
            return entry is not None and entry[2]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cpu_offload_behaviour(tracker: ShardedLiveBytes):
    """FSDP2 with `CPUOffloadPolicy(pin_memory=True)` (what accelerate 1.15 makes of `fsdp_offload_params`) as on a
    CUDA machine, where the fake trace's "cpu" tensors stand for device memory (torch 2.13,
    torch/distributed/fsdp/_fully_shard/):

    - each sharded parameter is copied to pinned host memory (`_fsdp_param.py` `_init_sharded_param` and
      `reset_sharded_param`: `.cpu().pin_memory()`): `_PinnedHostCUDA` makes it a host storage;
    - gathering a unit copies each host shard to the device first (`FSDPParam.all_gather_inputs`:
      `self._sharded_param_data.to(self.device, non_blocking=True)`, then the cast to param_dtype); on the fake
      device `.to` would return the tensor itself, so the stand-in allocates the device copy;
    - after the reduce-scatter each sharded gradient goes to the host (`_fsdp_collectives.py` `foreach_reduce`:
      `new_sharded_grad.to(torch.device("cpu"), non_blocking=True)`: a pinned host tensor when nothing accumulates
      into it, as `_to_copy` pins a non-blocking device-to-host copy) and the device shard is dropped; the stand-in
      wraps `foreach_reduce` and moves each new gradient to pinned host memory after it;
    - the optimizer step (clip included) runs on those host tensors: `run_steps` counts its state and scratch as
      pageable host memory."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param as fp
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as fpg

    original_inputs = fp.FSDPParam.all_gather_inputs
    original_reduce = fpg.foreach_reduce

    def all_gather_inputs(self):
        if (self.offload_to_cpu and self.sharded_state == fp.ShardedState.SHARDED
                and not hasattr(self._sharded_local_tensor, "fsdp_pre_all_gather")):
            device_copy = self._sharded_param_data.clone()  # the host-to-device copy
            return [fp._to_dtype_if_needed(device_copy, self.param_dtype)]
        return original_inputs.fget(self)

    def foreach_reduce(fsdp_params, *args, **kwargs):
        out = original_reduce(fsdp_params, *args, **kwargs)
        for fsdp_param in fsdp_params:
            grad = fsdp_param.sharded_param.grad
            if not fsdp_param.offload_to_cpu or grad is None:
                continue
            local = grad._local_tensor
            if id(local.untyped_storage()) in tracker.host_live:
                continue  # accumulated into the host gradient in place
            with tracker.host_memory(pinned=True):
                host = local.clone()
            fsdp_param.sharded_param.grad = fsdp_param.to_sharded_dtensor(host)
        return out

    fp.FSDPParam.all_gather_inputs = property(all_gather_inputs)
    fpg.foreach_reduce = foreach_reduce
    try:
        with _PinnedHostCUDA(tracker):
            yield
    finally:
        fp.FSDPParam.all_gather_inputs = original_inputs
        fpg.foreach_reduce = original_reduce


def _pack_4bit_on_meta(model) -> None:
    """Each bitsandbytes Linear4bit weight as quantizing with `bnb_4bit_quant_storage=torch.bfloat16` leaves it: a
    frozen `Params4bit` of ((numel + 1) // 4, 1) bf16 elements, 4 NF4 values per element (bitsandbytes 0.50
    backends/cuda/ops.py `_quantize_4bit_impl`: `(n + 1) // (quant_storage.itemsize * 2)`), so it is a floating
    tensor FSDP2 shards and gathers like any other (accelerate 1.15 `fsdp2_prepare_model` leaves only non-floating
    Params4bit out of `fully_shard`)."""
    import bitsandbytes as bnb

    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            if mod.quant_storage != torch.bfloat16:
                raise ValueError(f"a 4-bit base across GPUs is stored as bf16 (trainer.recipe.quant_storage_kwargs); "
                                 f"got {mod.quant_storage}")
            n = mod.out_features * mod.in_features
            mod._ftplan_4bit = (mod.out_features, mod.in_features, -(-n // 64))  # NF4 blocksize 64
            packed = torch.empty(((n + 1) // 4, 1), dtype=torch.bfloat16, device="meta")
            mod.weight = bnb.nn.Params4bit(packed, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                           quant_storage=torch.bfloat16, module=mod, bnb_quantized=True)


def _quant_states(model, fake_mode) -> list:
    """The double-quantized constants of every 4-bit layer (absmax uint8 per 64 weights, its fp32 absmax per 256,
    the 256-entry code, the offset, the NF4 code), as fake tensors on the device. bitsandbytes keeps them in a
    `QuantState` attribute of the weight and of the module (`Linear4bit.quant_state`), not a parameter or buffer:
    `fully_shard` never sees them, so every rank holds all of them."""
    import bitsandbytes as bnb

    out = []
    with fake_mode:
        for mod in model.modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                n_blocks = mod._ftplan_4bit[2]
                mod._ftplan_quant = [torch.empty((n_blocks,), dtype=torch.uint8),
                                     torch.empty((-(-n_blocks // 256),), dtype=torch.float32),
                                     torch.empty((256,), dtype=torch.float32), torch.empty((), dtype=torch.float32),
                                     torch.empty((16,), dtype=torch.float32)]
                out += mod._ftplan_quant
    return out


def build_model(config: dict, tc: TrainConfig):
    """The recipe's model and method on the meta device, before sharding. A 4-bit base is built as `ftplan run`
    loads it across GPUs: transformers' bnb replacement with the recipe's quant storage (bf16), the packed
    weights (`_pack_4bit_on_meta`), then k-bit preparation and LoRA (`recipe.apply_method`)."""
    with torch.device("meta"):
        if tc.base_quant.quantized:
            from transformers import AutoModelForCausalLM

            from .trace import _quantize_on_meta

            model = AutoModelForCausalLM.from_config(recipe.hf_config(config), dtype=torch.bfloat16,
                                                     attn_implementation=tc.recipe.attn_implementation)
            _quantize_on_meta(model, **recipe.quant_storage_kwargs(tc))
            _pack_4bit_on_meta(model)
        else:
            model = recipe.build_model(config, tc, device="meta")
        return recipe.apply_method(model, tc)


def run_steps(model, tc: TrainConfig, tracker: ShardedLiveBytes, vocab: int, steps: int, *, device="cpu",
              generator=None):
    """The run's own step (`trainer.step.TrainStep`) on a sharded model, with the tracker's phases and tags; the
    sharded parameters are tagged weights, their gradients (tagged at the optimizer phase) gradients."""
    params = recipe.trainable_parameters(model)
    for p in model.parameters():
        tracker.track(p, "weights")
    for b in model.buffers():
        tracker.track(b, "weights")
    for p in params:
        tracker.retag(p._local_tensor if hasattr(p, "_local_tensor") else p, "trainable")
    # CPU offload: the parameters, gradients and so the optimizer step are on the host, where torch's default
    # (foreach=None) takes the per-tensor loops (torch/optim/optimizer.py `_default_to_fused_or_foreach`: foreach
    # only on CUDA-like devices); on the device, foreach as CUDA's default
    foreach = None if tc.cpu_offload else True
    opt = recipe.make_optimizer(params, tc, foreach=foreach if tc.optimizer in ("adamw", "sgd") else None)
    step_no = 0

    def phase(name: str) -> None:
        if name == "optimizer":
            for p in params:
                if p.grad is not None:
                    g = p.grad
                    tracker.retag(getattr(g, "_local_tensor", g), "gradients")
        tracker.phase, tracker.default_tag = f"{name}{step_no}", PHASE_TAGS[name]
        # CPU offload: the clip and the optimizer step allocate pageable host memory
        tracker.on_host, tracker.host_pinned = tc.cpu_offload and name == "optimizer", False

    train_step = TrainStep(model, opt, params, tc, device, max_grad_norm=1.0, foreach=foreach, keep_grad_norm=False,
                           phase=phase)
    for step_no in range(steps):
        batch = recipe.synthetic_batch(vocab, tc, device=device, generator=generator)
        train_step([batch], micro_steps=1)
    train_step.release()
    return params


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """torch's fake process group (no communication), rank 0 of `world_size`, for the duration."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def traceable(tc: TrainConfig) -> bool:
    """strategy fsdp on 2 or more GPUs"""
    return tc.num_gpus >= 2 and tc.strategy in TRACED_STRATEGIES


def trace_sharded_step(config: dict, tc: TrainConfig, *, steps: int = 2, cuda_workspace_bytes: int = 0) -> TraceResult:
    """Trace `steps` steps of rank 0 of `tc.num_gpus` under `tc.strategy` (FSDP2) on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not traceable(tc):
        raise ValueError(f"the sharded trace follows {traceable.__doc__.strip()}; got {tc.strategy} on "
                         f"{tc.num_gpus} GPU(s)")
    t0 = time.perf_counter()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = ShardedLiveBytes()
    with fake_process_group(tc.num_gpus), cuda_behaviour(tc=tc):
        model = build_model(config, tc)
        n_total = _count_params(model)
        model = shard(model, tc, config.get("model_type"))
        offload = (lambda: cpu_offload_behaviour(tracker)) if tc.cpu_offload else contextlib.nullcontext
        with fake_mode, offload():
            model.to_empty(device="cpu")
        # the host peak of the steps: `to_empty` re-pins a tied parameter once per module that holds it, a load
        # path of the fake trace only (the run shards a model already on the CPU, pinning each shard once)
        tracker.host_peak = tracker.host_current
        quant = _quant_states(model, fake_mode) if tc.base_quant.quantized else []
        with fake_mode, offload(), own_propagation_mode(tracker), storage_resizes(tracker), tracker:
            for t in quant:
                tracker.track(t, "quant_constants")
            params = run_steps(model, tc, tracker, int(config["vocab_size"]), steps)
        n_trainable = sum(p.numel() for p in params)
    peak_by_tag = {k: v for k, v in tracker.peak_by_tag.items() if v}
    if cuda_workspace_bytes:
        peak_by_tag["cuda_workspace"] = cuda_workspace_bytes
    return TraceResult(
        peak_allocated_bytes=tracker.peak + cuda_workspace_bytes, peak_phase=tracker.peak_phase,
        peak_by_tag=peak_by_tag, phase_peaks=tracker.phase_peaks, paged_bytes=0, trainable_params=n_trainable,
        total_params=n_total, seconds=time.perf_counter() - t0, steps=steps,
        cuda_workspace_bytes=cuda_workspace_bytes,
        notes=[f"FSDP2 rank 0 of {tc.num_gpus} on a fake process group (accelerate's fsdp2_prepare_model)"]
        + (["CPU offload: sharded parameters and gradients in pinned host memory, the optimizer step on the host"]
           if tc.cpu_offload else []),
        host_bytes=tracker.host_peak if tc.cpu_offload else None,
    )


def real_rank(rank: int, world_size: int, config: dict, tc_dict: dict, init_file: str, out_path: str,
              steps: int = 2) -> None:
    """One process of a real FSDP2 run on CPU over gloo (`torch.multiprocessing.spawn` target): the same model,
    sharding, step and byte tracker as `trace_sharded_step`, on real tensors; rank 0 writes its counts as JSON to
    `out_path`. What the fake trace must reproduce (tests/test_trace_multigpu.py)."""
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        tc = TrainConfig.from_dict(tc_dict)
        torch.manual_seed(0)
        tracker = ShardedLiveBytes()
        with cuda_behaviour(tc=tc):
            model = recipe.apply_method(recipe.build_model(config, tc, device="cpu"), tc)
            model = shard(model, tc, config.get("model_type"))
            gen = torch.Generator().manual_seed(rank)
            with own_propagation_mode(tracker), storage_resizes(tracker), tracker:
                run_steps(model, tc, tracker, int(config["vocab_size"]), steps, generator=gen)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"peak_allocated_bytes": tracker.peak, "phase_peaks": tracker.phase_peaks,
                           "peak_phase": tracker.peak_phase}, f)
    finally:
        dist.destroy_process_group()
