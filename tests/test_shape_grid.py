"""The shape of the data (issue 11 item 3): packed rows and batches padded to the longest row, under sdpa, eager and
flash_attention_2, with full / LoRA / QLoRA, precisions and checkpointing on a GQA and a non-GQA tiny family, traced
(`python -m calibrate.trace_grid --grid shape --out calibrate/reference/trace-points-shape.jsonl`: transformers' own
mask code on the batch's real position ids and attention mask), against the analytic model."""

import statistics

import pytest

from calibrate.trace_grid import TINY_FAMILIES, model_arch, planned_error, read_points
from planner.config import TrainConfig
from planner.memory import estimate_memory
from planner.recipe import Recipe


def _points():
    return read_points("trace-points-shape.jsonl")


_error = planned_error  # (config, estimate, relative error of the analytic peak)


def test_the_grid_crosses_both_shapes_every_attention_method_and_checkpointing_on_two_families():
    tcs = [(p["model"], TrainConfig.from_dict(p["train"])) for p in _points()]
    assert len(tcs) <= 40
    assert {m for m, _ in tcs} == set(TINY_FAMILIES) | {"family:gemma3_text"}  # + sliding-window layers
    shapes = {("packing" if tc.recipe.packing else tc.recipe.padding, tc.recipe.attn_implementation) for _, tc in tcs}
    assert shapes == {("packing", "sdpa"), ("longest", "sdpa"), ("packing", "eager"), ("longest", "eager"),
                      ("packing", "flash_attention_2"), ("longest", "flash_attention_2")}
    assert {tc.method_name for _, tc in tcs} == {"full", "lora", "qlora"}
    assert {tc.precision for _, tc in tcs if not tc.base_quant.quantized} == {"bf16", "mixed", "fp32"}
    assert {tc.grad_ckpt for _, tc in tcs} == {False, True}
    gqa = {m: TINY_FAMILIES[m]["num_attention_heads"] != TINY_FAMILIES[m]["num_key_value_heads"] for m in TINY_FAMILIES}
    assert set(gqa.values()) == {True, False}


def test_the_trace_ran_the_kernels_the_masks_select():
    """A materialized mask takes sdpa off flash and off `enable_gqa` (transformers copies keys and values to every
    head): on the H100 the mem-efficient kernel runs, in fp32 too (the math kernel of fp32 GQA without a mask does
    not)."""
    seen = set()
    for p in _points():
        tc = TrainConfig.from_dict(p["train"])
        if tc.recipe.attn_implementation != "sdpa":
            continue
        note = next(n for n in p["trace"]["notes"] if n.startswith("sdpa on"))
        assert note == "sdpa on sm90: efficient", (tc.describe(), note)
        seen.add(tc.precision)
    assert seen == {"bf16", "mixed", "fp32"}


@pytest.mark.parametrize("point", _points(), ids=lambda p: f"{p['id']}-{p['model']}")
def test_analytic_matches_the_shape_trace(point):
    tc, est, err = _error(point)
    assert abs(err) <= 0.02, f"{tc.describe()} {tc.recipe}: {err:+.2%} at {est.peak_event}"
    assert est.trainable_params == point["trace"]["trainable_params"]


def test_the_shape_is_what_the_sdpa_points_measure():
    """Under sdpa each point's prediction moves with the shape of the data (the bool mask, the kernel it selects
    and its bias, the copied keys and values, packing's per-row rotary tables and no KV cache) by at least ten times
    its error against the trace: the grid would catch any of them left out."""
    for p in _points():
        tc, est, err = _error(p)
        if tc.recipe.attn_implementation != "sdpa":
            continue
        plain = tc.replace(recipe=Recipe(**{**tc.recipe.to_dict(), "packing": False, "padding": "none"}))
        ref = estimate_memory(model_arch(p["model"]), plain).peak_allocated_bytes
        assert abs(est.peak_allocated_bytes - ref) / ref > 10 * abs(err), (tc.describe(), tc.recipe)


def test_the_shape_grid_median_error_is_tiny():
    errs = [abs(_error(p)[2]) for p in _points()]
    assert statistics.median(errs) < 0.002
