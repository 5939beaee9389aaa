"""Offloaded gradient checkpointing (`Recipe.offload_checkpoints`, `--offload-ckpt`): the analytic model against the
trace of the real step (transformers' `gradient_checkpointing_enable(offload=True)`, which wraps each checkpoint in
torch's `save_on_cpu(pin_memory=True)`), device and pinned host bytes; the host limit in `estimate`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from planner.arch import arch_from_config
from planner.cli import cli
from planner.config import TrainConfig
from planner.memory import cuda_workspace_bytes, estimate_memory, pinned_block_bytes
from planner.recipe import Recipe

LLAMA_GQA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
             "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
             "vocab_size": 1024, "max_position_embeddings": 4096, "tie_word_embeddings": False}
QWEN_MHA = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 256,
            "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
            "vocab_size": 1024, "max_position_embeddings": 4096, "tie_word_embeddings": True}
OFF = Recipe(offload_checkpoints=True)


@pytest.mark.parametrize("config", [LLAMA_GQA, QWEN_MHA], ids=["llama-gqa", "qwen2-mha"])
@pytest.mark.parametrize("method,precision,batch", [("lora", "bf16", 2), ("full", "mixed", 1), ("qlora", "bf16", 2),
                                                    ("prompt", "bf16", 1)])
def test_trace_agrees_with_the_analytic_model(config, method, precision, batch):
    """Within 2 % of the traced device peak's live tensors (the cuBLAS workspace, a constant on both sides, left
    out); the pinned host bytes are the same tensors (one per layer). Prompt tuning is held to the suite's usual
    criterion (workspace included): the analytic model misses, with or without offload, the prompt-less embeddings
    that AccumulateGrad keeps (a leaf once `enable_input_require_grads` runs), about one layer input."""
    pytest.importorskip("torch")
    from calibrate.trace import trace_step

    arch = arch_from_config(config)
    tc = TrainConfig(method=method, precision=precision, batch_size=batch, seq_len=512, grad_ckpt=True, recipe=OFF)
    m = estimate_memory(arch, tc)
    t = trace_step(config, tc, cuda_workspace_bytes=cuda_workspace_bytes(None))
    ws = 0 if method == "prompt" else cuda_workspace_bytes(None)
    err = (m.peak_allocated_bytes - t.peak_allocated_bytes) / (t.peak_allocated_bytes - ws)
    assert abs(err) < 0.02, (m.peak_event, t.peak_phase, err)
    assert m.host_pinned_bytes == t.host_pinned_bytes > 0
    # and the device side is smaller than the same recipe without offload
    on_device = estimate_memory(arch, tc.replace(recipe=Recipe.REFERENCE))
    assert m.peak_allocated_bytes <= on_device.peak_allocated_bytes


def test_host_bytes_one_pinned_block_per_layer():
    arch = arch_from_config(LLAMA_GQA)
    tc = TrainConfig(method="lora", batch_size=3, seq_len=1000, grad_ckpt=True, recipe=OFF)
    per_layer = 3 * 1000 * 256 * 2  # B x S x h, bf16
    assert pinned_block_bytes(per_layer) == 2**21  # the pinned allocator rounds to a power of two
    m = estimate_memory(arch, tc)
    assert m.host_pinned_bytes == 3 * 2**21 and m.host_bytes == m.host_pinned_bytes
    assert estimate_memory(arch, tc.replace(recipe=Recipe.REFERENCE)).host_pinned_bytes == 0
    with pytest.raises(ValueError, match="needs grad_ckpt"):
        TrainConfig(method="lora", grad_ckpt=False, recipe=OFF)


def test_estimate_offload_ckpt_reports_host_memory_and_its_limit():
    args = ["estimate", "--model", "llama-3.1-8b", "--seq-len", "8192", "--batch-size", "4", "--grad-ckpt", "--gpu",
            "h100"]
    base = json.loads(CliRunner().invoke(cli, [*args, "--json"]).output)
    res = CliRunner().invoke(cli, [*args, "--offload-ckpt", "--host-ram", "4", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["host_pinned_bytes"] == 32 * 2**28  # 32 layers x 4 x 8192 x 4096 x 2 B (a power of two each)
    assert d["host_fits"] is False and d["host_ram_bytes"] == 4 * 2**30
    assert d["peak_allocated_bytes"] < base["peak_allocated_bytes"] and base["host_pinned_bytes"] == 0
    assert d["tokens_per_s"] < base["tokens_per_s"]  # the copies run on the compute stream
    text = CliRunner().invoke(cli, [*args, "--offload-ckpt", "--host-ram", "4"]).output
    assert "host (pinned)" in text and "the host is the limit" in text
    res = CliRunner().invoke(cli, ["estimate", "--model", "8b", "--offload-ckpt"])
    assert res.exit_code == 2 and "--offload-ckpt" in res.output and "needs grad_ckpt" in res.output
    res = CliRunner().invoke(cli, [*args, "--host-ram", "0"])
    assert res.exit_code == 2 and "--host-ram" in res.output


def test_run_refuses_offloaded_checkpoints_on_cpu():
    from trainer.spec import RunUsageError, check_device

    with pytest.raises(RunUsageError, match="need CUDA"):
        check_device(TrainConfig(method="lora", grad_ckpt=True, recipe=OFF), "cpu")
