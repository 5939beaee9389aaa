"""`ftplan run`: the training loop that executes a plan, with checkpoints, resume, signals and the OOM fallback.

The step is the reference recipe's (`trainer.recipe`), so what runs is what `ftplan estimate` predicts and
`ftplan calibrate` measures:

    outputs = recipe.forward(model, batch, tc, device_type)      # the previous outputs live until this returns
    (outputs.loss / grad_accum).backward()
    ... grad_accum micro-steps ...
    recipe.optimizer_step(params, optimizer, max_grad_norm, scheduler)

Around it: the data stream of `trainer.data` (the data position is a function of the optimizer step), a tqdm
progress bar (loss, tokens/s, ETA), a per-step log (`trainer_log.jsonl`: loss, lr, grad norm, tokens, seconds and
the example indices each step saw), `checkpoint-<step>` folders written atomically every `save_steps` and on
SIGINT/SIGTERM, and, when a step runs out of memory, the next plan of the fallback chain (same effective batch).

One process runs in-process (`run(spec)`); several are started by `trainer.launch` through `accelerate launch`,
each running `python -m trainer.loop --spec <output>/run_spec.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from planner.config import TrainConfig
from planner.planfile import PlanFile, read_plan, write_plan

from . import data as D
from . import recipe

# bitsandbytes (imported by peft) warns on every CPU start that an optional 4-bit CPU kernel package is missing;
# `ftplan run` never uses 4-bit on CPU (qlora needs CUDA), so the warning only confuses.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LOG_NAME = "trainer_log.jsonl"
SUMMARY_NAME = "run_summary.json"
SPEC_NAME = "run_spec.json"
RECORD_NAME = "run_record.json"
MICRO_FIELDS = ("batch_size", "grad_accum", "grad_ckpt", "optimizer")  # what a fallback plan may change
STEADY_SKIP = 2  # first optimizer steps of an attempt left out of the steady-state step time


class RunError(Exception):
    """A run that cannot go on; the message says why in plain words (the CLI exits 1)."""


class RunUsageError(RunError):
    """A user error found while preparing the run (a bad path, an incompatible checkpoint): the CLI exits 2."""

    def __init__(self, message: str, param_hint: str | None = None):
        super().__init__(message)
        self.param_hint = param_hint


class OutOfMemory(RunError):
    """Every plan of the chain ran out of memory (or fallback was off)."""


class Interrupted(RunError):
    """Stopped by SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, message: str, signum: int, summary: dict):
        super().__init__(message)
        self.signum = signum
        self.summary = summary


@dataclass
class RunSpec:
    """Everything a run needs, resolved by the CLI (JSON-serializable: the launcher passes it to each process).

    `train` is the TrainConfig to run (the plan's, with the command-line overrides); `fallbacks` the next ones
    in recommendation order, each with the same effective batch."""

    plan: str
    data: str
    output_dir: str
    model_path: str
    train: dict
    fallbacks: list = field(default_factory=list)
    eval_data: str | None = None
    tokenizer: str = ""
    data_format: str = "auto"
    train_on_inputs: bool = False
    packing: bool = False
    device: str = "auto"
    resume: bool = False
    fallback: bool = True
    record: bool = True
    keep_checkpoints: int = 2
    eval_steps: int = 0
    quiet: bool = False
    progress: bool = True
    command: str = ""
    resume_as_given: bool = False  # a fallback relaunch: run `train` even where the checkpoint's micro-batch differs

    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.train)

    def fallback_configs(self) -> list[TrainConfig]:
        return [TrainConfig.from_dict(d) for d in self.fallbacks]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        return cls(**json.loads(text))


# -- resolving the model, the device and the fallback chain ---------------------------------------------------------


def resolve_model_path(pf: PlanFile, override: str = "", plan_dir: str | Path | None = None) -> str:
    """The local folder with the base model's weights: `override`, the plan's `[model] path`, the plan's `ref` when
    it is a folder (or a config.json inside one), else the Hugging Face id of `ref` looked up in the local cache
    (no network). Relative paths are tried from the working directory, then from the plan's folder."""

    def local(p: str) -> Path | None:
        for base in (Path.cwd(), Path(plan_dir) if plan_dir else None):
            if base is None:
                continue
            q = (base / p).expanduser()
            if q.exists():
                q = q.parent if q.is_file() else q
                return q.resolve()
        return None

    if override:
        q = local(override)
        if q is None:
            raise RunUsageError(f"no such folder: {override}", "--model-path")
        return _with_weights(q, "--model-path")
    if pf.model_path:
        q = local(pf.model_path)
        if q is None:
            raise RunUsageError(f"the plan's [model] path {pf.model_path!r} does not exist (edit the plan or pass "
                                "--model-path)", "--model-path")
        return _with_weights(q, "[model] path")
    q = local(pf.model)  # a folder (or config.json) wins over a catalog name, as in `ftplan recommend --model`
    if q is not None:
        return _with_weights(q, "[model] ref")
    repo_id = pf.model
    try:
        from planner.profiles import ProfileError, resolve_model

        arch, _ = resolve_model(pf.model)
        repo_id = arch.hf_id or pf.model
    except (ProfileError, ValueError):
        pass
    if repo_id.count("/") != 1:
        raise RunUsageError(f"cannot find weights for model {pf.model!r}: not a local folder and no Hugging Face id "
                            "(set [model] path in the plan or pass --model-path)", "--model-path")
    from huggingface_hub import constants, snapshot_download

    try:
        path = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError and friends: not in the cache
        raise RunUsageError(f"{repo_id} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); ftplan "
                            f"does not download: run `hf download {repo_id}` first, or pass --model-path",
                            "--model-path") from None
    return _with_weights(Path(path), "[model] ref")


