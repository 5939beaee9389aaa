"""The method registry, the base-quantization axis, DoRA and rsLoRA: one module per method, read by every side.

(Trainable counts against real peft are in test_methods_peft.py; the trace agreement of DoRA in
test_memory_golden.py over calibrate/reference/trace-points-dora.jsonl.)"""

import ast
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from planner.cli import cli
from planner.config import TrainConfig
from planner.memory import estimate_memory
from planner.methods import ALIASES, METHOD_CHOICES, METHODS, get_method, method_label
from planner.plan import make_plan
from planner.profiles import load_gpu, load_model

ROOT = Path(__file__).resolve().parents[1]


def test_every_method_module_is_registered_once_and_supplies_its_parts():
    mods = sorted(p.stem for p in (ROOT / "planner" / "methods").glob("*.py") if p.stem not in ("__init__", "base"))
    assert sorted(METHODS) == mods
    arch = load_model("llama-3.2-1b")
    for name, m in METHODS.items():
        assert m.name == name and m.label and m.description and m.quality_reason
        tc = TrainConfig(method=name, target_modules=("all-linear",))
        assert m.trainable_params(arch, tc) > 0
        assert method_label(tc).startswith(m.label.split()[0])
    with pytest.raises(ValueError, match="method must be one of .*dora"):
        get_method("vera")


def test_qlora_is_lora_over_an_nf4_base():
    a = TrainConfig(method="qlora", rank=16, target_modules=("all-linear",))
    b = TrainConfig(method="lora", quant="nf4", rank=16, target_modules=("all-linear",))
    assert a == b and hash(a) == hash(b)
    assert (a.method, a.quant, a.method_name) == ("lora", "nf4", "qlora")
    assert a.describe().startswith("QLoRA r16 all-linear") and "bf16" not in a.describe()
    # plan files and records written before the quant axis still load
    old = {"method": "qlora", "rank": 16, "target_modules": ["all-linear"], "precision": "bf16"}
    assert TrainConfig.from_dict(old) == a
    assert TrainConfig.from_dict(a.to_dict()) == a
    qdora = TrainConfig(method="dora", quant="nf4")
    assert qdora.method_name == "qdora" and method_label(qdora).startswith("QDoRA")
    for bad, field in ((dict(method="full", quant="nf4"), "quant"), (dict(method="qlora", precision="mixed"), "precision"),
                       (dict(method="qlora", quant="none"), None), (dict(method="prefix", quant="nf4"), "quant")):
        if field is None:  # the alias fills in its quantization
            assert TrainConfig(**bad).quant == "nf4"
            continue
        with pytest.raises(ValueError, match=field):
            TrainConfig(**bad)
    assert set(ALIASES) <= set(METHOD_CHOICES)


def test_quantization_moves_the_same_numbers_for_lora_and_dora():
    """The 4-bit base is the quantization's business: it shrinks LoRA's and DoRA's weights by the same bytes."""
    arch = load_model("llama-2-7b")
    for method in ("lora", "dora"):
        tc = TrainConfig(method=method, rank=16, target_modules=("all-linear",), seq_len=512, grad_ckpt=True)
        e16, e4 = estimate_memory(arch, tc), estimate_memory(arch, tc.replace(quant="nf4"))
        assert e16.trainable_params == e4.trainable_params
        assert e4.breakdown["weights"] < e16.breakdown["weights"] / 2
        assert e4.breakdown["quant_constants"] > 0 and "quant_constants" not in e16.breakdown


