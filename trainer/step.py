"""The training step, written once: `ftplan run`, `ftplan calibrate` and `ftplan estimate --trace` all call it.

    for each of the step's micro-batches (n of them):
        outputs = recipe.forward(model, batch, tc, device_type)  # the previous outputs live until this returns
        loss.backward()                                          # (loss / n).backward() when n > 1
    clip_grad_norm_(params, max_grad_norm, foreach=foreach)
    optimizer.step(); scheduler.step(); optimizer.zero_grad(set_to_none=True)

With `--precision fp16` the loss is scaled by a `torch.amp.GradScaler` and the gradients unscaled before the clip
(`scaler.step` skips a step whose gradients overflowed).

The outputs (so the logits) of the last micro-batch stay referenced by the `TrainStep` until the next forward returns,
exactly as in a plain `out = model(**batch); out.loss.backward(); opt.step()` loop: the memory estimate counts them
there, and the trace and the calibration measure them there.

What differs between the callers is given, not re-written:

Activation offloading (`Recipe.activation_offload`): TRL's context manager (trainer/offload.py) around each
micro-batch's forward and backward, as TRL's `SFTTrainer.training_step` wraps them.

- `phase(name)`: called before each "forward", "backward" and "optimizer" phase (the trace tags its allocations);
- `sync(last)`: a context around each micro-batch's forward and backward; `last` is True on the micro-batch whose
  backward must reduce the gradients across processes (DDP's `no_sync` on the others);
- `backward(loss)`: replaces `(loss / n).backward()` (DeepSpeed's engine scales by its own accumulation steps);
- `foreach`: the clip's foreach (the trace passes True, CUDA's default, on its fake CPU tensors);
- `keep_grad_norm`: the trace drops the norm at once, as its reference points were traced (one 512-byte block less
  during the optimizer step); the run logs it.

`recipe.forward` is looked up on each call, so a test that replaces it (simulated out-of-memory) reaches every caller.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable

import torch

from planner.config import TrainConfig

from . import recipe


@dataclass
class StepResult:
    loss: torch.Tensor  # sum of the micro-batches' losses (detached, fp32; divide by micro_steps for the mean)
    grad_norm: torch.Tensor | None  # the pre-clip gradient norm (None with keep_grad_norm=False)
    micro_steps: int


def optimizer_step(params, optimizer, max_grad_norm: float = 1.0, scheduler=None, *, foreach: bool | None = None,
                   keep_grad_norm: bool = True, scaler=None):
    """Clip, step, (scheduler step), zero_grad(set_to_none=True). Returns the pre-clip gradient norm (a tensor), or
    None with keep_grad_norm=False (the norm is then freed before the optimizer steps). With a GradScaler (`fp16`):
    `scaler.unscale_(optimizer)` (in place) before the clip, `scaler.step(optimizer)` (skipped on inf/NaN) and
    `scaler.update()`, as torch's AMP recipe does."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=foreach)
    if not keep_grad_norm:
        norm = None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


class TrainStep:
    """One optimizer step of the reference recipe over the micro-batches it is given (see the module docstring)."""

    def __init__(self, model, optimizer, params, tc: TrainConfig, device_type: str, *, max_grad_norm: float = 1.0,
                 scheduler=None, foreach: bool | None = None, keep_grad_norm: bool = True,
                 phase: Callable[[str], None] | None = None,
                 sync: Callable[[bool], ContextManager] | None = None,
                 backward: Callable[[torch.Tensor], None] | None = None):
        self.model, self.optimizer, self.params, self.tc = model, optimizer, params, tc
        self.device_type = device_type
        self.max_grad_norm, self.scheduler, self.foreach = max_grad_norm, scheduler, foreach
        self.keep_grad_norm = keep_grad_norm
        self.phase = phase or (lambda name: None)
        self.sync = sync or (lambda last: contextlib.nullcontext())
        self.backward = backward
        self.outputs = None  # the last micro-batch's outputs, alive until the next forward returns
        # fp16 autocast: a GradScaler (torch.amp) scales the loss and unscales the gradients before the clip
        self.scaler = torch.amp.GradScaler(device_type) if tc.precision == "fp16" else None
        # activation offloading (TRL's manager, built once as SFTTrainer builds it): around each micro-batch's
        # forward and backward, as SFTTrainer.training_step wraps them
        self.offload = recipe.activation_offloading(model, tc) if tc.recipe.activation_offload else None

    def __call__(self, batches: Iterable[dict], micro_steps: int | None = None) -> StepResult:
        """Forward and backward over `batches` (`micro_steps` of them: tc.grad_accum unless given), then the optimizer
        step. `batches` may be a generator: each batch is built only when its micro-step starts."""
        n = self.tc.grad_accum if micro_steps is None else micro_steps
        total = None
        i = -1
        for i, batch in enumerate(batches):
            with self.sync(i == n - 1), (self.offload or contextlib.nullcontext()):
                self.phase("forward")
                self.outputs = recipe.forward(self.model, batch, self.tc, self.device_type)
                loss = self.outputs.loss
                self.phase("backward")
                scaled = loss if self.scaler is None else self.scaler.scale(loss)
                if self.backward is not None:
                    self.backward(scaled)
                elif n == 1:
                    scaled.backward()
                else:
                    (scaled / n).backward()
                del scaled
            total = loss.detach().float() if total is None else total + loss.detach().float()  # fp32 sum
            del loss
        if i + 1 != n:
            raise ValueError(f"TrainStep: {i + 1} micro-batches given, {n} expected")
        self.phase("optimizer")
        norm = optimizer_step(self.params, self.optimizer, self.max_grad_norm, self.scheduler, foreach=self.foreach,
                              keep_grad_norm=self.keep_grad_norm, scaler=self.scaler)
        return StepResult(loss=total, grad_norm=norm, micro_steps=n)

    def release(self) -> None:
        """Drop the last outputs (end of training, or before evaluation frees memory)."""
        self.outputs = None


def evaluate(model, batches: Iterable[tuple[dict, int]], tc: TrainConfig, device: torch.device) -> torch.Tensor:
    """Token-weighted loss over `batches` ((batch, weight) pairs; weight = the batch's target tokens, 0 for a
    padding batch that only keeps processes in step): tensor([sum of loss x tokens, tokens]) in float64."""
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    total_tok = torch.zeros((), device=device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch, n in batches:
                out = recipe.forward(model, batch, tc, device.type)
                if n:
                    total_loss += out.loss.double() * n
                    total_tok += n
                del out
    finally:
        model.train(was_training)
    return torch.stack([total_loss, total_tok])
