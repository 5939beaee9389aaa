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
    configs = [TrainConfig.from_dict(p["train"]) for p in pts]
    assert {p["train"]["num_gpus"] for p in pts} >= {2, 8, 64}
    assert {tc.method for tc in configs} >= {"full", "lora"}
    assert {p["train"]["grad_ckpt"] for p in pts} == {False, True}
    assert {p["train"]["strategy"] for p in pts} == {"fsdp"}
    # issue 12 item 2: CPU offload (with its host RAM) and a 4-bit base, tied and untied
    offloaded = [p for p, tc in zip(pts, configs) if tc.cpu_offload]
    assert {p["train"]["num_gpus"] for p in offloaded} == {2, 8} and all(p["trace"]["host_bytes"] for p in offloaded)
    quantized = [p for p, tc in zip(pts, configs) if tc.base_quant.quantized]
    assert {p["train"]["num_gpus"] for p in quantized} == {2, 8}
    assert any(tc.cpu_offload for tc in configs if tc.base_quant.quantized)
    assert any("config" in p for p in quantized) and any("config" not in p for p in quantized)
    # bf16 autocast over fp32 shards (`planner.memory.gathered_precision`), with and without offload, and the
    # methods whose layers then compute in bf16 (IA3's vectors, prompt and prefix tuning)
    assert {tc.cpu_offload for tc in configs if tc.precision == "mixed"} == {False, True}
    assert {tc.method for tc in configs if tc.precision == "mixed"} >= {"full", "lora", "ia3", "prompt", "prefix"}
    # untied models, whose last layer the tail unit prefetches after the loss's backward ("head_backward")
    untied = [tc for p, tc in zip(pts, configs) if not _arch(p).tie_word_embeddings]
    cases = {(tc.method, tc.grad_ckpt, tc.cpu_offload) for tc in untied}
    assert cases >= {("full", True, True), ("full", False, False), ("lora", True, False)}


def _arch(point):
    from planner.arch import arch_from_config
    from planner.profiles import load_model

    return arch_from_config(point["config"], name=point["model"]) if "config" in point else load_model(point["model"])


@pytest.mark.parametrize("point", _multigpu_points(), ids=lambda p: f"{p['id']}-{p['model']}-{p['train']['method']}"
                         f"{'-' + p['train']['quant'] if p['train'].get('quant', 'none') != 'none' else ''}"
                         f"-n{p['train']['num_gpus']}{'-ckpt' if p['train']['grad_ckpt'] else ''}"
                         f"{'-offload' if p['train'].get('cpu_offload') else ''}")
def test_fsdp2_formulas_match_the_multigpu_trace(point):
    """Within 2 % per GPU, full fine-tuning, LoRA (whose fp32 adapters FSDP2 gathers in bf16:
    `planner.memory.gathered_adapter_dtype`), QLoRA (the layers compute in bf16: `gathered_recipe`) and bf16
    autocast over fp32 shards (`gathered_precision`); under CPU
    offload the device memory and the host RAM (`planner.strategies.fsdp2.offloaded_host_bytes`) both."""
    from planner.memory import estimate_memory

    tc = TrainConfig.from_dict(point["train"])
    est = estimate_memory(_arch(point), tc)
    traced = point["trace"]["peak_allocated_bytes"]
    err = (est.peak_allocated_bytes - traced) / traced
    msg = f"{point['model']} {tc.describe()}: analytic {err:+.2%} (at {est.peak_event}; trace at {point['trace']['peak_phase']})"
    assert abs(err) <= 0.02, msg
    if tc.cpu_offload:
        host = point["trace"]["host_bytes"]
        assert abs(est.host_bytes - host) / host <= 0.02, f"{point['model']} {tc.describe()}: host {est.host_bytes} vs {host}"
    else:
        assert est.host_bytes == 0 and "host_bytes" not in point["trace"]


TINY_TIED = dict(TINY_UNTIED, hidden_size=256, intermediate_size=512, vocab_size=4096, tie_word_embeddings=True)


def test_cpu_offload_moves_shards_gradients_and_the_step_to_the_host():
    """FSDP2's CPUOffloadPolicy traced: on the device no parameter shard, gradient or optimizer state is left (only
    the rotary buffer of the weights) and no optimizer phase allocates; the host holds the pinned shards and
    gradients and the pageable state, as `offloaded_host_bytes` counts them."""
    from calibrate.trace_multigpu import trace_sharded_step
    from planner.arch import arch_from_config
    from planner.memory import estimate_memory

    tc = TrainConfig(method="lora", rank=16, target_modules=("all-linear",), precision="bf16", seq_len=128,
                     batch_size=2, num_gpus=8, strategy="fsdp")
    on_device = trace_sharded_step(TINY_TIED, tc).to_dict()
    offloaded = trace_sharded_step(TINY_TIED, tc.replace(cpu_offload=True)).to_dict()
    assert not {"trainable", "gradients", "optimizer_state"} & set(offloaded["peak_by_tag"])
    assert offloaded["peak_by_tag"]["weights"] <= 1024
    assert not any(k.startswith("optimizer") for k in offloaded["phase_peaks"])
    assert offloaded["peak_allocated_bytes"] < on_device["peak_allocated_bytes"]
    assert "host_bytes" not in on_device
    est = estimate_memory(arch_from_config(TINY_TIED, name="tiny"), tc.replace(cpu_offload=True))
    assert est.host_bytes == pytest.approx(offloaded["host_bytes"], rel=0.02)


