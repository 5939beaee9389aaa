"""`ftplan estimate|recommend|run --config FILE`: the user's own TRL / Axolotl / LLaMA-Factory YAML through the
commands; flags typed override the file; the output lists keys read, defaults applied, keys ignored; bad files exit 2
naming --config and the key, with no traceback."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from planner.cli import cli
from planner.config import TrainConfig
from planner.recipe import Recipe

from test_configfile import AXOLOTL, LLAMAFACTORY, TRL

# TRL, with values this build models whatever the recipe options merged (nll: TRL 1.16's fused LM head, sdpa, full-length rows)
TRL_NLL = """\
model_name_or_path: meta-llama/Llama-3.1-8B
use_peft: true
lora_r: 32
lora_alpha: 16
lora_target_modules: all-linear
loss_type: nll
max_length: 2048
per_device_train_batch_size: 2
gradient_accumulation_steps: 4
dtype: bfloat16
output_dir: out
learning_rate: 1.0e-4
my_own_key: 7
"""
# the flags that say the same
TRL_NLL_FLAGS = ["--model", "llama-3.1-8b", "--method", "lora", "--rank", "32", "--lora-alpha", "16",
                 "--target-modules", "all-linear", "--lora-dropout", "0.05", "--seq-len", "2048", "--batch-size", "2",
                 "--grad-accum", "4", "--grad-ckpt", "--precision", "bf16", "--padding", "longest", "--loss", "chunked"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def modelled(options: dict) -> str | None:
    """The validation message this build gives for the file's recipe options, None when it models them all."""
    from planner.configfile import NEUTRAL

    recipe_fields = set(Recipe.__dataclass_fields__)
    try:
        recipe = Recipe(**{k: v for k, v in options.items() if k in recipe_fields})
        # a recipe value this build models alone but not with the file's other options (packing under
        # flash_attention_2 with several rows per micro-batch)
        TrainConfig(**{k: v for k, v in options.items() if k in TrainConfig.__dataclass_fields__}, recipe=recipe)
        extra = {k: v for k, v in options.items() if k in NEUTRAL and k not in recipe_fields
                 and k not in TrainConfig.__dataclass_fields__ and v != NEUTRAL[k]}
        return f"{extra}" if extra else None
    except ValueError as e:
        return str(e)


@pytest.mark.parametrize("text,model", [(TRL, "qwen"), (AXOLOTL, "llama"), (LLAMAFACTORY, "llama")],
                         ids=["trl", "axolotl", "llamafactory"])
def test_each_framework_file_estimates_or_names_what_is_not_modelled(tmp_path, text, model):
    from planner.configfile import load_config

    path = write(tmp_path, text)
    mapping = load_config(path)
    # the files name hub ids (an Instruct variant is not in the catalog and tests never reach the hub): --model, a
    # flag, overrides the file's model with the catalog's base model of the same family
    catalog = {"qwen": "qwen2.5-7b", "llama": "llama-3.1-8b"}[model]
    res = invoke("estimate", "--config", path, "--model", catalog, "--gpu", "h100", "--json")
    assert "Traceback" not in res.output
    refused = modelled(mapping.options)
    if refused is None:
        assert res.exit_code == 0, res.output
        d = json.loads(res.output)
        assert d["config_file"]["framework"] == mapping.framework
        assert d["config_file"]["keys_read"] and d["config_file"]["defaults_applied"]
        assert model in d["model"]
    else:  # this build does not model one of the file's values yet: exit 2 naming --config and the key that set it
        assert res.exit_code == 2, res.output
        err = json.loads(res.output)
        assert err["field"] == "--config" and "not modelled" in err["error"]
        field = next(k for k in mapping.source if f"recipe.{k} " in err["error"] or f"{k} " in err["error"])
        assert mapping.source[field] in err["error"]


