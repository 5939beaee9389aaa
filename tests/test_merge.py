"""`ftplan merge`: merged logits equal the adapted model's; combinations (TIES, DARE, cat) load and generate;
merging keeps the base model's original dtype; what cannot be merged is a usage error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from planner.cli import cli

from conftest import EXAMPLES_DIR, write_tiny_plan

IDS = torch.tensor([[1, 40, 52, 61, 75, 90, 120, 33]])


def _train(tmp, model_dir, name, method="lora", data="alpaca", steps=12, seed=0, **train):
    plan = write_tiny_plan(tmp / f"{name}.toml", model_dir, method=method, max_steps=steps, seed=seed, **train)
    out = tmp / name
    res = CliRunner().invoke(cli, ["run", str(plan), "--data", os.path.join(EXAMPLES_DIR, f"{data}.jsonl"),
                                   "--output-dir", str(out), "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    return out


def merge(*args):
    return CliRunner().invoke(cli, ["merge", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("merge-runs")
    return {
        "a": _train(tmp, tiny_model_dir, "a", target_modules=("all-linear",)),
        "b": _train(tmp, tiny_model_dir, "b", data="prompt_completion", seed=1, target_modules=("all-linear",)),
        "r4": _train(tmp, tiny_model_dir, "r4", steps=2, rank=4, target_modules=("all-linear",)),
        "ia3": _train(tmp, tiny_model_dir, "ia3", method="ia3", steps=8),
        "dora": _train(tmp, tiny_model_dir, "dora", method="dora", steps=8, target_modules=("all-linear",)),
        "prefix": _train(tmp, tiny_model_dir, "prefix", method="prefix", steps=2),
        "full": _train(tmp, tiny_model_dir, "full", method="full", steps=2),
    }


def _logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize("which", ["a", "ia3", "dora"])
def test_merged_model_gives_the_adapted_models_logits(runs, tmp_path, which):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    res = merge(runs[which], "--output", out, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["dtype"] == "float32" and Path(info["base"]).is_dir()
    assert not (out / "adapter_config.json").exists() and (out / "config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    adapted = AutoPeftModelForCausalLM.from_pretrained(runs[which])
    base = AutoModelForCausalLM.from_pretrained(info["base"])
    torch.testing.assert_close(_logits(merged), _logits(adapted), atol=1e-4, rtol=1e-4)
    assert (_logits(merged) - _logits(base)).abs().max() > 1e-3  # the adapter did change something
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert merged.generate(IDS[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id).shape[1] == 8


def test_merge_keeps_the_base_models_original_dtype(tmp_path, tiny_model_dir):
    """A bf16 base trained in fp32 (the plan's precision) is merged back into a bf16 model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base16 = tmp_path / "base-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base16)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(base16)
    run = _train(tmp_path, base16, "run16", steps=4, target_modules=("all-linear",))
    out = tmp_path / "merged"
    res = merge(run, "--output", out)
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(merged.parameters()).dtype == torch.bfloat16
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base16, dtype="auto"), run)
    torch.testing.assert_close(_logits(merged).float(), _logits(adapted).float(), atol=0.1, rtol=0.05)
    res = merge(run, "--output", tmp_path / "m32", "--dtype", "fp32")
    assert res.exit_code == 0 and "float32" in res.output


@pytest.mark.parametrize("combination,extra", [("ties", ["--weights", "0.6,0.4"]), ("dare", []),
                                               ("dare_ties", ["--density", "0.7"])])
