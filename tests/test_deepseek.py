"""DeepSeek-V3 (planner/deepseek.py, planner/mla.py) against transformers, peft and the FakeTensor trace."""

from pathlib import Path

import pytest
import torch

from calibrate.trace_grid import DEEPSEEK_CONFIGS, read_points
from planner import attention as sdp
from planner.arch import ArchError, arch_from_config
from planner.config import TrainConfig
from planner.cost import attention_flops_per_token, matmul_params
from planner.memory import estimate_memory
from planner.methods import trainable_params
from planner.moe import unsupported
from planner.profiles import load_gpu, load_model
from trainer import recipe

ROOT = Path(__file__).resolve().parents[1]

_TINY = dict(model_type="deepseek_v3", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
             num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, vocab_size=128)
TINY = {
    "q_lora": dict(_TINY, q_lora_rank=24),
    "no_q_lora": dict(_TINY, q_lora_rank=None, n_shared_experts=2, attention_bias=True, first_k_dense_replace=2),
}


def _meta_model(config: dict):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(recipe.hf_config(config))


@pytest.mark.parametrize("name", sorted(TINY))
def test_parameter_count_equals_transformers(name):
    """MLA projections and their two norms, fused experts, router weight (the correction bias is a buffer),
    shared experts, dense-first layers: sum(p.numel()) of transformers' model on the meta device."""
    config = TINY[name]
    assert arch_from_config(config).total_params == sum(p.numel() for p in _meta_model(config).parameters())


def test_layers_before_first_k_dense_replace_are_dense():
    arch = arch_from_config(TINY["no_q_lora"])
    assert [k.mlp for k in arch.layer_kinds] == ["dense", "dense", "moe", "moe"]
    assert arch.head_dim == 8  # config.head_dim = qk_rope_head_dim: the rotary tables' width


@pytest.mark.parametrize("name", sorted(TINY))
def test_lora_trainable_count_equals_peft(name):
    import peft

    config = TINY[name]
    arch = arch_from_config(config)
    # all-linear and the transformers-4 expert names: peft 0.21 wraps the fused experts and the router
    # (target_parameters, rank 2r on gate_up_proj) and leaves the shared experts and dense-first MLPs unadapted
    wrapped = (("all-linear",), ("gate_proj", "up_proj", "down_proj"), ("gate", "kv_b_proj"), ("down_proj",))
    for targets in (arch.linear_names, ("kv_b_proj", "o_proj")) + wrapped:
        tc = TrainConfig(method="lora", rank=4, target_modules=targets, lora_dropout=0.0 if targets in wrapped
                         else 0.05)
        model = peft.get_peft_model(_meta_model(config), recipe.peft_config(tc, config["model_type"]))
        assert trainable_params(arch, tc) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_mla_value_head_dim_rules_out_flash():
    """q/k have qk_nope + qk_rope, v has v_head_dim: sdpa takes the memory-efficient kernel on an H100."""
    m = arch_from_config(DEEPSEEK_CONFIGS["tiny-deepseek-v3-v512"]).mla
    call = sdp.SdpaCall("bf16", 8, 8, m.qk_head_dim, 1024, 1024, False, True, False, value_head_dim=m.v_head_dim)
    assert sdp.select_backend(call, (9, 0)) == "efficient"
    assert sdp.select_backend(sdp.SdpaCall("bf16", 8, 8, 96, 1024, 1024, False, True, False), (9, 0)) == "flash"


def _arch(point):
    return arch_from_config(point["config"], name=point["model"]) if "config" in point else load_model(point["model"])


def _points():
    return read_points("trace-points-deepseek.jsonl")


@pytest.mark.parametrize("point", _points(), ids=lambda p: f"{p['id']}-{p['model']}-{p['train']['method']}")
def test_deepseek_against_the_trace(point):
    """The real DeepseekV3ForCausalLM and peft on fake tensors (`python -m calibrate.trace_grid --grid deepseek`):
    within 2 % (0.03 % measured; eager 0.6 %), with and without checkpointing, on the H100 and (sdpa's math
    backend) a T4."""
    tc = TrainConfig.from_dict(point["train"])
    gpu = load_gpu(point["gpu"]) if "gpu" in point else None
    est = estimate_memory(_arch(point), tc, gpu=gpu)
    traced = point["trace"]["peak_allocated_bytes"]
    assert abs(est.peak_allocated_bytes - traced) / traced <= 0.02, f"{tc.describe()} at {est.peak_event}"
    assert est.trainable_params == point["trace"]["trainable_params"]
    assert est.total_params == point["trace"]["total_params"]


