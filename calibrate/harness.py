"""`ftplan calibrate`: measure real training steps, one fresh subprocess per configuration.

The parent (`run_points`) never touches CUDA: for each configuration it checks that the GPU is idle (NVML, refusing
a busy one unless forced; without NVML the check cannot be made and is skipped), starts
`python -m calibrate.harness --child - --result-fd N` with the spec on its stdin, waits (with a timeout), reads the
child's record from that descriptor and writes it. A child that crashes, is killed or times out returns no record,
so the parent writes one with `status: "error"`; the sweep goes on either way. A tqdm bar shows the configuration
being measured and the ETA.

No child outlives the parent, and nothing is left behind: the spec, the result and the child's log are anonymous
temporary files (unlinked on creation), so no temporary folder exists to leave; the child runs in its own process
group, which the parent kills on SIGINT/SIGTERM (then exits 128 + the signal, the configuration unrecorded); the
child asks the kernel for SIGTERM when the parent dies (`prctl(PR_SET_PDEATHSIG)`, set between fork and exec), and
a watchdog thread in the child also notices a changed parent pid, so a SIGKILLed parent takes the child with it
within a fraction of a second (its own temporary folders removed). Records are written only by the parent: none
appears after it died.

The child (`measure`) starts with clean device memory and runs the reference recipe (`trainer.recipe`, the code
`ftplan run` uses): the model built from its config directly on the device (random weights; a local checkpoint
folder loads its real weights; QLoRA without a checkpoint builds the bf16 model - on the GPU when it fits there,
else in host memory - saves it to a temporary folder and loads it back quantized, as the shipped measurements did;
for a model whose bf16 weights fit neither, pass a checkpoint folder), the method applied, then `steps` training steps
(forward, backward, clip, optimizer step, zero_grad), the outputs of a step kept until the next forward returns.
It records:

- CUDA: `torch.cuda.max_memory_allocated/reserved` over model load and all steps, the peak of NVML's device
  memory in use (sampled by a background thread), the CUDA context (NVML in use minus the allocator's reserve
  and the device's use before the process started), GPU name, total memory and driver;
- CPU: the process's peak resident memory (`getrusage`, imports included; recorded on CUDA too, as host memory);
- both: every step's time, tokens/s over the steps after warm-up (tokens per step / median step time), the
  versions of torch, transformers, peft and bitsandbytes, the git commit, and the planner's prediction of the
  same configuration.

An out-of-memory error (CUDA OOM, bitsandbytes/cuBLAS allocation failures, host MemoryError) is a result: the
record says `status: "oom"` with the phase it happened in and the peak reached. Records are written once, never
edited (`calibrate.record.write_record`).

Testing hook: `FTPLAN_CALIBRATE_INJECT=oom@step3` (or `oom@load`, `crash@step1`, `hang@load`, `wedge@step1`,
`fail@step2`) makes the child raise an out-of-memory error, abort, hang (wedge: hang with SIGTERM blocked in the main
thread) or raise an ordinary error at that phase, so the parent's handling is tested on machines without a GPU;
`FTPLAN_CALIBRATE_INJECT_MARK=FILE` makes a hanging child write its pid to FILE when it gets there.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from planner.arch import arch_from_config
from planner.config import TrainConfig
from planner.plan import make_plan
from planner.profiles import ProfileError, gpu_from_nvml_name, load_gpu

from .record import RESULTS_DIR, new_record, write_record

GIB = 2**30
DEFAULT_STEPS = 6
DEFAULT_WARMUP = 2
DEFAULT_TIMEOUT_S = 1800.0
DEFAULT_BUSY_BYTES = 1 * GIB  # NVML memory in use above which the GPU counts as busy
INJECT_ENV = "FTPLAN_CALIBRATE_INJECT"
VERSION_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "ftplan")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
ENV_RECORDED = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "CUDA_VISIBLE_DEVICES", "CUDA_MODULE_LOADING",
                "CUDA_DEVICE_ORDER", "OMP_NUM_THREADS")


class GpuBusyError(RuntimeError):
    """The GPU holds more memory than the threshold before a measurement (another process uses it)."""


# -- configurations -----------------------------------------------------------------------------------------------


@dataclass
class Point:
    """One configuration to measure."""

    model_name: str  # the name records use (catalog name, or the folder/file it came from)
    config: dict  # config.json fields, with model_type
    train: TrainConfig
    checkpoint: str | None = None  # a local folder with weights: real weights are loaded from it
    steps: int = DEFAULT_STEPS
    source: str = ""  # where the configuration came from (a matrix entry)
    model_ref: str = ""  # as the user wrote it

    @property
    def label(self) -> str:
        return f"{self.model_name}: {self.train.describe()}"

    @property
    def warmup(self) -> int:
        return warmup_steps(self.steps)


def warmup_steps(steps: int) -> int:
    """Steps 1-2 are warm-up (as in the shipped measurements: tokens/s = median of steps 3..N); fewer steps keep at
    least one measured step."""
    return max(0, min(DEFAULT_WARMUP, steps - 1))


def checkpoint_folder(model_ref: str) -> str | None:
    """The folder to load real weights from: `model_ref` is a folder holding weight files. A config.json path (or a
    folder without weights) means random weights built from the config."""
    p = Path(model_ref).expanduser()
    if p.is_dir() and any(any(p.glob(pat)) for pat in WEIGHT_PATTERNS):
        return str(p.resolve())
    return None


def point_from_arch(arch, tc: TrainConfig, *, model_ref: str = "", steps: int = DEFAULT_STEPS, source: str = "") -> Point:
    config = dict(arch.config)
    config.setdefault("model_type", arch.model_type)
    name = arch.name
    if model_ref and (os.sep in model_ref or model_ref.endswith(".json")):
        p = Path(model_ref).expanduser()
        name = (p.parent.name if p.name == "config.json" else p.name) or arch.name
    return Point(model_name=name, config=config, train=tc, checkpoint=checkpoint_folder(model_ref) if model_ref else None,
                 steps=steps, source=source, model_ref=model_ref or arch.name)


class MatrixError(ValueError):
    """A matrix file that cannot be read; the message names the file, the entry and the key."""


MATRIX_KEYS = ("model", "steps", "label", "note", "method", "precision", "rank", "lora_alpha", "lora_dropout",
               "target_modules", "num_virtual_tokens", "seq_len", "batch_size", "grad_accum", "grad_ckpt", "optimizer",
               "num_gpus")


def load_matrix(path: str | Path, *, steps: int | None = None) -> list[Point]:
    """The configurations of a sweep file (see calibrate/matrix.toml for the format): `[defaults]` then
    `[[point]]` entries; a list value means one configuration per item (the product over every list-valued key).
    `steps` (the command line's `--steps`, when given) overrides the file."""
    import itertools
    import tomllib

    from planner.arch import ArchError
    from planner.limits import position_error
    from planner.methods import TargetError, lora_targets
    from planner.profiles import resolve_model

    path = Path(path)
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise MatrixError(f"{path}: {e.strerror} (valid: a sweep file like calibrate/matrix.toml)") from None
    except UnicodeDecodeError as e:
        raise MatrixError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); valid: a TOML file in UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise MatrixError(f"{path}: invalid TOML ({e})") from None
    unknown_top = sorted(set(doc) - {"defaults", "point"})
    if unknown_top:
        raise MatrixError(f"{path}: unknown table(s) {', '.join(unknown_top)}; valid: [defaults], [[point]]")
    defaults = doc.get("defaults", {})
    entries = doc.get("point", [])
    if not entries:
        raise MatrixError(f"{path}: no [[point]] entries")
    points: list[Point] = []
    for n, entry in enumerate(entries, 1):
        where = f"{path}: point {n}"
        merged = {**defaults, **entry}
        bad = sorted(set(merged) - set(MATRIX_KEYS))
        if bad:
            raise MatrixError(f"{where}: unknown key(s) {', '.join(bad)}; valid: {', '.join(MATRIX_KEYS)}")
        if "model" not in merged:
            raise MatrixError(f"{where}: 'model' is required")
        keys = [k for k in merged if isinstance(merged[k], list)]
        for combo in itertools.product(*(merged[k] for k in keys)):
            values = dict(merged, **dict(zip(keys, combo)))
            label, _ = values.pop("label", None), values.pop("note", None)
            ref = str(values.pop("model"))
            n_steps = steps if steps is not None else values.pop("steps", DEFAULT_STEPS)
            values.pop("steps", None)
            if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
                raise MatrixError(f"{where}: steps must be an integer >= 1, got {n_steps!r}")
            local = path.parent / ref
            if (ref.startswith(".") or os.sep in ref) and local.exists():
                ref = str(local)
            try:
                tc = TrainConfig.from_dict(values)
                if tc.num_gpus != 1:
                    raise ValueError(f"num_gpus: calibrate measures one device, got {tc.num_gpus} (valid: 1)")
                arch, _ = resolve_model(ref)
                if tc.spec.uses_rank:
                    lora_targets(arch, tc)
                too_long = position_error(arch, tc)
                if too_long:
                    raise ValueError(too_long[1])
            except (ValueError, TypeError, ProfileError, ArchError, TargetError) as e:
                shown = ", ".join(f"{k}={v}" for k, v in zip(keys, combo))
                raise MatrixError(f"{where}{' (' + shown + ')' if shown else ''}: {e}") from None
            source = f"{path.name}#{n}" + (f" {label}" if label else "")
            points.append(point_from_arch(arch, tc, model_ref=ref, steps=n_steps, source=source))
    return points


