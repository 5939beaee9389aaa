"""`ftplan run`: the training loop that executes a plan, with checkpoints, resume, signals and the OOM fallback.

The step is `trainer.step.TrainStep`, the one `ftplan estimate --trace` and `ftplan calibrate` take, so what runs is
what the planner predicts and the calibration measures. Around it, this module runs the attempts of the fallback
chain: the data stream of `trainer.data` (the data position is a function of the optimizer step), a progress bar, the
per-step log, `checkpoint-<step>` folders every `save_steps` and on SIGINT/SIGTERM, and, when a step runs out of
memory, the next plan of the chain (same effective batch). The concerns live in their own modules:

    spec.py        RunSpec, the errors, the checks made before a model is loaded
    attempt.py     one plan of the chain: model, resume, the step loop, evaluation, checkpoints
    step.py        the training step and the evaluation pass
    fallback.py    the fallback chain, out-of-memory detection
    checkpoint.py  checkpoint folders (atomic), resume, RNG state
    dist.py        one process or several (accelerate)
    measure.py     prediction, device memory, step times, run/oom records
    report.py      messages, progress bar, trainer_log.jsonl, run_summary.json, loss curve
    supervise.py   signals, parent-death signals, the launcher child
    files.py       atomic writes, the output folder's lock

One process runs in-process (`run(spec)`); several are started by `trainer.launch` through `accelerate launch`,
each running `python -m trainer.loop --spec <output>/run_spec.json`.
"""

from __future__ import annotations

if __name__ == "__main__":  # one process of a launched run dies with its launcher (set before the slow imports)
    import os as _os

    if int(_os.environ.get("WORLD_SIZE", "1")) > 1:
        from trainer.supervise import die_with_parent

        die_with_parent()

import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from planner.config import TrainConfig  # noqa: E402
from planner.planfile import read_plan, write_plan  # noqa: E402

from . import checkpoint, files  # noqa: E402
from . import data as D  # noqa: E402
from .attempt import Attempt, make_scheduler  # noqa: E402,F401
from .checkpoint import (CHECKPOINT_RE, checkpoints, compatibility_problems, latest_checkpoint,  # noqa: E402,F401
                         rng_state, set_rng_state)
from .dist import Dist  # noqa: E402
from .fallback import MICRO_FIELDS, chain_for_checkpoint, fallback_chain, is_oom, micro  # noqa: E402,F401
from .measure import STEADY_SKIP, DeviceMemory, Recorder, peak_rss, predict  # noqa: E402,F401
from .report import Reporter, echo_to  # noqa: E402
from .spec import (LOG_NAME, RECORD_NAME, SPEC_NAME, SUMMARY_NAME, Interrupted, OutOfMemory,  # noqa: E402,F401
                   RunError, RunSpec, RunUsageError, check_device, load_tokenizer, prepare_data, resolve_device,
                   resolve_model_path)

# bitsandbytes (imported by peft) warns on every CPU start that an optional 4-bit CPU kernel package is missing;
# `ftplan run` never uses 4-bit on CPU (qlora needs CUDA), so the warning only confuses.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_echo_to = echo_to  # the name trainer.launch used


