"""Device memory as NVML sees it (pynvml, package `nvidia-ml-py`): what the whole process holds on the GPU,
CUDA context and paged (managed) memory included, which `torch.cuda` does not count.

`NvmlSampler` polls `nvmlDeviceGetMemoryInfo(...).used` from a background thread to catch the peak between
calls; `device_info` names the GPU (matched to a profile by `planner.profiles.gpu_from_nvml_name`).
Everything here degrades to None when NVML is not available (CPU machines, containers without the driver).
"""

from __future__ import annotations

import threading
import time


def _nvml():
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # pynvml.NVMLError and driver-less environments
        return None
    return pynvml


def device_info(index: int = 0) -> dict | None:
    """{name, total_bytes, used_bytes, driver} of GPU `index`, or None without NVML."""
    nv = _nvml()
    if nv is None:
        return None
    try:
        h = nv.nvmlDeviceGetHandleByIndex(index)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        name = nv.nvmlDeviceGetName(h)
        driver = nv.nvmlSystemGetDriverVersion()
        return {
            "name": name.decode() if isinstance(name, bytes) else name,
            "total_bytes": int(mem.total),
            "used_bytes": int(mem.used),
            "driver": driver.decode() if isinstance(driver, bytes) else driver,
        }
    except Exception:
        return None


class NvmlSampler:
    """Peak of NVML `used` bytes on one GPU while active. Use as a context manager:

        with NvmlSampler(0, interval_s=0.005) as s:
            ...
        s.peak_used_bytes, s.baseline_used_bytes
    """

    def __init__(self, index: int = 0, interval_s: float = 0.005):
        self.index = index
        self.interval_s = interval_s
        self.peak_used_bytes: int | None = None
        self.baseline_used_bytes: int | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nv = _nvml()
        self._handle = None
        if self._nv is not None:
            try:
                self._handle = self._nv.nvmlDeviceGetHandleByIndex(index)
            except Exception:
                self._nv = None

    @property
    def available(self) -> bool:
        return self._nv is not None

    def used_now(self) -> int | None:
        if not self.available:
            return None
        return int(self._nv.nvmlDeviceGetMemoryInfo(self._handle).used)

    def _run(self) -> None:
        while not self._stop.is_set():
            used = self.used_now()
            self.samples += 1
            if used is not None and (self.peak_used_bytes is None or used > self.peak_used_bytes):
                self.peak_used_bytes = used
            time.sleep(self.interval_s)

    def start(self) -> "NvmlSampler":
        if self.available:
            self.baseline_used_bytes = self.used_now()
            self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> int | None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            final = self.used_now()  # the last instant too
            if final is not None and (self.peak_used_bytes is None or final > self.peak_used_bytes):
                self.peak_used_bytes = final
        return self.peak_used_bytes

    def __enter__(self) -> "NvmlSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