# -- what every record carries ------------------------------------------------------------------------------------


def package_versions() -> dict:
    out = {}
    for name in VERSION_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def git_state() -> dict | None:
    """{commit, dirty} of the checkout this package runs from, or None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def host_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count()}


def prediction(point: Point, gpu) -> dict:
    """The planner's prediction of `point` on `gpu` (None: no GPU, memory only) as the record stores it."""
    arch = arch_from_config(point.config, name=point.model_name)
    plan = make_plan(arch, point.train, gpu)
    out = {
        "peak_allocated_bytes": plan.peak_allocated_bytes,
        "peak_reserved_bytes": plan.peak_reserved_bytes,
        "device_bytes": plan.device_bytes,
        "tokens_per_s": plan.speed.tokens_per_s if plan.speed else None,
        "fits": plan.fits,
        "calibration": plan.params.source if plan.params else None,
        "planner_version": _version("ftplan"),
    }
    return out


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- NVML on the parent side (no CUDA) ----------------------------------------------------------------------------


def nvml_index() -> int | None:
    """The NVML index of what CUDA calls device 0, from CUDA_VISIBLE_DEVICES (an index or a GPU UUID); None when
    it cannot be told (a MIG slice, or NVML missing)."""
    from .nvml import _nvml

    nv = _nvml()
    if nv is None:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return 0
    first = visible.split(",")[0].strip()
    if first.isdigit():
        return int(first)
    if first.startswith("GPU-"):
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                uuid = nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetHandleByIndex(i))
                uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
                if uuid.startswith(first) or first.startswith(uuid):
                    return i
        except Exception:
            return None
    return None