def test_trl_file_predicts_what_the_same_flags_predict(tmp_path):
    path = write(tmp_path, TRL_NLL)
    a = json.loads(invoke("estimate", "--config", path, "--gpu", "a100-80", "--json").output)
    b = json.loads(invoke("estimate", *TRL_NLL_FLAGS, "--gpu", "a100-80", "--json").output)
    assert a["peak_allocated_bytes"] == b["peak_allocated_bytes"] and a["tokens_per_s"] == b["tokens_per_s"]
    c = a["config_file"]
    assert c["options"]["grad_ckpt"] is True and "grad_ckpt" in c["defaults_applied"]  # TRL checkpoints by default
    assert c["keys_unknown"] == ["my_own_key"] and "output_dir" in c["keys_ignored"]
    assert c["keys_read"]["lora_r"] == 32 and c["overridden_by_flags"] == {}
    # a typed flag overrides the file (and only a typed one: --rank left at its default does not)
    over = json.loads(invoke("estimate", "--config", path, "--gpu", "a100-80", "--batch-size", "4",
                             "--no-grad-ckpt", "--json").output)
    flags = list(TRL_NLL_FLAGS)
    flags[flags.index("--batch-size") + 1] = "4"
    flags.remove("--grad-ckpt")
    same = json.loads(invoke("estimate", *flags, "--gpu", "a100-80", "--json").output)
    assert over["peak_allocated_bytes"] == same["peak_allocated_bytes"]
    assert over["config_file"]["overridden_by_flags"] == {"batch_size": 4, "grad_ckpt": False}
    # --model overrides the file's model
    other = json.loads(invoke("estimate", "--config", path, "--model", "llama-3.2-1b", "--json").output)
    assert other["model"] != a["model"]


def test_text_output_lists_keys_read_defaults_ignored_unknown(tmp_path):
    res = invoke("estimate", "--config", write(tmp_path, TRL_NLL), "--gpu", "a100-80")
    assert res.exit_code == 0, res.output
    out = res.output
    assert "(TRL SFTConfig)" in out and "keys read     model_name_or_path=meta-llama/Llama-3.1-8B" in out
    assert "grad_ckpt True: TRL SFTConfig gradient_checkpointing defaults to true" in out
    assert "ignored       output_dir" in out and "unknown       my_own_key" in out


def test_recommend_takes_the_files_model_length_batch_and_method(tmp_path):
    res = invoke("recommend", "--config", write(tmp_path, TRL_NLL), "--gpu", "a100-80", "--json", "--top", "3")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["config_file"]["framework"] == "trl" and "llama-3.1-8b" in d["model"]
    assert d["plans"] and all(p["config"]["seq_len"] == 2048 for p in d["plans"])
    assert {p["config"]["method"] for p in d["plans"]} == {"lora"}
    assert all(p["config"]["batch_size"] * p["config"]["grad_accum"] == 8 for p in d["plans"])  # 2 x 4 from the file
    res = invoke("recommend", "--config", write(tmp_path, TRL_NLL), "--gpu", "a100-80", "--seq-len", "1024",
                 "--methods", "full,lora", "--json")
    d = json.loads(res.output)
    assert {p["config"]["seq_len"] for p in d["plans"]} == {1024} and d["config_file"]["overridden_by_flags"]


@pytest.mark.parametrize("text,extra,field,words", [
    (None, [], "--config", "no such file"),
    ("learning_rate: 1.0e-4\n", [], "--config", "TRL SFTConfig, Axolotl or LLaMA-Factory"),
    ("[1, 2]\n", [], "--config", "YAML mapping"),
    ("model_name_or_path: [oops\n", [], "--config", "not valid YAML"),
    ("base_model: x/y\nadapter: qlora\nload_in_4bit: true\nbnb_4bit_quant_type: fp4\n", [], "--config",
     "bnb_4bit_quant_type: 'fp4'"),
    ("model_name_or_path: x/y\noptim: lomo\n", [], "--config", "optim: 'lomo' is not an optimizer"),
    ("use_peft: true\nmax_length: 512\nloss_type: nll\n", [], "--model", "names no model (model_name_or_path)"),
    ("model_name_or_path: meta-llama/Llama-3.1-8B\nmax_length: null\nloss_type: nll\n", [], "--config",
     "pass --seq-len"),
    ("model_name_or_path: meta-llama/Llama-3.1-8B\nuse_peft: true\nloss_type: nll\n", ["--rank", "0"], "--rank", "rank"),
])
def test_bad_config_exits_2_naming_the_key(tmp_path, text, extra, field, words):
    path = tmp_path / "missing.yaml" if text is None else write(tmp_path, text)
    for cmd in (["estimate"], ["recommend", "--gpu", "h100"]):
        if cmd[0] == "recommend" and field == "--rank":
            continue
        res = invoke(*cmd, "--config", path, *extra, "--json")
        assert res.exit_code == 2, res.output
        err = json.loads(res.output)
        assert err["field"] == field and words in err["error"], err
        res = invoke(*cmd, "--config", path, *extra)
        assert res.exit_code == 2 and "Traceback" not in res.output and field in res.output


def test_model_still_required_without_config():
    res = invoke("estimate")
    assert res.exit_code == 2 and "Missing option '--model'" in res.output


