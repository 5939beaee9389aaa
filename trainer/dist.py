"""One process, or one of several started by `accelerate launch` (`trainer.launch`)."""

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

    def __init__(self, device: str, fsdp_mixed_precision: dict | None = None):
        """`fsdp_mixed_precision`: the FSDP2 `MixedPrecisionPolicy` fields (dtype names) to launch FSDP with
        (`planner.strategies.fsdp2.mixed_precision_policy`); accelerate's yaml cannot say it."""
        self.acc = None
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            self.acc = Accelerator(cpu=device == "cpu", fsdp_plugin=_fsdp_plugin(fsdp_mixed_precision))
            self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.kind = "single" if self.acc is None else str(self.acc.distributed_type).split(".")[-1].lower()
        self.deepspeed = self.kind == "deepspeed"
        self.fsdp = self.kind == "fsdp"

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

    def unwrap(self, model):
        return self.acc.unwrap_model(model) if self.acc is not None else model

    def no_sync(self, model, sync: bool):
        if self.acc is None or sync or self.deepspeed:
            return contextlib.nullcontext()
        return self.acc.no_sync(model)
