"""The fine-tuning methods ftplan models, one module each (in the manner of peft's `tuners/<method>/`).

Adding a method: write `planner/methods/<name>.py` with a `Method` subclass (see `base.py` for what it supplies)
and a module-level `METHOD`, add the module to `_MODULES` below, and add a test row (tests/test_methods_peft.py
checks the trainable-parameter count against real peft). Nothing outside this package compares method names,
except the CLI's list of choices and the `qlora` alias.

`--method qlora` is an alias: LoRA over an NF4 base (`method="lora", quant="nf4"`, see `planner.quant`).
"""

from __future__ import annotations

from importlib import import_module

from .base import Method, TargetError, Trainable
from .ia3 import IA3_TARGETS, ia3_targets
from .lora import lora_targets

_MODULES = ("full", "lora", "dora", "prefix", "prompt", "ia3")

METHODS: dict[str, Method] = {m.name: m for m in (import_module(f"{__name__}.{mod}").METHOD for mod in _MODULES)}

# Names a user may give for a (method, base quantization) pair.
ALIASES = {"qlora": ("lora", "nf4"), "qdora": ("dora", "nf4")}

# What the CLI and plan files accept for `method`, in display order.
METHOD_CHOICES = ("full", "lora", "qlora", "dora", "qdora", "prefix", "prompt", "ia3")


def get_method(name: str) -> Method:
    """The registered method `name`; ValueError naming the valid choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method must be one of {', '.join(METHOD_CHOICES)}; got {name!r}") from None


def method_label(tc) -> str:
    """How tables name the configuration's method: `QLoRA r16 all-linear`, `Prefix 20 tok`, `Full FT`."""
    return get_method(tc.method).config_label(tc)


def trainable_params(arch, tc) -> int:
    """Trainable parameters as peft counts them (`get_nb_trainable_parameters()[0]`)."""
    return get_method(tc.method).trainable_params(arch, tc)


def total_params(arch, tc) -> int:
    """All parameters of the trained model, adapters included (peft's `all params`; 4-bit weights counted as
    their unquantized elements)."""
    return arch.total_params + get_method(tc.method).extra_params(arch, tc)


__all__ = ["ALIASES", "IA3_TARGETS", "METHODS", "METHOD_CHOICES", "Method", "TargetError", "Trainable", "get_method",
           "ia3_targets", "lora_targets", "method_label", "total_params", "trainable_params"]
