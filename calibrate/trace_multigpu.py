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
    opt = recipe.make_optimizer(params, tc, foreach=True if tc.optimizer in ("adamw", "sgd") else None)
    step_no = 0

    def phase(name: str) -> None:
        if name == "optimizer":
            for p in params:
                if p.grad is not None:
                    g = p.grad
                    tracker.retag(getattr(g, "_local_tensor", g), "gradients")
        tracker.phase, tracker.default_tag = f"{name}{step_no}", PHASE_TAGS[name]

    train_step = TrainStep(model, opt, params, tc, device, max_grad_norm=1.0, foreach=True, keep_grad_norm=False,
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
    """strategy fsdp on 2 or more GPUs, without CPU offload or a 4-bit base"""
    return (tc.num_gpus >= 2 and tc.strategy in TRACED_STRATEGIES and not tc.cpu_offload
            and not tc.base_quant.quantized)


def trace_sharded_step(config: dict, tc: TrainConfig, *, steps: int = 2, cuda_workspace_bytes: int = 0) -> TraceResult:
    """Trace `steps` steps of rank 0 of `tc.num_gpus` under `tc.strategy` (FSDP2) on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not traceable(tc):
        raise ValueError(f"the sharded trace follows {traceable.__doc__.strip()}; got {tc.strategy} on "
                         f"{tc.num_gpus} GPU(s)" + (", 4-bit base" if tc.base_quant.quantized else "")
                         + (", CPU offload" if tc.cpu_offload else ""))
    t0 = time.perf_counter()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = ShardedLiveBytes()
    with fake_process_group(tc.num_gpus), cuda_behaviour(tc=tc):
        with torch.device("meta"):
            model = recipe.build_model(config, tc, device="meta")
            model = recipe.apply_method(model, tc)
        n_total = _count_params(model)
        model = shard(model, tc, config.get("model_type"))
        with fake_mode:
            model.to_empty(device="cpu")
        with fake_mode, own_propagation_mode(tracker), storage_resizes(tracker), tracker:
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
        notes=[f"FSDP2 rank 0 of {tc.num_gpus} on a fake process group (accelerate's fsdp2_prepare_model)"],
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