def detect_gpu(gpu_override: str | None = None) -> dict:
    """{index, name, total_bytes, used_bytes, driver, profile} of the GPU CUDA will use (NVML), profile from the
    NVML name (or `gpu_override`). Empty dict without NVML."""
    from .nvml import device_info

    idx = nvml_index()
    info = device_info(idx) if idx is not None else None
    out = dict(info or {})
    out["index"] = idx
    profile = None
    if gpu_override:
        profile = load_gpu(gpu_override).name
    elif info:
        g = gpu_from_nvml_name(info["name"])
        profile = g.name if g else None
    out["profile"] = profile
    return out


def check_idle(threshold_bytes: int, index: int | None, wait_s: float = 0.0) -> int | None:
    """NVML memory in use on the GPU; raise GpuBusyError when above `threshold_bytes` (after waiting up to
    `wait_s` for it to drop: a finished child's memory takes a moment to return)."""
    from .nvml import device_info

    if index is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        info = device_info(index)
        if info is None:
            return None
        used = info["used_bytes"]
        if used <= threshold_bytes:
            return used
        if time.monotonic() >= deadline:
            raise GpuBusyError(
                f"GPU {index} ({info['name']}) already has {used / GIB:.2f} GiB in use (threshold "
                f"{threshold_bytes / GIB:.2f} GiB): another process would distort the measurement. "
                "Stop it, or pass --force to measure anyway."
            )
        time.sleep(1.0)


