"""`ModelArch`: the shapes of a decoder-only causal LM, read from a Hugging Face `config.json` (or a profile).

Only the fields that decide memory and FLOPs are kept. The linear layers of one decoder layer are listed by
their module names (`q_proj`, ..., `down_proj`; Phi-3 fuses `qkv_proj` and `gate_up_proj`), because LoRA
targets modules by name and peft's trainable-parameter count follows from their shapes.
What differs between layers (attention window, post-norms, q/k norms) is each layer's `LayerKind`
(`planner.layerkinds`), one per decoder layer in `ModelArch.layer_kinds`.

Families: llama, mistral (Mistral-Small-3: explicit head_dim), qwen2, qwen3, gemma, gemma2, gemma3_text (and the
text tower of the multimodal `gemma3` config), olmo2, phi3 (Phi-3, Phi-4); the MoE families of `planner.moe`;
deepseek_v3 (`planner.deepseek`, its latent attention in `planner.mla`: `linears` are the MLA projections,
`head_dim` is `qk_rope_head_dim` as in its config). Sources: `configuration_<family>.py` and `modeling_<family>.py`
in transformers 5.17.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from dataclasses import replace as _dc_replace
from pathlib import Path

from .frozen import fields_hash
from . import deepseek as _deepseek
from . import mla as _mla
from . import moe as _moe
from .layerkinds import LayerKind, LayerKindError, layer_kinds_from_config

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "olmo2",
                         "phi3") + _moe.MOE_MODEL_TYPES + (_deepseek.MODEL_TYPE,)

# transformers' config defaults for keys a config.json may omit, per family (configuration_<family>.py).
_FAMILY_DEFAULTS = {
    "llama": dict(hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False, vocab_size=32000,
                  hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  max_position_embeddings=2048),
    "mistral": dict(hidden_act="silu", tie_word_embeddings=False, vocab_size=32000, hidden_size=4096, sliding_window=4096,
                    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=4096 * 32),
    "qwen2": dict(hidden_act="silu", tie_word_embeddings=False, vocab_size=151936, hidden_size=4096,
                  intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  max_position_embeddings=32768),
    "qwen3": dict(hidden_act="silu", attention_bias=False, tie_word_embeddings=False, vocab_size=151936,
                  hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, head_dim=128, max_position_embeddings=32768),
    "gemma": dict(hidden_act="gelu_pytorch_tanh", attention_bias=False, tie_word_embeddings=True, vocab_size=256000,
                  hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=16, head_dim=256, max_position_embeddings=8192),
    "gemma2": dict(hidden_activation="gelu_pytorch_tanh", attention_bias=False, tie_word_embeddings=True,
                   vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0, sliding_window=4096),
    "phi3": dict(hidden_act="silu", tie_word_embeddings=False, vocab_size=32064, hidden_size=3072,
                 intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=4096),
    # configuration_gemma3.py Gemma3TextConfig (262,208-token vocabulary, 256-wide heads, tied embeddings)
    "gemma3_text": dict(hidden_activation="gelu_pytorch_tanh", attention_bias=False, tie_word_embeddings=True,
                        vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
                        sliding_window=4096, query_pre_attn_scalar=256, final_logit_softcapping=None,
                        attn_logit_softcapping=None),
    # configuration_olmo2.py Olmo2Config
    "olmo2": dict(hidden_act="silu", attention_bias=False, tie_word_embeddings=False, vocab_size=50304,
                  hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  max_position_embeddings=2048),
}
_FAMILY_DEFAULTS[_deepseek.MODEL_TYPE] = _deepseek.FAMILY_DEFAULTS  # configuration_deepseek_v3.py (planner.deepseek)
# Keys of Gemma3TextConfig that the multimodal `gemma3` config.json may leave out of its `text_config`: transformers
# builds the nested config as `Gemma3TextConfig(**text_config)` (configuration_gemma3.py Gemma3Config.__post_init__),
# so an absent key takes the class default (the published gemma-3-4b/12b/27b configs omit the vocabulary and the
# head counts of the smaller ones).
_GEMMA3_TEXT_DEFAULTS = dict(_FAMILY_DEFAULTS["gemma3_text"], num_hidden_layers=26, hidden_size=2304,
                             intermediate_size=9216)


@dataclass(frozen=True)
class Linear:
    """One `nn.Linear` of a decoder layer: `name` as peft sees it, shapes, and whether it has a bias."""

    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ModelArch:
    """Shapes of a decoder-only causal LM.

    Args:
        name: catalog name or the path it was read from.
        model_type: transformers `model_type` (one of SUPPORTED_MODEL_TYPES).
        hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size, vocab_size: config fields.
        tie_word_embeddings: lm_head shares the embedding matrix (one tensor, one gradient).
        linears: the linear layers of one decoder layer, in forward order.
        layer_kinds: the `LayerKind` of every decoder layer (layer 0 first): attention, window, MLP, norms.
            Left out of the hash (equal archs still hash equal; the hash stays cheap for the lru_caches keyed
            on the arch) but compared.
        hf_id: Hugging Face repository id where known.
    """

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    linears: tuple[Linear, ...]
    layer_kinds: tuple[LayerKind, ...] = field(hash=False, repr=False)
    hidden_act: str = "silu"
    final_logit_softcapping: float | None = None
    max_position_embeddings: int = 0
    hf_id: str | None = None
    aliases: tuple[str, ...] = ()
    source: str = ""
    moe: _moe.MoE | None = None  # the sparse block of a MoE family (planner.moe); `linears` are then attention only
    config: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    note: str = ""  # what ftplan plans when it is not the whole checkpoint (a multimodal model's text tower)
    mla: _mla.MLA | None = None  # DeepSeek's latent attention (planner.mla); `linears` are then its projections

    # -- families ---------------------------------------------------------------------------------
    @property
    def fp32_norm_product(self) -> bool:
        """The RMSNorm multiplies its weight into the fp32 normalized tensor, then casts to the input dtype: Gemma's
        `(x.float() * rsqrt(...)) * (1 + w.float())` (modeling_gemma.py, gemma2, gemma3) and OLMo-2's
        `(w * x.float() * rsqrt(...)).to(dtype)` (modeling_olmo2.py Olmo2RMSNorm) and gpt-oss's
        `(self.weight * hidden_states).to(input_dtype)` on the fp32 normalized tensor (modeling_gpt_oss.py
        GptOssRMSNorm); Llama casts first, then multiplies."""
        return self.model_type in ("gemma", "gemma2", "gemma3_text", "olmo2", "gpt_oss")

    @property
    def scales_embeddings(self) -> bool:
        """Gemma multiplies the embeddings by sqrt(hidden_size) (a new activation tensor; Gemma-3 by its
        `embed_scale` buffer, Gemma3TextScaledWordEmbedding)."""
        return self.model_type in ("gemma", "gemma2", "gemma3_text")

    @property
    def rope_fp32(self) -> bool:
        """The rotary cos/sin stay fp32 and q, k are cast back after rotation: `Olmo2RotaryEmbedding.forward`
        returns fp32 cos/sin, `apply_rotary_pos_emb` ends `q_embed.to(q_type)` (modeling_olmo2.py); the other
        families cast cos/sin to the activations' dtype."""
        return self.model_type == "olmo2"

    @property
    def attention_sinks(self) -> bool:
        """gpt-oss: a learned sink logit per head joins every softmax (`GptOssAttention.sinks`, modeling_gpt_oss.py),
        run by its eager attention (`Builder.eager_sinks`)."""
        return self.model_type == "gpt_oss"

    @property
    def rope_on_halves(self) -> bool:
        """gpt-oss rotates `chunk(x, 2)` halves with half-width cos/sin (`_apply_rotary_emb`, `GptOssRotaryEmbedding`
        returns (S, head_dim / 2) tables); the others use `rotate_half` with full-width tables."""
        return self.model_type == "gpt_oss"

    @property
    def rope_tables(self) -> int:
        """Rotary (cos, sin) pairs the model computes per step: Gemma-3 one per layer type present
        (`Gemma3TextModel.forward`: `for layer_type in set(config.layer_types)`; local and global RoPE differ);
        the others one."""
        if self.model_type != "gemma3_text":
            return 1
        return len({k.window is None for k, _ in self.kind_counts})

    # -- layer kinds ------------------------------------------------------------------------------
    def __post_init__(self):
        if len(self.layer_kinds) != self.num_layers:
            raise ArchError(f"{self.name}: {len(self.layer_kinds)} layer kinds for {self.num_layers} layers")
        object.__setattr__(self, "_hash", fields_hash(self))

    def __hash__(self) -> int:
        """The dataclass hash (every field but `layer_kinds` and `config`), computed once (`planner.frozen`)."""
        return self._hash

    @functools.cached_property
    def kind_counts(self) -> tuple[tuple[LayerKind, int], ...]:
        """(kind, number of layers) of each distinct kind, in order of first appearance."""
        counts: dict[LayerKind, int] = {}
        for k in self.layer_kinds:
            counts[k] = counts.get(k, 0) + 1
        return tuple(counts.items())

    def masked_layers(self, kv_seq: int) -> int:
        """How many layers attend through a materialized mask at this key length (`LayerKind.masked`)."""
        return sum(n for k, n in self.kind_counts if k.masked(kv_seq))

    def _uniform(self, attr: str):
        values = {getattr(k, attr) for k, _ in self.kind_counts}
        if len(values) != 1:
            raise ValueError(f"{self.name}: layers differ in {attr}; read layer_kinds")
        return values.pop()

    @property
    def norms_per_layer(self) -> int:
        """hidden-size RMSNorms per decoder layer (2; Gemma-2 has 4); all layers must agree."""
        return self._uniform("norms")

    @property
    def qk_norm(self) -> bool:
        """Qwen3's per-head RMSNorm on q and k; all layers must agree."""
        return self._uniform("qk_norm")

    @property
    def sliding_window(self) -> int | None:
        """The smallest window of any layer; None when every layer attends to all keys."""
        return min((k.window for k, _ in self.kind_counts if k.window is not None), default=None)

    @property
    def fused_qkv(self) -> bool:
        """Phi-3 fuses q/k/v into `qkv_proj` (and gate/up into `gate_up_proj`)."""
        return any(lin.name == "qkv_proj" for lin in self.linears)

    # -- parameter counts -------------------------------------------------------------------------
    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """0 when tied: the output projection reuses the embedding matrix."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def layer_linear_params(self) -> int:
        return sum(lin.params for lin in self.linears)

    @property
    def layer_norm_params(self) -> int:
        """Norm parameters of the decoder layer with the most (all layers alike in the supported families)."""
        return (max(k.norm_params(self.hidden_size, self.head_dim, self.q_dim, self.kv_dim) for k, _ in self.kind_counts)
                + (self.mla.norm_params if self.mla else 0))  # MLA: q_a_layernorm, kv_a_layernorm

    @property
    def layer_params(self) -> int:
        """Parameters of the largest decoder layer."""
        mlp = _moe.largest_mlp_params(self) if self.moe else 0
        return self.layer_linear_params + self.layer_norm_params + mlp

    @functools.cached_property
    def total_params(self) -> int:
        """Equals `sum(p.numel() for p in model.parameters())` of the transformers model (tied counted once)."""
        return (
            self.embedding_params
            + self.lm_head_params
            + self.num_layers * self.layer_linear_params
            + sum(n * k.norm_params(self.hidden_size, self.head_dim, self.q_dim, self.kv_dim) for k, n in self.kind_counts)
            + self.hidden_size  # final norm
            + (_moe.mlp_params(self) if self.moe else 0)  # MoE: experts, routers, dense-first MLPs
            + (self.num_layers * self.mla.norm_params if self.mla else 0)  # MLA: q_a_layernorm, kv_a_layernorm
        )

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(lin.name for lin in self.linears)

    def linear(self, name: str) -> Linear:
        for lin in self.linears:
            if lin.name == name:
                return lin
        raise KeyError(name)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def label(self) -> str:
        return self.name

    def summary(self) -> dict:
        return {
            "name": self.name,
            "hf_id": self.hf_id,
            "model_type": self.model_type,
            "total_params": self.total_params,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "linear_modules": list(self.linear_names),
            "max_position_embeddings": self.max_position_embeddings,
            **({"note": self.note} if self.note else {}),
        }


class ArchError(ValueError):
    """A config that ftplan cannot model (not a causal LM, unsupported family, missing fields)."""


# Keys every causal-LM config.json of the supported families writes (transformers 5.17 `PretrainedConfig.to_dict`
# writes all of them) and that decide the parameter count: a config missing one is not planned with a family
# default (a config.json with most keys missing was silently planned as a 6.74B llama).
REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
# Optional keys that, when present and not null, must be positive integers.
_OPTIONAL_INT_KEYS = ("num_key_value_heads", "head_dim")


def _check_required(config: dict, label: str) -> None:
    """ArchError naming the first required key that is missing, or a key whose value is not a positive integer."""
    missing = [k for k in REQUIRED_KEYS if k not in config or config[k] is None]
    if missing:
        raise ArchError(
            f"{label}: missing required key{'s' if len(missing) > 1 else ''} {', '.join(repr(k) for k in missing)} "
            f"(a causal-LM config.json has {', '.join(REQUIRED_KEYS)})"
        )
    for key in REQUIRED_KEYS + _OPTIONAL_INT_KEYS:
        v = config.get(key)
        if key in _OPTIONAL_INT_KEYS and v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ArchError(f"{label}: '{key}' must be a positive integer, got {v!r}")


def _check_full_rotary(config: dict, label: str) -> None:
    """ArchError for a partial rotary embedding (Phi-4-mini's `partial_rotary_factor` 0.75: Phi3's
    `apply_rotary_pos_emb` rotates a slice and concatenates the rest, other tensors than the full rotation ftplan
    models); 1.0 or absent is full rotation (transformers 5.17 modeling_phi3.py, modeling_rope_utils.py)."""
    for where in (config, config.get("rope_parameters") or {}, config.get("rope_scaling") or {}):
        f = where.get("partial_rotary_factor") if isinstance(where, dict) else None
        if f is not None and f != 1.0:
            raise ArchError(f"{label}: partial_rotary_factor {f!r} is not modelled (ftplan plans full rotary "
                            f"embeddings); valid: 1.0 or absent")
    if config.get("model_type") == "phi3":
        # Phi3DecoderLayer's resid_attn_dropout / resid_mlp_dropout (nn.Dropout(config.resid_pdrop)): masks ftplan
        # does not model; every published Phi-3 / Phi-4 config sets 0.0 (embd_pdrop is unused in 5.17's Phi3Model)
        v = config.get("resid_pdrop")
        if v not in (None, 0, 0.0):
            raise ArchError(f"{label}: resid_pdrop {v!r} is not modelled (dropout masks on the residual stream); "
                            f"valid: 0.0")


GEMMA3_TEXT_TOWER_NOTE = ("multimodal Gemma-3: planned as its text tower (Gemma3ForCausalLM); the SigLIP vision "
                          "tower and projector, and image tokens, are not counted")


def gemma3_text_config(config: dict, label: str) -> dict:
    """The text tower of a multimodal `gemma3` config.json as a `gemma3_text` config: its `text_config` with the
    Gemma3TextConfig defaults for what it leaves out, `Gemma3ForCausalLM` as the architecture. The top-level
    `tie_word_embeddings` (Gemma3Config, default true) decides the tie of the language-model head."""
    text = config.get("text_config")
    if text is None:
        text = {}
    if not isinstance(text, dict):
        raise ArchError(f"{label}: 'text_config' must be a JSON object, got {type(text).__name__}")
    out = dict(_GEMMA3_TEXT_DEFAULTS)
    out.update(text)
    out["model_type"] = "gemma3_text"
    out["architectures"] = ["Gemma3ForCausalLM"]
    out["tie_word_embeddings"] = config.get("tie_word_embeddings", True)
    return out


def arch_from_config(config: dict, *, name: str = "", hf_id: str | None = None, aliases=(), source: str = "",
                     note: str = "") -> ModelArch:
    """Build a `ModelArch` from the fields of a Hugging Face `config.json`.

    Raises ArchError naming the problem (not a causal LM, unsupported `model_type`, missing or invalid fields).
    """
    if not isinstance(config, dict):
        raise ArchError("config must be a JSON object")
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type is None:
        raise ArchError("config has no 'model_type'; is this a Hugging Face config.json?")
    if archs and not any(a.endswith("ForCausalLM") for a in archs) and model_type != "gemma3":
        raise ArchError(
            f"{name or 'config'}: architectures {archs} has no *ForCausalLM; ftplan plans causal-LM fine-tuning"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ArchError(
            f"{name or 'config'}: model_type {model_type!r} is not a supported causal LM; "
            f"valid: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "gemma3":
        return arch_from_config(gemma3_text_config(config, name or "config"), name=name, hf_id=hf_id, aliases=aliases,
                                source=source, note=GEMMA3_TEXT_TOWER_NOTE)
    if config.get("use_bidirectional_attention"):
        raise ArchError(f"{name or 'config'}: use_bidirectional_attention is true (an embedding model, not a causal LM); "
                        f"ftplan plans causal-LM fine-tuning")
    _check_required(config, name or "config")
    _check_full_rotary(config, name or "config")
    c = dict(_FAMILY_DEFAULTS.get(model_type) or _moe.FAMILY_DEFAULTS[model_type])
    c.update(config)  # an explicit null (e.g. Mistral v0.3 sliding_window) overrides the family default

    def get_int(key: str) -> int:
        v = c.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ArchError(f"{name or 'config'}: '{key}' must be a positive integer, got {v!r}")
        return v

    h = get_int("hidden_size")
    n_layers = get_int("num_hidden_layers")
    n_heads = get_int("num_attention_heads")
    n_kv = c.get("num_key_value_heads") or n_heads
    if not isinstance(n_kv, int) or n_kv <= 0 or n_heads % n_kv:
        raise ArchError(f"{name or 'config'}: num_key_value_heads {n_kv!r} must divide num_attention_heads {n_heads}")
    head_dim = c.get("head_dim") or h // n_heads
    inter = get_int("intermediate_size")
    vocab = get_int("vocab_size")
    tie = bool(c.get("tie_word_embeddings", False))
    act = c.get("hidden_activation") or c.get("hidden_act") or "silu"

    q, kv = n_heads * head_dim, n_kv * head_dim
    if model_type == _deepseek.MODEL_TYPE:
        return _deepseek.build_arch(c, config, name=name, hf_id=hf_id, aliases=aliases, source=source, h=h,
                                    n_layers=n_layers, n_heads=n_heads, inter=inter, vocab=vocab, tie=tie, act=act)
    if model_type in _moe.MOE_MODEL_TYPES:
        return _moe_arch(model_type, c, config, name, hf_id, aliases, source, h, n_layers, n_heads, n_kv, head_dim,
                         inter, vocab, tie, act)
    if model_type in ("llama", "qwen3"):
        qkv_bias = o_bias = bool(c.get("attention_bias", False))
    elif model_type == "qwen2":
        qkv_bias, o_bias = True, False  # Qwen2Attention: q/k/v with bias, o_proj without
    else:  # mistral, gemma, gemma2, gemma3_text, olmo2, phi3: `attention_bias` on all four
        qkv_bias = o_bias = bool(c.get("attention_bias", False))
    mlp_bias = bool(c.get("mlp_bias", False))
    try:
        kinds = layer_kinds_from_config(model_type, c, n_layers, n_heads, n_kv)
    except LayerKindError as e:
        raise ArchError(f"{name or 'config'}: {e}") from None

    if model_type == "phi3":
        linears = (
            Linear("qkv_proj", h, q + 2 * kv, False),
            Linear("o_proj", q, h, False),
            Linear("gate_up_proj", h, 2 * inter, False),
            Linear("down_proj", inter, h, False),
        )
    else:
        linears = (
            Linear("q_proj", h, q, qkv_bias),
            Linear("k_proj", h, kv, qkv_bias),
            Linear("v_proj", h, kv, qkv_bias),
            Linear("o_proj", q, h, o_bias),
            Linear("gate_proj", h, inter, mlp_bias),
            Linear("up_proj", h, inter, mlp_bias),
            Linear("down_proj", inter, h, mlp_bias),
        )
    return ModelArch(
        name=name or c.get("_name_or_path") or model_type,
        model_type=model_type,
        hidden_size=h,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        linears=linears,
        layer_kinds=kinds,
        hidden_act=act,
        final_logit_softcapping=c.get("final_logit_softcapping") if model_type in ("gemma2", "gemma3_text") else None,
        max_position_embeddings=int(c.get("max_position_embeddings") or 0),
        hf_id=hf_id,
        aliases=tuple(aliases),
        source=source,
        config=dict(config),
        note=note,
    )


def _moe_arch(model_type, c, config, name, hf_id, aliases, source, h, n_layers, n_heads, n_kv, head_dim, inter, vocab,
              tie, act) -> ModelArch:
    """A MoE family (planner.moe): the attention of its dense relative, the MoE block on its sparse layers.
    `linears` lists the attention projections only; the feed-forward tensors are `planner.moe.param_tensors`."""
    label = name or "config"
    q, kv = n_heads * head_dim, n_kv * head_dim
    if model_type == "qwen2_moe":
        qkv_bias, o_bias = bool(c.get("qkv_bias", True)), False  # Qwen2MoeAttention: o_proj without bias
    elif model_type == "mixtral":
        qkv_bias = o_bias = False
    else:  # qwen3_moe, gpt_oss: attention_bias on all four
        qkv_bias = o_bias = bool(c.get("attention_bias", False))
    try:
        block = _moe.moe_from_config(model_type, c)
        sparse = _moe.sparse_layers(model_type, c, n_layers)
        family = _moe.ATTENTION_FAMILY[model_type]
        if family == "gpt_oss":
            # gpt-oss builds `layer_types` as Gemma-2 does (sliding on even layers, `sliding_window` keys),
            # without Gemma-2's post-norms (configuration_gpt_oss.py, modeling_gpt_oss.py)
            kinds = tuple(_dc_replace(k, post_attention_norm=False, post_feedforward_norm=False)
                          for k in layer_kinds_from_config("gemma2", c, n_layers, n_heads, n_kv))
        else:
            kinds = layer_kinds_from_config(family, c, n_layers, n_heads, n_kv)
        kinds = _moe.with_moe_kinds(kinds, sparse)
    except (LayerKindError, _moe.MoEError) as e:
        raise ArchError(f"{label}: {e}") from None
    linears = (
        Linear("q_proj", h, q, qkv_bias),
        Linear("k_proj", h, kv, qkv_bias),
        Linear("v_proj", h, kv, qkv_bias),
        Linear("o_proj", q, h, o_bias),
    )
    return ModelArch(
        name=name or c.get("_name_or_path") or model_type, model_type=model_type, hidden_size=h, num_layers=n_layers,
        num_heads=n_heads, num_kv_heads=n_kv, head_dim=head_dim, intermediate_size=inter, vocab_size=vocab,
        tie_word_embeddings=tie, linears=linears, layer_kinds=kinds, hidden_act=act,
        max_position_embeddings=int(c.get("max_position_embeddings") or 0), hf_id=hf_id, aliases=tuple(aliases),
        source=source, moe=block, config=dict(config),
    )


def arch_from_path(path: str | Path) -> ModelArch:
    """Read a `config.json` file, or a folder holding one (a local checkpoint)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ArchError(f"no config.json at {path}")
    try:
        config = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ArchError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return arch_from_config(config, name=str(path), source=str(p))
