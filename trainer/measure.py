"""What a run measures and records: the planner's prediction for the plan, device memory (CUDA peaks, NVML, the CUDA
context), step times and tokens/s, and the run record (`run_record.json`, the calibrate record format; also an `oom`
record of each out-of-memory miss)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from planner.config import TrainConfig

from . import files
from .spec import RECORD_NAME

STEADY_SKIP = 2  # first optimizer steps of an attempt left out of the steady-state step time
PREDICTED = ("peak_allocated_bytes", "peak_reserved_bytes", "device_bytes", "tokens_per_s")


def peak_rss() -> int | None:
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(kb * 1024) if sys.platform != "darwin" else int(kb)
    except Exception:
        return None


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


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
    out = {k: p.get(k) for k in PREDICTED}
    out["gpu"] = gpu.name if gpu else None
    out["gpu_memory_bytes"] = gpu.memory_bytes if gpu else None
    out["planner_version"] = _version("ftplan")
    return out, gpu


class DeviceMemory:
    """CUDA memory of this process: the context's size, the allocator's peaks and NVML's peak per attempt."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.nvml = None
        self.nvml_baseline = None
        self.cuda_context_bytes = None

    def start(self) -> None:
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

    def start_attempt(self) -> None:
        """Peaks from zero and a fresh NVML sampler per attempt (an attempt that ran out of memory does not count in
        the next one)."""
        if not self.cuda:
            return
        from calibrate.nvml import NvmlSampler

        torch.cuda.reset_peak_memory_stats(self.device)
        if self.nvml is not None:
            self.nvml.stop()
        self.nvml = NvmlSampler(self.device.index or 0, interval_s=0.01).start()

    def stop_nvml(self) -> int | None:
        """Peak NVML bytes this process held during the attempt (CUDA context included): the device's peak `used`
        less what was used before this process started CUDA."""
        if self.nvml is None or not self.nvml.available:
            return None
        self.nvml.stop()
        if self.nvml.peak_used_bytes is None:
            return None
        return max(0, self.nvml.peak_used_bytes - (self.nvml_baseline or 0))

    def peaks(self) -> dict:
        if not self.cuda:
            return {}
        return {"peak_allocated_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(self.device)),
                "cuda_context_bytes": self.cuda_context_bytes,
                "nvml_peak_used_bytes": self.stop_nvml()}

    def measured(self, step_seconds: list[float], tokens: list[int]) -> dict:
        """Step times, steady-state tokens/s (the first STEADY_SKIP steps left out), peak RSS and the CUDA peaks."""
        steady = list(zip(step_seconds, tokens))[STEADY_SKIP:] or list(zip(step_seconds, tokens))
        secs = [s for s, _ in steady]
        m = {
            "device": "cuda" if self.cuda else "cpu",
            "step_seconds": [round(s, 6) for s in secs[:1000]],
            "tokens_per_s": round(sum(t for _, t in steady) / sum(secs), 1) if secs and sum(secs) > 0 else None,
            "steps": len(step_seconds),
            "warmup_steps": min(STEADY_SKIP, max(0, len(step_seconds) - 1)),
            "process_peak_rss_bytes": peak_rss(),
        }
        m.update(self.peaks())
        return m

    def gpu_name(self, fallback: str | None) -> str | None:
        """The GPU profile of the device this runs on (else `fallback`, the plan's)."""
        if self.cuda:
            from planner.profiles import gpu_from_nvml_name

            g = gpu_from_nvml_name(torch.cuda.get_device_name(self.device))
            if g is not None:
                return g.name
        return fallback


class Recorder:
    """The run's records: `run_record.json` at the end, an `oom` record in `records/` for each miss (and on CUDA,
    unless --no-record, a copy in calibrate/results)."""

    def __init__(self, spec, pf, out: Path, memory: DeviceMemory, processes: int, train_ds):
        self.spec, self.pf, self.out, self.memory = spec, pf, out, memory
        self.processes, self.train_ds = processes, train_ds
        self.model_config = json.loads((Path(spec.model_path) / "config.json").read_text())

    def meta_info(self) -> dict:
        import platform

        versions = {m: v for m in ("torch", "transformers", "peft", "accelerate", "bitsandbytes")
                    if (v := _version(m)) is not None}
        meta = {"versions": versions, "host": platform.node(), "processes": self.processes,
                "data": self.train_ds.summary(),
                "workload": "real data (dynamic padding); the prediction assumes every sequence is seq_len long"}
        if self.memory.cuda:
            from calibrate.nvml import device_info
            from planner.profiles import gpu_from_nvml_name

            device = self.memory.device
            name = torch.cuda.get_device_name(device)
            g = gpu_from_nvml_name(name)
            meta.update(gpu_name=name, gpu_profile=g.name if g else None,
                        gpu_total_bytes=int(torch.cuda.get_device_properties(device).total_memory))
            info = device_info(device.index or 0)
            if info:
                meta["driver"] = info["driver"]
        return meta

    def record(self, tc: TrainConfig, measured: dict, status: str, prediction: dict, error: str | None = None) -> dict:
        from calibrate.record import new_record

        pred = {k: v for k, v in prediction.items() if k in (*PREDICTED, "planner_version")}
        model = self.pf.model if "/" not in self.pf.model else Path(self.pf.model).name
        return new_record(kind="run", model_name=model, model_config=dict(self.model_config), train=tc.to_dict(),
                          measured=measured, status=status, prediction=pred, meta_info=self.meta_info(),
                          command=self.spec.command, source=str(self.out), error=error)

    def write_run(self, tc: TrainConfig, measured: dict, prediction: dict) -> dict:
        from calibrate.record import write_record

        rec = self.record(tc, measured, "ok", prediction)
        path = self.out / RECORD_NAME
        files.write_json(path, rec)
        paths = {"run": str(path)}
        if self.memory.cuda and self.spec.record:
            paths["calibrate"] = str(write_record(rec))
        return paths

    def write_oom(self, tc: TrainConfig, msg: str, step: int, prediction: dict) -> str:
        """An `oom` record of the miss, written by the process that ran out of memory."""
        from calibrate.record import write_record

        measured = {"device": "cuda" if self.memory.cuda else "cpu", "steps": step,
                    "process_peak_rss_bytes": peak_rss()}
        measured.update(self.memory.peaks())
        rec = self.record(tc, measured, "oom", prediction, error=msg)
        path = write_record(rec, self.out / "records")
        if self.memory.cuda and self.spec.record:
            write_record(rec)
        return str(path)
