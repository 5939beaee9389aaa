"""Checkpoints: `checkpoint-<step>` folders that exist complete or not at all, and what a resume restores.

A checkpoint is written into `.tmp-checkpoint-<step>` (every process its RNG state; the main process the trainable
parameters, the optimizer and scheduler states and `state.json`; FSDP/DeepSpeed through accelerate's `save_state`),
fsynced, then renamed: a kill at any moment leaves the previous checkpoints intact, and a half-written folder is
removed at the next start. Old checkpoints are renamed away before they are deleted, for the same reason.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from planner.config import TrainConfig

from . import files
from .spec import RunUsageError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (a `checkpoint-<step>` folder with its state.json), oldest first."""
    out = []
    d = Path(output_dir)
    if not d.is_dir():
        return out
    for p in d.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / "state.json").exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    cps = checkpoints(output_dir)
    return cps[-1][1] if cps else None


def remove_partial(output_dir: str | Path) -> None:
    """Remove what a save cut short by a kill left behind (temp folders, old checkpoints being deleted)."""
    for p in Path(output_dir).glob(TMP_PREFIX + "*"):
        shutil.rmtree(p, ignore_errors=True)


def remove(path: Path) -> None:
    """Delete a checkpoint: first renamed (atomic: it is no longer a checkpoint), then removed."""
    trash = path.with_name(f"{TMP_PREFIX}{path.name}-old")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_all(output_dir: str | Path) -> None:
    for _, p in checkpoints(output_dir):
        remove(p)


def rng_state() -> dict:
    st = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        st["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if "numpy" in st:
        import numpy as np

        np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def compatibility_problems(saved: dict, tc: TrainConfig, schedule: dict, world: int) -> list[str]:
    """Why a checkpoint cannot continue with `tc` (fields other than the micro-batch ones, the effective batch,
    the schedule)."""
    problems = []
    old = TrainConfig.from_dict(saved["train"])
    for k in ("method", "precision", "rank", "lora_alpha", "lora_dropout", "target_modules", "num_virtual_tokens",
              "seq_len"):
        if getattr(old, k) != getattr(tc, k):
            problems.append(f"{k}: checkpoint {getattr(old, k)!r}, now {getattr(tc, k)!r}")
    old_eff = old.batch_size * old.grad_accum * saved.get("world_size", 1)
    new_eff = tc.batch_size * tc.grad_accum * world
    if old_eff != new_eff:
        problems.append(f"effective batch: checkpoint {old_eff}, now {new_eff}")
    for k in ("learning_rate", "lr_scheduler", "warmup_ratio", "max_steps", "epochs", "seed"):
        if saved["schedule"].get(k) != schedule.get(k):
            problems.append(f"schedule.{k}: checkpoint {saved['schedule'].get(k)!r}, now {schedule.get(k)!r}")
    return problems


def save(out: Path, step: int, state: dict, model, optimizer, scheduler, dist, *, keep: int) -> Path:
    """Write `checkpoint-<step>` (every process calls this; `state` is the main process's state.json) and keep the
    latest `keep` checkpoints."""
    final = out / f"checkpoint-{step}"
    tmp = out / f"{TMP_PREFIX}{step}"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save(rng_state(), tmp / f"rng-{dist.rank}.pt")
    if dist.fsdp or dist.deepspeed:
        dist.save_state(tmp, model, optimizer)
    elif dist.main:
        unwrapped = dist.unwrap(model)
        trainable = {n: p.detach() for n, p in unwrapped.named_parameters() if p.requires_grad}
        torch.save(trainable, tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if dist.main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    dist.barrier()
    if dist.main:
        if final.exists():
            remove(final)
        files.publish_dir(tmp, final)  # fsync, rename: a checkpoint folder exists complete or not at all
        for _, old in checkpoints(out)[: -keep or None]:
            if old != final:
                remove(old)
    dist.barrier()
    return final


def load(ckpt: Path, model, optimizer, scheduler, dist) -> int:
    """Restore the trainable parameters, optimizer, scheduler and this process's RNG state; returns the step."""
    state = json.loads((ckpt / "state.json").read_text())
    if dist.fsdp or dist.deepspeed:
        dist.load_state(ckpt, model, optimizer)
    else:
        unwrapped = dist.unwrap(model)
        saved = torch.load(ckpt / "trainable.pt", map_location="cpu", weights_only=True)
        result = unwrapped.load_state_dict(saved, strict=False)
        if result.unexpected_keys:
            raise RunUsageError(f"{ckpt}: parameters that this model lacks: {result.unexpected_keys[:3]}")
        trainable = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(saved))
        if missing:
            raise RunUsageError(f"{ckpt}: trainable parameters missing from the checkpoint: {missing[:3]}")
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    rng = ckpt / f"rng-{dist.rank}.pt"
    if not rng.exists():
        rng = ckpt / "rng-0.pt"
    set_rng_state(torch.load(rng, weights_only=False))
    return int(state["step"])