def test_ties_and_dare_combinations_give_a_loadable_model(runs, tmp_path, combination, extra):
    from transformers import AutoModelForCausalLM

    out = tmp_path / combination
    res = merge(runs["a"], runs["b"], "--combination", combination, *extra, "--output", out, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["combination"] == ("dare_linear" if combination == "dare" else combination)
    assert info["weights"] == ([0.6, 0.4] if extra[:1] == ["--weights"] else [1.0, 1.0])
    assert json.loads((out / "merge_info.json").read_text())["runs"] == [str(runs["a"]), str(runs["b"])]
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = _logits(model)
    assert torch.isfinite(logits).all()
    assert model.generate(IDS[:, :4], max_new_tokens=4, do_sample=False).shape[1] == 8


def test_cat_combination_adds_the_weighted_deltas_and_adapter_only_loads_with_peft(runs, tmp_path):
    """`cat` with weights 1, 1 is exact: the merged weights are the base plus both adapters' deltas."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    for name in ("a", "b"):
        assert merge(runs[name], "--output", tmp_path / f"m-{name}").exit_code == 0
    res = merge(runs["a"], runs["b"], "--combination", "cat", "--weights", "1,1", "--output", tmp_path / "cat")
    assert res.exit_code == 0, res.output
    base_dir = json.loads((tmp_path / "m-a" / "merge_info.json").read_text())["base"]
    sd = {k: AutoModelForCausalLM.from_pretrained(p).state_dict()
          for k, p in (("base", base_dir), ("a", tmp_path / "m-a"), ("b", tmp_path / "m-b"), ("cat", tmp_path / "cat"))}
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = sd["base"][name] + (sd["a"][name] - sd["base"][name]) + (sd["b"][name] - sd["base"][name])
    torch.testing.assert_close(sd["cat"][name], expected, atol=1e-5, rtol=1e-4)

    res = merge(runs["a"], runs["b"], "--combination", "ties", "--adapter-only", "--output", tmp_path / "adapter")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert torch.isfinite(_logits(model)).all()


@pytest.mark.parametrize("args,hint,words", [
    (["prefix", "--output", "{tmp}/o"], "RUNS", "cannot be merged"),
    (["full", "--output", "{tmp}/o"], "RUNS", "full model"),
    (["a", "b", "--output", "{tmp}/o"], "--combination", "choose how to combine"),
    (["a", "b", "--combination", "ties", "--weights", "1", "--output", "{tmp}/o"], "--weights", "1 weights for 2 runs"),
    (["a", "r4", "--combination", "ties", "--output", "{tmp}/o"], "--combination", "same rank"),
    (["a", "ia3", "--combination", "linear", "--output", "{tmp}/o"], "RUNS", "only LoRA/QLoRA adapters"),
    (["a", "--output", "{tmp}/o", "--combination", "ties"], "--combination", "at least two runs"),
    (["a", "--output", "{tmp}/o", "--base", "{tmp}"], "--base", "not a model folder"),
])
def test_merge_user_errors_exit_2(runs, tmp_path, args, hint, words):
    argv = [str(runs[a]) if a in runs else a.format(tmp=tmp_path) for a in args]
    res = merge(*argv)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert hint in text and words in text and "Traceback" not in text


@pytest.mark.slow
def test_the_readme_cpu_loop_runs_as_written(tmp_path, tiny_model_dir, monkeypatch):
    """The README's recommend -> run -> merge loop, its commands read from the README itself (a tiny model stands
    in for ./my-model), so the documented loop cannot drift into one that fails."""
    import re
    import shlex

    import calibrate.record

    text = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    para = text[text.index("Try the whole loop on CPU"):]
    cmds = re.findall(r"`(ftplan (?:recommend|run|merge) [^`]+)`", para)[:3]
    assert [c.split()[1] for c in cmds] == ["recommend", "run", "merge"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(calibrate.record, "RESULTS_DIR", tmp_path / "results")
    for cmd in cmds:
        args = [a.replace("./my-model", str(tiny_model_dir)).replace("examples/", EXAMPLES_DIR + "/")
                for a in shlex.split(cmd)[1:]]
        r = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert r.exit_code == 0, f"{cmd}\n{r.output}"
    assert (tmp_path / "merged" / "config.json").exists() and not (tmp_path / "merged" / "adapter_config.json").exists()