class Run:
    """One `ftplan run`: the attempts of the fallback chain, then the outputs."""

    def __init__(self, spec: RunSpec, prepared: tuple | None = None):
        self.spec = spec
        self.out = Path(spec.output_dir)
        try:
            self.pf = read_plan(spec.plan)
        except ValueError as e:
            raise RunUsageError(str(e), "PLAN") from None
        self.schedule = dataclasses.asdict(self.pf.schedule)
        device_name = resolve_device(spec.device)
        from planner.strategies.fsdp2 import mixed_precision_policy

        tc0 = spec.train_config()
        self.dist = Dist(device_name, tc0.strategy, fsdp_mixed_precision=mixed_precision_policy(tc0))
        self.device = self.dist.device(device_name)
        self.device_type = self.device.type
        self.tokenizer, self.train_ds, self.eval_ds = prepared or prepare_data(spec)
        self.order = D.ExampleOrder(len(self.train_ds), seed=self.schedule["seed"])
        self.memory = DeviceMemory(self.device)
        self.rep = Reporter(spec, self.pf, self.out, self.dist, self.device_type, self.train_ds, self.eval_ds)
        self.records = Recorder(spec, self.pf, self.out, self.memory, self.dist.world, self.train_ds)
        self.say = self.rep.say
        self.attempt: Attempt | None = None

    def run(self) -> dict:
        spec = self.spec
        chain = [spec.train_config()] + spec.fallback_configs()
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            checkpoint.remove_partial(self.out)  # what a save cut short by a kill left behind
            files.remove_temps(self.out)
        self.dist.barrier()
        resume_from = None
        if spec.resume:
            done = self._already_complete(chain[0])
            if done is not None:
                self.say(f"{self.out} already holds a completed run of {done['steps']} steps: nothing to do")
                return done
            resume_from = latest_checkpoint(self.out)
            if resume_from is None:
                self.say(f"--resume: no checkpoint in {self.out}; starting from step 0")
            else:
                chain = self._chain_for_checkpoint(resume_from, chain, keep=spec.resume_as_given)
        self.memory.start()
        i = 0
        while True:
            tc = chain[i]
            self.attempt = Attempt(self, tc, resume_from, i)
            try:
                model, measured, eval_loss, n_trainable = self.attempt()
            except RuntimeError as e:  # torch.OutOfMemoryError is one
                if not is_oom(e):
                    raise
                msg = str(e).split("\n")[0]
            else:
                self.rep.attempts.append({"config": tc.to_dict(), "describe": tc.describe(), "status": "ok"})
                return self._finish(tc, model, measured, eval_loss, n_trainable)
            resume_from = self._after_oom(chain, i, msg)
            i += 1

    def _after_oom(self, chain: list[TrainConfig], i: int, msg: str) -> Path | None:
        """Record the miss; raise OutOfMemory when no plan is left, else return the checkpoint the next one resumes."""
        tc, step, spec = chain[i], self.attempt.current_step, self.spec
        gc.collect()  # the attempt's model and optimizer went with its frames
        if self.memory.cuda:
            torch.cuda.empty_cache()
        miss = self.records.write_oom(tc, msg, step, self.rep.prediction)
        self.rep.attempts.append({"config": tc.to_dict(), "describe": tc.describe(), "status": "oom",
                                  "step": step, "error": msg, "record": miss})
        self.say(f"\nOUT OF MEMORY at optimizer step {step + 1} with {tc.describe()}: {msg}")
        if miss:
            self.say(f"  recorded the miss: {miss}")
        if not spec.fallback or i + 1 >= len(chain) or self.dist.world > 1:
            why = ("--no-fallback" if not spec.fallback else
                   "the fallback of a multi-process run is a relaunch" if self.dist.world > 1 else
                   "no smaller plan with the same effective batch is left")
            summary = self.rep.summary("oom", tc, error=msg)
            self.rep.write_summary(summary, any_rank=True)  # the launcher reads it to relaunch with the next plan
            raise OutOfMemory(f"out of memory with {tc.describe()} ({why}). {msg}")
        nxt = chain[i + 1]
        resume_from = latest_checkpoint(self.out)
        if resume_from is not None:
            saved = json.loads((resume_from / "state.json").read_text())
            if saved["train"]["optimizer"] != nxt.optimizer:
                self.say(f"  the next plan uses {nxt.optimizer}: starting again from step 0")
                checkpoint.remove_all(self.out)
                resume_from = None
        eff = nxt.batch_size * nxt.grad_accum * nxt.num_gpus
        where = f"from {resume_from.name}" if resume_from else "from step 0"
        self.say(f"  retrying {where} with the next plan: {nxt.describe()} (same effective batch {eff})\n")
        return resume_from

    def total_steps(self, tc: TrainConfig) -> int:
        per_step = tc.batch_size * tc.grad_accum * self.dist.world
        return D.steps_for(len(self.train_ds), epochs=self.schedule["epochs"], max_steps=self.schedule["max_steps"],
                           per_step=per_step)

    def _already_complete(self, tc: TrainConfig) -> dict | None:
        path = self.out / SUMMARY_NAME
        if not path.exists():
            return None
        try:
            s = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        same = (s.get("status") == "completed" and s.get("steps") == self.total_steps(tc)
                and (s.get("data") or {}).get("fingerprint") == self.train_ds.fingerprint)
        return s if same else None

    def _chain_for_checkpoint(self, ckpt: Path, chain: list[TrainConfig], keep: bool = False) -> list[TrainConfig]:
        saved = json.loads((ckpt / "state.json").read_text())
        problems = compatibility_problems(saved, chain[0], self.schedule, self.dist.world)
        if saved.get("data_fingerprint") != self.train_ds.fingerprint:
            problems.append("the training data changed since the checkpoint (different tokens or order)")
        if problems:
            raise RunUsageError(f"{ckpt} cannot continue this run: " + "; ".join(problems)
                                + ". Resume with the settings it was started with, or use a new --output-dir.")
        used = TrainConfig.from_dict(saved["train"])
        if keep or micro(used) == micro(chain[0]):
            return chain
        # the checkpoint was written by a fallback plan (or the micro-batch flags changed): go on with its settings
        self.say(f"resuming with the checkpoint's micro-batch settings: {used.describe()}")
        return chain_for_checkpoint(used, chain)

    # -- outputs -------------------------------------------------------------------------------------------------------

    def _finish(self, tc: TrainConfig, model, measured: dict, eval_loss, n_trainable: int) -> dict:
        """Save the model, tokenizer, plan and loss curve (into a temp folder, then each file renamed into the output
        folder), the run record, and last the summary: a run is complete when run_summary.json says so."""
        dist, out = self.dist, self.out
        state_dict = dist.full_state_dict(model)
        outputs = {}
        if dist.main:
            tmp = files.temp_dir_for(out / ".final")  # .final.tmp-<pid>: its files are renamed into place
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            dist.unwrap(model).save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
            self.tokenizer.save_pretrained(tmp)
            pf = dataclasses.replace(self.pf, train=tc, model_path=self.spec.model_path, created="",
                                     command=self.spec.command,
                                     prediction={k: v for k, v in self.rep.prediction.items() if v is not None})
            write_plan(pf, tmp / "plan.toml")
            png = self.rep.loss_png(tc, tmp)
            files.publish_files(tmp, out)
            outputs = {"adapter" if tc.is_peft else "model": str(out), "tokenizer": str(out),
                       "plan": str(out / "plan.toml"), "log": str(out / LOG_NAME)}
            if png:
                outputs["loss_curve"] = str(out / png.name)
        summary = self.rep.summary("completed", tc, measured=measured, eval_loss=eval_loss)
        summary["trainable_params"] = n_trainable
        if dist.main:
            summary["record"] = self.records.write_run(tc, measured, self.rep.prediction)
            summary["outputs"] = outputs
            self.rep.write_summary(summary)
            self.rep.report(summary)
        dist.barrier()
        return summary