# -- the parent ---------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    point: Point
    status: str  # ok | oom | error
    path: Path
    record: dict
    seconds: float


def invocation() -> str:
    """The command line this process was started with, as the user typed it (`ftplan ...`)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("ftplan", "ftplan.exe"):
        argv[0] = "ftplan"
    return shlex.join(argv)


class Interrupted(BaseException):
    """SIGINT/SIGTERM reached the parent: the child's process group was killed, the point is not recorded."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def run_points(points: list[Point], *, device: str = "cuda", out_dir: str | Path | None = None, force: bool = False,
               busy_threshold_bytes: int = DEFAULT_BUSY_BYTES, timeout_s: float = DEFAULT_TIMEOUT_S,
               progress: bool | None = None, command: str | None = None, gpu_override: str | None = None,
               echo=None) -> list[Outcome]:
    """Measure every point in its own subprocess; returns one outcome (and one record file) per point.

    Raises GpuBusyError (before anything runs, or between configurations) when the GPU is busy and not `force`,
    and Interrupted on SIGINT/SIGTERM (after killing the running child)."""
    from tqdm import tqdm

    out_dir = Path(out_dir).resolve() if out_dir is not None else RESULTS_DIR
    command = command if command is not None else invocation()
    gpu = detect_gpu(gpu_override) if device == "cuda" else {}
    git = git_state()
    host = host_info()
    versions = package_versions()
    if progress is None:
        progress = len(points) > 1
    outcomes: list[Outcome] = []
    bar = tqdm(total=len(points), unit="config", file=sys.stderr, disable=not progress, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
    say = echo or (lambda msg: bar.write(msg, file=sys.stderr))
    previous = _raise_on_signals()
    try:
        for i, point in enumerate(points):
            bar.set_description_str(point.label[:70])
            if device == "cuda" and not force:
                check_idle(busy_threshold_bytes, gpu.get("index"), wait_s=30.0 if i else 0.0)
            t0 = time.monotonic()
            outcome = _run_one(point, device=device, out_dir=out_dir, timeout_s=timeout_s, command=command, gpu=gpu,
                               git=git, host=host, versions=versions, forced=force)
            outcome.seconds = time.monotonic() - t0
            outcomes.append(outcome)
            say(summary_line(outcome))
            bar.update(1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        bar.close()
    return outcomes


def _raise_on_signals() -> dict:
    """SIGINT and SIGTERM raise Interrupted in the parent (main thread only); returns the previous handlers."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)
    return previous


def _libc():
    """libc for prctl, loaded in the parent (nothing may be loaded between fork and exec); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent_pid: int):
    """preexec_fn: the kernel sends this child SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG); a parent
    that died before the call is noticed by the pid check."""
    libc = _libc()
    prctl = libc.prctl if libc is not None else None

    def preexec():
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def _run_one(point: Point, *, device, out_dir, timeout_s, command, gpu, git, host, versions, forced) -> Outcome:
    spec = {
        "model_name": point.model_name, "model_ref": point.model_ref, "config": point.config,
        "train": point.train.to_dict(), "checkpoint": point.checkpoint, "steps": point.steps,
        "warmup": point.warmup, "device": device, "out_dir": str(out_dir), "command": command,
        "source": point.source, "gpu": gpu, "git": git, "host": host, "versions": versions, "forced": forced,
        "parent_pid": os.getpid(),
    }
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    # anonymous files (no name on disk): nothing to clean up however this process ends
    with tempfile.TemporaryFile() as spec_file, tempfile.TemporaryFile() as result, tempfile.TemporaryFile() as log:
        spec_file.write(json.dumps(spec).encode())
        spec_file.seek(0)
        cmd = [sys.executable, "-m", "calibrate.harness", "--child", "-", "--result-fd", str(result.fileno())]
        error = None
        proc = subprocess.Popen(cmd, stdin=spec_file, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, pass_fds=(result.fileno(),),
                                preexec_fn=_die_with_parent(os.getpid()))
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc = None
            error = f"timed out after {timeout_s:g} s (killed)"
        except BaseException:
            _kill(proc)
            raise
        result.seek(0)
        rec = _result_record(result.read())
        if rec is not None and error is None:
            path = write_record(rec, out_dir)
            return Outcome(point, rec["status"], path, rec, 0.0)
        if error is None:
            if rc is not None and rc < 0:
                sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
                error = f"child killed by {sig}" + (" (the host likely ran out of memory)" if -rc == 9 else "")
            else:
                error = f"child exited with code {rc} without a record"
        log.seek(0)
        tail = _tail_text(log.read().decode(errors="replace"))
    rec = _error_record(point, device=device, command=command, gpu=gpu, git=git, host=host, versions=versions,
                        message=f"{error}\n{tail}".strip())
    path = write_record(rec, out_dir)
    return Outcome(point, "error", path, rec, 0.0)


def _result_record(data: bytes) -> dict | None:
    """The record a child returned (None: nothing, or not a whole JSON object: the child died while writing)."""
    try:
        res = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return res.get("record") if isinstance(res, dict) else None


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def _tail_text(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _gpu_profile(gpu: dict):
    if not gpu or not gpu.get("profile"):
        return None
    try:
        return load_gpu(gpu["profile"])
    except ProfileError:
        return None


def _meta(gpu: dict, device: str, git, host, versions, extra: dict | None = None) -> dict:
    meta = {
        "gpu_name": gpu.get("name") if device == "cuda" else None,
        "gpu_profile": gpu.get("profile") if device == "cuda" else None,
        "gpu_total_bytes": gpu.get("total_bytes") if device == "cuda" else None,
        "driver": gpu.get("driver") if device == "cuda" else None,
        "versions": dict(versions),
        "git": git,
        "host": host,
        "env": {k: os.environ[k] for k in ENV_RECORDED if k in os.environ},
    }
    meta.update(extra or {})
    return meta


def _error_record(point: Point, *, device, command, gpu, git, host, versions, message: str,
                  status: str = "error", measured: dict | None = None, extra: dict | None = None) -> dict:
    target = _gpu_profile(gpu) if device == "cuda" else None
    try:
        pred = prediction(point, target)
    except ValueError:
        pred = {}
    return new_record(
        kind="calibrate", model_name=point.model_name, model_config=point.config, train=point.train.to_dict(),
        measured=dict(measured or {}, device=device), status=status, prediction=pred,
        meta_info=_meta(gpu, device, git, host, versions, extra), command=command, source=point.source,
        error=message[-4000:],
    )


def summary_line(o: Outcome) -> str:
    m, p = o.record["measured"], o.record.get("prediction") or {}
    head = f"{o.status:5s} {o.point.label}"
    parts = []
    if o.status == "ok":
        if m.get("peak_allocated_bytes") is not None:
            pred = p.get("peak_allocated_bytes")
            parts.append(_vs("peak allocated", m["peak_allocated_bytes"] / GIB, pred / GIB if pred else None, "GiB"))
        if m.get("process_peak_rss_bytes") is not None and m.get("device") == "cpu":
            parts.append(f"peak RSS {m['process_peak_rss_bytes'] / GIB:.2f} GiB")
        if m.get("tokens_per_s"):
            parts.append(_vs("tokens/s", m["tokens_per_s"], p.get("tokens_per_s"), "", fmt=",.0f"))
    elif o.status == "oom":
        phase = o.record["meta_info"].get("phase")
        parts.append("out of memory" + (f" at {phase}" if phase else ""))
        if p.get("fits") is not None:
            parts.append("planner said " + ("fits" if p["fits"] else "does not fit"))
    else:
        parts.append((o.record.get("error") or "").splitlines()[0][:120])
    return f"{head}: {'; '.join(parts)}  -> {o.path}"


def _vs(name, meas, pred, unit, fmt=".2f") -> str:
    s = f"{name} {format(meas, fmt)}{(' ' + unit) if unit else ''}"
    if pred:
        s += f" (predicted {format(pred, fmt)}, {100 * (pred - meas) / meas:+.1f}%)"
    return s


# -- the child ----------------------------------------------------------------------------------------------------


class _Injected(Exception):
    pass


def _inject(phase: str) -> None:
    """The testing hook (module docstring): `kind@phase` in FTPLAN_CALIBRATE_INJECT."""
    spec = os.environ.get(INJECT_ENV, "")
    if "@" not in spec:
        return
    kind, where = spec.split("@", 1)
    if where != phase:
        return
    if kind == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {INJECT_ENV} at {phase})")
    if kind == "crash":
        os.abort()
    if kind in ("hang", "wedge"):
        mark = os.environ.get(INJECT_ENV + "_MARK")
        if mark:  # tell the test that the child is in the phase now
            Path(mark).write_text(str(os.getpid()))
        if kind == "wedge":  # a main thread that cannot run a Python signal handler (as inside a long native call)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        time.sleep(3600)
    if kind == "fail":
        raise _Injected(f"injected failure at {phase}")


OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation")


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in OOM_MARKERS)


