"""MoE families (planner/moe.py, planner/moe_graph.py) against transformers, peft and the FakeTensor trace."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from calibrate.trace_grid import MOE_CONFIGS
from planner.arch import arch_from_config
from planner.cli import cli
from planner.config import TrainConfig
from planner.cost import matmul_params
from planner.memory import estimate_memory
from planner.methods import trainable_params
from planner.profiles import load_model
from trainer import recipe

ROOT = Path(__file__).resolve().parents[1]
MOE_REFERENCE = ROOT / "calibrate" / "reference" / "trace-points-moe.jsonl"

_TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128)
TINY = {
    "qwen3_moe": dict(model_type="qwen3_moe", moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=16,
                      **_TINY),
    "qwen3_moe-dense-first": dict(model_type="qwen3_moe", moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                  head_dim=16, mlp_only_layers=[0], decoder_sparse_step=2, **_TINY),
    "qwen2_moe": dict(model_type="qwen2_moe", moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
                      num_experts_per_tok=2, **_TINY),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, **_TINY),
    "gpt_oss": dict(model_type="gpt_oss", num_local_experts=4, num_experts_per_tok=2, head_dim=16, **_TINY),
}


def _meta_model(config: dict):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(recipe.hf_config(config))


@pytest.mark.parametrize("name", sorted(TINY))
def test_parameter_count_equals_transformers(name):
    """sum(p.numel()) of transformers' own model on the meta device: fused experts, routers (gpt-oss: biases),
    Qwen2-MoE's shared expert and gate, dense-first layers, gpt-oss sinks. (Full-size catalog profiles:
    tests/test_methods_peft.py::test_catalog_totals_equal_transformers.)"""
    config = TINY[name]
    assert arch_from_config(config).total_params == sum(p.numel() for p in _meta_model(config).parameters())


def test_dense_first_layers_are_their_own_kind():
    arch = arch_from_config(TINY["qwen3_moe-dense-first"])
    assert [k.mlp for k in arch.layer_kinds] == ["dense", "moe", "dense", "moe"]
    assert len(arch.kind_counts) == 2


def test_gpt_oss_layers_alternate_sliding_and_full():
    arch = load_model("gpt-oss-20b")
    assert [k.window for k in arch.layer_kinds[:4]] == [128, None, 128, None]
    assert {k.mlp for k in arch.layer_kinds} == {"moe"}


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("all-linear",)])
@pytest.mark.parametrize("name", sorted(TINY))
def test_lora_trainable_count_equals_peft(name, targets):
    """peft 0.21 on transformers' model: all-linear wraps Mixtral's and Qwen3-MoE's fused experts and router
    (target_parameters, rank 2r on gate_up_proj) but not their dense-first MLPs; Qwen2-MoE's shared expert and
    gate; gpt-oss's attention only."""
    import peft

    config = TINY[name]
    tc = TrainConfig(method="lora", rank=4, target_modules=targets, lora_dropout=0.0)
    model = peft.get_peft_model(_meta_model(config), recipe.peft_config(tc, config["model_type"]))
    assert trainable_params(arch_from_config(config), tc) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_flops_follow_the_active_parameters():
    """Active parameters per token (matmul weights plus the embedding) against the model cards: Qwen3-30B-A3B
    3.3B activated, Mixtral-8x7B 12.9B used per token; all experts are held in memory."""
    for name, active in (("qwen3-30b-a3b", 3.3e9), ("mixtral-8x7b", 12.9e9)):
        arch = load_model(name)
        n = matmul_params(arch) + arch.vocab_size * arch.hidden_size
        assert abs(n - active) / active < 0.03, (name, n)
        assert n < arch.total_params / 3


def _moe_points():
    return [json.loads(line) for line in MOE_REFERENCE.read_text().splitlines() if line.strip()]


def _arch_of(point):
    return arch_from_config(point["config"], name=point["model"]) if "config" in point else load_model(point["model"])


def _stress(point) -> bool:
    return point["model"].endswith("-v512")


@pytest.mark.parametrize("point", _moe_points(), ids=lambda p: f"{p['id']}-{p['model']}-{p['train']['method']}")
def test_moe_within_2_percent_of_the_trace(point):
    """The real transformers MoE model and peft on fake tensors (`python -m calibrate.trace_grid --grid moe`).
    The `-v512` points (a 512-token vocabulary) leave the MoE layers' own transients as the peak: the last
    layer's forward and a checkpointed layer's recomputation."""
    tc = TrainConfig.from_dict(point["train"])
    est = estimate_memory(_arch_of(point), tc)
    traced = point["trace"]["peak_allocated_bytes"]
    assert abs(est.peak_allocated_bytes - traced) / traced <= 0.02, f"{tc.describe()} at {est.peak_event}"
    assert est.trainable_params == point["trace"]["trainable_params"]


