"""The recipe grid (issue 11): every loss x precision x method (full, lora, qlora) x checkpointing on a GQA Llama and a
non-GQA Qwen2 tiny family, traced (`python -m calibrate.trace_grid --grid recipe --out
calibrate/reference/trace-points-recipe.jsonl`), against the analytic model."""

import statistics

import pytest

from calibrate.trace_grid import TINY_FAMILIES, planned_error, read_points
from planner.config import TrainConfig


def _points():
    return read_points("trace-points-recipe.jsonl")


_error = planned_error  # (config, estimate, relative error of the analytic peak)


def test_the_grid_crosses_every_loss_precision_method_and_checkpointing_on_two_families():
    tcs = [(p["model"], TrainConfig.from_dict(p["train"])) for p in _points()]
    assert {m for m, _ in tcs} == set(TINY_FAMILIES)
    assert {tc.recipe.loss for _, tc in tcs} == {"plain", "chunked", "liger", "cce"}
    assert {(tc.method_name, tc.precision) for _, tc in tcs} >= {("full", "bf16"), ("full", "mixed"), ("lora", "bf16"),
                                                                 ("lora", "mixed"), ("qlora", "bf16")}
    assert {tc.grad_ckpt for _, tc in tcs} == {False, True}
    gqa = {m: TINY_FAMILIES[m]["num_attention_heads"] != TINY_FAMILIES[m]["num_key_value_heads"] for m in TINY_FAMILIES}
    assert set(gqa.values()) == {True, False}


@pytest.mark.parametrize("point", _points(), ids=lambda p: f"{p['id']}-{p['model']}-{p['train'].get('recipe', {}).get('loss', 'plain')}")
def test_analytic_matches_the_recipe_trace(point):
    """Within 2% wherever the peak is: the loss, the optimizer or a decoder layer (where LoRA's module inputs, kept by
    peft's forward until it returns, decide it on these tiny models)."""
    tc, est, err = _error(point)
    assert abs(err) <= 0.02, f"{tc.describe()} {tc.recipe.loss}: {err:+.2%} at {est.peak_event}"
    assert est.trainable_params == point["trace"]["trainable_params"]


def test_the_recipe_grid_median_error_is_tiny():
    errs = [abs(_error(p)[2]) for p in _points()]
    assert statistics.median(errs) < 0.002
    assert sum(e <= 0.02 for e in errs) >= 0.9 * len(errs)
