"""The CLI as users call it (click's CliRunner): outputs, --json interfaces, and errors (exit 2, no traceback)."""

import json

import pytest
from click.testing import CliRunner

from planner.cli import cli
from planner.planfile import read_plan


def run(*args, code=0):
    r = CliRunner().invoke(cli, list(args))
    assert r.exit_code == code, r.output + (repr(r.exception) if r.exception and code == 0 else "")
    assert "Traceback" not in r.output
    return r


ESTIMATE_QLORA = ["estimate", "--model", "llama-2-7b", "--method", "qlora", "--rank", "16", "--target-modules", "all-linear",
                  "--seq-len", "2048", "--batch-size", "4", "--grad-ckpt", "--gpu", "a100-80"]


def test_estimate_json_interface_keys_and_types():
    d = json.loads(run(*ESTIMATE_QLORA, "--json").output)
    for key in ("peak_allocated_bytes", "peak_reserved_bytes", "device_bytes", "breakdown", "trainable_params",
                "total_params", "fits", "headroom_bytes", "tokens_per_s", "step_seconds"):
        assert key in d, key
    assert isinstance(d["peak_allocated_bytes"], int) and isinstance(d["device_bytes"], int)
    assert sum(d["breakdown"].values()) == d["peak_allocated_bytes"]
    assert d["peak_allocated_bytes"] < d["peak_reserved_bytes"] < d["device_bytes"]
    assert d["fits"] is True and d["headroom_bytes"] == d["gpu_memory_bytes"] - d["device_bytes"]
    assert d["trainable_params"] == 39_976_960  # r16 on all 7 linears of 32 layers
    assert "quant_constants" in d["breakdown"]


def test_estimate_without_gpu_has_no_fit_keys():
    d = json.loads(run("estimate", "--model", "8b", "--json").output)
    assert "fits" not in d and "tokens_per_s" not in d and d["peak_allocated_bytes"] > 0


def test_estimate_text_output_names_terms_and_verdict():
    out = run(*ESTIMATE_QLORA).output
    assert "fits" in out and "optimizer state" in out and "GiB" in out and "tokens/s" in out


def test_estimate_multi_gpu_zero3_from_config_json(tmp_path):
    from planner.profiles import load_model

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(dict(load_model("8b").config)))
    one = json.loads(run("estimate", "--model", str(cfg), "--method", "full", "--precision", "mixed", "--gpu", "h100-80", "--json").output)
    eight = json.loads(run("estimate", "--model", str(cfg), "--method", "full", "--precision", "mixed", "--gpu", "h100-80",
                           "--num-gpus", "8", "--strategy", "zero3", "--json").output)
    assert one["fits"] is False and eight["fits"] is True
    # weights and optimizer state shard 8 ways; activations are per device and do not. DeepSpeed's bf16 mode (what
    # ds_config enables for mixed) holds the weights in bf16 (half of mixed's fp32) and fp32 master weights beside
    # AdamW's fp32 state (12 B against mixed's 8 B per parameter)
    assert eight["breakdown"]["weights"] == pytest.approx(one["breakdown"]["weights"] / 2 / 8, rel=0.01)
    assert eight["breakdown"]["optimizer_state"] == pytest.approx(one["breakdown"]["optimizer_state"] * 1.5 / 8,
                                                                  rel=0.01)
    assert eight["peak_allocated_bytes"] > one["peak_allocated_bytes"] / 8


def test_dataset_tokens_give_hours_and_cost():
    d = json.loads(run("estimate", "--model", "8b", "--method", "qlora", "--gpu", "4090", "--dataset-tokens", "50M",
                       "--epochs", "3", "--json").output)
    assert d["hours"] > 0 and d["cost_usd"] > 0 and d["provider"]
    assert d["hours"] == pytest.approx(150e6 / d["tokens_per_s"] / 3600, rel=1e-3)


@pytest.mark.parametrize(
    "args, must_say",
    [
        (["--model", "lama-2-7b"], "llama-2-7b"),  # close match suggested
        (["--model", "8b", "--gpu", "a100-8"], "a100-80"),
        (["--model", "8b", "--seq-len", "0"], "seq_len"),
        (["--model", "8b", "--batch-size", "-2"], "batch_size"),
        (["--model", "8b", "--rank", "9000", "--target-modules", "q_proj"], "rank 9000"),
        (["--model", "8b", "--method", "qlora", "--precision", "fp32"], "qlora"),
        (["--model", "8b", "--target-modules", "query,value"], "q_proj"),
        (["--model", "8b", "--method", "banana"], "full"),
        (["--model", "8b", "--method", "prefix", "--grad-ckpt"], "checkpointing"),
        (["--model", "8b", "--dataset-tokens", "lots"], "50M"),
    ],
)
def test_bad_input_is_a_usage_error_naming_the_field(args, must_say):
    r = run("estimate", *args, code=2)
    assert must_say in r.output