def run(spec: RunSpec, prepared: tuple | None = None) -> dict:
    """Train as `spec` says; returns the summary (also in `<output>/run_summary.json`). Raises RunUsageError,
    OutOfMemory, Interrupted or RunError. One process holds the output folder's lock for the run (re-entrant: the CLI
    already holds it); the processes of a launched run run under their launcher's."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return Run(spec, prepared).run()
    try:
        lock = files.OutputLock(spec.output_dir).acquire()
    except files.LockedError as e:
        raise RunUsageError(str(e), "--output-dir") from None
    try:
        return Run(spec, prepared).run()
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.loop --spec <output>/run_spec.json`: one process of a launched run."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m trainer.loop", description=main.__doc__)
    ap.add_argument("--spec", required=True, help="run_spec.json written by `ftplan run`")
    args = ap.parse_args(argv)
    spec = RunSpec.from_json(Path(args.spec).read_text())
    try:
        run(spec)
    except Interrupted as e:
        print(f"ftplan run: {e}", file=sys.stderr)
        return 128 + e.signum
    except OutOfMemory as e:
        print(f"ftplan run: {e}", file=sys.stderr)
        _report_failure(spec, e)
        return 3
    except RunError as e:
        print(f"ftplan run: {e}", file=sys.stderr)
        _report_failure(spec, e)
        return 2 if isinstance(e, RunUsageError) else 1
    except BaseException as e:  # noqa: BLE001 - any crash: say which process, then let it propagate
        _report_failure(spec, e)
        raise
    return 0


FAILURE_PREFIX = "failed-rank"


def _report_failure(spec: RunSpec, e: BaseException) -> None:
    """`<output>/failed-rank<R>.json`: which process of a launched run failed and why (the launcher reads them)."""
    import platform

    rank = int(os.environ.get("RANK", "0"))
    try:
        files.write_json(Path(spec.output_dir) / f"{FAILURE_PREFIX}{rank}.json",
                         {"rank": rank, "host": platform.node(), "error": f"{type(e).__name__}: {e}".split("\n")[0]})
    except OSError:
        pass


def failures(out: Path, since: float) -> list[dict]:
    """The failure reports that processes wrote since `since` (a time.time()), by rank."""
    found = []
    for p in sorted(Path(out).glob(f"{FAILURE_PREFIX}*.json")):
        try:
            if p.stat().st_mtime >= since - 1:
                found.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda d: d.get("rank", 0))


if __name__ == "__main__":
    sys.exit(main())
