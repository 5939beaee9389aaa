"""`--no-kbit-prep`: QLoRA without peft's `prepare_model_for_kbit_training` (TRL, LLaMA-Factory): embeddings, norms
and lm_head stay bf16 as loaded, so the residual stream is bf16 and Linear4bit's casts are no-ops."""

import json

import pytest
from click.testing import CliRunner

from planner.cli import cli
from planner.config import TrainConfig
from planner.cost import fp32_flops_per_token, quantized_cast_bytes_per_token
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
    assert fp32_flops_per_token(arch, tc.replace(recipe=NOPREP)) == 0 < fp32_flops_per_token(arch, tc)
    assert quantized_cast_bytes_per_token(arch, tc.replace(recipe=NOPREP)) == 0


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
