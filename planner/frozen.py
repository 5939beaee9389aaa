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