def test_grid_covers_both_query_paths_checkpointing_and_attention():
    pts = _points()
    assert {_arch(p).mla.q_lora_rank is None for p in pts} == {True, False}
    assert {_arch(p).mla.rope_interleave for p in pts} == {True, False}
    assert {p["train"]["grad_ckpt"] for p in pts} == {True, False}
    assert {p["train"]["method"] for p in pts} == {"full", "lora", "qlora"}
    attn = {TrainConfig.from_dict(p["train"]).recipe.attn_implementation for p in pts}
    assert attn == {"sdpa", "eager", "flash_attention_2"}
    trains = [TrainConfig.from_dict(p["train"]) for p in pts]
    assert {t.precision for t in trains} == {"bf16", "mixed"}
    assert {t.grad_ckpt for t in trains if t.all_linear} == {True, False}, "wrapped experts, checkpointed or not"


def test_flops_follow_the_active_parameters():
    """DeepSeek-V3: 671B parameters, 36.6B activated per token besides the input embedding (arXiv:2412.19437);
    attention FLOPs use H x (qk_head_dim + v_head_dim), not 2 x H x the rotary head dim."""
    arch = load_model("deepseek-v3")
    assert abs(arch.total_params - 671e9) / 671e9 < 0.001
    assert abs(matmul_params(arch) - 36.6e9) / 36.6e9 < 0.01
    tc = TrainConfig(method="lora", rank=8, target_modules=("kv_b_proj",), seq_len=4096)
    assert attention_flops_per_token(arch, tc) == 2.0 * 128 * (192 + 128) * 2048 * 61


def test_what_is_not_modelled_is_refused():
    arch = arch_from_config(TINY["q_lora"])
    tc = TrainConfig(method="lora", rank=4, target_modules=("kv_b_proj",))
    assert unsupported(arch, tc) is None
    assert unsupported(arch, tc.replace(precision="mixed")) is None  # traced (t019, t020)
    assert unsupported(arch, tc.replace(precision="fp16"))[0] == "precision"
    # all-linear wraps the experts (ParamWrapper), which refuses lora_dropout != 0, as peft does
    with pytest.raises(ValueError, match="lora_dropout"):
        trainable_params(arch, TrainConfig(method="lora", rank=4, target_modules=("all-linear",)))
    with pytest.raises(ValueError, match="fused into gate_up_proj"):
        trainable_params(arch, TrainConfig(method="lora", rank=4, target_modules=("up_proj",), lora_dropout=0.0))
    with pytest.raises(ArchError, match="num_key_value_heads"):
        arch_from_config(dict(TINY["q_lora"], num_key_value_heads=2))
    with pytest.raises(ArchError, match="n_group"):
        arch_from_config(dict(TINY["q_lora"], n_group=3))


def test_the_traced_sdpa_kernel_is_the_planned_one():
    """The trace's own dispatch (calibrate/sdpa_dispatch.py on the real q, k, v) picked the kernel the planner
    picks for MLA's call (planner.attention), at every sdpa point: memory-efficient on the H100, math on the T4."""
    seen = set()
    for p in _points():
        tc = TrainConfig.from_dict(p["train"])
        if tc.recipe.attn_implementation != "sdpa":
            continue
        arch = _arch(p)
        m, H = arch.mla, arch.num_heads
        sm = sdp.parse_capability(load_gpu(p["gpu"]).compute_capability) if "gpu" in p else (9, 0)
        # QLoRA with k-bit preparation: an fp32 residual stream, fp32 q, k, v
        dtype = "fp32" if tc.base_quant.quantized and tc.recipe.kbit_preparation else "bf16"
        call = sdp.SdpaCall(dtype, H, H, m.qk_head_dim, tc.seq_len, tc.seq_len, False, True, False,
                            value_head_dim=m.v_head_dim)
        backend = sdp.select_backend(call, sm)
        notes = [n for n in p["trace"]["notes"] if n.startswith("sdpa on")]
        assert notes == [f"sdpa on sm{sm[0]}{sm[1]}: {backend}"]
        seen.add(backend)
    assert seen == {"efficient", "math"}
