"""The multi-GPU trace (calibrate/trace_multigpu.py) against a real FSDP2 run: two processes over gloo on CPU, the
same tiny model, sharding, step and byte tracker on real tensors. Same bytes within 1 %, phase by phase."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")

from planner.config import TrainConfig  # noqa: E402

TINY_UNTIED = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False,
                   max_position_embeddings=256)


def _real(tmp_path, config, tc, world=2) -> dict:
    import torch.multiprocessing as mp

    from calibrate.trace_multigpu import real_rank

    out = tmp_path / "rank0.json"
    mp.spawn(real_rank, args=(world, config, tc.to_dict(), str(tmp_path / "init"), str(out)), nprocs=world,
             join=True)
    return json.loads(out.read_text())


@pytest.mark.parametrize("method,tied", [("full", False), ("lora", True)])
def test_fake_trace_matches_real_gloo_fsdp2(tmp_path, method, tied):
    from calibrate.trace_multigpu import trace_sharded_step

    config = dict(TINY_UNTIED, tie_word_embeddings=tied)
    tc = TrainConfig(method=method, precision="bf16", seq_len=128, batch_size=2, num_gpus=2, strategy="fsdp",
                     target_modules=("all-linear",))
    real = _real(tmp_path, config, tc)
    fake = trace_sharded_step(config, tc).to_dict()
    assert fake["peak_allocated_bytes"] == pytest.approx(real["peak_allocated_bytes"], rel=0.01)
    for phase, nbytes in real["phase_peaks"].items():
        assert fake["phase_peaks"][phase] == pytest.approx(nbytes, rel=0.01), phase


def test_sharded_trace_ignores_dtensor_propagation_shadows():
    """The known trap: DTensor's sharding propagation runs each optimizer op on global shapes; counted, the
    optimizer step at N=2 holds the whole model's state again. Rank 0's state is half the unsharded state."""
    from calibrate.trace import trace_step
    from calibrate.trace_multigpu import trace_sharded_step

    tc1 = TrainConfig(method="full", precision="bf16", seq_len=64, batch_size=1)
    one = trace_step(TINY_UNTIED, tc1).to_dict()
    two = trace_sharded_step(TINY_UNTIED, tc1.replace(num_gpus=2, strategy="fsdp")).to_dict()
    # half the state, plus the 512-byte rounding of each of the many small shards
    assert two["peak_by_tag"].get("optimizer_state", 0) < 0.6 * one["peak_by_tag"]["optimizer_state"]
    assert two["phase_peaks"]["optimizer1"] < one["phase_peaks"]["optimizer1"]


def test_sharded_trace_refuses_what_it_does_not_follow():
    from calibrate.trace_multigpu import trace_sharded_step

    tc = TrainConfig(method="full", seq_len=64, num_gpus=2, strategy="zero3")
    with pytest.raises(ValueError, match="fsdp"):
        trace_sharded_step(TINY_UNTIED, tc)


# -- the analytic FSDP2 formulas against the grid of traced points ------------------------------------------------

from pathlib import Path  # noqa: E402

MULTIGPU_REFERENCE = Path(__file__).resolve().parents[1] / "calibrate" / "reference" / "trace-points-multigpu.jsonl"


def _multigpu_points():
    return [json.loads(line) for line in MULTIGPU_REFERENCE.read_text().splitlines() if line.strip()]


def test_multigpu_points_cover_the_grid():
    pts = _multigpu_points()
    assert {p["train"]["num_gpus"] for p in pts} >= {2, 8, 64}
    assert {p["train"]["method"] for p in pts} == {"full", "lora"}
    assert {p["train"]["grad_ckpt"] for p in pts} == {False, True}
    assert {p["train"]["strategy"] for p in pts} == {"fsdp"}


@pytest.mark.parametrize("point", _multigpu_points(), ids=lambda p: f"{p['id']}-{p['model']}-{p['train']['method']}"
                         f"-n{p['train']['num_gpus']}{'-ckpt' if p['train']['grad_ckpt'] else ''}")
def test_fsdp2_formulas_match_the_multigpu_trace(point):
    """Within 2 % per GPU, full fine-tuning and LoRA (whose fp32 adapters FSDP2 gathers in bf16:
    `planner.memory.gathered_adapter_dtype`)."""
    from planner.memory import estimate_memory
    from planner.profiles import load_model

    tc = TrainConfig.from_dict(point["train"])
    est = estimate_memory(load_model(point["model"]), tc)
    traced = point["trace"]["peak_allocated_bytes"]
    err = (est.peak_allocated_bytes - traced) / traced
    msg = f"{point['model']} {tc.describe()}: analytic {err:+.2%} (at {est.peak_event}; trace at {point['trace']['peak_phase']})"
    assert abs(err) <= 0.02, msg


def test_estimate_trace_on_several_gpus_traces_fsdp_and_says_what_it_did_not(tmp_path):
    from click.testing import CliRunner

    from planner.cli import cli

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_UNTIED))
    args = ["estimate", "--model", str(cfg), "--method", "full", "--seq-len", "64", "--trace", "--json"]
    r = CliRunner().invoke(cli, args + ["--num-gpus", "2", "--strategy", "fsdp"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert any("FSDP2 rank 0 of 2" in n for n in d["trace"]["notes"])
    assert abs(d["peak_allocated_bytes"] - d["trace"]["peak_allocated_bytes"]) / d["trace"]["peak_allocated_bytes"] < 0.1
    r = CliRunner().invoke(cli, args + ["--num-gpus", "2", "--strategy", "zero2"])
    assert r.exit_code == 0, r.output
    assert any("is not traced" in n for n in json.loads(r.stdout)["trace"]["notes"])
