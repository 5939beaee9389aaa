"""One attempt of a run: one plan of the fallback chain, from its first (or resumed) optimizer step to the last.

Builds the model, method, optimizer and scheduler; restores a checkpoint; runs `TrainStep` over the data stream
(each process its share of every step), logs each step, evaluates every `eval_steps`, writes a checkpoint every
`save_steps` and when a signal arrives (then raises `Interrupted`), and evaluates at the end. An out-of-memory
error propagates to `trainer.loop.Run`, which goes on with the next plan.
"""

from __future__ import annotations

import math
import random
import signal
import time
from pathlib import Path

import torch

from planner.config import TrainConfig

from . import checkpoint, recipe
from . import data as D
from .measure import predict
from .spec import Interrupted
from .step import TrainStep, evaluate
from .supervise import Signals


def make_scheduler(optimizer, schedule: dict, total_steps: int):
    from transformers import get_scheduler

    warmup = math.ceil(schedule["warmup_ratio"] * total_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[schedule["lr_scheduler"]]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class Attempt:
    """Train `tc` within `run` (a `trainer.loop.Run`: spec, data, devices, reporter); `current_step` says how far it
    got when an error stops it."""

    def __init__(self, run, tc: TrainConfig, resume_from: Path | None, index: int):
        self.run, self.tc, self.resume_from, self.index = run, tc, resume_from, index
        self.rep, self.dist, self.schedule, self.device = run.rep, run.dist, run.schedule, run.device
        self.current_step = 0
        self.step_seconds: list[float] = []
        self.step_tokens: list[int] = []

    def __call__(self) -> tuple:
        """Train to the end; returns (model, measured, eval loss or None, trainable parameters)."""
        run, tc, dist = self.run, self.tc, self.dist
        run.memory.start_attempt()
        total = run.total_steps(tc)
        self.rep.total_steps = total
        self.rep.prediction, _ = predict(run.spec.model_path, tc, run.memory.gpu_name(run.pf.gpu))
        self.rep.announce(tc, total, self.index)

        torch.manual_seed(self.schedule["seed"])
        random.seed(self.schedule["seed"])
        from . import losses
        from .spec import RunUsageError

        try:  # Liger / Cut Cross-Entropy: say what to install before loading a model
            losses.check_available(tc.recipe.loss)
        except losses.LossLibraryMissing as e:
            raise RunUsageError(str(e), "--loss") from None
        model = recipe.build_model(None, tc, path=run.spec.model_path, device=str(self.device))
        model = dist.shard(recipe.apply_method(model, tc), tc)
        params = recipe.trainable_parameters(model)
        optimizer = recipe.make_optimizer(params, tc, lr=self.schedule["learning_rate"])
        scheduler = make_scheduler(optimizer, self.schedule, total)
        if dist.acc is not None:
            ds_config = None
            if dist.ds_direct:
                from .launch import deepspeed_config

                ds_config = deepspeed_config(tc, max_grad_norm=self.schedule["max_grad_norm"],
                                             hidden_size=getattr(getattr(model, "config", None), "hidden_size", None))
            model, optimizer = dist.prepare(model, optimizer, ds_config)
            params = [p for p in model.parameters() if p.requires_grad]
        train_step = TrainStep(model, optimizer, params, tc, run.device_type,
                               max_grad_norm=self.schedule["max_grad_norm"], scheduler=scheduler,
                               sync=lambda last: dist.no_sync(model, sync=last), backward=dist.backward_fn(model))
        n_trainable = sum(p.numel() for p in params)

        start = 0
        if self.resume_from is not None:
            start = checkpoint.load(self.resume_from, model, optimizer, scheduler, dist)
        self.rep.restart(start)
        if self.resume_from is not None:
            self.rep.say(f"resumed from {self.resume_from.name}: step {start} of {total}")
        self.current_step = start
        self.rep.say(f"trainable parameters: {n_trainable:,}")

        stopped = self._train(train_step, start, total)
        if stopped:
            self._interrupted(stopped, total)
        eval_loss = self.evaluate(model, total) if run.eval_ds is not None else None
        measured = run.memory.measured(self.step_seconds, self.step_tokens)  # the peaks include the evaluation
        return model, measured, eval_loss, n_trainable

    def _train(self, train_step: TrainStep, start: int, total: int) -> int | None:
        """Optimizer steps `start`..`total`; returns the signal that stopped them, or None."""
        tc, dist, world, ga, sched = self.tc, self.dist, self.dist.world, self.tc.grad_accum, self.schedule
        stopped = None
        train_step.model.train()
        bar = self.rep.progress(total, start)
        t_attempt = time.perf_counter()
        with Signals() as sig:
            for step in range(start, total):
                self.current_step = step
                t0 = time.perf_counter()
                seen, tokens = [], [0]
                lr = train_step.scheduler.get_last_lr()[0]  # the rate this step uses
                res = train_step(self._batches(step, seen, tokens))
                if world > 1:  # mean loss, total tokens, and whether any process got a signal
                    stats = torch.stack([res.loss / ga, torch.tensor(float(tokens[0]), device=self.device)])
                    loss, tokens_all = dist.all_reduce(stats).tolist()
                    loss /= world
                    sig_any = int(dist.all_reduce(torch.tensor(float(sig.signum or 0), device=self.device), "max"))
                else:
                    loss, tokens_all, sig_any = res.loss.item() / ga, tokens[0], sig.signum
                dt = time.perf_counter() - t0
                self.step_seconds.append(dt)
                self.step_tokens.append(int(tokens_all))
                rec = {"step": step + 1, "loss": round(loss, 6), "lr": lr, "grad_norm": round(dist.grad_norm(train_step.model, res.grad_norm), 6),
                       "tokens": int(tokens_all), "seconds": round(dt, 6),
                       "time": round(time.perf_counter() - t_attempt, 6), "examples": seen}
                if world > 1:  # every process's indices (deterministic: no need to gather them)
                    rec["examples"] = [i for m in range(ga) for r in range(world)
                                       for i in D.micro_batch_indices(self.run.order, step, m, batch_size=tc.batch_size,
                                                                      grad_accum=ga, world_size=world, rank=r)]
                self.rep.step(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"loss {loss:.4f}, {tokens_all / dt:,.0f} tok/s, lr {lr:.2e}", refresh=False)
                done = self.current_step = step + 1
                eval_steps = self.run.spec.eval_steps
                if eval_steps and self.run.eval_ds is not None and done % eval_steps == 0 and done < total:
                    self.evaluate(train_step.model, done)
                if done % sched["logging_steps"] == 0:
                    self.rep.log.flush()
                if sig_any:
                    stopped = int(sig_any) if sig.signum is None else sig.signum
                if stopped or (done % sched["save_steps"] == 0 and done < total):
                    self.save_checkpoint(done, train_step)
                if stopped:
                    break
        if bar is not None:
            bar.close()
        self.rep.log.flush()
        train_step.release()
        return stopped

    def _interrupted(self, stopped: int, total: int) -> None:
        ck = checkpoint.latest_checkpoint(self.run.out)
        name = signal.Signals(stopped).name if stopped in signal.Signals._value2member_map_ else str(stopped)
        summary = self.rep.summary("interrupted", self.tc,
                                   measured=self.run.memory.measured(self.step_seconds, self.step_tokens))
        summary["signal"] = name
        summary["checkpoint"] = str(ck) if ck else None
        self.rep.write_summary(summary)
        raise Interrupted(f"stopped by {name} at step {self.current_step} of {total}; checkpoint: {ck}. "
                          "Continue with the same command and --resume.", stopped, summary)

    def _batches(self, step: int, seen: list, tokens: list):
        """The micro-batches of optimizer `step` for this process, built as each micro-step starts; their example
        indices go into `seen`, their tokens into tokens[0]."""
        tc, run = self.tc, self.run
        for m in range(tc.grad_accum):
            idx = D.micro_batch_indices(run.order, step, m, batch_size=tc.batch_size, grad_accum=tc.grad_accum,
                                        world_size=self.dist.world, rank=self.dist.rank)
            exs = [run.train_ds.examples[i] for i in idx]
            batch = D.collate(exs, run.tokenizer.pad_token_id, max_len=tc.seq_len)
            tokens[0] += D.batch_tokens(exs)
            seen += idx
            yield {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def evaluate(self, model, step: int) -> float:
        """Token-weighted mean loss over the eval set (each process a strided shard, summed across processes)."""
        tc, ds, world, rank = self.tc, self.run.eval_ds, self.dist.world, self.dist.rank
        mine = list(range(rank, len(ds), world))
        per_rank = -(-len(ds) // world)
        n_batches = -(-per_rank // tc.batch_size)  # the same on every process

        def batches():
            for b in range(n_batches):
                idx = mine[b * tc.batch_size:(b + 1) * tc.batch_size]
                exs = [ds.examples[i] for i in (idx or [0])]  # an empty shard still runs: processes stay in step
                batch = D.collate(exs, self.run.tokenizer.pad_token_id, max_len=tc.seq_len)
                n = int((batch["labels"][:, 1:] != D.IGNORE_INDEX).sum()) if idx else 0
                yield {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}, n

        stats = self.dist.all_reduce(evaluate(model, batches(), tc, self.device))
        loss = float(stats[0] / stats[1]) if float(stats[1]) > 0 else float("nan")
        self.rep.evaluated(step, loss)
        return loss

    def save_checkpoint(self, step: int, train_step: TrainStep) -> Path:
        tc, dist, state = self.tc, self.dist, {}
        if dist.main:
            self.rep.log.flush(fsync=True)  # the log holds every step the checkpoint has before the checkpoint exists
            seen = step * tc.batch_size * tc.grad_accum * dist.world
            epoch, index = self.run.order.position(seen)
            state = {"step": step, "total_steps": self.rep.total_steps, "micro_steps": step * tc.grad_accum,
                     "examples_seen": seen, "epoch": epoch, "index_in_epoch": index, "world_size": dist.world,
                     "train": tc.to_dict(), "schedule": self.schedule, "data_fingerprint": self.run.train_ds.fingerprint,
                     "data_examples": len(self.run.train_ds), "seed": self.schedule["seed"],
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        return checkpoint.save(self.run.out, step, state, train_step.model, train_step.optimizer, train_step.scheduler,
                               dist, keep=self.run.spec.keep_checkpoints)