def test_config_json_that_is_not_a_causal_lm(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 64}))
    r = run("estimate", "--model", str(p), code=2)
    assert "ForCausalLM" in r.output
    p.write_text(json.dumps({"model_type": "gpt_neox", "hidden_size": 64}))
    assert "not a supported causal LM" in run("estimate", "--model", str(p), code=2).output
    p.write_text("{not json")
    assert "not valid JSON" in run("estimate", "--model", str(p), code=2).output


def test_catalog_commands():
    gpus = json.loads(run("gpus", "list", "--json").output)
    assert {"a100-sxm-80gb", "h100-sxm-80gb", "rtx-4090-24gb", "t4-16gb"} <= {g["name"] for g in gpus}
    assert "4090" in run("gpus", "list").output
    models = json.loads(run("models", "list", "--json").output)
    assert len(models) >= 19
    out = run("models", "show", "70b").output
    assert "70b -> llama-3.1-70b" in out and "70,553,706,496" in out
    assert json.loads(run("gpus", "show", "h100", "--json").output)["memory_bytes"] == 85_520_809_984
    run("models", "show", "nope-13b", code=2)


def test_recommend_70b_on_one_a100_is_qlora_and_full_needs_zero3(tmp_path):
    d = json.loads(run("recommend", "--model", "70b", "--gpu", "a100-80", "--json").output)
    assert d["plans"] and d["plans"][0]["config"]["method"] == "qlora"
    assert all(p["fits"] and p["device_bytes"] <= 0.95 * p["gpu_memory_bytes"] for p in d["plans"])
    full = [nf for nf in d["not_fitting"] if nf["label"].startswith("Full FT")]
    assert full and all(nf["needs_gpus"] and nf["needs_strategy"].startswith("zero3") for nf in full)
    text = run("recommend", "--model", "70b", "--gpu", "a100-80").output
    assert "wins" in text and "needs" in text and "ZeRO-3" in text


def test_recommend_saves_a_plan_that_reads_back(tmp_path):
    path = tmp_path / "plan.toml"
    run("recommend", "--model", "meta-llama/Llama-3.1-8B", "--gpu", "rtx-4090", "--seq-len", "4096",
        "--dataset-tokens", "50M", "--epochs", "3", "--save", str(path))
    pf = read_plan(path)
    assert pf.train.seq_len == 4096 and pf.gpu == "rtx-4090-24gb" and pf.schedule.epochs == 3
    assert pf.prediction["device_bytes"] <= 24 * 2**30
    for fb in pf.fallback_configs():  # same effective batch
        assert fb.batch_size * fb.grad_accum == pf.train.batch_size * pf.train.grad_accum


def test_recommend_objectives_reorder():
    q = json.loads(run("recommend", "--model", "1b", "--gpu", "h100", "--json").output)
    t = json.loads(run("recommend", "--model", "1b", "--gpu", "h100", "--objective", "time", "--json").output)
    assert q["plans"][0]["config"]["method"] == "full"
    assert t["plans"][0]["tokens_per_s"] >= max(p["tokens_per_s"] for p in q["plans"])


def test_recommend_bad_methods_and_margin():
    assert "valid" in run("recommend", "--model", "8b", "--gpu", "l4", "--methods", "lora,bogus", code=2).output
    run("recommend", "--model", "8b", "--gpu", "l4", "--margin", "1.5", code=2)


def test_lora_defaults_to_the_familys_targets_when_none_are_named():
    """Phi-3 fuses q, k and v: with no --target-modules LoRA takes its `qkv_proj` (peft has no default for phi3),
    other families keep peft's q_proj, v_proj; a name the family lacks is still an error."""
    phi = json.loads(run("estimate", "--model", "phi-3-mini", "--json").output)
    assert phi["config"]["target_modules"] == ["qkv_proj"] and phi["trainable_params"] > 0
    llama = json.loads(run("estimate", "--model", "llama-3.2-1b", "--json").output)
    assert llama["config"]["target_modules"] == ["q_proj", "v_proj"]
    dora = json.loads(run("estimate", "--model", "phi-3-mini", "--method", "dora", "--json").output)
    assert dora["config"]["target_modules"] == ["qkv_proj"]
    r = run("estimate", "--model", "phi-3-mini", "--target-modules", "q_proj,v_proj", code=2)
    assert "qkv_proj" in r.output
