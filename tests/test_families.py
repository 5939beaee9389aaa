"""Issue 13's dense families (Qwen3, Gemma-3 text and multimodal, Phi-4/Phi-3, OLMo-2, Mistral-Small-3) against
transformers and peft themselves: parameter counts of the real model on the meta device, trainable counts of real
peft, layer patterns as the configuration classes build them, and the trace reference points
(`python -m calibrate.trace_grid --grid families`)."""

import json
from pathlib import Path

import pytest

from planner.arch import SUPPORTED_MODEL_TYPES, ArchError, arch_from_config
from planner.config import TrainConfig
from planner.memory import estimate_memory
from planner.methods.lora import family_default_targets
from planner.profiles import load_model

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "calibrate" / "reference" / "trace-points-families.jsonl"


def _points():
    return [json.loads(line) for line in REFERENCE.read_text().splitlines() if line.strip()]


def _arch(point):
    return arch_from_config(point["config"], name=point["model"]) if "config" in point else load_model(point["model"])


# -- structure, from the configuration classes -----------------------------------------------------------------------


def test_gemma3_layers_slide_five_then_one_global():
    """Gemma3TextConfig: `sliding_attention if (i + 1) % sliding_window_pattern else full_attention`, pattern 6."""
    arch = load_model("gemma-3-27b")
    full = [i for i, k in enumerate(arch.layer_kinds) if k.window is None]
    assert full == list(range(5, 62, 6)) and len(full) == 10
    assert {k.window for k in arch.layer_kinds} == {None, 1024}
    assert arch.vocab_size == 262_208 and arch.tie_word_embeddings and arch.scales_embeddings
    assert arch.rope_tables == 2 and arch.qk_norm and arch.norms_per_layer == 4
    assert arch.head_dim == 128 and arch.q_dim == 4096 != arch.hidden_size  # head_dim explicit, not 5376 / 32
    # layer_types given in the config win over the pattern
    cfg = dict(load_model("gemma-3-4b").config, layer_types=["full_attention"] * 34)
    assert arch_from_config(cfg).sliding_window is None


def test_multimodal_gemma3_is_planned_as_its_text_tower():
    arch = load_model("gemma-3-4b")
    assert arch.model_type == "gemma3_text" and arch.config["architectures"] == ["Gemma3ForCausalLM"]
    assert "text tower" in arch.note and "vision" in arch.note
    # what the published text_config leaves out comes from Gemma3TextConfig's defaults
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (8, 4, 256)


def test_olmo2_and_qwen3_norms():
    olmo = arch_from_config(dict(model_type="olmo2", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=2, vocab_size=1000))
    kind = olmo.layer_kinds[0]
    assert not kind.pre_norms and kind.post_attention_norm and kind.post_feedforward_norm and kind.norms == 2
    assert kind.qk_norm and kind.qk_norm_over == "projection" and olmo.rope_fp32 and olmo.fp32_norm_product
    assert olmo.layer_norm_params == 2 * 256 + 256 + 64  # post-norms, q_norm over 8 x 32, k_norm over 2 x 32
    q3 = load_model("qwen3-8b").layer_kinds[0]
    assert q3.qk_norm and q3.qk_norm_over == "head" and q3.pre_norms and q3.norms == 2


def test_every_family_states_its_default_lora_targets():
    assert family_default_targets(load_model("phi-4")) == ("qkv_proj",)
    for name in ("qwen3-8b", "gemma-3-12b", "mistral-small-3"):
        assert family_default_targets(load_model(name)) == ("q_proj", "v_proj")


