"""What the trainers do to QLoRA and adapters (issue 11 item 6): `--no-kbit-prep` (TRL, LLaMA-Factory skip peft's
`prepare_model_for_kbit_training`: embeddings, norms and lm_head stay bf16 as loaded) and `--adapter-dtype bf16`."""

import json

import pytest
from click.testing import CliRunner

from planner.cli import cli
from planner.config import TrainConfig
from planner.kernels import step_ops
from planner.memory import base_weight_bytes, estimate_memory
from planner.profiles import load_model
from planner.recipe import Recipe

NOPREP = Recipe(kbit_preparation=False)


def test_without_k_bit_preparation_the_stream_and_the_head_stay_bf16():
    arch = load_model("llama-3.1-8b")
    tc = TrainConfig(method="qlora", target_modules=("all-linear",), seq_len=2048, batch_size=4, grad_ckpt=True)
    prep, noprep = estimate_memory(arch, tc), estimate_memory(arch, tc.replace(recipe=NOPREP))
    # embeddings + lm_head: 2 x 128256 x 4096 params at 2 B instead of 4 B
    saved = base_weight_bytes(arch, tc)["weights"] - base_weight_bytes(arch, tc.replace(recipe=NOPREP))["weights"]
    assert abs(saved - 2 * 128256 * 4096 * 2) < 2**20
    assert noprep.peak_allocated_bytes < prep.peak_allocated_bytes - saved  # and half the activations
    assert "model load (k-bit preparation)" not in noprep.events and "model load (k-bit preparation)" in prep.events
    # the kernels the throughput model times (planner.kernels): k-bit preparation's fp32 lm_head GEMMs and the
    # Linear4bit casts of the fp32 stream are gone without it
    from planner.memory import _piece_key

    ops, ops_noprep = step_ops(arch, _piece_key(tc)), step_ops(arch, _piece_key(tc.replace(recipe=NOPREP)))
    fp32 = [g for g in ops.gemms if g.dtype == 4 and arch.vocab_size in (g.n, g.k)]
    assert fp32 and not [g for g in ops_noprep.gemms if g.dtype == 4 and arch.vocab_size in (g.n, g.k)]
    assert ops_noprep.memory_bytes[0] < ops.memory_bytes[0]


@pytest.mark.parametrize("ckpt, batch", [(False, 1), (True, 2)])
def test_no_kbit_prep_trace_agrees_with_the_analytic_model(ckpt, batch):
    pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    from calibrate.trace import trace_step
    from planner.arch import arch_from_config
    from planner.memory import cuda_workspace_bytes

    cfg = dict(model_type="llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
               num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096)
    tc = TrainConfig(method="qlora", target_modules=("all-linear",), seq_len=512, batch_size=batch, grad_ckpt=ckpt,
                     recipe=NOPREP)
    t = trace_step(cfg, tc, cuda_workspace_bytes=cuda_workspace_bytes(None))
    a = estimate_memory(arch_from_config(cfg), tc)
    assert abs(a.peak_allocated_bytes - t.peak_allocated_bytes) / t.peak_allocated_bytes < 0.005
    assert a.trainable_params == t.trainable_params


def test_kbit_prep_flag():
    args = ["estimate", "--model", "llama-3.2-1b", "--method", "qlora", "--json"]
    on = CliRunner().invoke(cli, args)
    off = CliRunner().invoke(cli, args + ["--no-kbit-prep"])
    assert on.exit_code == 0 and off.exit_code == 0, off.output
    assert json.loads(off.output)["peak_allocated_bytes"] < json.loads(on.output)["peak_allocated_bytes"]


# -- --adapter-dtype bf16 (TRL casts a quantized model's adapters to bf16) --------------------------------------------

BF16_ADAPTERS = Recipe(adapter_dtype="bf16")


def test_bf16_adapters_halve_the_adapter_state_and_the_adapter_activations():
    arch = load_model("llama-3.1-8b")
    tc = TrainConfig(method="qlora", target_modules=("all-linear",), seq_len=1024, batch_size=2, grad_ckpt=True)
    fp32, bf16 = estimate_memory(arch, tc), estimate_memory(arch, tc.replace(recipe=BF16_ADAPTERS))
    assert bf16.trainable_params == fp32.trainable_params
    assert bf16.breakdown["trainable_weights"] * 2 == pytest.approx(fp32.breakdown["trainable_weights"], rel=0.01)
    assert bf16.peak_allocated_bytes < fp32.peak_allocated_bytes


@pytest.mark.parametrize("kw, recipe", [(dict(method="lora"), BF16_ADAPTERS),
                                        (dict(method="qlora", grad_ckpt=True, batch_size=2), BF16_ADAPTERS),
                                        (dict(method="qlora"), Recipe(adapter_dtype="bf16", kbit_preparation=False))],
                         ids=["lora", "qlora-ckpt", "qlora-noprep"])
def test_bf16_adapters_trace_agrees_with_the_analytic_model(kw, recipe):
    pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    from calibrate.trace import trace_step
    from planner.arch import arch_from_config
    from planner.memory import cuda_workspace_bytes

    cfg = dict(model_type="llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
               num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096)
    tc = TrainConfig(seq_len=512, target_modules=("all-linear",), recipe=recipe, **kw)
    t = trace_step(cfg, tc, cuda_workspace_bytes=cuda_workspace_bytes(None))
    a = estimate_memory(arch_from_config(cfg), tc)
    assert abs(a.peak_allocated_bytes - t.peak_allocated_bytes) / t.peak_allocated_bytes < 0.005
    assert a.trainable_params == t.trainable_params


def test_the_trainer_casts_the_adapters_to_bf16():
    torch = pytest.importorskip("torch")
    from trainer import recipe as tr

    cfg = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=300)
    tc = TrainConfig(method="lora", seq_len=32, recipe=BF16_ADAPTERS)
    with torch.device("meta"):
        model = tr.apply_method(tr.build_model(cfg, tc, device="meta"), tc)
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    assert dtypes == {torch.bfloat16}


@pytest.mark.parametrize("extra", [["--method", "full"], ["--method", "lora", "--precision", "mixed"],
                                   ["--method", "prefix"]])
def test_bf16_adapters_elsewhere_are_refused_naming_the_option(extra):
    r = CliRunner().invoke(cli, ["estimate", "--model", "llama-3.2-1b", "--adapter-dtype", "bf16", *extra])
    assert r.exit_code == 2 and "--adapter-dtype" in r.output and "valid here: fp32" in r.output, r.output
    r = CliRunner().invoke(cli, ["estimate", "--model", "llama-3.2-1b", "--adapter-dtype", "fp8"])
    assert r.exit_code == 2 and "fp32" in r.output and "bf16" in r.output
