"""The strategies by name, in registration order (`planner/strategies/__init__.py` imports their modules).

Order matters where it shows: `recommend` tries strategies in this order (the stable sort keeps it between equal
plans) and `most_sharded` takes the first of equals."""

from __future__ import annotations

from .base import Strategy

SINGLE_NAME = "single"  # the implicit strategy of one device

_REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Add `strategy` under its name (once); returns it, so a module can write `X = register(...)`."""
    if strategy.name in _REGISTRY:
        raise ValueError(f"strategy {strategy.name!r} is already registered")
    _REGISTRY[strategy.name] = strategy
    return strategy


def get(name: str) -> Strategy:
    """The strategy called `name`; ValueError naming the valid choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"strategy must be one of {', '.join(names())}; got {name!r}") from None


def strategy_of(tc) -> Strategy:
    """The strategy a configuration runs: the single-device one for num_gpus == 1, else `tc.strategy`'s."""
    return _REGISTRY[SINGLE_NAME] if tc.num_gpus == 1 else _REGISTRY[tc.strategy]


def all_strategies() -> tuple[Strategy, ...]:
    return tuple(_REGISTRY.values())


def multi_gpu() -> tuple[Strategy, ...]:
    """The strategies a user can choose (`--strategy`), in registration order."""
    return tuple(s for s in _REGISTRY.values() if s.multi_gpu)


def names() -> tuple[str, ...]:
    """`--strategy` choices, sorted (error messages and help list them so)."""
    return tuple(sorted(s.name for s in multi_gpu()))


def offload_names() -> tuple[str, ...]:
    """Strategies valid with `cpu_offload`, in registration order."""
    return tuple(s.name for s in multi_gpu() if s.offloads)


def recommend_layouts() -> tuple[tuple[str, bool], ...]:
    """(strategy, cpu_offload) pairs `recommend` tries on several GPUs: every strategy without offload, in
    registration order, then those with offload (the last resort: the slowest)."""
    ss = multi_gpu()
    return (tuple((s.name, False) for s in ss if False in s.recommend_offload)
            + tuple((s.name, True) for s in ss if True in s.recommend_offload))


def most_sharded() -> Strategy:
    """The searched strategy that leaves the least on each device: most terms sharded, then most offloadable;
    the first registered of equals (ZeRO-3 before FSDP). `recommend` sizes "GPUs needed" with it."""
    ss = [s for s in multi_gpu() if s.recommend_offload]
    return max(ss, key=lambda s: (len(s.shards), len(s.offloads)))