def _with_weights(folder: Path, hint: str) -> str:
    if not (folder / "config.json").exists():
        raise RunUsageError(f"{folder} has no config.json (a model folder from save_pretrained is needed)", hint)
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise RunUsageError(f"{folder} has a config.json but no weights (*.safetensors / *.bin); `ftplan run` "
                            "trains real weights: point [model] path or --model-path at the downloaded model", hint)
    return str(folder)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RunUsageError("--device cuda: no CUDA device is available (valid here: cpu)", "--device")
    return device


def check_device(tc: TrainConfig, device: str) -> None:
    """What needs CUDA (bitsandbytes) or a launcher that CPU lacks: usage errors naming the option."""
    if device == "cuda":
        return
    if tc.method == "qlora":
        raise RunUsageError("qlora needs CUDA (bitsandbytes 4-bit); on CPU valid methods are full, lora, prefix, "
                            "prompt, ia3", "--method")
    if tc.optimizer in ("adamw8bit", "paged_adamw8bit"):
        raise RunUsageError(f"optimizer {tc.optimizer} needs CUDA (bitsandbytes); on CPU valid optimizers are "
                            "adamw, sgd, adafactor", "--optimizer")
    if tc.num_gpus > 1 and (tc.strategy != "ddp" or tc.cpu_offload):
        raise RunUsageError(f"strategy {tc.strategy} needs GPUs; several CPU processes run DDP only (valid on CPU: "
                            "ddp)", "--strategy")


