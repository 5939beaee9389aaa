"""`ftplan estimate --trace --num-gpus 2 --strategy zero2|zero3`: rank 0 of a real DeepSpeed ZeRO run, its bytes counted.

Unlike FSDP2 (`calibrate.trace_multigpu`, fake tensors on a fake process group), DeepSpeed is traced on real tensors
in real processes: its engine talks through its own comm layer (deepspeed/comm, backed by torch.distributed with
the accelerator's backend; the CPU accelerator's is ccl or gloo), flattens parameters into buffers with
`_flatten_dense_tensors` and swaps `param.data` in and out (stage 3's `ds_tensor`, `free_param`), reads gradients'
values (`has_overflow`, norms via `.item()`), and sizes its partitions from `dist.get_world_size`. A FakeTensor run
would have to fake the comm layer too (DeepSpeed's own `all_gather_into_tensor` / `reduce_scatter` wrappers, the
`.item()` syncs of the norm and overflow checks), so much of the engine would be a stand-in rather than the engine.
Two CPU processes over gloo run a tiny model in seconds, so the trace is of the engine itself, at N=2 only.

What runs: the recipe's model and method (`trainer.recipe`), the optimizer `ftplan run` builds, `deepspeed.initialize`
with the config `ftplan run` writes (`trainer.launch.deepspeed_config`, bucket sizes from the hidden size), and the
run's own step (`trainer.step.TrainStep`) with DeepSpeed's backward and step as `trainer.zero` drives them on CPU.
A `calibrate.trace.LiveBytes` on rank 0 counts every storage created from just before `deepspeed.initialize`
(DeepSpeed's bf16 cast, flat buffers, fp32 master partitions, optimizer state, gradient partitions, reduce
buckets, ZeRO-3's gathered parameters), each rounded to the CUDA caching allocator's 512-byte block: what
`torch.cuda.max_memory_allocated` counts. The peak is that of the training steps (the engine's construction is
reported apart as the "load" phase: on CUDA DeepSpeed flattens stage 1/2 groups on the host when the device is
short, and stage 3 partitions as it builds; neither is the training peak for the planner's configurations).

Where DeepSpeed 0.19.8's CPU accelerator (deepspeed/accelerator/cpu_accelerator.py) takes another path than CUDA:
- `is_synchronized_device()` is True on CPU, so there is no reduction stream and `resolves_data_dependency()`
  skips the stream waits and `record_stream` calls of overlap_comm (stage_1_and_2.py `reduction_stream`,
  stage3.py `reduce_and_partition_stream`). On CUDA a buffer handed to the reduction stream is freed only when
  that stream has used it; the allocations are the same (the double ipg buffer of stage 1/2 and stage 3's
  buckets are allocated identically: `ipg_buckets[...].buffer`, `__ipg_bucket_flat_buffer`), only the
  release of a few transient flat copies may come later on CUDA. Not modelled (no substitution).
- `pin_memory` is a no-op on the CPU accelerator; pinned buffers are only created for CPU offload, not traced here.
- flattening: stage 1/2 flattens each group on the accelerator when it has room for the flat buffer
  (stage_1_and_2.py `flatten_on_accelerator`: `is_available()` and `available_memory()`, both answered by the CPU
  accelerator from host RAM), the path a GPU with room takes; it keeps shape records on the meta device
  (`round_robin_bit16_meta`), which hold no memory and are not counted.
- the CUDA sdpa stand-in allocates its outputs without computing them; here they are zeroed in place
  (`finite_attention`), or DeepSpeed's overflow checks would skip every step on garbage values.
- sdpa, dropout and the other kernels: `calibrate.trace.cuda_behaviour` substitutes CUDA's, as for every trace.
- the cuBLAS workspace is added as a constant (`cuda_workspace_bytes`), as `calibrate.trace_multigpu` does.

What the engine showed (calibrate/reference/trace-points-zero.jsonl, held by tests/test_trace_zero.py), each now a
term of `planner.strategies.zero`: from the second step ZeRO-3 keeps every layer gathered from its forward to its
backward (`zero3_kept_params`: stage3_max_reuse_distance), a frozen untied embedding excepted; its gradient
partition is bf16 and allocated up front (`zero3_gradient_partition`), the fp32 copy made at the step; it has one
reduce bucket (stage 1/2: two); and the bf16 mode casts peft's adapters to bf16, so LoRA computes in bf16
(`planner.memory._deepspeed_casts_bf16`). Known residual: ZeRO-3 LoRA on an untied model without checkpointing
holds 2 MiB more activations in the layers than ZeRO-2 (RMSNorm / MLP outputs, 2.9 % of that peak without the
workspace, -1.4 % with it), not explained.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from planner.config import TrainConfig

TRACED_STRATEGIES = ("zero2", "zero3")
WORLD_SIZE = 2


def traceable(tc: TrainConfig) -> bool:
    """strategy zero2 or zero3 on 2 GPUs, bf16, without CPU offload or a 4-bit base"""
    return (tc.num_gpus == WORLD_SIZE and tc.strategy in TRACED_STRATEGIES and not tc.cpu_offload
            and not tc.base_quant.quantized and tc.precision == "bf16")


def _tracker():
    """`calibrate.trace.LiveBytes` that also keeps, for each phase, the composition (by tag) at its peak."""
    from .trace import LiveBytes

    class Tracker(LiveBytes):
        def __init__(self):
            super().__init__()
            self.phase_by_tag: dict[str, dict] = {}

        def track(self, t, tag=None):
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                return  # DeepSpeed's shape records (stage_1_and_2.py `round_robin_bit16_meta`): no memory
            super().track(t, tag)

        def _note_peak(self) -> None:
            if self.current > self.phase_peaks.get(self.phase, -1):
                self.phase_by_tag[self.phase] = {k: v for k, v in self.by_tag.items() if v}
            super()._note_peak()

    return Tracker()


@contextlib.contextmanager
def finite_attention():
    """The CUDA sdpa stand-in (`calibrate.trace._AttentionCUDA`) allocates its outputs as the fused kernels do but
    does not compute them: on the fake tensors of the other traces values do not exist, here they are real memory
    holding whatever the allocator left, often inf / NaN. DeepSpeed's bf16 mode checks the gradients
    (`bf16.check_grad_overflow`, on by default: deepspeed/runtime/precision_config.py; stage_1_and_2.py and
    stage3.py `has_overflow`, and the global norm's `is_invalid_grad_norm`) and would skip every step, never
    creating the optimizer state. The stand-in's outputs are zeroed in place (no allocation), so the values are
    finite and DeepSpeed's own checks run and pass, as on the GPU."""
    from .trace import _AttentionCUDA

    forward, backward = _AttentionCUDA.forward, _AttentionCUDA.backward

    def zeroed_forward(ctx, *args):
        out = forward(ctx, *args)
        with torch.no_grad():
            out.zero_()
        return out

    def zeroed_backward(ctx, grad_out):
        grads = backward(ctx, grad_out)
        with torch.no_grad():
            for g in grads:
                if g is not None:
                    g.zero_()
        return grads

    _AttentionCUDA.forward, _AttentionCUDA.backward = staticmethod(zeroed_forward), staticmethod(zeroed_backward)
    try:
        yield
    finally:
        _AttentionCUDA.forward, _AttentionCUDA.backward = staticmethod(forward), staticmethod(backward)


MAX_TRACED_PARAMS = 100_000_000  # real tensors in two processes: ~1.6 GB of host memory each at this size


def refusal(tc: TrainConfig, total_params: int) -> str | None:
    """Why `ftplan estimate --trace` cannot trace `tc` with the real engine, or None when it can."""
    if not traceable(tc):
        return f"the DeepSpeed trace follows {traceable.__doc__.strip()}"
    if total_params > MAX_TRACED_PARAMS:
        return (f"the DeepSpeed trace runs real tensors, models up to {MAX_TRACED_PARAMS / 1e6:.0f}M parameters; "
                f"this one has {total_params / 1e6:.0f}M")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return "the DeepSpeed trace needs deepspeed: pip install 'ftplan[deepspeed]'"
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world_size: int, config: dict, tc_dict: dict, init_file: str, out_path: str,
              steps: int = 2, port: int = 0) -> None:
    """One process of the ZeRO run (`torch.multiprocessing.spawn` target); rank 0 writes its counts as JSON."""
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = _rank_steps(rank, config, TrainConfig.from_dict(tc_dict), steps)
        if rank == 0:
            Path(out_path).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _rank_steps(rank: int, config: dict, tc: TrainConfig, steps: int) -> dict:
    import deepspeed

    from trainer import recipe
    from trainer.launch import deepspeed_config
    from trainer.step import TrainStep
    from trainer.zero import NoOpOptimizer

    from .trace import PHASE_TAGS, cuda_behaviour

    torch.manual_seed(0)
    tracker = _tracker()
    with cuda_behaviour(tc=tc), finite_attention():
        model = recipe.apply_method(recipe.build_model(config, tc, device="cpu"), tc)
        n_total = sum(p.numel() for p in model.parameters())
        params = recipe.trainable_parameters(model)
        with tracker:
            tracker.default_tag = "weights"
            for p in model.parameters():
                tracker.track(p, "weights")
            for b in model.buffers():
                tracker.track(b, "weights")
            opt = recipe.make_optimizer(params, tc, foreach=True if tc.optimizer in ("adamw", "sgd") else None)
            ds_config = deepspeed_config(tc, hidden_size=int(config["hidden_size"]))
            deepspeed.init_distributed(dist_backend="gloo")
            tracker.default_tag = "model_states"
            engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
            del model, opt, params
            load_current = tracker.current
            step_no = 0

            def phase(name: str) -> None:
                tracker.phase, tracker.default_tag = f"{name}{step_no}", PHASE_TAGS[name]

            def backward(loss) -> None:  # trainer.zero.backward, with the optimizer phase marked
                engine.set_gradient_accumulation_boundary(True)
                engine.backward(loss)
                phase("optimizer")
                engine.step()

            trainable = [p for p in engine.parameters() if p.requires_grad]
            n_trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in trainable)
            train_step = TrainStep(engine, NoOpOptimizer(ds_opt), trainable, tc, "cpu", max_grad_norm=1.0,
                                   keep_grad_norm=False, phase=phase, backward=backward)
            gen = torch.Generator().manual_seed(rank)
            for step_no in range(steps):
                batch = recipe.synthetic_batch(int(config["vocab_size"]), tc, device="cpu", generator=gen)
                train_step([batch], micro_steps=1)
            train_step.release()
    step_phases = {k: v for k, v in tracker.phase_peaks.items() if k != "load"}
    peak_phase = max(step_phases, key=step_phases.get)
    return {"peak_allocated_bytes": step_phases[peak_phase], "peak_phase": peak_phase,
            "phase_peaks": tracker.phase_peaks, "load_bytes": load_current,
            "peak_by_tag": tracker.phase_by_tag[peak_phase], "phase_by_tag": tracker.phase_by_tag,
            "trainable_params": n_trainable, "total_params": n_total}