def test_qlora_packed_weights_shard_and_quant_constants_stay_whole():
    """QLoRA over FSDP2: the bf16-stored packed 4-bit weights are sharded N ways like any parameter, while
    bitsandbytes' quantization constants (a QuantState attribute, not a parameter) are whole on every rank: the
    same bytes at N = 2 as on one device."""
    from calibrate.trace import trace_step
    from calibrate.trace_multigpu import trace_sharded_step

    tc = TrainConfig(method="lora", quant="nf4", rank=16, target_modules=("all-linear",), seq_len=128, batch_size=2)
    one = trace_step(TINY_TIED, tc).to_dict()["peak_by_tag"]
    two = trace_sharded_step(TINY_TIED, tc.replace(num_gpus=2, strategy="fsdp")).to_dict()["peak_by_tag"]
    assert two["quant_constants"] == one["quant_constants"]
    assert two["weights"] < 0.6 * one["weights"]


def test_qlora_across_gpus_stores_4bit_in_bf16_as_run_configures():
    """`ftplan run` loads a 4-bit base for FSDP and ZeRO-3 with bnb_4bit_quant_storage=bf16 (what the planner's
    packed-bf16 gathers and the trace assume); ZeRO-2 and one GPU keep bitsandbytes' uint8 default."""
    from trainer.recipe import quant_storage_kwargs

    qlora = TrainConfig(method="lora", quant="nf4", seq_len=128)
    for strategy in ("fsdp", "zero3"):
        assert quant_storage_kwargs(qlora.replace(num_gpus=2, strategy=strategy)) == {
            "bnb_4bit_quant_storage": torch.bfloat16}
    assert quant_storage_kwargs(qlora.replace(num_gpus=2, strategy="zero2")) == {}
    assert quant_storage_kwargs(qlora) == {}


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
    # ZeRO is traced with the real engine on 2 processes only (calibrate/trace_zero.py; tests/test_trace_zero.py)
    r = CliRunner().invoke(cli, args + ["--num-gpus", "4", "--strategy", "zero2"])
    assert r.exit_code == 0, r.output
    assert any("is not traced" in n and "zero2 or zero3 on 2 GPUs" in n for n in json.loads(r.stdout)["trace"]["notes"])
    # CPU offload: the host RAM the trace saw, next to the analytic one
    r = CliRunner().invoke(cli, args[:-1] + ["--num-gpus", "2", "--strategy", "fsdp", "--cpu-offload"])
    assert r.exit_code == 0, r.output
    assert "trace host" in r.output and "CPU offload: sharded parameters" in r.output


def test_ia3_bf16_vectors_match_the_trace():
    """IA3 with bf16 vectors (what FSDP2's bf16 gathers hand the layers, and `Recipe.adapter_dtype` bf16): peft
    multiplies in the vector's dtype, so no fp32 copy of the down projection's input is saved. On one device
    against the single-device trace, and smaller than with fp32 vectors."""
    from calibrate.trace import trace_step
    from planner.arch import arch_from_config
    from planner.memory import estimate_memory
    from planner.recipe import Recipe

    config = dict(TINY_UNTIED, hidden_size=256, intermediate_size=768, vocab_size=1024)
    arch = arch_from_config(config, name="tiny")
    workspace = 64 * 2**20  # the planner's default GPU (H100): two cuBLAS handles
    peaks = {}
    for dtype in ("fp32", "bf16"):
        tc = TrainConfig(method="ia3", precision="bf16", seq_len=256, batch_size=2, recipe=Recipe(adapter_dtype=dtype))
        traced = trace_step(config, tc, cuda_workspace_bytes=workspace).peak_allocated_bytes
        peaks[dtype] = estimate_memory(arch, tc).peak_allocated_bytes
        assert peaks[dtype] == pytest.approx(traced, rel=0.005), dtype
    assert peaks["bf16"] < peaks["fp32"]


def test_untied_fsdp2_prefetches_the_last_layer_after_the_loss_backward():
    """The tail unit's pre-backward hook sits on the lm_head output (torch 2.13 `_register_pre_backward_hook`), so
    the last layer is gathered from the lm_head's backward on ("lm_head backward"), not during the loss's own
    backward; tied models prefetch nothing there (one event); a loss that never calls the lm_head module
    (chunked) completes the tail on the root output, so its prefetch comes first (one event, layer included)."""
    from planner.arch import arch_from_config
    from planner.memory import estimate_memory
    from planner.recipe import Recipe
    from planner.strategies.fsdp2 import FSDP, fsdp_units

    config = dict(TINY_UNTIED, hidden_size=256, intermediate_size=768, vocab_size=8192)
    untied, tied = (arch_from_config(dict(config, tie_word_embeddings=t), name="tiny") for t in (False, True))
    tc = TrainConfig(method="full", precision="bf16", seq_len=512, batch_size=1, num_gpus=2, strategy="fsdp")
    layer = fsdp_units(untied, tc)["layer"] * 2
    assert FSDP.step_buffers(untied, tc, "head_backward") - FSDP.step_buffers(untied, tc, "loss_backward") == layer
    assert "lm_head backward" in estimate_memory(untied, tc).events
    assert "lm_head backward" not in estimate_memory(tied, tc).events
    chunked = tc.replace(recipe=Recipe(loss="chunked"))
    assert FSDP.step_buffers(untied, chunked, "loss_backward") == FSDP.step_buffers(untied, chunked, "head_backward")
    assert "lm_head backward" not in estimate_memory(untied, chunked).events