@pytest.mark.parametrize("bad, message", [
    (dict(model_type="gpt_neox"), "model_type 'gpt_neox' is not a supported causal LM; valid: llama"),
    (dict(model_type="phi3", partial_rotary_factor=0.75), "partial_rotary_factor 0.75 is not modelled"),
    (dict(model_type="phi3", resid_pdrop=0.1), "resid_pdrop 0.1 is not modelled"),
    (dict(model_type="gemma3_text", use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(model_type="gemma3", text_config=[1]), "'text_config' must be a JSON object"),
])
def test_what_ftplan_does_not_model_is_named(bad, message):
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    with pytest.raises(ArchError, match=message.replace("(", r"\(")):
        arch_from_config(dict(base, **bad))
    assert {"gemma3", "gemma3_text", "olmo2", "qwen3", "phi3", "mistral"} <= set(SUPPORTED_MODEL_TYPES)


def test_cli_names_an_unknown_model_type_and_the_supported_ones(tmp_path):
    from click.testing import CliRunner

    from planner.cli import cli

    (tmp_path / "config.json").write_text(json.dumps(dict(model_type="mamba", hidden_size=64, intermediate_size=128,
                                                          num_hidden_layers=2, num_attention_heads=4, vocab_size=100)))
    r = CliRunner().invoke(cli, ["estimate", "--model", str(tmp_path / "config.json")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "'mamba'" in r.output and "gemma3_text" in r.output and "olmo2" in r.output


# -- truth: transformers and peft on the meta device ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen3-32b", "gemma-3-4b", "phi-4", "mistral-small-3"])
def test_full_size_counts_equal_transformers_and_peft(name):
    """sum(p.numel()) of the real model built at full size on the meta device, and peft's trainable count with the
    family's default LoRA targets and with all-linear (one model per family; test_methods_peft's
    test_catalog_totals_equal_transformers builds every catalog profile, these included)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from planner.methods import total_params, trainable_params
    from trainer import recipe

    arch = load_model(name)
    for targets in (family_default_targets(arch), ("all-linear",)):
        tc = TrainConfig(method="lora", rank=16, target_modules=targets)
        with torch.device("meta"):
            model = recipe.build_model(dict(arch.config), tc, device="meta")
            assert sum(p.numel() for p in model.parameters()) == arch.total_params
            model = recipe.apply_method(model, tc)
        n_trainable, n_all = model.get_nb_trainable_parameters()
        assert (trainable_params(arch, tc), total_params(arch, tc)) == (n_trainable, n_all), targets


def test_multimodal_gemma3_text_tower_equals_the_language_model_of_transformers():
    """Gemma3ForConditionalGeneration built from the published gemma-3-4b config: its language model plus the (tied)
    head are exactly the planned parameters; the vision tower and projector are what the note leaves out."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForImageTextToText

    from trainer.recipe import hf_config

    import tomllib

    arch = load_model("gemma-3-4b")
    raw = tomllib.loads((ROOT / "profiles" / "models" / "gemma-3-4b.toml").read_text())["config"]
    cfg = AutoConfig.for_model("gemma3", **{k: v for k, v in raw.items() if k not in ("model_type", "architectures",
                                                                                       "transformers_version")})
    with torch.device("meta"):
        mm = AutoModelForImageTextToText.from_config(cfg)
    assert type(mm).__name__ == "Gemma3ForConditionalGeneration"
    language = sum(p.numel() for p in mm.model.language_model.parameters())
    head = 0 if cfg.tie_word_embeddings else mm.lm_head.weight.numel()
    assert language + head == arch.total_params
    assert sum(p.numel() for p in mm.parameters()) > arch.total_params + 300_000_000  # SigLIP tower not planned
    assert hf_config(dict(arch.config)).model_type == "gemma3_text"


# -- truth: the trace of the real model on fake tensors -----------------------------------------------------------------


@pytest.mark.parametrize("point", _points(), ids=lambda p: f"{p['id']}-{p['model']}-{p['train']['method']}")
def test_families_within_2_percent_of_the_trace(point):
    tc = TrainConfig.from_dict(point["train"])
    est = estimate_memory(_arch(point), tc)
    traced = point["trace"]["peak_allocated_bytes"]
    err = (est.peak_allocated_bytes - traced) / traced
    assert abs(err) <= 0.02, f"{point['model']} {tc.describe()}: analytic {err:+.2%} (model at {est.peak_event})"
    assert est.trainable_params == point["trace"]["trainable_params"]
    assert est.total_params == point["trace"]["total_params"]


def test_the_families_grid_covers_each_family_and_mechanism():
    pts = _points()
    families = {p["config"]["model_type"] for p in pts if "config" in p}
    assert families == {"qwen3", "gemma3_text", "gemma3", "olmo2", "phi3", "mistral"}
    assert {p["model"] for p in pts if "config" not in p} >= {"qwen3-8b", "gemma-3-4b", "phi-4", "mistral-small-3"}
    tcs = [TrainConfig.from_dict(p["train"]) for p in pts]
    assert {tc.method for tc in tcs} == {"full", "lora"} and any(tc.base_quant.quantized for tc in tcs)
    assert {tc.precision for tc in tcs} >= {"bf16", "mixed"}
    assert any(tc.grad_ckpt for tc in tcs) and any(not tc.grad_ckpt for tc in tcs)
    # Gemma-3's sliding layers both attend without a mask (512 < 1024 keys) and through one (1536)
    gemma = [_arch(p) for p in pts if p.get("config", {}).get("model_type") == "gemma3_text"]
    assert gemma and gemma[0].masked_layers(1536) == 5 and gemma[0].masked_layers(512) == 0