def _rss_now() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb if sys.platform == "darwin" else kb * 1024)


class _Measurement:
    """What the child has seen so far (kept when a step runs out of memory)."""

    def __init__(self, device: str):
        self.device = device
        self.phase = "start"
        self.step_seconds: list[float] = []
        self.losses: list[float] = []
        self.extra: dict = {}
        self.baseline_used: int | None = None
        self.sampler = None

    def cuda_memory(self) -> dict:
        import torch

        if self.device != "cuda" or not torch.cuda.is_initialized():
            return {}
        out = {"peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
               "peak_reserved_bytes": int(torch.cuda.max_memory_reserved())}
        if self.sampler is not None and self.sampler.available:
            torch.cuda.synchronize()
            peak = self.sampler.stop()
            self.sampler = None
            out["nvml_peak_used_bytes"] = peak
            used_now = _nvml_used(self.extra.get("nvml_index"))
            if used_now is not None and self.baseline_used is not None:
                ctx = used_now - self.baseline_used - int(torch.cuda.memory_reserved())
                out["cuda_context_bytes"] = max(0, ctx)
        return out


def _nvml_used(index) -> int | None:
    from .nvml import device_info

    if index is None:
        return None
    info = device_info(index)
    return info["used_bytes"] if info else None


def measure(spec: dict) -> dict:
    """Run the configuration of `spec` and return its record (status ok or oom). Other errors propagate."""
    device = spec["device"]
    tc = TrainConfig.from_dict(spec["train"])
    point = Point(model_name=spec["model_name"], config=spec["config"], train=tc, checkpoint=spec.get("checkpoint"),
                  steps=int(spec["steps"]), source=spec.get("source", ""), model_ref=spec.get("model_ref", ""))
    gpu = dict(spec.get("gpu") or {})
    m = _Measurement(device)
    try:
        _run_steps(point, spec, gpu, m)
        status, error = "ok", None
    except BaseException as e:  # noqa: BLE001 - OOM is a result, anything else propagates
        if not is_oom(e) or m.phase == "qlora-prepare":  # preparing the 4-bit checkpoint is not the measurement
            raise
        status, error = "oom", f"{type(e).__name__} at {m.phase}: {str(e).splitlines()[0][:500]}"
    measured = {"device": device, "steps": len(m.step_seconds), "warmup_steps": point.warmup,
                "step_seconds": [round(s, 6) for s in m.step_seconds]}
    measured.update(m.cuda_memory())
    measured["process_peak_rss_bytes"] = peak_rss_bytes()  # host memory (the whole measurement on a CPU)
    timed = m.step_seconds[point.warmup:]
    if status == "ok" and timed:
        measured["tokens_per_s"] = tc.tokens_per_step / statistics.median(timed)
    extra = dict(m.extra, phase=m.phase if status != "ok" else None, steps_requested=point.steps,
                 losses=[round(x, 4) for x in m.losses], forced=bool(spec.get("forced")),
                 checkpoint=point.checkpoint, model_ref=point.model_ref)
    target = _gpu_profile(gpu) if device == "cuda" else None
    return new_record(
        kind="calibrate", model_name=point.model_name, model_config=point.config, train=tc.to_dict(),
        measured=measured, status=status, prediction=prediction(point, target),
        meta_info=_meta(gpu, device, spec.get("git"), spec.get("host") or host_info(),
                        spec.get("versions") or package_versions(), extra),
        command=spec.get("command", ""), source=point.source, error=error,
    )


