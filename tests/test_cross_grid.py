"""The cross grid (issue 11's numbers): configurations that draw every recipe option at once (attention
implementation, loss, packing or padding, activation offloading, offloaded checkpoints, k-bit preparation, adapter
dtype, modules_to_save) with every method, precision and checkpointing on a GQA and a non-GQA tiny family, traced
(`python -m calibrate.trace_grid --grid cross --out calibrate/reference/trace-points-cross.jsonl`), against the
analytic model: every point within 2 %, no exception."""

import dataclasses
import statistics

import pytest

from calibrate.trace_grid import CUDA_WORKSPACE_H100, TINY_FAMILIES, cross_points, model_arch, planned_error, read_points
from planner.config import TrainConfig
from planner.memory import estimate_memory
from planner.recipe import MODELLED


def _points():
    return read_points("trace-points-cross.jsonl")


_error = planned_error  # (config, estimate, relative error of the analytic peak)


def test_the_stored_grid_is_the_one_cross_points_draws():
    """The reference file was traced from today's `cross_points` (same seed, same draws, same order)."""
    drawn = cross_points()
    stored = _points()
    assert len(stored) == len(drawn)
    for (model, d), p in zip(drawn, stored):
        assert p["model"] == model
        assert TrainConfig.from_dict(p["train"]) == TrainConfig(**d)


def test_the_grid_crosses_every_option_method_precision_and_checkpointing():
    tcs = [(p["model"], TrainConfig.from_dict(p["train"])) for p in _points()]
    recipes = [tc.recipe for _, tc in tcs]
    for name in ("attn_implementation", "loss", "packing", "padding", "activation_offload", "offload_checkpoints",
                 "adapter_dtype"):
        assert {getattr(r, name) for r in recipes} == set(MODELLED[name]), name
    # k-bit preparation is QLoRA's option: both values drawn there
    assert {tc.recipe.kbit_preparation for _, tc in tcs if tc.base_quant.quantized} == {True, False}
    assert {m for r in recipes for m in r.modules_to_save} == set(MODELLED["modules_to_save"])
    assert {tc.method_name for _, tc in tcs} >= {"full", "lora", "qlora", "dora"}
    assert {tc.precision for _, tc in tcs if not tc.base_quant.quantized} == {"bf16", "mixed", "fp16", "fp32"}
    assert {tc.grad_ckpt for _, tc in tcs} == {False, True}
    assert {m for m, _ in tcs} == set(TINY_FAMILIES)
    gqa = {TINY_FAMILIES[m]["num_attention_heads"] != TINY_FAMILIES[m]["num_key_value_heads"] for m, _ in tcs}
    assert gqa == {True, False}
    # options in combination, not one at a time: some point has at least five non-default recipe options
    defaults = TrainConfig().recipe
    changed = [sum(getattr(r, f) != getattr(defaults, f) for f in MODELLED) for r in recipes]
    assert max(changed) >= 5


@pytest.mark.parametrize("point", _points(), ids=lambda p: f"{p['id']}-{p['model']}")
def test_analytic_matches_the_cross_trace(point):
    tc, est, err = _error(point)
    assert abs(err) <= 0.02, f"{tc.describe()} {tc.recipe}: {err:+.2%} at {est.peak_event}"
    assert est.trainable_params == point["trace"]["trainable_params"]


def test_the_cross_grid_median_error_is_tiny():
    errs = [abs(_error(p)[2]) for p in _points()]
    assert statistics.median(errs) < 0.002
    assert max(errs) < 0.01


def test_one_tile_of_trls_loss_live():
    """The point whose tokens fit one tile of TRL 1.16's fused LM head with a trained lm_head copy (LoRA r8 +
    modules_to_save lm_head, 1 x 256 tokens, packed, flash-attention 2, activation offloading, bf16 adapters,
    checkpointing): traced again now, it gives the stored peak, and the analytic model agrees with it; its loss
    backward holds the fp32 accumulator of the lm_head gradient (`ChunkedLogProbFunction.backward`), which an
    untrained lm_head does not have."""
    from calibrate.trace import trace_step
    from planner.layers import chunked_loss_chunks

    point = next(p for p in _points() if p["id"] == "t030")
    tc = TrainConfig.from_dict(point["train"])
    assert tc.recipe.loss == "chunked" and "lm_head" in tc.recipe.modules_to_save and chunked_loss_chunks(tc) == 1
    arch = model_arch(point["model"])
    config = dict(arch.config, max_position_embeddings=max(16384, tc.seq_len + tc.num_virtual_tokens))
    config.pop("rope_scaling", None)
    traced = trace_step(config, tc, cuda_workspace_bytes=CUDA_WORKSPACE_H100)
    assert traced.peak_allocated_bytes == point["trace"]["peak_allocated_bytes"]
    est = estimate_memory(arch, tc)
    assert abs(est.peak_allocated_bytes / traced.peak_allocated_bytes - 1) < 0.005
    frozen = tc.replace(recipe=dataclasses.replace(tc.recipe, modules_to_save=()))
    assert (est.events["loss backward"] - estimate_memory(arch, frozen).events["loss backward"]
            >= arch.vocab_size * arch.hidden_size * 4)
