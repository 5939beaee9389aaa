"""What a run tells the user and leaves in its folder besides the model: messages, the progress bar, the per-step
log (`trainer_log.jsonl`), `run_summary.json`, the loss curve and the final predicted-vs-measured table."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from planner.config import TrainConfig

from . import files
from .spec import LOG_NAME, SUMMARY_NAME


def echo_to(quiet: bool):
    def echo(msg: str = "") -> None:
        print(msg, file=sys.stderr if quiet else sys.stdout, flush=True)

    return echo


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


class StepLog:
    """trainer_log.jsonl: one line per optimizer step, buffered and flushed at logging/checkpoint intervals."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.buf: list[str] = []

    def truncate_after(self, step: int) -> list[dict]:
        """Keep the steps <= `step` (a resume redoes the rest); returns them."""
        self.flush()
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by a kill
                if rec.get("step", 0) <= step:
                    kept.append(rec)
        if self.enabled:
            files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def add(self, rec: dict) -> None:
        if self.enabled:
            self.buf.append(json.dumps(rec) + "\n")

    def flush(self, fsync: bool = False) -> None:
        """Append the buffered lines; `fsync` before a checkpoint is published (the log then holds its steps)."""
        if self.enabled and self.buf:
            with open(self.path, "a") as f:
                f.write("".join(self.buf))
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            self.buf.clear()


