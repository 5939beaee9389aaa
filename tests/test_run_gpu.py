"""The CUDA-only paths of `ftplan run` for real (skipped without a GPU): QLoRA (bitsandbytes NF4 + k-bit preparation),
the 8-bit optimizers, the measured peak (torch.cuda + NVML) in a run record that also lands in calibrate/results,
merging a QLoRA adapter into the unquantized base, and a real out-of-memory answered by the fallback plan."""

from __future__ import annotations

import json
import os
import random
import statistics

import pytest
import torch
from click.testing import CliRunner

from calibrate.record import load_records
from planner.cli import cli

from conftest import EXAMPLES_DIR, write_tiny_plan

pytestmark = pytest.mark.gpu


def _run(plan, out, data=os.path.join(EXAMPLES_DIR, "alpaca.jsonl"), *extra):
    res = CliRunner().invoke(cli, ["run", str(plan), "--data", str(data), "--output-dir", str(out), "--device", "cuda",
                                   "--no-progress", "--json", *extra], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    import calibrate.record

    d = tmp_path / "calibrate-results"
    monkeypatch.setattr(calibrate.record, "RESULTS_DIR", d)
    return d


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory, tiny_model_dir):
    """The tiny model saved in bf16 (QLoRA loads a bf16 checkpoint and quantizes it while loading)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("tiny-bf16")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(d)
    return d


@pytest.mark.parametrize("method,optimizer", [("qlora", "adamw"), ("qlora", "paged_adamw8bit"),
                                              ("lora", "adamw8bit"), ("lora", "paged_adamw8bit")])
def test_cuda_methods_and_8bit_optimizers_record_the_real_peak(bf16_base, tmp_path, results_dir, method, optimizer):
    plan = write_tiny_plan(tmp_path / "plan.toml", bf16_base, method=method, precision="bf16", optimizer=optimizer,
                           target_modules=("all-linear",), max_steps=25, lr=5e-3)
    out = tmp_path / "out"
    s = _run(plan, out)
    assert s["status"] == "completed" and s["device"] == "cuda"
    losses = [json.loads(line)["loss"] for line in (out / "trainer_log.jsonl").read_text().splitlines()
              if "loss" in line]
    assert statistics.fmean(losses[-5:]) < statistics.fmean(losses[:5])
    m = s["measured"]
    assert m["device"] == "cuda" and m["peak_allocated_bytes"] > 0
    assert m["peak_reserved_bytes"] >= m["peak_allocated_bytes"]
    assert s["prediction"]["peak_allocated_bytes"] > 0
    (rec,) = load_records([out / "run_record.json"])
    assert rec["measured"]["peak_allocated_bytes"] == m["peak_allocated_bytes"]
    assert rec["meta_info"]["gpu_name"] and rec["meta_info"]["versions"]["bitsandbytes"]
    # a CUDA run also calibrates the planner: the same record in calibrate/results/<gpu>/
    (cal,) = load_records([results_dir])
    assert cal["id"] == rec["id"] and cal["kind"] == "run"
    if method == "qlora":
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA"
        # k-bit training: the base was loaded 4-bit (bitsandbytes), the adapter saved alone
        assert not any(p.name.startswith("model") for p in out.glob("*.safetensors"))


def test_qlora_adapter_merges_into_the_unquantized_base(bf16_base, tmp_path, results_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plan = write_tiny_plan(tmp_path / "plan.toml", bf16_base, method="qlora", precision="bf16",
                           target_modules=("all-linear",), max_steps=10, lr=5e-3)
    run = tmp_path / "run"
    _run(plan, run)
    out = tmp_path / "merged"
    res = CliRunner().invoke(cli, ["merge", str(run), "--output", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(merged.parameters()).dtype == torch.bfloat16  # the base's original dtype, not 4-bit
    assert not hasattr(merged.config, "quantization_config") or merged.config.quantization_config is None
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bf16_base, dtype="auto"), run)
    ids = torch.tensor([[1, 40, 52, 61, 75, 90]])
    with torch.no_grad():
        a, b = merged.eval()(ids).logits.float(), adapted.eval()(ids).logits.float()
    torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)


def test_real_out_of_memory_falls_back_to_the_next_plan(tmp_path, tiny_tokenizer_dir, results_dir):
    """A micro-batch whose logits alone need ~130 GiB runs out of memory on any GPU; the plan's fallback (same
    effective batch of 512 sequences, micro-batch 8) finishes the step."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model_dir = tmp_path / "wide-vocab"
    cfg = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    lines = [json.loads(x)["text"] for x in open(os.path.join(EXAMPLES_DIR, "text.jsonl"))]
    rng = random.Random(0)
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.sample(lines, 4))}) + "\n" for _ in range(3000)))
    plan = write_tiny_plan(tmp_path / "plan.toml", model_dir, method="lora", precision="bf16", seq_len=2048,
                           batch_size=512, max_steps=1, fallback=[{"batch_size": 8, "grad_accum": 64}])
    out = tmp_path / "out"
    s = _run(plan, out, data, "--packing")
    assert s["status"] == "completed" and s["fallback_used"]
    assert s["attempts"][0]["status"] == "oom" and s["attempts"][0]["config"]["batch_size"] == 512
    assert (s["config"]["batch_size"], s["config"]["grad_accum"]) == (8, 64)
    (miss,) = load_records([out / "records"])
    assert miss["status"] == "oom" and miss["measured"]["device"] == "cuda"
    statuses = sorted(r["status"] for r in load_records([results_dir]))
    assert statuses == ["ok", "oom"]  # the miss calibrates the planner too
