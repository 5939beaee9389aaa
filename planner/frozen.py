"""Hashing frozen dataclasses once.

The planner's lru_caches are keyed on a `ModelArch` and a `TrainConfig`; `recommend` asks them thousands of times a
second, and the hash dataclass generates walks every field (the arch's linears, the config's recipe) on each ask.
Both are immutable, so their hash is computed once, at construction, from the same fields dataclass would hash.
"""

from __future__ import annotations

from dataclasses import fields


def fields_hash(obj) -> int:
    """`hash` of the tuple of the fields that take part in hashing, as `dataclass(frozen=True)` defines it: a field
    with `hash=None` hashes when it compares (`dataclasses._hash_fn` over `f.hash is None and f.compare or f.hash`)."""
    return hash(tuple(getattr(obj, f.name) for f in fields(obj) if (f.compare if f.hash is None else f.hash)))


def memo(obj, name: str, compute):
    """`compute(obj)`, kept on the (immutable) object under `name` (outside its fields, so equality, hashing and
    `asdict` ignore it): for derived values one plan asks for several times (`planner.memory.batch_free`,
    `_piece_key`)."""
    out = obj.__dict__.get(name)
    if out is None:
        out = compute(obj)
        object.__setattr__(obj, name, out)
    return out