class Reporter:
    """The run's history (steps, evaluations, attempts) and everything written from it."""

    def __init__(self, spec, pf, out: Path, dist, device_type: str, train_ds, eval_ds):
        self.spec, self.pf, self.out, self.dist = spec, pf, out, dist
        self.device_type, self.train_ds, self.eval_ds = device_type, train_ds, eval_ds
        self.echo = echo_to(spec.quiet)
        self.log = StepLog(out / LOG_NAME, dist.main)
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self.attempts: list[dict] = []
        self.total_steps: int | None = None
        self.prediction: dict = {}
        self.t_start = time.time()

    def say(self, msg: str = "") -> None:
        if self.dist.main:
            self.echo(msg)

    # -- during the run ------------------------------------------------------------------------------------------

    def restart(self, start: int) -> None:
        """An attempt starts at optimizer step `start`: the log keeps the steps before it (history restored)."""
        if start:
            kept = self.log.truncate_after(start)
            self.history = [r for r in kept if "loss" in r]
            self.eval_history = [r for r in kept if "eval_loss" in r]
        else:
            self.history, self.eval_history = [], []
            if self.dist.main:
                self.log.truncate_after(0)

    def step(self, rec: dict) -> None:
        self.history.append(rec)
        self.log.add(rec)

    def evaluated(self, step: int, loss: float) -> None:
        rec = {"step": step, "eval_loss": round(loss, 6)}
        self.eval_history.append(rec)
        self.log.add(rec)
        self.log.flush()
        self.say(f"eval   step {step}: loss {loss:.4f} (perplexity {math.exp(min(loss, 50)):.2f})")

    def announce(self, tc: TrainConfig, total: int, attempt: int) -> None:
        ds, prediction = self.train_ds, self.prediction
        if attempt == 0:
            s = ds.summary()
            self.say(f"data   {s['path']}: {s['records']} records, {ds.format} format, {s['examples']} "
                     f"{'packed blocks' if ds.packed else 'examples'}, {s['tokens']:,} tokens "
                     f"({s['trained_tokens']:,} trained, mean {s['mean_tokens']:.0f}/seq)"
                     + (f"; {ds.truncated} truncated to {tc.seq_len} tokens" if ds.truncated else "")
                     + (f"; {ds.dropped} dropped (no response token left)" if ds.dropped else ""))
            for n in ds.notes:
                self.say(f"       note: {n}")
        where = self.device_type + (f" x {self.dist.world} processes ({self.dist.kind})" if self.dist.world > 1 else "")
        self.say(f"plan   {tc.describe()} on {where}; {total} optimizer steps of "
                 f"{tc.batch_size * tc.grad_accum * self.dist.world} sequences")
        if prediction:
            gname = prediction.get("gpu")
            line = (f"predicted peak {gib(prediction['peak_allocated_bytes'])} allocated, "
                    f"{gib(prediction['peak_reserved_bytes'])} reserved, {gib(prediction['device_bytes'])} on the device")
            if gname:
                line += f" ({gname}: {gib(prediction.get('gpu_memory_bytes'))})"
            if self.device_type != "cuda":
                line += "; a CPU run measures no GPU memory"
            self.say(line)
        else:
            self.say("predicted peak: not available (the planner cannot model this model's config.json)")

    def progress(self, total: int, start: int):
        if not self.dist.main or not self.spec.progress:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
                    mininterval=0.5)

    # -- the summary -----------------------------------------------------------------------------------------------

    def summary(self, status: str, tc: TrainConfig, *, measured: dict | None = None, eval_loss=None,
                error: str | None = None) -> dict:
        losses = [r["loss"] for r in self.history]
        w = max(1, min(5, len(losses) // 4 or 1))
        return {
            "status": status,
            "output_dir": str(self.out),
            "model": self.pf.model,
            "model_path": self.spec.model_path,
            "method": tc.method_name,
            "config": tc.to_dict(),
            "describe": tc.describe(),
            "device": self.device_type,
            "processes": self.dist.world,
            "steps": self.total_steps,
            "optimizer_steps": self.history[-1]["step"] if self.history else 0,
            "train_loss_first": round(statistics.fmean(losses[:w]), 6) if losses else None,
            "train_loss_last": round(statistics.fmean(losses[-w:]), 6) if losses else None,
            "eval_loss": None if eval_loss is None else round(eval_loss, 6),
            "eval_perplexity": None if eval_loss is None else round(math.exp(min(eval_loss, 50)), 4),
            "tokens_per_s": (measured or {}).get("tokens_per_s"),
            "step_seconds_median": round(statistics.median(measured["step_seconds"]), 6)
            if measured and measured.get("step_seconds") else None,
            "data": self.train_ds.summary(),
            "eval_data": self.eval_ds.summary() if self.eval_ds is not None else None,
            "prediction": self.prediction,
            "measured": measured or {},
            "attempts": self.attempts,
            "fallback_used": any(a["status"] == "oom" for a in self.attempts),
            "error": error,
            "seconds": round(time.time() - self.t_start, 2),
        }

    def write_summary(self, summary: dict, any_rank: bool = False) -> None:
        if self.dist.main or any_rank:
            self.out.mkdir(parents=True, exist_ok=True)
            files.write_json(self.out / SUMMARY_NAME, summary)

    # -- the end -----------------------------------------------------------------------------------------------------

    def loss_png(self, tc: TrainConfig, folder: Path) -> Path | None:
        """The loss curve, saved into `folder` (the caller publishes it)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.say("matplotlib is not installed: no loss curve (pip install 'ftplan[report]')")
            return None
        steps = [r["step"] for r in self.history]
        losses = [r["loss"] for r in self.history]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        ax.plot(steps, losses, lw=1, alpha=0.5, label="train loss")
        k = max(1, len(losses) // 20)
        if k > 1:
            smooth = [statistics.fmean(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, lw=2, label=f"train loss ({k}-step mean)")
        if self.eval_history:
            ax.plot([r["step"] for r in self.eval_history], [r["eval_loss"] for r in self.eval_history], "o-",
                    label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(f"{Path(self.spec.model_path).name}: {tc.describe()}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = folder / "loss.png"
        fig.savefig(path)
        plt.close(fig)
        return path

    def report(self, s: dict) -> None:
        m, p = s["measured"], s["prediction"] or {}
        self.say("")
        loss = (f"; loss {s['train_loss_first']:.4f} -> {s['train_loss_last']:.4f}"
                if s["train_loss_first"] is not None else "")
        self.say(f"done   {s['optimizer_steps']} steps in {s['seconds']:.0f} s{loss}"
                 + (f"; eval loss {s['eval_loss']:.4f}" if s["eval_loss"] is not None else ""))
        rows = []
        if m.get("device") == "cuda":
            for label, pk, mk in (("peak allocated", "peak_allocated_bytes", "peak_allocated_bytes"),
                                  ("peak reserved", "peak_reserved_bytes", "peak_reserved_bytes"),
                                  ("device (NVML)", "device_bytes", "nvml_peak_used_bytes")):
                rows.append((label, p.get(pk), m.get(mk), True))
        cpu = m.get("device") == "cpu"
        rows.append(("tokens/s", None if cpu else p.get("tokens_per_s"), m.get("tokens_per_s"), False))
        self.say(f"{'':16}{'predicted':>14}{'measured':>14}")
        for label, pv, mv, is_bytes in rows:
            fmt = gib if is_bytes else (lambda v: "-" if v is None else f"{v:,.0f}")
            diff = f"  ({(pv - mv) / mv * 100:+.1f}%)" if pv and mv else ""
            self.say(f"{label:16}{fmt(pv):>14}{fmt(mv):>14}{diff}")
        if cpu:
            self.say(f"(CPU run: nothing to compare with the {p.get('gpu') or 'GPU'} prediction; process peak RSS "
                     f"{gib(m.get('process_peak_rss_bytes'))})")
        self.say(f"output {self.out}  (record: {s['record']['run']})")
