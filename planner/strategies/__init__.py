"""Multi-GPU strategies, one object each (see `base.Strategy`), registered by name (`registry`).

Adding a strategy is one module: a `Strategy` (or a subclass overriding `buffer_bytes` and
`comm_bytes_per_step`) passed to `register`, imported below. Its name becomes a `--strategy` choice and a valid
`TrainConfig.strategy`; memory, cost, recommend and `ftplan run`'s launcher configs ask it what it does.
"""

from __future__ import annotations

from .base import GRADIENTS, OPTIMIZER_STATE, WEIGHTS, Launcher, Strategy
from .registry import all_strategies, get, most_sharded, names, offload_names, recommend_layouts, strategy_of

# registration order: see `registry`
from . import single, ddp, zero, fsdp2  # noqa: E402,F401  isort: skip

STRATEGY_NAMES = names()
OFFLOAD_STRATEGY_NAMES = offload_names()

__all__ = [
    "GRADIENTS", "OPTIMIZER_STATE", "WEIGHTS", "Launcher", "Strategy", "OFFLOAD_STRATEGY_NAMES", "STRATEGY_NAMES",
    "all_strategies", "get", "most_sharded", "names", "offload_names", "recommend_layouts", "strategy_of",
]
