"""Activation offloading (`Recipe.activation_offload`): TRL's own context manager, as `SFTTrainer` uses it.

Source read: trl 1.16.0 `trl/models/activation_offloading.py` (`OffloadActivations`, `NoOpManager`,
`get_act_offloading_ctx_manager`) and `trl/trainer/sft_trainer.py` (`activation_offloading=True`:
`get_act_offloading_ctx_manager(model=self.model)` once, with its defaults, and `training_step` runs each
micro-batch's forward and backward inside it). Axolotl's `activation_offloading: true` uses the same manager.

On CUDA this is exactly TRL's call. TRL asks `torch.accelerator.current_accelerator()` for the device to offload
from, and a CPU-only torch has none (its constructor fails on `None.type`); there `ftplan run` runs TRL's same hooks
with the CPU as the device (`cpu_device`): saved tensors of at least 1 KiB that are not parameters are copied to
a new host tensor (unpinned: pinning needs an accelerator) and copied back in backward, streams are torch.cpu's
synchronous stand-ins. The step computes the same numbers; the memory it saves exists only on a GPU.
"""

from __future__ import annotations

import contextlib
import types

import torch


class _Stream(torch.cpu.Stream):
    """torch.cpu's stream stand-in (every op is synchronous on the CPU) with the `synchronize()` TRL's `__exit__`
    calls."""

    def synchronize(self) -> None:
        pass


_CURRENT = _Stream()


def _device_module(base):
    """`base` (torch.cpu) with the calls TRL makes that torch.cpu lacks: `empty_cache()` (TRL's `__enter__` calls it
    whenever bitsandbytes is imported) and streams with `synchronize()`."""
    mod = types.SimpleNamespace(**{k: getattr(base, k) for k in dir(base) if not k.startswith("__")})
    mod.empty_cache = lambda: None
    mod.Stream = _Stream
    mod.current_stream = lambda device=None: _CURRENT
    return mod


@contextlib.contextmanager
def cpu_device():
    """While TRL builds its manager: the CPU is the accelerator (`torch.accelerator.current_accelerator()` returns
    the cpu device, `torch.get_device_module("cpu")` torch.cpu plus `empty_cache`)."""
    acc, get_mod = torch.accelerator.current_accelerator, torch.get_device_module
    cpu = torch.device("cpu")
    torch.accelerator.current_accelerator = lambda *a, **k: cpu
    torch.get_device_module = lambda d=None: _device_module(torch.cpu) if str(d) == "cpu" else get_mod(d)
    try:
        yield
    finally:
        torch.accelerator.current_accelerator, torch.get_device_module = acc, get_mod


def _record_stream(record):
    """`Tensor.record_stream` for TRL's hooks on the CPU: nothing to order (every CPU op is synchronous; on CUDA it
    only delays the reuse of the block until the copy stream is done), and the C++ call refuses a torch.cpu
    stream."""
    def call(self, stream):
        if self.device.type != "cpu":
            return record(self, stream)
    return call


class _OnCPU(contextlib.AbstractContextManager):
    """TRL's manager entered with `Tensor.record_stream` a no-op for CPU tensors (`_record_stream`)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self._saved = None

    def __enter__(self):
        self._saved = torch.Tensor.record_stream
        torch.Tensor.record_stream = _record_stream(self._saved)
        return self.ctx.__enter__()

    def __exit__(self, *exc):
        try:
            return self.ctx.__exit__(*exc)
        finally:
            torch.Tensor.record_stream = self._saved


def context(model, pin_memory: bool | None = None):
    """TRL's `get_act_offloading_ctx_manager(model)` with SFTTrainer's defaults (pinned memory, a second stream, 1 KiB
    minimum, a forward stash of 5, the lm_head under `NoOpManager`). Without an accelerator: the CPU as the device,
    unpinned (see the module docstring); `pin_memory` overrides (the trace counts pinned host memory itself)."""
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    if torch.accelerator.current_accelerator() is not None:
        return get_act_offloading_ctx_manager(model)
    with cpu_device():
        return _OnCPU(get_act_offloading_ctx_manager(model, use_pin_memory=bool(pin_memory)))
