"""One process, or one of several started by `accelerate launch` (`trainer.launch`).

Several CPU processes with the fsdp strategy are sharded here with FSDP2 directly (`trainer.fsdp`), and with a ZeRO
strategy run the DeepSpeed engine directly (`trainer.zero`): accelerate 1.15 turns an FSDP config into DDP on CPU and
does not start DeepSpeed there. Every other multi-process run is prepared by accelerate."""

from __future__ import annotations

import contextlib
import os

import torch


def _fsdp_plugin(mixed_precision: dict | None):
    """accelerate's FSDP plugin from the launcher's environment (accelerate_config.yaml's fsdp_config) with the
    plan's mixed-precision policy; None when the launch is not FSDP2 (accelerate then reads its environment)."""
    if (mixed_precision is None or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"
            or os.environ.get("FSDP_VERSION", "1") != "2"):
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(**{k: getattr(torch, v) for k, v in mixed_precision.items()})
    return FullyShardedDataParallelPlugin(mixed_precision_policy=policy)


class Dist:
    """One process, or one of several started by `accelerate launch` (then an `Accelerator` prepares the model and
    the optimizer: DDP, FSDP or DeepSpeed from the launcher's config)."""

    def __init__(self, device: str, strategy: str = "ddp", fsdp_mixed_precision: dict | None = None):
        """`strategy`: the plan's (CPU processes shard FSDP2 or start DeepSpeed here); `fsdp_mixed_precision`: the
        FSDP2 `MixedPrecisionPolicy` fields (dtype names) to launch FSDP with
        (`planner.strategies.fsdp2.mixed_precision_policy`); accelerate's yaml cannot say it."""
        self.fsdp_mixed_precision = fsdp_mixed_precision
        self.acc = None
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            self.acc = Accelerator(cpu=device == "cpu", fsdp_plugin=_fsdp_plugin(fsdp_mixed_precision))
            self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.kind = "single" if self.acc is None else str(self.acc.distributed_type).split(".")[-1].lower()
        self.deepspeed = self.kind == "deepspeed"
        # FSDP2 applied by `trainer.fsdp` (CPU processes), or by accelerate's FSDP plugin (CUDA)
        self.fsdp_direct = self.acc is not None and device == "cpu" and strategy == "fsdp"
        self.fsdp = self.kind == "fsdp" or self.fsdp_direct
        self.ds_direct = self.acc is not None and device == "cpu" and strategy in ("zero1", "zero2", "zero3")
        self.deepspeed = self.deepspeed or self.ds_direct
        self._boundary = True  # DeepSpeed: whether this micro-step ends the accumulation (set by no_sync)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> torch.device:
        if self.acc is not None:
            return self.acc.device
        return torch.device(device)

    def barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.acc is None:
            return t
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t

    def shard(self, model, tc):
        """FSDP2 over the CPU processes (before the optimizer is built: it must see the sharded parameters)."""
        if not self.fsdp_direct:
            return model
        from . import fsdp

        return fsdp.shard(model, tc, getattr(getattr(model, "config", None), "model_type", None))

    def prepare(self, model, optimizer, ds_config: dict | None = None):
        """accelerate's wrapping (DDP, FSDP, DeepSpeed); the directly sharded model is ready as it is; CPU ZeRO
        starts the DeepSpeed engine with `ds_config` (`trainer.launch.deepspeed_config`)."""
        if self.ds_direct:
            from . import zero

            return zero.initialize(model, optimizer, ds_config)
        if self.acc is None or self.fsdp_direct:
            return model, optimizer
        return self.acc.prepare(model, optimizer)

    def backward_fn(self, model):
        """What the training step calls instead of `loss.backward()`, or None (DeepSpeed steps inside backward)."""
        if self.ds_direct:
            from . import zero

            return lambda loss: zero.backward(model, loss, self._boundary)
        if self.deepspeed:
            return self.acc.backward
        return None

    def save_state(self, folder, model, optimizer) -> None:
        """Sharded model and optimizer state of an FSDP / DeepSpeed run (every process writes its part)."""
        if self.fsdp_direct:
            from . import fsdp

            fsdp.save_state(folder / "fsdp", model, optimizer)
        elif self.ds_direct:
            from . import zero

            zero.save_state(folder / "deepspeed", model)
        else:
            self.acc.save_state(str(folder / "accelerate"))

    def load_state(self, folder, model, optimizer) -> None:
        if self.fsdp_direct:
            from . import fsdp

            fsdp.load_state(folder / "fsdp", model, optimizer)
        elif self.ds_direct:
            from . import zero

            zero.load_state(folder / "deepspeed", model)
        else:
            self.acc.load_state(str(folder / "accelerate"))

    def full_state_dict(self, model):
        """The whole state dict gathered for saving (every process calls it), or None where the model holds it."""
        if self.fsdp_direct:
            from . import fsdp

            return fsdp.full_state(model)
        if self.ds_direct:
            from . import zero

            return zero.full_state(model)
        if self.fsdp or self.deepspeed:
            return self.acc.get_state_dict(model)
        return None

    def grad_norm(self, model, norm) -> float:
        """The pre-clip gradient norm of the step: DeepSpeed computes it inside its step (the partitioned gradients
        are gone by the time the training step would measure them)."""
        if self.ds_direct:
            return float(model.get_global_grad_norm() or 0.0)
        return float(norm)

    def unwrap(self, model):
        if self.ds_direct:
            return model.module
        return self.acc.unwrap_model(model) if self.acc is not None else model

    def no_sync(self, model, sync: bool):
        self._boundary = sync
        if self.acc is None or sync or self.deepspeed:
            return contextlib.nullcontext()
        if self.fsdp_direct:
            from . import fsdp

            return fsdp.no_sync(model, sync)
        return self.acc.no_sync(model)
