"""DeepSpeed ZeRO-2/3 in bf16 mode: the analytic per-GPU peak against the real engine (calibrate/trace_zero.py: two
CPU processes over gloo, rank 0's storages counted). The grid is precomputed in
calibrate/reference/trace-points-zero.jsonl (`python -m calibrate.trace_grid --grid zero --out ...`); one point is
re-run live here and must reproduce its record."""

import json
from pathlib import Path

import pytest

from planner.config import TrainConfig

ZERO_REFERENCE = Path(__file__).resolve().parents[1] / "calibrate" / "reference" / "trace-points-zero.jsonl"


def _points():
    return [json.loads(line) for line in ZERO_REFERENCE.read_text().splitlines() if line.strip()]


def _arch(point):
    from planner.arch import arch_from_config

    return arch_from_config(point["config"], name=point["model"])


def test_zero_points_cover_the_grid():
    pts = _points()
    configs = [TrainConfig.from_dict(p["train"]) for p in pts]
    assert {(tc.strategy, tc.method, tc.grad_ckpt) for tc in configs} == {
        (s, m, c) for s in ("zero2", "zero3") for m in ("full", "lora") for c in (False, True)}
    assert {tc.num_gpus for tc in configs} == {2}
    assert {p["config"]["tie_word_embeddings"] for p in pts} == {False, True}
    # every point took its optimizer steps: the Adam state is live in the second step's forward
    for p in pts:
        assert p["trace"]["phase_by_tag"]["forward1"].get("optimizer_state", 0) > 0, p["id"]


@pytest.mark.parametrize("point", _points(), ids=lambda p: f"{p['id']}-{p['model']}-{p['train']['strategy']}-"
                         f"{p['train']['method']}{'-ckpt' if p['train']['grad_ckpt'] else ''}")
def test_zero_formulas_match_the_real_engine(point):
    """Within 2 % per GPU (the peak with the cuBLAS workspace, as the other multi-GPU points)."""
    from planner.memory import estimate_memory

    tc = TrainConfig.from_dict(point["train"])
    est = estimate_memory(_arch(point), tc)
    traced = point["trace"]["peak_allocated_bytes"]
    err = (est.peak_allocated_bytes - traced) / traced
    assert abs(err) <= 0.02, (f"{point['model']} {tc.describe()}: analytic {err:+.2%} (at {est.peak_event}; "
                              f"trace at {point['trace']['peak_phase']})")


def test_zero3_keeps_the_model_gathered_from_the_second_step():
    """DeepSpeed's reuse distance (1e9 parameters by default) keeps every unit of a small model gathered from its
    forward to its backward once the first step has recorded the order: the second step's forward holds the whole
    bf16 model more than the first's (ZeRO-2 does not gather). The planner's rule says the same for these models,
    except the frozen untied embedding of LoRA without checkpointing (not in the backward order)."""
    from planner.strategies.zero import zero3_kept_params

    pts = {(p["train"]["strategy"], p["train"]["method"], p["train"]["grad_ckpt"]): p for p in _points()}
    for method, ckpt in (("full", False), ("full", True)):
        p3, p2 = pts[("zero3", method, ckpt)], pts[("zero2", method, ckpt)]
        arch = _arch(p3)
        grow3 = p3["trace"]["phase_peaks"]["forward1"] - p3["trace"]["phase_peaks"]["forward0"]
        grow2 = p2["trace"]["phase_peaks"]["forward1"] - p2["trace"]["phase_peaks"]["forward0"]
        # the bf16 model, less the persistent norms (kept whole from the start) and block rounding
        assert grow3 - grow2 == pytest.approx(2 * arch.total_params, rel=0.02), (method, ckpt)
        assert zero3_kept_params(arch, TrainConfig.from_dict(p3["train"])) == arch.total_params
    lora = pts[("zero3", "lora", False)]
    arch = _arch(lora)
    tc = TrainConfig.from_dict(lora["train"])
    assert zero3_kept_params(arch, tc) == arch.total_params + tc.spec.trainable_params(arch, tc) - arch.embedding_params


def test_live_zero3_run_reproduces_its_record():
    """One point of the grid run again (two processes, ~20 s): the same bytes, phase by phase."""
    pytest.importorskip("deepspeed")
    from calibrate.trace_zero import trace_zero_step

    point = next(p for p in _points() if p["train"]["strategy"] == "zero3" and p["train"]["method"] == "lora"
                 and p["train"]["grad_ckpt"])
    tc = TrainConfig.from_dict(point["train"])
    live = trace_zero_step(point["config"], tc, cuda_workspace_bytes=point["trace"]["cuda_workspace_bytes"]).to_dict()
    assert live["peak_allocated_bytes"] == pytest.approx(point["trace"]["peak_allocated_bytes"], rel=0.005)
    for phase, nbytes in point["trace"]["phase_peaks"].items():
        assert live["phase_peaks"][phase] == pytest.approx(nbytes, rel=0.005), phase


def test_zero_trace_refuses_what_it_does_not_follow():
    from calibrate.trace_zero import trace_zero_step, traceable

    config = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    base = TrainConfig(method="full", precision="bf16", seq_len=64, num_gpus=2, strategy="zero3")
    assert traceable(base) and traceable(base.replace(strategy="zero2"))
    for tc in (base.replace(num_gpus=8), base.replace(cpu_offload=True), base.replace(strategy="fsdp"),
               base.replace(method="lora", quant="nf4", rank=16), base.replace(precision="fp32")):
        assert not traceable(tc)
        with pytest.raises(ValueError, match="zero2 or zero3 on 2 GPUs"):
            trace_zero_step(config, tc)


def test_zero3_releases_the_gathered_parameters_before_the_optimizer_step():
    """The optimizer step's event (no gathered parameters: `Zero3.step_buffers`) against the trace's optimizer
    phase of the second step, within 1 %."""
    from planner.memory import estimate_memory

    for point in _points():
        tc = TrainConfig.from_dict(point["train"])
        if tc.strategy != "zero3":
            continue
        est = estimate_memory(_arch(point), tc).events["optimizer step"]
        traced = point["trace"]["phase_peaks"]["optimizer1"] + point["trace"]["cuda_workspace_bytes"]
        assert est == pytest.approx(traced, rel=0.01), (point["id"], tc.describe())