def fallback_chain(tc: TrainConfig, fallbacks: list[dict]) -> list[TrainConfig]:
    """The plan's `[[fallback]]` tables applied to `tc`, keeping those that are valid, new, and keep the effective
    batch (an override of --batch-size/--grad-accum can break that). When none is left, halve the micro-batch
    (doubling accumulation) down to 1, with gradient checkpointing on where the method allows it."""
    eff = tc.batch_size * tc.grad_accum

    def keep(candidates):
        out, seen = [], {_micro(tc)}
        for c in candidates:
            if c.batch_size * c.grad_accum == eff and _micro(c) not in seen:
                seen.add(_micro(c))
                out.append(c)
        return out

    planned = []
    for fb in fallbacks:
        try:
            planned.append(tc.replace(**{k: v for k, v in fb.items() if k in MICRO_FIELDS}))
        except (ValueError, TypeError):
            continue
    chain = keep(planned)
    if chain:
        return chain
    ckpt = tc.method != "prefix"  # peft refuses checkpointing with prefix tuning
    synth = [tc.replace(grad_ckpt=True)] if ckpt and not tc.grad_ckpt else []
    b = tc.batch_size
    while b > 1:
        b //= 2
        if eff % b == 0:
            synth.append(tc.replace(batch_size=b, grad_accum=eff // b, grad_ckpt=ckpt or tc.grad_ckpt))
    return keep(synth)


OOM_MESSAGES = ("out of memory", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED")


def is_oom(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, and the allocation failures that surface as plain RuntimeErrors (CPU allocator,
    cuBLAS workspace)."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in OOM_MESSAGES))


def _micro(tc: TrainConfig) -> tuple:
    return tuple(getattr(tc, k) for k in MICRO_FIELDS)


# -- checkpoints ---------------------------------------------------------------------------------------------------


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


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


# -- the run ---------------------------------------------------------------------------------------------------------


class _Dist:
    """One process, or one of several started by `accelerate launch` (then an `Accelerator` prepares the model and
    the optimizer: DDP, FSDP or DeepSpeed from the launcher's config)."""

    def __init__(self, device: str):
        self.acc = None
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            self.acc = Accelerator(cpu=device == "cpu")
            self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.kind = "single" if self.acc is None else str(self.acc.distributed_type).split(".")[-1].lower()
        self.deepspeed = self.kind == "deepspeed"
        self.fsdp = self.kind == "fsdp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> torch.device:
        if self.acc is not None:
            return self.acc.device
        return torch.device(device)

    def barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.acc is None:
            return t
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t

    def unwrap(self, model):
        return self.acc.unwrap_model(model) if self.acc is not None else model

    def no_sync(self, model, sync: bool):
        if self.acc is None or sync or self.deepspeed:
            return contextlib.nullcontext()
        return self.acc.no_sync(model)


class _Log:
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
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        return kept

    def add(self, rec: dict) -> None:
        if self.enabled:
            self.buf.append(json.dumps(rec) + "\n")

    def flush(self) -> None:
        if self.enabled and self.buf:
            with open(self.path, "a") as f:
                f.write("".join(self.buf))
            self.buf.clear()


class _Signals:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the current optimizer step and stops. A second
    signal stops at once (the default behaviour)."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _echo_to(quiet: bool):
    def echo(msg: str = "") -> None:
        print(msg, file=sys.stderr if quiet else sys.stdout, flush=True)

    return echo


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def prepare_data(spec: RunSpec, tokenizer=None) -> tuple:
    """(tokenizer, train Dataset, eval Dataset or None): everything checked before a model is loaded."""
    if tokenizer is None:
        tokenizer = load_tokenizer(spec.tokenizer or spec.model_path)
    tc = spec.train_config()
    train = D.load_dataset(spec.data, tokenizer, tc.seq_len, fmt=spec.data_format,
                           train_on_inputs=spec.train_on_inputs, packing=spec.packing)
    ev = None
    if spec.eval_data:
        ev = D.load_dataset(spec.eval_data, tokenizer, tc.seq_len, fmt=spec.data_format,
                            train_on_inputs=spec.train_on_inputs, packing=False)
    return tokenizer, train, ev


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RunUsageError(f"cannot load a tokenizer from {path}: {e}".split("\n")[0], "--tokenizer") from None
    if tok.pad_token_id is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            raise RunUsageError(f"the tokenizer at {path} has neither a pad nor an EOS token", "--tokenizer")
    return tok


def predict(model_path: str, tc: TrainConfig, gpu_name: str | None) -> tuple[dict, object]:
    """(prediction dict, GPUProfile or None) from the planner for the model's config.json; {} where the planner
    cannot model it."""
    from planner.arch import arch_from_config
    from planner.plan import make_plan
    from planner.profiles import ProfileError, load_gpu

    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
        arch = arch_from_config(config, name=Path(model_path).name)
    except (ValueError, OSError):
        return {}, None
    gpu = None
    if gpu_name:
        try:
            gpu = load_gpu(gpu_name)
        except ProfileError:
            gpu = None
    p = make_plan(arch, tc, gpu).to_dict()
    out = {k: p.get(k) for k in ("peak_allocated_bytes", "peak_reserved_bytes", "device_bytes", "tokens_per_s")}
    out["gpu"] = gpu.name if gpu else None
    out["gpu_memory_bytes"] = gpu.memory_bytes if gpu else None
    try:
        from importlib.metadata import version

        out["planner_version"] = version("ftplan")
    except Exception:
        out["planner_version"] = None
    return out, gpu


def make_scheduler(optimizer, schedule: dict, total_steps: int):
    from transformers import get_scheduler

    warmup = math.ceil(schedule["warmup_ratio"] * total_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[schedule["lr_scheduler"]]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class Run:
    """One `ftplan run`: the attempts of the fallback chain, then the outputs."""

    def __init__(self, spec: RunSpec, prepared: tuple | None = None):
        self.spec = spec
        self.out = Path(spec.output_dir)
        self.echo = _echo_to(spec.quiet)
        self.pf = read_plan(spec.plan)
        self.schedule = dataclasses.asdict(self.pf.schedule)
        self.device_name = resolve_device(spec.device)
        self.dist = _Dist(self.device_name)
        self.device = self.dist.device(self.device_name)
        self.device_type = self.device.type
        self.cuda = self.device_type == "cuda"
        self.tokenizer, self.train_ds, self.eval_ds = prepared or prepare_data(spec)
        self.order = D.ExampleOrder(len(self.train_ds), seed=self.schedule["seed"])
        self.attempts: list[dict] = []
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self.t_start = time.time()
        self.log = _Log(self.out / LOG_NAME, self.dist.main)
        self.nvml = None
        self.nvml_baseline = None
        self.cuda_context_bytes = None
        self.model_config = json.loads((Path(spec.model_path) / "config.json").read_text())

    def say(self, msg: str = "") -> None:
        if self.dist.main:
            self.echo(msg)

    # -- top level -----------------------------------------------------------------------------------------------

    def run(self) -> dict:
        spec = self.spec
        chain = [spec.train_config()] + spec.fallback_configs()
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            for p in self.out.glob(".tmp-checkpoint-*"):
                shutil.rmtree(p, ignore_errors=True)  # a save cut short by a kill
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
        self._start_memory()
        i = 0
        while True:
            tc = chain[i]
            try:
                return self._attempt(tc, resume_from, attempt=i)
            except RuntimeError as e:  # torch.OutOfMemoryError is one
                if not is_oom(e):
                    raise
                msg = str(e).split("\n")[0]
            step = self._current_step
            self._free()
            miss = self._record_oom(tc, msg, step)
            self.attempts.append({"config": tc.to_dict(), "describe": tc.describe(), "status": "oom",
                                  "step": step, "error": msg, "record": miss})
            self.say(f"\nOUT OF MEMORY at optimizer step {step + 1} with {tc.describe()}: {msg}")
            if miss:
                self.say(f"  recorded the miss: {miss}")
            if not spec.fallback or i + 1 >= len(chain) or self.dist.world > 1:
                why = ("--no-fallback" if not spec.fallback else
                       "the fallback of a multi-process run is a relaunch" if self.dist.world > 1 else
                       "no smaller plan with the same effective batch is left")
                summary = self._summary("oom", tc, error=msg)
                self._write_summary(summary, any_rank=True)  # the launcher reads it to relaunch with the next plan
                raise OutOfMemory(f"out of memory with {tc.describe()} ({why}). {msg}")
            nxt = chain[i + 1]
            resume_from = latest_checkpoint(self.out)
            if resume_from is not None:
                saved = json.loads((resume_from / "state.json").read_text())
                if saved["train"]["optimizer"] != nxt.optimizer:
                    self.say(f"  the next plan uses {nxt.optimizer}: starting again from step 0")
                    for _, p in checkpoints(self.out):
                        shutil.rmtree(p, ignore_errors=True)
                    resume_from = None
            eff = nxt.batch_size * nxt.grad_accum * nxt.num_gpus
            where = f"from {resume_from.name}" if resume_from else "from step 0"
            self.say(f"  retrying {where} with the next plan: {nxt.describe()} (same effective batch {eff})\n")
            i += 1

    def _already_complete(self, tc: TrainConfig) -> dict | None:
        path = self.out / SUMMARY_NAME
        if not path.exists():
            return None
        try:
            s = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        per_step = tc.batch_size * tc.grad_accum * self.dist.world
        total = D.steps_for(len(self.train_ds), epochs=self.schedule["epochs"], max_steps=self.schedule["max_steps"],
                            per_step=per_step)
        same = (s.get("status") == "completed" and s.get("steps") == total
                and (s.get("data") or {}).get("fingerprint") == self.train_ds.fingerprint)
        return s if same else None

    def _chain_for_checkpoint(self, ckpt: Path, chain: list[TrainConfig], keep: bool = False) -> list[TrainConfig]:
        saved = json.loads((ckpt / "state.json").read_text())
        tc = chain[0]
        problems = compatibility_problems(saved, tc, self.schedule, self.dist.world)
        if saved.get("data_fingerprint") != self.train_ds.fingerprint:
            problems.append("the training data changed since the checkpoint (different tokens or order)")
        if problems:
            raise RunUsageError(f"{ckpt} cannot continue this run: " + "; ".join(problems)
                                + ". Resume with the settings it was started with, or use a new --output-dir.")
        used = TrainConfig.from_dict(saved["train"])
        if keep or _micro(used) == _micro(tc):
            return chain
        # the checkpoint was written by a fallback plan (or the micro-batch flags changed): go on with its settings
        self.say(f"resuming with the checkpoint's micro-batch settings: {used.describe()}")
        for i, c in enumerate(chain):
            if _micro(c) == _micro(used):
                return chain[i:]
        tc = tc.replace(**{k: getattr(used, k) for k in MICRO_FIELDS})
        return [tc] + [c for c in chain[1:] if _micro(c) != _micro(tc)]

    # -- memory ---------------------------------------------------------------------------------------------------

    def _start_memory(self) -> None:
        """CUDA context size: NVML's used bytes before and after CUDA starts, less what torch reserved."""
        if not self.cuda:
            return
        from calibrate.nvml import NvmlSampler

        probe = NvmlSampler(self.device.index or 0)
        baseline = probe.used_now() if probe.available else None
        self.nvml_baseline = baseline  # what others hold on this GPU before this process starts CUDA
        torch.cuda.init()
        torch.empty(1, device=self.device)
        if baseline is not None:
            self.cuda_context_bytes = max(0, probe.used_now() - baseline - torch.cuda.memory_reserved(self.device))

    def _start_nvml(self) -> None:
        """A fresh NVML sampler per attempt (an attempt that ran out of memory does not count in the next one)."""
        if not self.cuda:
            return
        from calibrate.nvml import NvmlSampler

        if self.nvml is not None:
            self.nvml.stop()
        self.nvml = NvmlSampler(self.device.index or 0, interval_s=0.01).start()

    def _stop_nvml(self) -> int | None:
        """Peak NVML bytes this process held during the attempt (CUDA context included): the device's peak `used`
        less what was used before this process started CUDA."""
        if self.nvml is None or not self.nvml.available:
            return None
        self.nvml.stop()
        if self.nvml.peak_used_bytes is None:
            return None
        return max(0, self.nvml.peak_used_bytes - (self.nvml_baseline or 0))

    def _free(self) -> None:
        self._model = self._optimizer = self._scheduler = None
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def _measured(self, step_seconds: list[float], tokens: list[int]) -> dict:
        steady = list(zip(step_seconds, tokens))[STEADY_SKIP:] or list(zip(step_seconds, tokens))
        secs = [s for s, _ in steady]
        m = {
            "device": "cuda" if self.cuda else "cpu",
            "step_seconds": [round(s, 6) for s in secs[:1000]],
            "tokens_per_s": round(sum(t for _, t in steady) / sum(secs), 1) if secs and sum(secs) > 0 else None,
            "steps": len(step_seconds),
            "warmup_steps": min(STEADY_SKIP, max(0, len(step_seconds) - 1)),
            "process_peak_rss_bytes": _peak_rss(),
        }
        if self.cuda:
            m["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            m["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(self.device))
            m["cuda_context_bytes"] = self.cuda_context_bytes
            m["nvml_peak_used_bytes"] = self._stop_nvml()
        return m

    # -- one attempt ------------------------------------------------------------------------------------------------

    _current_step = 0
    _model = _optimizer = _scheduler = None

    def _attempt(self, tc: TrainConfig, resume_from: Path | None, attempt: int) -> dict:
        spec, dist = self.spec, self.dist
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_nvml()
        world = dist.world
        per_step = tc.batch_size * tc.grad_accum * world
        total = D.steps_for(len(self.train_ds), epochs=self.schedule["epochs"], max_steps=self.schedule["max_steps"],
                            per_step=per_step)
        self.total_steps = total
        prediction, gpu = predict(spec.model_path, tc, self._gpu_name())
        self.prediction = prediction
        self._announce(tc, prediction, gpu, total, attempt)

        torch.manual_seed(self.schedule["seed"])
        random.seed(self.schedule["seed"])
        model = recipe.build_model(None, tc, path=spec.model_path, device=str(self.device))
        model = recipe.apply_method(model, tc)
        self._model = model
        params = recipe.trainable_parameters(model)
        optimizer = recipe.make_optimizer(params, tc, lr=self.schedule["learning_rate"])
        scheduler = make_scheduler(optimizer, self.schedule, total)
        if dist.acc is not None:
            model, optimizer = dist.acc.prepare(model, optimizer)
            params = [p for p in model.parameters() if p.requires_grad]
        self._model, self._optimizer, self._scheduler = model, optimizer, scheduler
        n_trainable = sum(p.numel() for p in params)

        start = 0
        if resume_from is not None:
            start = self._load_checkpoint(resume_from, model, optimizer, scheduler)
            kept = self.log.truncate_after(start)
            self.history = [r for r in kept if "loss" in r]
            self.eval_history = [r for r in kept if "eval_loss" in r]
            self.say(f"resumed from {resume_from.name}: step {start} of {total}")
        else:
            self.history, self.eval_history = [], []
            if dist.main:
                self.log.truncate_after(0)
        self._current_step = start
        self.say(f"trainable parameters: {n_trainable:,}")

        step_seconds, step_tokens = [], []
        stopped = None
        pad_id = self.tokenizer.pad_token_id
        ga = tc.grad_accum
        outputs = None
        model.train()
        bar = self._progress(total, start)
        t_attempt = time.perf_counter()
        with _Signals() as sig:
            for step in range(start, total):
                self._current_step = step
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), device=self.device)
                tokens = 0
                seen = []
                for micro in range(ga):
                    idx = D.micro_batch_indices(self.order, step, micro, batch_size=tc.batch_size, grad_accum=ga,
                                                world_size=world, rank=dist.rank)
                    exs = [self.train_ds.examples[i] for i in idx]
                    batch = D.collate(exs, pad_id, max_len=tc.seq_len)
                    batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                             for k, v in batch.items()}
                    tokens += D.batch_tokens(exs)
                    seen += idx
                    with dist.no_sync(model, sync=micro == ga - 1):
                        outputs = recipe.forward(model, batch, tc, self.device_type)
                        if dist.deepspeed:
                            dist.acc.backward(outputs.loss)  # the engine scales by its accumulation steps
                        else:
                            (outputs.loss / ga).backward()
                    loss_sum += outputs.loss.detach()
                lr = scheduler.get_last_lr()[0]  # the rate this step uses
                norm = recipe.optimizer_step(params, optimizer, self.schedule["max_grad_norm"], scheduler)
                if world > 1:  # mean loss, total tokens, and whether any process got a signal
                    stats = torch.stack([loss_sum.float() / ga, torch.tensor(float(tokens), device=self.device)])
                    loss, tokens_all = dist.all_reduce(stats).tolist()
                    loss /= world
                    sig_any = int(dist.all_reduce(torch.tensor(float(sig.signum or 0), device=self.device), "max"))
                else:
                    loss, tokens_all, sig_any = loss_sum.item() / ga, tokens, sig.signum
                dt = time.perf_counter() - t0
                step_seconds.append(dt)
                step_tokens.append(int(tokens_all))
                rec = {"step": step + 1, "loss": round(loss, 6), "lr": lr, "grad_norm": round(float(norm), 6),
                       "tokens": int(tokens_all), "seconds": round(dt, 6),
                       "time": round(time.perf_counter() - t_attempt, 6), "examples": seen}
                if world > 1:  # every process's indices (deterministic: no need to gather them)
                    rec["examples"] = [i for m in range(ga) for r in range(world)
                                       for i in D.micro_batch_indices(self.order, step, m, batch_size=tc.batch_size,
                                                                      grad_accum=ga, world_size=world, rank=r)]
                self.history.append(rec)
                self.log.add(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"loss {loss:.4f}, {tokens_all / dt:,.0f} tok/s, lr {lr:.2e}", refresh=False)
                done = step + 1
                self._current_step = done
                if spec.eval_steps and self.eval_ds is not None and done % spec.eval_steps == 0 and done < total:
                    self._evaluate(model, tc, done)
                if done % self.schedule["logging_steps"] == 0:
                    self.log.flush()
                if sig_any:
                    stopped = int(sig_any) if sig.signum is None else sig.signum
                if stopped or (done % self.schedule["save_steps"] == 0 and done < total):
                    self._save_checkpoint(done, tc, model, optimizer, scheduler)
                if stopped:
                    break
        if bar is not None:
            bar.close()
        self.log.flush()
        del outputs
        if stopped:
            ck = latest_checkpoint(self.out)
            name = signal.Signals(stopped).name if stopped in signal.Signals._value2member_map_ else str(stopped)
            summary = self._summary("interrupted", tc, step_seconds=step_seconds, step_tokens=step_tokens)
            summary["signal"] = name
            summary["checkpoint"] = str(ck) if ck else None
            self._write_summary(summary)
            raise Interrupted(f"stopped by {name} at step {self._current_step} of {total}; checkpoint: {ck}. "
                              "Continue with the same command and --resume.", stopped, summary)
        eval_loss = self._evaluate(model, tc, total) if self.eval_ds is not None else None
        measured = self._measured(step_seconds, step_tokens)
        self.attempts.append({"config": tc.to_dict(), "describe": tc.describe(), "status": "ok"})
        return self._finish(tc, model, measured, eval_loss, n_trainable)

    def _gpu_name(self) -> str | None:
        if self.cuda:
            from planner.profiles import gpu_from_nvml_name

            g = gpu_from_nvml_name(torch.cuda.get_device_name(self.device))
            if g is not None:
                return g.name
        return self.pf.gpu

    def _announce(self, tc: TrainConfig, prediction: dict, gpu, total: int, attempt: int) -> None:
        ds = self.train_ds
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
            line = (f"predicted peak {_gib(prediction['peak_allocated_bytes'])} allocated, "
                    f"{_gib(prediction['peak_reserved_bytes'])} reserved, {_gib(prediction['device_bytes'])} on the device")
            if gname:
                line += f" ({gname}: {_gib(prediction.get('gpu_memory_bytes'))})"
            if not self.cuda:
                line += "; a CPU run measures no GPU memory"
            self.say(line)
        else:
            self.say("predicted peak: not available (the planner cannot model this model's config.json)")

    def _progress(self, total: int, start: int):
        if not self.dist.main or not self.spec.progress:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
                    mininterval=0.5)

    # -- evaluation --------------------------------------------------------------------------------------------------

    def _evaluate(self, model, tc: TrainConfig, step: int) -> float:
        """Token-weighted mean loss over the eval set (each process a strided shard, summed across processes)."""
        ds, world, rank = self.eval_ds, self.dist.world, self.dist.rank
        mine = list(range(rank, len(ds), world))
        per_rank = -(-len(ds) // world)
        n_batches = -(-per_rank // tc.batch_size)
        total_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        total_tok = torch.zeros((), device=self.device, dtype=torch.float64)
        model.eval()
        with torch.no_grad():
            for b in range(n_batches):
                idx = mine[b * tc.batch_size:(b + 1) * tc.batch_size]
                real = len(idx)
                if real == 0:
                    idx = [0]  # keep the processes in step; weight 0
                exs = [ds.examples[i] for i in idx]
                batch = D.collate(exs, self.tokenizer.pad_token_id, max_len=tc.seq_len)
                n = int((batch["labels"][:, 1:] != D.IGNORE_INDEX).sum())
                batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                out = recipe.forward(model, batch, tc, self.device_type)
                if real and n:
                    total_loss += out.loss.double() * n
                    total_tok += n
                del out
        model.train()
        stats = self.dist.all_reduce(torch.stack([total_loss, total_tok]))
        loss = float(stats[0] / stats[1]) if float(stats[1]) > 0 else float("nan")
        rec = {"step": step, "eval_loss": round(loss, 6)}
        self.eval_history.append(rec)
        self.log.add(rec)
        self.log.flush()
        self.say(f"eval   step {step}: loss {loss:.4f} (perplexity {math.exp(min(loss, 50)):.2f})")
        return loss

    # -- checkpoints ---------------------------------------------------------------------------------------------------

    def _save_checkpoint(self, step: int, tc: TrainConfig, model, optimizer, scheduler) -> Path:
        dist = self.dist
        final = self.out / f"checkpoint-{step}"
        tmp = self.out / f".tmp-checkpoint-{step}"
        if dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        torch.save(rng_state(), tmp / f"rng-{dist.rank}.pt")
        if dist.fsdp or dist.deepspeed:
            dist.acc.save_state(str(tmp / "accelerate"))
        elif dist.main:
            unwrapped = dist.unwrap(model)
            state = {n: p.detach() for n, p in unwrapped.named_parameters() if p.requires_grad}
            torch.save(state, tmp / "trainable.pt")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if dist.main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            epoch, index = self.order.position(step * tc.batch_size * tc.grad_accum * dist.world)
            state = {
                "step": step,
                "total_steps": self.total_steps,
                "micro_steps": step * tc.grad_accum,
                "examples_seen": step * tc.batch_size * tc.grad_accum * dist.world,
                "epoch": epoch,
                "index_in_epoch": index,
                "world_size": dist.world,
                "train": tc.to_dict(),
                "schedule": self.schedule,
                "data_fingerprint": self.train_ds.fingerprint,
                "data_examples": len(self.train_ds),
                "seed": self.schedule["seed"],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        dist.barrier()
        if dist.main:
            _fsync_tree(tmp)
            if final.exists():
                trash = self.out / f".tmp-checkpoint-{step}-old"
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)  # atomic: a checkpoint folder exists complete or not at all
            for _, old in checkpoints(self.out)[: -self.spec.keep_checkpoints or None]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
            self.log.flush()
        dist.barrier()
        return final

    def _load_checkpoint(self, ckpt: Path, model, optimizer, scheduler) -> int:
        dist = self.dist
        state = json.loads((ckpt / "state.json").read_text())
        if dist.fsdp or dist.deepspeed:
            dist.acc.load_state(str(ckpt / "accelerate"))
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

    # -- outputs -------------------------------------------------------------------------------------------------------

    def _finish(self, tc: TrainConfig, model, measured: dict, eval_loss, n_trainable: int) -> dict:
        dist = self.dist
        outputs = {}
        if dist.fsdp or dist.deepspeed:
            state_dict = dist.acc.get_state_dict(model)
        else:
            state_dict = None
        if dist.main:
            unwrapped = dist.unwrap(model)
            kw = {"state_dict": state_dict} if state_dict is not None else {}
            unwrapped.save_pretrained(self.out, **kw)
            outputs["adapter" if tc.is_peft else "model"] = str(self.out)
            self.tokenizer.save_pretrained(self.out)
            outputs["tokenizer"] = str(self.out)
            plan_out = self.out / "plan.toml"
            pf = dataclasses.replace(self.pf, train=tc, model_path=self.spec.model_path, created="",
                                     command=self.spec.command,
                                     prediction={k: v for k, v in self.prediction.items() if v is not None})
            write_plan(pf, plan_out)
            outputs["plan"] = str(plan_out)
            outputs["log"] = str(self.out / LOG_NAME)
        summary = self._summary("completed", tc, measured=measured, eval_loss=eval_loss)
        summary["trainable_params"] = n_trainable
        if dist.main:
            rec_paths = self._write_record(tc, measured, "ok")
            summary["record"] = rec_paths
            png = self._loss_png(tc)
            if png:
                outputs["loss_curve"] = png
            summary["outputs"] = outputs
            self._write_summary(summary)
            self._report(summary)
        dist.barrier()
        return summary

    def _summary(self, status: str, tc: TrainConfig, *, measured: dict | None = None, eval_loss=None,
                 error: str | None = None, step_seconds=None, step_tokens=None) -> dict:
        losses = [r["loss"] for r in self.history]
        w = max(1, min(5, len(losses) // 4 or 1))
        if measured is None and step_seconds is not None:
            measured = self._measured(step_seconds, step_tokens)
        return {
            "status": status,
            "output_dir": str(self.out),
            "model": self.pf.model,
            "model_path": self.spec.model_path,
            "method": tc.method,
            "config": tc.to_dict(),
            "describe": tc.describe(),
            "device": self.device_type,
            "processes": self.dist.world,
            "steps": getattr(self, "total_steps", None),
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
            "prediction": getattr(self, "prediction", {}),
            "measured": measured or {},
            "attempts": self.attempts,
            "fallback_used": any(a["status"] == "oom" for a in self.attempts),
            "error": error,
            "seconds": round(time.time() - self.t_start, 2),
        }

    def _write_summary(self, summary: dict, any_rank: bool = False) -> None:
        if self.dist.main or any_rank:
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = self.out / (SUMMARY_NAME + ".tmp")
            tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
            os.replace(tmp, self.out / SUMMARY_NAME)

    def _meta_info(self) -> dict:
        import platform

        versions = {}
        for mod in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
            try:
                from importlib.metadata import version

                versions[mod] = version(mod)
            except Exception:
                pass
        meta = {"versions": versions, "host": platform.node(), "processes": self.dist.world,
                "data": self.train_ds.summary(),
                "workload": "real data (dynamic padding); the prediction assumes every sequence is seq_len long"}
        if self.cuda:
            from calibrate.nvml import device_info
            from planner.profiles import gpu_from_nvml_name

            name = torch.cuda.get_device_name(self.device)
            g = gpu_from_nvml_name(name)
            meta.update(gpu_name=name, gpu_profile=g.name if g else None,
                        gpu_total_bytes=int(torch.cuda.get_device_properties(self.device).total_memory))
            info = device_info(self.device.index or 0)
            if info:
                meta["driver"] = info["driver"]
        return meta

    def _record(self, tc: TrainConfig, measured: dict, status: str, error: str | None = None) -> dict:
        from calibrate.record import new_record

        pred = {k: v for k, v in getattr(self, "prediction", {}).items()
                if k in ("peak_allocated_bytes", "peak_reserved_bytes", "device_bytes", "tokens_per_s",
                         "planner_version")}
        config = dict(self.model_config)
        return new_record(kind="run", model_name=self.pf.model if "/" not in self.pf.model else Path(self.pf.model).name,
                          model_config=config, train=tc.to_dict(), measured=measured, status=status, prediction=pred,
                          meta_info=self._meta_info(), command=self.spec.command, source=str(self.out), error=error)

    def _write_record(self, tc: TrainConfig, measured: dict, status: str) -> dict:
        from calibrate.record import write_record

        rec = self._record(tc, measured, status)
        path = self.out / RECORD_NAME
        path.write_text(json.dumps(rec, indent=2) + "\n")
        paths = {"run": str(path)}
        if self.cuda and self.spec.record:
            paths["calibrate"] = str(write_record(rec))
        return paths

    def _record_oom(self, tc: TrainConfig, msg: str, step: int) -> str | None:
        """An `oom` record of the miss (in the output's records/ folder; also calibrate/results on CUDA), written by
        the process that ran out of memory."""
        from calibrate.record import write_record

        measured = {"device": "cuda" if self.cuda else "cpu", "steps": step, "process_peak_rss_bytes": _peak_rss()}
        if self.cuda:
            measured["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            measured["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(self.device))
            measured["nvml_peak_used_bytes"] = self._stop_nvml()
            measured["cuda_context_bytes"] = self.cuda_context_bytes
        rec = self._record(tc, measured, "oom", error=msg)
        path = write_record(rec, self.out / "records")
        if self.cuda and self.spec.record:
            write_record(rec)
        return str(path)

    def _loss_png(self, tc: TrainConfig) -> str | None:
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
        path = self.out / "loss.png"
        fig.savefig(path)
        plt.close(fig)
        return str(path)

    def _report(self, s: dict) -> None:
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
            fmt = _gib if is_bytes else (lambda v: "-" if v is None else f"{v:,.0f}")
            diff = f"  ({(pv - mv) / mv * 100:+.1f}%)" if pv and mv else ""
            self.say(f"{label:16}{fmt(pv):>14}{fmt(mv):>14}{diff}")
        if cpu:
            self.say(f"(CPU run: nothing to compare with the {p.get('gpu') or 'GPU'} prediction; process peak RSS "
                     f"{_gib(m.get('process_peak_rss_bytes'))})")
        self.say(f"output {self.out}  (record: {s['record']['run']})")


def _peak_rss() -> int | None:
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(kb * 1024) if sys.platform != "darwin" else int(kb)
    except Exception:
        return None


def run(spec: RunSpec, prepared: tuple | None = None) -> dict:
    """Train as `spec` says; returns the summary (also in `<output>/run_summary.json`). Raises RunUsageError,
    OutOfMemory, Interrupted or RunError."""
    return Run(spec, prepared).run()


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
        return 3
    except RunError as e:
        print(f"ftplan run: {e}", file=sys.stderr)
        return 2 if isinstance(e, RunUsageError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