def _run_steps(point: Point, spec: dict, gpu: dict, m: _Measurement) -> None:
    import torch

    from trainer import recipe
    from trainer.step import TrainStep

    from .nvml import NvmlSampler

    tc = point.train
    device = spec["device"]
    m.phase = "setup"
    torch.manual_seed(0)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
        index = gpu.get("index")
        m.baseline_used = _nvml_used(index)  # before this process creates its context
        torch.cuda.set_device(0)
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        if not gpu.get("name"):  # no NVML in the parent: name the GPU from torch
            name = torch.cuda.get_device_name(0)
            profile = gpu_from_nvml_name(name)
            gpu.update(name=name, total_bytes=int(torch.cuda.get_device_properties(0).total_memory),
                       profile=gpu.get("profile") or (profile.name if profile else None))
        resolved = _check_nvml_index(index)
        if resolved != index:  # CUDA's device 0 is another NVML device than assumed: that baseline is not its
            m.baseline_used = None
        index = resolved
        m.extra["nvml_index"] = index
        used = _nvml_used(index)
        m.extra["cuda"] = {
            "torch_cuda": torch.version.cuda,
            "device_name": torch.cuda.get_device_name(0),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "nvml_baseline_used_bytes": m.baseline_used,
            "context_after_init_bytes": (used - m.baseline_used - int(torch.cuda.memory_reserved()))
            if used is not None and m.baseline_used is not None else None,
        }
        dev = "cuda:0"
    else:
        dev = "cpu"
        m.extra["cpu"] = {"torch_threads": torch.get_num_threads(), "rss_before_model_bytes": _rss_now()}

    path = point.checkpoint
    tmp = None
    try:
        if tc.base_quant.quantized and path is None:
            m.phase = "qlora-prepare"
            tmp = tempfile.TemporaryDirectory(prefix="ftplan-qlora-")
            _CHILD_TEMP_DIRS.append(tmp.name)
            path = _save_bf16(point, tc, dev, tmp.name)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            m.sampler = NvmlSampler(m.extra.get("nvml_index") or 0, interval_s=0.005)
            if m.baseline_used is not None:
                m.sampler.start()
            else:
                m.sampler = None

        m.phase = "load"
        _inject("load")
        model = recipe.build_model(point.config, tc, path=path, device=dev)
        model = recipe.apply_method(model, tc)
        params = recipe.trainable_parameters(model)
        optimizer = recipe.make_optimizer(params, tc)
        gen = torch.Generator(device=dev).manual_seed(0)
        batch = recipe.synthetic_batch(int(point.config["vocab_size"]), tc, dev, generator=gen)
        m.extra["trainable_params"] = sum(p.numel() for p in params)

        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        # the run's own step (trainer.step): the previous outputs (logits) stay alive until the next forward returns
        train_step = TrainStep(model, optimizer, params, tc, torch.device(dev).type, max_grad_norm=1.0)
        for step in range(1, point.steps + 1):
            m.phase = f"step{step}"
            _inject(m.phase)
            sync()
            t0 = time.perf_counter()
            train_step([batch] * tc.grad_accum)
            sync()
            m.step_seconds.append(time.perf_counter() - t0)
            m.losses.append(float(train_step.outputs.loss.detach().float().item()))  # the last micro-batch's
        m.phase = "done"
    finally:
        if tmp is not None:
            tmp.cleanup()
            _CHILD_TEMP_DIRS.remove(tmp.name)


