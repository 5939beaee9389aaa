"""One process, or one of several started by `accelerate launch` (`trainer.launch`)."""

from __future__ import annotations

import contextlib
import os

import torch


class Dist:
    """One process, or one of several started by `accelerate launch` (then an `Accelerator` prepares the model and
    the optimizer: DDP, FSDP or DeepSpeed from the launcher's config)."""

    def __init__(self, device: str):
        self.acc = None
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            self.acc = Accelerator(cpu=device == "cpu")
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
