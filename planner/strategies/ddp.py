"""DDP (torch.nn.parallel.DistributedDataParallel through accelerate's MULTI_GPU): a full replica per device,
gradients all-reduced in buckets during backward."""

from __future__ import annotations

from .base import Launcher, Strategy, all_reduce_bytes
from .registry import register


def ddp_bucket_bytes(grads: int) -> int:
    """DDP's reducer copies gradients into flat buckets (25 MiB each) covering every gradient, unless
    `gradient_as_bucket_view=True` (accelerate's default is False): one more gradient-sized buffer."""
    return grads


class DDP(Strategy):
    def buffer_bytes(self, arch, tc, grads: int) -> int:
        return ddp_bucket_bytes(grads)

    def comm_bytes_per_step(self, arch, tc, grads: int) -> int:
        """All-reduce of the gradients once per optimizer step (no_sync during accumulation)."""
        return all_reduce_bytes(grads, tc.num_gpus)


DDP_STRATEGY = register(DDP(
    name="ddp", label="DDP", summary="full replica per GPU plus gradient buckets ({n} GPUs)",
    launcher=Launcher("MULTI_GPU"),
))