def _check_nvml_index(index: int | None) -> int | None:
    """The NVML index whose UUID is torch's device 0 (CUDA's order may differ from NVML's)."""
    import torch

    from .nvml import _nvml

    nv = _nvml()
    if nv is None:
        return None
    try:
        uuid = str(torch.cuda.get_device_properties(0).uuid)
    except Exception:
        return index
    try:
        for i in range(nv.nvmlDeviceGetCount()):
            u = nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetHandleByIndex(i))
            u = u.decode() if isinstance(u, bytes) else u
            if u.replace("GPU-", "") == uuid.replace("GPU-", ""):
                return i
    except Exception:
        return index
    return index


def _save_bf16(point: Point, tc: TrainConfig, dev: str, folder: str) -> str:
    """QLoRA from random weights: build the bf16 model (on the GPU when it fits, else on the CPU), save it, free it."""
    import torch

    from trainer import recipe

    bf16 = tc.replace(method="lora", quant="none", precision="bf16")
    build_on = dev
    if dev.startswith("cuda"):
        arch = arch_from_config(point.config, name=point.model_name)
        free, _ = torch.cuda.mem_get_info()
        if arch.total_params * 2 > 0.8 * free:
            build_on = "cpu"
    model = recipe.build_model(point.config, bf16, device=build_on)
    model.save_pretrained(folder)
    del model
    gc.collect()
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    return folder