def test_example_configs_map(tmp_path):
    from planner.configfile import load_config

    folder = os.path.join(os.path.dirname(__file__), "..", "examples", "configs")
    names = sorted(os.listdir(folder))
    assert len([n for n in names if n.endswith(".yaml")]) >= 3
    frameworks = {load_config(os.path.join(folder, n)).framework for n in names if n.endswith(".yaml")}
    assert frameworks == {"trl", "axolotl", "llamafactory"}


def test_run_config_runs_the_files_recipe(tmp_path, tiny_model_dir):
    """`ftplan run --config` on a TRL file for the tiny model (CPU): the run's plan is the file's configuration and
    schedule, with the typed flags on top."""
    from conftest import EXAMPLES_DIR
    from planner.planfile import read_plan

    cfg = write(tmp_path, f"""\
model_name_or_path: {tiny_model_dir}
use_peft: true
lora_r: 4
lora_alpha: 8
lora_target_modules: [q_proj, v_proj]
loss_type: nll
max_length: 64
per_device_train_batch_size: 2
gradient_checkpointing: false
dtype: float32
bf16: false
learning_rate: 5.0e-3
max_steps: 2
lr_scheduler_type: linear
output_dir: ignored
""")
    out = tmp_path / "run"
    data = os.path.join(EXAMPLES_DIR, "text.jsonl")
    res = invoke("run", "--config", cfg, "--data", data, "--output-dir", out, "--device", "cpu", "--grad-accum", "2",
                 "--no-progress")
    assert res.exit_code == 0, res.output
    pf = read_plan(out / "plan.toml")
    t = pf.train
    assert (t.method, t.rank, t.lora_alpha, t.seq_len, t.batch_size, t.grad_accum, t.grad_ckpt, t.precision) == (
        "lora", 4, 8, 64, 2, 2, False, "fp32")
    assert (pf.schedule.learning_rate, pf.schedule.max_steps, pf.schedule.lr_scheduler) == (5e-3, 2, "linear")
    assert "keys read" in res.output
    # a PLAN and --config together, or neither: usage errors
    res = invoke("run", str(cfg), "--config", cfg, "--data", data, "--output-dir", tmp_path / "x")
    assert res.exit_code == 2 and "not both" in res.output
    res = invoke("run", "--data", data, "--output-dir", tmp_path / "x")
    assert res.exit_code == 2 and "Missing argument 'PLAN'" in res.output


def test_recommend_keeps_the_files_offloaded_checkpointing(tmp_path):
    path = write(tmp_path, "base_model: meta-llama/Llama-3.1-8B\nadapter: lora\ngradient_checkpointing: offload\n"
                           "sequence_len: 4096\nmicro_batch_size: 4\n")
    res = invoke("recommend", "--config", path, "--gpu", "l40s", "--json", "--variants")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["plans"] and all(p["config"]["grad_ckpt"] and p["config"]["recipe"]["offload_checkpoints"]
                              for p in d["plans"])
    assert all(p["host_pinned_bytes"] > 0 for p in d["plans"])
    res = invoke("recommend", "--config", path, "--gpu", "l40s", "--methods", "lora,prefix")
    assert res.exit_code == 2 and "--methods" in res.output and "prefix" in res.output


def test_recommend_searches_only_what_the_recipe_can_run(tmp_path):
    """Packed rows under flash_attention_2 (Axolotl's sample_packing with flash_attention) are detected by
    transformers in a one-row micro-batch only, so recommend searches micro-batch 1 there; --packing drops the
    methods that cannot pack (prefix/prompt tuning) and every plan prices the packed rows."""
    path = write(tmp_path, "base_model: NousResearch/Meta-Llama-3.1-8B\nadapter: lora\nlora_r: 16\n"
                           "sequence_len: 4096\nmicro_batch_size: 1\ngradient_accumulation_steps: 8\n"
                           "sample_packing: true\nflash_attention: true\nbf16: true\n")
    res = invoke("recommend", "--config", path, "--model", "llama-3.1-8b", "--gpu", "a100-80", "--variants", "--json")
    assert res.exit_code == 0, res.output
    plans = json.loads(res.output)["plans"]
    assert plans and all(p["config"]["batch_size"] == 1 for p in plans)
    assert all(p["config"]["recipe"]["packing"] for p in plans)
    res = invoke("recommend", "--model", "llama-3.2-1b", "--gpu", "l4", "--packing", "--variants", "--json")
    assert res.exit_code == 0, res.output
    plans = json.loads(res.output)["plans"]
    assert {p["config"]["method"] for p in plans} <= {"full", "lora", "qlora", "ia3"}
    assert all(p["config"]["recipe"]["packing"] for p in plans)