def test_the_moe_grid_covers_the_families_and_mechanisms():
    pts = _moe_points()
    types = {_arch_of(p).model_type for p in pts}
    assert types == {"qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss"}
    trains = [TrainConfig.from_dict(p["train"]) for p in pts]
    assert {t.method for t in trains} == {"full", "lora"}
    assert any(t.grad_ckpt for t in trains) and any(not t.grad_ckpt for t in trains)
    assert {t.optimizer for t in trains} >= {"adamw", "adamw8bit", "sgd", "adafactor"}
    assert any(p["model"] == "qwen3-30b-a3b" for p in pts) and set(MOE_CONFIGS) <= {p["model"] for p in pts}
    assert any(p["model"] == "gpt-oss-20b" for p in pts)
    aux = {_arch_of(p).model_type for p in pts if _arch_of(p).moe.aux_loss}
    assert aux == types, "the router load-balancing loss traced on every family"
    wide = {_arch_of(p).model_type for p, t in zip(pts, trains) if t.all_linear}
    assert wide == types and any(p["model"] == "qwen3-30b-a3b" for p, t in zip(pts, trains) if t.all_linear)
    assert any(_stress(p) for p in pts)
    qlora = [(_arch_of(p).model_type, t) for p, t in zip(pts, trains) if t.base_quant.quantized]
    assert {m for m, _ in qlora} == types, "QLoRA traced on every family"
    assert {t.recipe.kbit_preparation for _, t in qlora} == {True, False}
    assert any(t.all_linear and m in ("mixtral", "qwen3_moe") for m, t in qlora), "fp32 experts wrapped"
    assert {t.precision for t in trains} == {"bf16", "mixed", "fp32"}
    assert any(t.precision == "mixed" and t.all_linear and t.grad_ckpt for t in trains)


@pytest.mark.parametrize("args,option", [
    (["--model", "qwen3-30b-a3b", "--method", "lora", "--target-modules", "all-linear"], "--lora-dropout"),
    (["--model", "qwen3-30b-a3b", "--method", "lora", "--target-modules", "gate_proj", "--lora-dropout", "0"],
     "--target-modules"),
    (["--model", "qwen3-30b-a3b", "--method", "lora", "--target-modules", "w1"], "--target-modules"),
    (["--model", "qwen3-30b-a3b", "--method", "full", "--precision", "fp16"], "--precision"),
    (["--model", "gpt-oss-20b", "--method", "lora", "--precision", "mixed"], "--precision"),
    (["--model", "qwen3-30b-a3b", "--method", "prefix"], "--method"),
    (["--model", "gpt-oss-20b", "--method", "lora", "--attn", "flash_attention_2"], "--attn"),
])
def test_what_is_not_modelled_is_a_usage_error(args, option):
    r = CliRunner().invoke(cli, ["estimate", *args])
    assert r.exit_code == 2, r.output
    assert option in r.output
    assert "valid" in r.output.lower() or "families planned:" in r.output
    assert "Traceback" not in r.output


def test_expert_parallelism_is_named_when_the_experts_exceed_the_gpu():
    r = CliRunner().invoke(cli, ["estimate", "--model", "mixtral-8x7b", "--gpu", "h100", "--method", "lora"])
    assert r.exit_code == 0, r.output
    assert "expert parallelism" in r.output
    r = CliRunner().invoke(cli, ["estimate", "--model", "qwen3-30b-a3b", "--gpu", "h100", "--method", "lora"])
    assert "expert parallelism" not in r.output  # 56.6 GiB of experts fit an 80 GiB GPU


def test_recommend_plans_lora_on_the_attention_of_a_moe_model():
    r = CliRunner().invoke(cli, ["recommend", "--model", "qwen3-30b-a3b", "--gpu", "h100"])
    assert r.exit_code == 0, r.output
    assert "LoRA r16 q_proj,k_proj,v_proj,o_proj" in r.output and "all-linear wins" not in r.output


def test_gpt_oss_runs_eager_attention_as_transformers_picks_it():
    """transformers' default (the recipe's `sdpa`) falls back to eager for gpt-oss (no sdpa path); the trainer
    builds what the planner plans, and an explicit eager plans the same."""
    from planner.attention import effective_implementation

    config = TINY["gpt_oss"]
    with torch.device("meta"):
        model = recipe.build_model(config, TrainConfig(method="lora"), device="meta")
    assert model.config._attn_implementation == "eager" == effective_implementation("gpt_oss", "sdpa")
    assert effective_implementation("qwen3_moe", "sdpa") == "sdpa"
    arch = arch_from_config(config)
    tc = TrainConfig(method="lora", seq_len=256)
    eager = tc.replace(recipe=tc.recipe.__class__(attn_implementation="eager"))
    assert estimate_memory(arch, tc).peak_allocated_bytes == estimate_memory(arch, eager).peak_allocated_bytes


