"""Trainable and total parameter counts equal peft's own, for every method and family (real peft, meta device)."""

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from planner.arch import arch_from_config  # noqa: E402
from planner.config import TrainConfig  # noqa: E402
from planner.methods import total_params, trainable_params  # noqa: E402
from trainer import recipe  # noqa: E402

BASE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=320, max_position_embeddings=256)
FAMILIES = {
    "llama": dict(model_type="llama"),
    "llama-tied-bias": dict(model_type="llama", tie_word_embeddings=True, attention_bias=True),
    "mistral": dict(model_type="mistral"),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=32),
    "gemma": dict(model_type="gemma", head_dim=16),
    "gemma2": dict(model_type="gemma2", head_dim=16),
    "phi3": dict(model_type="phi3", pad_token_id=0, eos_token_id=1, bos_token_id=1),
    "phi3-gqa": dict(model_type="phi3", pad_token_id=0, eos_token_id=1, bos_token_id=1, num_attention_heads=8,
                     num_key_value_heads=2),  # Phi-4's shape: fused qkv_proj of 8 + 2 x 2 heads
    "mistral-head-dim": dict(model_type="mistral", head_dim=24),  # Mistral-Small-3: head_dim != hidden / heads
    "gemma3_text": dict(model_type="gemma3_text", head_dim=16, sliding_window=32, sliding_window_pattern=2),
    "olmo2": dict(model_type="olmo2", pad_token_id=0, eos_token_id=1),
}
CONFIGS = [
    dict(method="lora", rank=8, target_modules=("q_proj", "v_proj")),
    dict(method="lora", rank=4, target_modules=("all-linear",)),
    dict(method="lora", rank=16, target_modules=("gate_proj", "down_proj")),
    dict(method="dora", rank=4, target_modules=("all-linear",)),
    dict(method="dora", rank=8, target_modules=("q_proj", "v_proj")),
    dict(method="lora", rank=8, use_rslora=True, target_modules=("q_proj", "v_proj")),
    dict(method="prefix", num_virtual_tokens=7),
    dict(method="prompt", num_virtual_tokens=5),
    dict(method="ia3"),
    dict(method="full"),
]


def _phi3_targets(d):
    if d.get("target_modules") and d["target_modules"] != ("all-linear",):
        names = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
        return dict(d, target_modules=tuple(dict.fromkeys(names.get(n, n) for n in d["target_modules"])))
    return d


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda d: "-".join(str(v) if not isinstance(v, tuple) else "+".join(v) for v in d.values()))
def test_counts_equal_peft(family, cfg):
    config = dict(BASE, **FAMILIES[family])
    if family.startswith("phi3"):
        cfg = _phi3_targets(cfg)
    tc = TrainConfig(seq_len=64, **cfg)
    with torch.device("meta"):
        model = recipe.build_model(config, tc, device="meta")
        model = recipe.apply_method(model, tc)
    if tc.method == "full":
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
    else:
        n_trainable, n_all = model.get_nb_trainable_parameters()
    arch = arch_from_config(config)
    assert trainable_params(arch, tc) == n_trainable
    assert total_params(arch, tc) == n_all


def test_llama2_7b_lora_r8_qv_matches_peft_readme():
    """peft's README example: 4,194,304 trainable of 6,742,609,920."""
    from planner.profiles import load_model

    arch = load_model("llama-2-7b")
    tc = TrainConfig(method="lora", rank=8, target_modules=("q_proj", "v_proj"))
    assert trainable_params(arch, tc) == 4_194_304
    assert total_params(arch, tc) == 6_742_609_920


def test_catalog_totals_equal_transformers():
    """Every catalog profile's parameter count equals the transformers model built from its config."""
    from planner.profiles import list_models

    for arch in list_models():
        config = dict(arch.config)
        cfg = recipe.hf_config(config)
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        assert sum(p.numel() for p in model.parameters()) == arch.total_params, arch.name