# temporary folders the child made (QLoRA's bf16 copy): removed when the parent dies
_CHILD_TEMP_DIRS: list[str] = []


def _die(code: int) -> None:
    """End the child now: remove its temporary folders, exit without unwinding (and without a record)."""
    import shutil

    for d in list(_CHILD_TEMP_DIRS):
        shutil.rmtree(d, ignore_errors=True)
    os._exit(code)


def _guard_parent(parent_pid: int | None) -> None:
    """The child ends when its parent does: SIGTERM (sent by the kernel on the parent's death, see
    `_die_with_parent`) and a watchdog thread polling the parent pid (for when the main thread is inside a long
    native call and cannot run the signal handler yet) both end it."""
    import threading

    if not parent_pid:
        return
    signal.signal(signal.SIGTERM, lambda signum, frame: _die(128 + signum))

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        _die(1)

    threading.Thread(target=watch, name="ftplan-parent-watch", daemon=True).start()


def child_main(spec_src: str, result_fd: int | None = None) -> int:
    """Measure the spec (a file, or '-' for stdin). With `result_fd` the record is returned to the parent on that
    descriptor (the parent writes it); without, it is written under the spec's out_dir (by hand, for debugging)."""
    spec = json.load(sys.stdin) if spec_src == "-" else json.loads(Path(spec_src).read_text())
    _guard_parent(spec.get("parent_pid"))
    try:
        rec = measure(spec)
    except BaseException as e:  # noqa: BLE001 - anything but OOM: an error record
        if isinstance(e, KeyboardInterrupt):
            raise
        tc = TrainConfig.from_dict(spec["train"])
        point = Point(model_name=spec["model_name"], config=spec["config"], train=tc, steps=int(spec["steps"]),
                      source=spec.get("source", ""))
        message = f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exception(e)[-6:])
        rec = _error_record(point, device=spec["device"], command=spec.get("command", ""), gpu=spec.get("gpu") or {},
                            git=spec.get("git"), host=spec.get("host") or host_info(),
                            versions=spec.get("versions") or package_versions(), message=message)
    if result_fd is None:
        print(write_record(rec, spec["out_dir"]))
        return 0
    with os.fdopen(result_fd, "w") as f:
        json.dump({"record": rec}, f)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="ftplan calibrate's child process (one configuration).")
    ap.add_argument("--child", required=True, help="spec file written by the parent, or - for stdin")
    ap.add_argument("--result-fd", type=int, default=None, help="descriptor to return the record on")
    args = ap.parse_args(argv)
    return child_main(args.child, args.result_fd)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["Point", "Outcome", "GpuBusyError", "Interrupted", "MatrixError", "load_matrix", "run_points", "measure", "point_from_arch",
           "warmup_steps",
           "checkpoint_folder", "detect_gpu", "check_idle", "prediction", "summary_line"]
