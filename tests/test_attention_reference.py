"""The analytic model against the attention trace grid (calibrate/reference/trace-points-attn.jsonl): sdpa (each
kernel torch 2.13 picks: flash, memory-efficient, math), eager and flash_attention_2, every precision, checkpointing, a GQA and a
non-GQA family, on sm90, sm89 and sm75. Regenerate with `python -m calibrate.trace_grid --grid attn --out
calibrate/reference/trace-points-attn.jsonl`."""

import json

import pytest

from calibrate.trace_grid import read_points
from planner.arch import arch_from_config
from planner.config import TrainConfig
from planner.memory import estimate_memory
from planner.profiles import load_gpu


def _points():
    return read_points("trace-points-attn.jsonl")


def _estimate(p):
    return estimate_memory(arch_from_config(p["config"], name=p["model"]), TrainConfig.from_dict(p["train"]),
                           load_gpu(p["gpu"]))


def test_attention_grid_covers_kernels_implementations_and_families():
    pts = _points()
    attn = {p["train"].get("recipe", {}).get("attn_implementation", "sdpa") for p in pts}
    assert attn == {"sdpa", "eager", "flash_attention_2"}
    assert {p["model"] for p in pts} == {"tiny-llama3-gqa", "tiny-llama2-mha"}
    assert {p["gpu"] for p in pts} >= {"h100-sxm-80gb", "t4-16gb", "l4-24gb"}
    kernels = {k.strip() for p in pts for n in p["trace"]["notes"] if n.startswith("sdpa on")
               for k in n.split(":", 1)[1].split(",")}
    assert kernels >= {"flash", "efficient", "math"}
    assert {p["train"]["grad_ckpt"] for p in pts} == {False, True}
    assert {p["train"]["method"] for p in pts} >= {"full", "lora", "qlora", "prefix", "prompt"}


@pytest.mark.parametrize("point", _points(), ids=lambda p: f"{p['id']}-{p['model']}-{p['gpu']}")
def test_analytic_matches_attention_trace_within_2_percent(point):
    est = _estimate(point)
    traced = point["trace"]["peak_allocated_bytes"]
    err = (est.peak_allocated_bytes - traced) / traced
    assert abs(err) <= 0.02, f"{point['train']}: analytic {err:+.2%} (model at {est.peak_event}, trace at {point['trace']['peak_phase']})"


def test_math_kernel_is_what_makes_fp32_gqa_expensive():
    """The fp32 grouped-head point runs the math kernel on the H100 and costs much more than its non-grouped twin
    would if both ran fused: the attention matrices are saved."""
    by = {(p["model"], p["gpu"], json.dumps(p["train"], sort_keys=True)): p for p in _points()}
    fp32 = [p for p in by.values() if p["train"].get("precision") == "fp32" and p["train"]["method"] == "full"
            and p["gpu"] == "h100-sxm-80gb" and not p["train"]["grad_ckpt"] and "recipe" not in p["train"]]
    notes = {p["model"]: " ".join(p["trace"]["notes"]) for p in fp32}
    assert "math" in notes["tiny-llama3-gqa"] and "efficient" in notes["tiny-llama2-mha"]
