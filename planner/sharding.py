"""Per-device memory under data parallelism: the static terms as the configuration's strategy leaves them.

The strategies themselves (what each shards, gathers, buffers, sends and offloads) are objects in
`planner.strategies`; this module keeps the entry point `planner.memory` calls, and the buffer formulas'
historical names.
"""

from __future__ import annotations

from .arch import ModelArch
from .config import TrainConfig
from .strategies import strategy_of
from .strategies.base import gathered_param_bytes, layer_param_bytes  # noqa: F401
from .strategies.ddp import ddp_bucket_bytes  # noqa: F401
from .strategies.zero import zero_reduce_bucket_bytes  # noqa: F401


def shard_static(arch: ModelArch, tc: TrainConfig, static: dict, grads: int, opt_temp: int):
    """Apply `tc`'s strategy to the static terms (`Strategy.shard_static`). Returns (static, grads, opt_temp,
    cpu_offload_bytes, notes)."""
    return strategy_of(tc).shard_static(arch, tc, static, grads, opt_temp)