def test_gpt_oss_output_says_bf16_weights_and_eager_attention():
    r = CliRunner().invoke(cli, ["estimate", "--model", "gpt-oss-20b", "--gpu", "h100", "--method", "lora"])
    assert r.exit_code == 0, r.output
    assert "Mxfp4Config(dequantize=True)" in r.output and "eager" in r.output


@pytest.mark.parametrize("name,targets", [
    ("mixtral", ("w1", "w3", "w2")), ("mixtral", ("gate", "q_proj")), ("qwen3_moe", ("gate_proj", "up_proj")),
    ("qwen3_moe", ("down_proj", "gate", "k_proj")), ("qwen3_moe-dense-first", ("gate_proj", "up_proj", "down_proj")),
])
def test_transformers4_expert_names_count_as_peft_converts_them(name, targets):
    """peft 0.21 maps the transformers-4 expert and router names to target_parameters on the fused experts (and
    leaves the dense-first MLPs of those names unadapted)."""
    import peft

    config = TINY[name]
    tc = TrainConfig(method="lora", rank=4, target_modules=targets, lora_dropout=0.0)
    model = peft.get_peft_model(_meta_model(config), recipe.peft_config(tc, config["model_type"]))
    assert trainable_params(arch_from_config(config), tc) == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name,targets", [("mixtral", ("w1",)), ("qwen3_moe", ("up_proj", "down_proj"))])
def test_half_of_a_fused_pair_is_refused_as_peft_refuses_it(name, targets):
    import peft

    from planner.methods import TargetError

    config = TINY[name]
    tc = TrainConfig(method="lora", rank=4, target_modules=targets, lora_dropout=0.0)
    with pytest.raises(ValueError, match="fused into gate_up_proj"):
        peft.get_peft_model(_meta_model(config), recipe.peft_config(tc, config["model_type"]))
    with pytest.raises(TargetError, match="fused into gate_up_proj"):
        trainable_params(arch_from_config(config), tc)


def test_peft_refuses_dropout_on_wrapped_experts_as_the_planner_does():
    """ParamWrapper raises for lora_dropout != 0 (peft 0.21 tuners/lora/layer.py); the planner says so first, and
    accepts the same with dropout 0."""
    import peft

    from planner.methods import TargetError, trainable_params

    config = TINY["qwen3_moe"]
    tc = TrainConfig(method="lora", rank=4, target_modules=("all-linear",), lora_dropout=0.05)
    with pytest.raises(ValueError, match="lora_dropout"):
        peft.get_peft_model(_meta_model(config), recipe.peft_config(tc, "qwen3_moe"))
    with pytest.raises(TargetError, match="lora_dropout"):
        trainable_params(arch_from_config(config), tc)
    assert trainable_params(arch_from_config(config), tc.replace(lora_dropout=0.0)) > 0
    # Qwen2-MoE and gpt-oss keep nn.Linear targets only: dropout is fine there
    assert trainable_params(arch_from_config(TINY["qwen2_moe"]), tc) > 0