def test_rslora_changes_the_scaling_only():
    arch = load_model("llama-3.1-8b")
    tc = TrainConfig(method="lora", rank=64, target_modules=("all-linear",), seq_len=1024, batch_size=2)
    rs = tc.replace(use_rslora=True)
    gpu = load_gpu("a100-80")
    a, b = make_plan(arch, tc, gpu), make_plan(arch, rs, gpu)
    assert a.memory.breakdown == b.memory.breakdown and a.speed.tokens_per_s == b.speed.tokens_per_s
    spec = get_method("lora")
    assert spec.scaling(tc) == pytest.approx(128 / 64) and spec.scaling(rs) == pytest.approx(128 / 8)
    assert method_label(rs).endswith(" rs")
    pytest.importorskip("peft")
    cfg = spec.peft_config(rs)
    assert cfg.use_rslora is True and cfg.use_dora is False


def test_dora_costs_more_than_lora_where_peft_does_more():
    arch = load_model("llama-2-7b")
    lora = TrainConfig(method="lora", rank=16, target_modules=("all-linear",), seq_len=512)
    dora = lora.replace(method="dora")
    el, ed = estimate_memory(arch, lora), estimate_memory(arch, dora)
    # one magnitude vector of out_features per adapted linear
    assert ed.trainable_params - el.trainable_params == arch.num_layers * sum(l.out_features for l in arch.linears)
    # the fp32 copy of every adapted weight is kept for backward (the input needs a gradient from layer 1 on)
    assert ed.peak_allocated_bytes - el.peak_allocated_bytes > 0.9 * 4 * arch.layer_linear_params * (arch.num_layers - 1)
    # without dropout peft reuses the base result: no second matmul on fp32 weights, nothing of it saved
    nodrop = estimate_memory(arch, dora.replace(lora_dropout=0.0))
    assert nodrop.peak_allocated_bytes < ed.peak_allocated_bytes / 2
    # checkpointing frees what DoRA saves
    assert estimate_memory(arch, dora.replace(grad_ckpt=True)).peak_allocated_bytes < ed.peak_allocated_bytes / 3
    gpu = load_gpu("h100-80")
    assert make_plan(arch, dora, gpu).speed.tokens_per_s < make_plan(arch, lora, gpu).speed.tokens_per_s


def test_no_module_outside_the_registry_compares_a_method_name():
    """`tc.method == "..."` and `in (...)` over method names live in planner/methods/ (the CLI's choice list and
    the alias are data, not comparisons)."""
    names = set(METHODS) | set(ALIASES)
    offenders = []
    for folder in ("planner", "calibrate", "trainer"):
        for path in (ROOT / folder).rglob("*.py"):
            if "methods" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Compare):
                    continue
                left = ast.unparse(node.left)
                if not left.endswith("method"):
                    continue
                consts = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
                if names & set(consts):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "\n".join(offenders)


def _cli(*args):
    return CliRunner().invoke(cli, [*map(str, args)], catch_exceptions=False)


def test_cli_estimate_dora_qdora_and_the_qlora_alias():
    base = ["estimate", "--model", "llama-3.2-1b", "--rank", "16", "--target-modules", "all-linear", "--seq-len",
            "1024", "--gpu", "h100-80", "--json"]
    q1 = json.loads(_cli(*base, "--method", "qlora").stdout)
    q2 = json.loads(_cli(*base, "--method", "lora", "--quant", "nf4").stdout)
    assert q1 == q2 and q1["config"]["quant"] == "nf4"
    d = _cli(*base, "--method", "dora", "--quant", "nf4")
    assert d.exit_code == 0, d.output
    qd = json.loads(d.stdout)
    assert qd["trainable_params"] > q1["trainable_params"] and qd["peak_allocated_bytes"] > q1["peak_allocated_bytes"]
    bad = _cli("estimate", "--model", "7b", "--method", "full", "--quant", "nf4")
    assert bad.exit_code == 2 and "--quant" in bad.output and "Traceback" not in bad.output
    r = _cli("recommend", "--model", "8b", "--gpu", "a100-80", "--methods", "dora,qlora", "--json")
    assert r.exit_code == 0, r.output
    assert {p["config"]["method"] for p in json.loads(r.stdout)["plans"]} <= {"dora", "lora"}