def trace_zero_step(config: dict, tc: TrainConfig, *, steps: int = 2, cuda_workspace_bytes: int = 0):
    """Trace `steps` steps of rank 0 of a real 2-process DeepSpeed run of `tc` (ZeRO-2 / ZeRO-3) on CPU over gloo."""
    import torch.multiprocessing as mp

    from .trace import TraceResult

    if not traceable(tc):
        raise ValueError(f"the ZeRO trace follows {traceable.__doc__.strip()}; got {tc.strategy} on {tc.num_gpus} "
                         f"GPU(s), precision {tc.precision}" + (", CPU offload" if tc.cpu_offload else "")
                         + (f", quant {tc.quant}" if tc.base_quant.quantized else ""))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ftplan-zero-trace-") as tmp:
        out = Path(tmp) / "rank0.json"
        mp.spawn(rank_main, args=(WORLD_SIZE, config, tc.to_dict(), str(Path(tmp) / "init"), str(out), steps,
                                  _free_port()), nprocs=WORLD_SIZE, join=True)
        r = json.loads(out.read_text())
    peak_by_tag = r["peak_by_tag"]
    if cuda_workspace_bytes:
        peak_by_tag["cuda_workspace"] = cuda_workspace_bytes
    stage = {"zero2": 2, "zero3": 3}[tc.strategy]
    result = TraceResult(
        peak_allocated_bytes=r["peak_allocated_bytes"] + cuda_workspace_bytes, peak_phase=r["peak_phase"],
        peak_by_tag=peak_by_tag, phase_peaks=r["phase_peaks"], paged_bytes=0,
        trainable_params=r["trainable_params"], total_params=r["total_params"], seconds=time.perf_counter() - t0,
        steps=steps, cuda_workspace_bytes=cuda_workspace_bytes,
        notes=[f"DeepSpeed ZeRO-{stage} rank 0 of {WORLD_SIZE}: the real engine on CPU processes over gloo, "
               f"every storage counted (engine construction: {r['load_bytes']} bytes after `deepspeed.initialize`)"])
    result.phase_by_tag = r["phase_by_tag"]  # each phase's peak by tag (the grid records it)
    return result
