"""The real CUDA path of `ftplan calibrate` (skipped without a GPU, see conftest.py): allocator and NVML peaks,
the CUDA context, QLoRA's save-and-quantize build, a real out-of-memory record, and the busy-GPU refusal.

Run on a GPU machine: `pytest tests/test_calibrate_gpu.py -q` (about a minute; the OOM test builds a 70B model
until the GPU is full)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from calibrate.record import load_records

pytestmark = pytest.mark.gpu

FTPLAN = str(Path(sys.executable).parent / "ftplan")


@pytest.fixture
def tiny_config(make_tiny_config) -> Path:
    # big enough for the GPU to show real allocations
    return make_tiny_config(hidden_size=256, intermediate_size=512, vocab_size=1024, max_position_embeddings=512)


def calibrate(*args, timeout=900):
    return subprocess.run([FTPLAN, "calibrate", *args], capture_output=True, text=True, timeout=timeout)


def test_cuda_record_has_allocator_nvml_and_context(tiny_config, tmp_path):
    p = calibrate("--model", str(tiny_config), "--method", "lora", "--seq-len", "256", "--batch-size", "2",
                  "--steps", "4", "--out", str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    (rec,) = load_records([tmp_path])
    m, meta = rec["measured"], rec["meta_info"]
    assert rec["status"] == "ok" and m["device"] == "cuda"
    assert 0 < m["peak_allocated_bytes"] <= m["peak_reserved_bytes"]
    assert m["tokens_per_s"] > 0 and len(m["step_seconds"]) == 4 and m["warmup_steps"] == 2
    assert meta["gpu_name"] and meta["gpu_total_bytes"] > 0 and meta["cuda"]["torch_cuda"]
    if meta["cuda"]["nvml_baseline_used_bytes"] is not None:  # NVML present
        assert meta["driver"]
        assert m["nvml_peak_used_bytes"] >= meta["cuda"]["nvml_baseline_used_bytes"] + m["peak_reserved_bytes"]
        assert 100 * 2**20 < m["cuda_context_bytes"] < 4 * 2**30
    assert Path(rec["_path"]).parent.name == (meta["gpu_profile"] or Path(rec["_path"]).parent.name)
    pred = rec["prediction"]
    assert pred["peak_allocated_bytes"] > 0
    if meta["gpu_profile"]:
        assert pred["tokens_per_s"] > 0
        # the memory model (cuBLAS workspace included) is close even on a tiny model
        diff = abs(pred["peak_allocated_bytes"] - m["peak_allocated_bytes"])
        assert diff < max(64 * 2**20, 0.1 * m["peak_allocated_bytes"])


def test_qlora_builds_saves_and_quantizes(tiny_config, tmp_path):
    p = calibrate("--model", str(tiny_config), "--method", "qlora", "--target-modules", "all-linear", "--grad-ckpt",
                  "--seq-len", "256", "--batch-size", "2", "--steps", "3", "--out", str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    (rec,) = load_records([tmp_path])
    assert rec["status"] == "ok" and rec["meta_info"]["trainable_params"] > 0
    assert rec["measured"]["peak_allocated_bytes"] > 0


@pytest.mark.slow
def test_a_real_out_of_memory_is_a_record(tmp_path):
    """Full fine-tuning of 70B in bf16 fits on no single GPU: the load (or, on a 141 GB H200, the first step) runs
    out of memory and the record says so."""
    p = calibrate("--model", "llama-2-70b", "--method", "full", "--seq-len", "512", "--steps", "2",
                  "--out", str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    (rec,) = load_records([tmp_path])
    assert rec["status"] == "oom" and rec["meta_info"]["phase"] in ("load", "step1")
    assert rec["measured"]["peak_allocated_bytes"] > 0.5 * rec["meta_info"]["gpu_total_bytes"]
    assert rec["prediction"]["fits"] is False


def test_a_busy_gpu_is_refused_unless_forced(tiny_config, tmp_path):
    import torch

    hog = torch.empty(3 * 2**30, dtype=torch.uint8, device="cuda")  # 3 GiB held by this process
    try:
        p = calibrate("--model", str(tiny_config), "--seq-len", "64", "--steps", "2", "--out", str(tmp_path))
        assert p.returncode == 1 and "--force" in p.stderr
        assert not list(tmp_path.rglob("*.json"))
        p = calibrate("--model", str(tiny_config), "--seq-len", "64", "--steps", "2", "--out", str(tmp_path), "--force")
        assert p.returncode == 0, p.stdout + p.stderr
        (rec,) = load_records([tmp_path])
        assert rec["meta_info"]["forced"] is True
    finally:
        del hog
        torch.cuda.empty_cache()
