"""peft `modules_to_save` (`--modules-to-save embed_tokens,lm_head`, issue 11 section 6): trained full copies of the
embedding and/or lm_head beside LoRA / QLoRA / DoRA / IA3, predicted against the traced real peft model (a tied and
an untied tiny family: `python -m calibrate.trace_grid --grid mts --out calibrate/reference/trace-points-mts.jsonl`),
the bad inputs, the config files, and `ftplan run` / `ftplan merge` end to end on CPU."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from calibrate.trace_grid import MTS_FAMILIES, model_arch, read_points
from planner.cli import cli
from planner.config import TrainConfig
from planner.memory import estimate_memory
from planner.profiles import load_model
from planner.recipe import Recipe

from conftest import EXAMPLES_DIR, write_tiny_plan


def _points():
    return read_points("trace-points-mts.jsonl")


def test_the_grid_crosses_methods_modules_ties_and_checkpointing():
    tcs = [(p["model"], TrainConfig.from_dict(p["train"])) for p in _points()]
    assert len(tcs) <= 30
    assert {m for m, _ in tcs} == set(MTS_FAMILIES)
    assert {bool(MTS_FAMILIES[m].get("tie_word_embeddings")) for m in MTS_FAMILIES} == {True, False}
    for model in ("tiny-llama-gqa", "tiny-qwen2-tied"):
        for method in ("lora", "qlora"):
            got = {(tc.recipe.modules_to_save, tc.grad_ckpt) for m, tc in tcs if m == model and tc.method_name == method}
            assert got >= {(s, c) for s in (("embed_tokens",), ("lm_head",), ("embed_tokens", "lm_head"))
                           for c in (False, True)}, (model, method)
    assert {tc.method_name for _, tc in tcs} >= {"lora", "qlora", "dora", "ia3"}


@pytest.mark.parametrize("point", _points(), ids=lambda p: f"{p['id']}-{p['model']}")
def test_analytic_matches_the_traced_peft_copies(point):
    """Within 2% of the trace of the real peft model, and the same trainable parameters (peft's own count)."""
    tc = TrainConfig.from_dict(point["train"])
    est = estimate_memory(model_arch(point["model"]), tc)
    traced = point["trace"]["peak_allocated_bytes"]
    err = (est.peak_allocated_bytes - traced) / traced
    assert abs(err) <= 0.02, f"{tc.describe()}: {err:+.2%} at {est.peak_event}"
    assert est.trainable_params == point["trace"]["trainable_params"]
    # the copies (with the adapters) are what the trace tags as trainable weights
    trained = point["trace"]["peak_by_tag"].get("trainable", 0)
    assert est.breakdown["trainable_weights"] == pytest.approx(trained, rel=0.005)


def test_the_embedding_copys_backward_holds_cudas_sort_scratch():
    """Above 3072 ids CUDA's embedding backward sorts them and sums partial segments in fp32 beside the gradient
    (`planner.layers.embedding_backward_scratch_bytes`; the trace allocates the same buffers in place of the meta
    kernel's bare gradient). On the large-vocabulary point that backward is the peak, and the scratch is more than
    twice the 0.5% the prediction is held to: leaving it out would fail."""
    from planner.layers import embedding_backward_scratch_bytes

    (point,) = [p for p in _points() if p["model"] == "tiny-llama-bigvocab"]
    tc = TrainConfig.from_dict(point["train"])
    arch = model_arch(point["model"])
    est = estimate_memory(arch, tc)
    traced = point["trace"]["peak_allocated_bytes"]
    assert est.peak_event == "embedding backward"
    assert abs(est.peak_allocated_bytes - traced) <= 0.005 * traced
    tokens = tc.batch_size * tc.seq_len
    assert tokens > 3072 and embedding_backward_scratch_bytes(arch, tokens, 2) > 0.01 * traced
    assert embedding_backward_scratch_bytes(arch, 3072, 2) == 0  # the direct kernel: no scratch


def test_each_module_adds_one_vocab_by_hidden_copy_tied_or_not():
    """peft's default (`ensure_weight_tying=False`): each listed module gets its own copy, on a tied model too; the
    copy's gradient and AdamW moments follow, in the weights' dtype (bf16 here, fp32 under mixed)."""
    for name in ("qwen2.5-0.5b", "llama-3.1-8b"):
        arch = load_model(name)
        base = TrainConfig(method="lora", seq_len=512)
        e0 = estimate_memory(arch, base)
        vh = arch.vocab_size * arch.hidden_size
        for mts in (("lm_head",), ("embed_tokens",), ("embed_tokens", "lm_head")):
            e = estimate_memory(arch, base.replace(recipe=Recipe(modules_to_save=mts)))
            assert e.trainable_params - e0.trainable_params == len(mts) * vh
            assert e.total_params - e0.total_params == len(mts) * vh  # the frozen original stays
            mixed = estimate_memory(arch, base.replace(precision="mixed", recipe=Recipe(modules_to_save=mts)))
            assert mixed.breakdown["trainable_weights"] > e.breakdown["trainable_weights"] + len(mts) * vh


def test_the_reference_recipe_is_unchanged_by_an_empty_list():
    tc = TrainConfig(method="qlora", seq_len=1024, recipe=Recipe(modules_to_save=[]))
    assert tc.recipe.is_reference and "recipe" not in tc.to_dict()
    assert Recipe.from_dict({"modules_to_save": ["lm_head", "embed_tokens", "lm_head"]}).modules_to_save == (
        "embed_tokens", "lm_head")


@pytest.mark.parametrize("args,words", [
    (["--modules-to-save", "wte"], ["--modules-to-save", "wte", "embed_tokens, lm_head"]),
    (["--method", "full", "--modules-to-save", "lm_head"], ["--modules-to-save", "full fine-tuning"]),
    (["--method", "prompt", "--modules-to-save", "embed_tokens"], ["--modules-to-save", "prompt", "lora"]),
    (["--method", "qlora", "--adapter-dtype", "bf16", "--modules-to-save", "lm_head"], ["--no-kbit-prep"]),
    (["--num-gpus", "2", "--strategy", "zero2", "--modules-to-save", "lm_head"], ["--modules-to-save", "num_gpus 1"]),
])
def test_bad_input_exits_2_naming_the_option_and_valid_choices(args, words):
    r = CliRunner().invoke(cli, ["estimate", "--model", "qwen2.5-0.5b", *args])
    assert r.exit_code == 2 and "Traceback" not in r.output
    text = " ".join(r.output.split())
    for w in words:
        assert w in text, text


def test_estimate_and_recommend_take_the_flag():
    r = CliRunner().invoke(cli, ["estimate", "--model", "llama-3.2-1b", "--method", "qlora", "--modules-to-save",
                                 "embed_tokens,lm_head", "--json"])
    assert r.exit_code == 0, r.output
    with_copies = json.loads(r.stdout)
    r0 = CliRunner().invoke(cli, ["estimate", "--model", "llama-3.2-1b", "--method", "qlora", "--json"])
    plain = json.loads(r0.stdout)
    key = next(k for k in with_copies if "peak" in k and isinstance(with_copies[k], int))
    assert with_copies[key] > plain[key]
    r = CliRunner().invoke(cli, ["recommend", "--model", "llama-3.2-1b", "--gpu", "l4", "--modules-to-save", "lm_head"])
    assert r.exit_code == 0, r.output


def test_axolotl_config_maps_lora_modules_to_save(tmp_path):
    cfg = tmp_path / "axolotl.yml"
    cfg.write_text("base_model: meta-llama/Llama-3.2-1B\nadapter: qlora\nload_in_4bit: true\nlora_r: 16\n"
                   "lora_alpha: 32\nlora_target_linear: true\nlora_modules_to_save:\n  - embed_tokens\n  - lm_head\n"
                   "sequence_len: 1024\nmicro_batch_size: 1\ngradient_accumulation_steps: 4\n")
    r = CliRunner().invoke(cli, ["estimate", "--model", "llama-3.2-1b", "--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    arch = load_model("llama-3.2-1b")
    assert out["trainable_params"] - 2 * arch.vocab_size * arch.hidden_size == TrainConfig(
        method="qlora", rank=16, target_modules=("all-linear",)).spec.trainable_params(
        arch, TrainConfig(method="qlora", rank=16, target_modules=("all-linear",)))
    cfg.write_text(cfg.read_text().replace("  - lm_head\n", "  - wte\n"))
    r = CliRunner().invoke(cli, ["estimate", "--model", "llama-3.2-1b", "--config", str(cfg)])
    assert r.exit_code == 2 and "lora_modules_to_save" in r.output and "embed_tokens, lm_head" in " ".join(r.output.split())


def test_llamafactory_additional_target_maps_to_the_copies(tmp_path):
    cfg = tmp_path / "lf.yaml"
    cfg.write_text("model_name_or_path: Qwen/Qwen2.5-0.5B\nstage: sft\ndo_train: true\nfinetuning_type: lora\n"
                   "lora_rank: 8\nlora_target: all\nadditional_target: embed_tokens,lm_head\ntemplate: qwen\n"
                   "cutoff_len: 1024\nper_device_train_batch_size: 1\ngradient_accumulation_steps: 8\nbf16: true\n")
    r = CliRunner().invoke(cli, ["estimate", "--model", "qwen2.5-0.5b", "--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["config"]["recipe"]["modules_to_save"] == ["embed_tokens", "lm_head"]
    # an explicit flag overrides the file
    r = CliRunner().invoke(cli, ["estimate", "--model", "qwen2.5-0.5b", "--config", str(cfg), "--modules-to-save",
                                 "lm_head", "--json"])
    assert r.exit_code == 0, r.output
    arch = load_model("qwen2.5-0.5b")
    assert out["trainable_params"] - json.loads(r.stdout)["trainable_params"] == arch.vocab_size * arch.hidden_size


def test_the_copies_add_lm_heads_weight_gradient_gemm_to_the_step():
    """A trained lm_head copy adds `grad_logits^T @ x` (2 V h FLOPs per token) to backward; the embedding copy's
    gradient is a scatter-add, no matmul."""
    from planner.cost import flops_per_token

    arch = load_model("llama-3.1-8b")
    base = TrainConfig(method="lora", seq_len=1024)
    f0 = flops_per_token(arch, base)["backward"]
    head = flops_per_token(arch, base.replace(recipe=Recipe(modules_to_save=("lm_head",))))["backward"]
    emb = flops_per_token(arch, base.replace(recipe=Recipe(modules_to_save=("embed_tokens",))))["backward"]
    assert head - f0 == pytest.approx(2 * arch.vocab_size * arch.hidden_size) and emb == f0


def test_run_trains_the_lm_head_copy_and_merge_folds_it_in(tmp_path, tiny_model_dir):
    """`ftplan run --modules-to-save lm_head` on the tied tiny model: peft saves the trained copy with the adapter,
    the copy moved and the frozen embedding did not; `ftplan merge` gives the adapted model's logits."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    plan = write_tiny_plan(tmp_path / "plan.toml", tiny_model_dir, max_steps=6)
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", str(plan), "--data", os.path.join(EXAMPLES_DIR, "alpaca.jsonl"),
                                 "--output-dir", str(out), "--device", "cpu", "--no-progress",
                                 "--modules-to-save", "lm_head"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["lm_head"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = AutoPeftModelForCausalLM.from_pretrained(out)
    copy = adapted.base_model.model.lm_head.modules_to_save["default"].weight
    assert (copy - base.lm_head.weight).abs().max() > 1e-4  # the copy trained
    emb = adapted.base_model.model.model.embed_tokens.weight
    torch.testing.assert_close(emb, base.model.embed_tokens.weight)  # the original stayed frozen
    merged_dir = tmp_path / "merged"
    res = CliRunner().invoke(cli, ["merge", str(out), "--output", str(merged_dir)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    ids = torch.tensor([[1, 40, 52, 61, 75, 90, 120, 33]])
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids).logits, adapted.eval()(ids).logits, atol=1e-4, rtol=1e-4)