def test_wrapped_experts_keep_a_folded_copy_per_layer():
    """LoRA all-linear on Qwen3-30B-A3B without checkpointing: each MoE layer's grouped_mm saves the bf16 fold
    W + B A of its experts, so the saved activations exceed all the experts' bf16 bytes (planner.moe_graph)."""
    from planner.moe import sparse_layer_count

    arch = load_model("qwen3-30b-a3b")
    tc = TrainConfig(method="lora", rank=16, target_modules=("all-linear",), lora_dropout=0.0, seq_len=512)
    est = estimate_memory(arch, tc)
    experts = sparse_layer_count(arch) * arch.moe.expert_params(arch.hidden_size) * 2
    attn_only = estimate_memory(arch, tc.replace(target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    assert est.breakdown["activations"] - attn_only.breakdown["activations"] > experts


def test_all_linear_on_a_moe_model_with_dropout_0_is_planned():
    r = CliRunner().invoke(cli, ["estimate", "--model", "qwen3-30b-a3b", "--gpu", "h200", "--method", "lora",
                                 "--target-modules", "all-linear", "--lora-dropout", "0", "--grad-ckpt"])
    assert r.exit_code == 0, r.output


def test_router_aux_loss_keeps_the_logits_of_every_moe_layer():
    """output_router_logits: each MoE layer's router logits are held by the outputs and the load-balancing loss
    saves a softmax of them; the estimate grows by at least one logits tensor per MoE layer."""
    config = dict(TINY["qwen3_moe"], num_experts=64)
    tc = TrainConfig(method="full", seq_len=2048, batch_size=2)
    base = estimate_memory(arch_from_config(config), tc).peak_allocated_bytes
    aux = estimate_memory(arch_from_config(dict(config, output_router_logits=True)), tc).peak_allocated_bytes
    assert aux - base >= config["num_hidden_layers"] * 2 * 2048 * 64 * 2


def test_the_fold_of_wrapped_experts_is_timed_once_per_micro_step():
    """planner.kernels: each wrapped expert stack's baddbmm (E GEMMs out x in x r) and its two backward GEMMs,
    batch-independent: 3 x 2 E out in r FLOPs per stack and MoE layer."""
    from planner.kernels import step_ops
    from planner.moe import sparse_layer_count

    arch = arch_from_config(TINY["qwen3_moe"])
    tc = TrainConfig(method="lora", rank=4, target_modules=("all-linear",), lora_dropout=0.0, seq_len=128)
    fixed = sum(2 * g.tokens * g.n * g.k * g.count for g in step_ops(arch, tc).gemms if g.phase == "fixed")
    m, h, r = arch.moe, arch.hidden_size, 4
    per_layer = m.num_experts * (2 * m.expert_intermediate * h * 2 * r + h * m.expert_intermediate * r)
    assert fixed == sparse_layer_count(arch) * 3 * 2 * per_layer
    attn = tc.replace(target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    assert not [g for g in step_ops(arch, attn).gemms if g.phase == "fixed"]


def test_qlora_quantizes_only_the_linears_and_kbit_preparation_makes_the_experts_fp32(tmp_path):
    """The real stack on the CPU (bitsandbytes 0.50 quantizing while loading, peft's k-bit preparation): only
    `nn.Linear`s become Linear4bit (attention, Qwen2-MoE's shared expert and its gate, the dense-first MLP), every
    other parameter (the fused experts, the routers) ends fp32, as `planner.memory.param_tensors` groups them."""
    pytest.importorskip("bitsandbytes")
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from planner.memory import param_tensors

    config = dict(TINY["qwen2_moe"], mlp_only_layers=[0])
    AutoModelForCausalLM.from_config(recipe.hf_config(config), dtype=torch.bfloat16).save_pretrained(tmp_path)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"})
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    quantized = [p for p in model.parameters() if type(p).__name__ == "Params4bit"]
    rest = [p for p in model.parameters() if type(p).__name__ != "Params4bit"]
    assert {p.dtype for p in rest} == {torch.float32}
    groups = param_tensors(arch_from_config(config))
    linear = sum(r * c * n for g, (r, c), n in groups if g == "linear")
    assert sum(m.in_features * m.out_features for m in model.modules() if type(m).__name__ == "Linear4bit") == linear
    assert len(quantized) == sum(n for g, _, n in groups if g == "linear")
    assert sum(p.numel() for p in rest) == sum(r * c * n for g, (r, c), n in groups if g != "linear")


def test_qlora_on_a_moe_model_says_the_experts_are_fp32():
    """k-bit preparation doubles the experts' bytes (fp32): the estimate's weights exceed the bf16 experts', the
    output says so, and --no-kbit-prep keeps them bf16."""
    from planner.moe import experts_bytes

    arch = load_model("qwen3-30b-a3b")
    tc = TrainConfig(method="qlora", seq_len=512, grad_ckpt=True)
    est = estimate_memory(arch, tc)
    assert est.breakdown["weights"] >= experts_bytes(arch, 4)
    no_prep = tc.replace(recipe=tc.recipe.__class__(kbit_preparation=False))
    assert estimate_memory(arch, no_prep).breakdown["weights"] < experts_bytes(arch, 4)
    r = CliRunner().invoke(cli, ["estimate", "--model", "qwen3-30b-a3b", "--gpu", "h200", "--method", "qlora"])
    assert r.exit_code == 0, r.output
    assert "fp32" in r.output and "--no-kbit-prep" in r.output


def test_mixed_runs_the_experts_in_fp32_outside_autocast():
    """torch 2.13 registers no autocast kernel for `aten::_grouped_mm` (the experts' op), so under `mixed` the
    fp32 experts compute in fp32: the experts' saved activations are twice bf16's, and the throughput model times
    their GEMMs as fp32 ones."""
    assert "Autocast" not in torch._C._dispatch_dump("aten::_grouped_mm")
    assert "AutocastCUDA" in torch._C._dispatch_dump("aten::mm")
    from planner.kernels import step_ops

    arch = arch_from_config(dict(TINY["qwen3_moe"], moe_intermediate_size=40))  # 2I = 80: no other GEMM's width
    tc = TrainConfig(method="full", precision="mixed", seq_len=256)
    grouped = {g.dtype for g in step_ops(arch, tc).gemms if g.n == 2 * arch.moe.expert_intermediate}
    assert grouped == {4}
    assert {g.dtype for g in step_ops(arch, tc.replace(precision="bf16")).gemms
            if g.n == 2 * arch.moe.expert_intermediate} == {2}
