"""The analytic model against the fp16 trace grid (calibrate/reference/trace-points-fp16.jsonl): `--precision fp16`
(fp32 master weights under fp16 autocast, a GradScaler), full fine-tuning and LoRA, with and without checkpointing,
a GQA and a non-GQA tiny family, on a T4 (sm75: no flash kernel) and an A100 (sm80), plus TRL's chunked loss and
eager attention. Regenerate with `python -m calibrate.trace_grid --grid fp16 --out
calibrate/reference/trace-points-fp16.jsonl`."""


import pytest

from calibrate.trace_grid import TINY_FAMILIES, read_points
from planner.arch import arch_from_config
from planner.config import TrainConfig
from planner.memory import estimate_memory
from planner.profiles import load_gpu


def _points():
    return read_points("trace-points-fp16.jsonl")


def _error(p):
    est = estimate_memory(arch_from_config(p["config"], name=p["model"]), TrainConfig.from_dict(p["train"]),
                          load_gpu(p["gpu"]))
    traced = p["trace"]["peak_allocated_bytes"]
    return est, (est.peak_allocated_bytes - traced) / traced


def test_fp16_grid_crosses_methods_checkpointing_families_and_both_sides_of_sm80():
    pts = _points()
    assert {p["train"]["precision"] for p in pts} == {"fp16"}
    assert {p["train"]["method"] for p in pts} == {"full", "lora"}
    assert {p["train"]["grad_ckpt"] for p in pts} == {False, True}
    assert {p["model"] for p in pts} == set(TINY_FAMILIES)
    assert {p["gpu"] for p in pts} == {"t4-16gb", "a100-sxm-80gb"}
    recipes = [TrainConfig.from_dict(p["train"]).recipe for p in pts]
    assert {r.loss for r in recipes} == {"plain", "chunked"}
    assert {r.attn_implementation for r in recipes} == {"sdpa", "eager"}
    # the sdpa kernel the trace's dispatch picked differs across sm80: no flash kernel on the T4
    kernels = {(p["gpu"], k.strip()) for p in pts for n in p["trace"]["notes"] if n.startswith("sdpa on")
               for k in n.split(":", 1)[1].split(",")}
    assert ("a100-sxm-80gb", "flash") in kernels and not any(k == "flash" for g, k in kernels if g == "t4-16gb")


@pytest.mark.parametrize("point", _points(), ids=lambda p: f"{p['id']}-{p['model']}-{p['gpu']}")
def test_analytic_matches_the_fp16_trace_within_2_percent(point):
    est, err = _error(point)
    assert abs(err) <= 0.02, f"{point['train']}: analytic {err:+.2%} (model at {est.peak_event}, trace at {point['trace']['peak_phase']})"
    assert est.trainable_params == point["trace"]["trainable_params"]
