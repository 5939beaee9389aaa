"""`LayerKind`: what one decoder layer is made of, so that a model is a sequence of kinds rather than a set of flags.

A kind holds what decides a layer's activations, transients and norm parameters: the attention (`mha`: one
key/value head per query head; `gqa`: heads share key/value heads, MQA included), its window (None: full
causal attention; an int: a sliding window of that many keys), the feed-forward block (`dense`), and its norms
(pre-attention and pre-feed-forward RMSNorms, absent in OLMo-2; Gemma-2/Gemma-3/OLMo-2's post-attention and
post-feed-forward norms; q/k norms per head (Qwen3, Gemma-3) or over the whole projection (OLMo-2)). The linear layers and head counts stay on `ModelArch` (the same in every layer).

`layer_kinds_from_config` lists the kind of every layer the way transformers 5.17 decides it
(`configuration_<family>.py` / `modeling_<family>.py`):

- gemma2: `config.layer_types`, default `"sliding_attention" if (i + 1) % 2 else "full_attention"` (even layers
  slide); sliding layers use `sliding_window`.
- gemma3_text: `config.layer_types`, default `"sliding_attention" if (i + 1) % sliding_window_pattern else
  "full_attention"` with `sliding_window_pattern` 6 (five local layers, then a global one;
  `Gemma3TextConfig.__post_init__`).
- qwen2, qwen3: `layer_types`, default sliding for `i >= max_window_layers` when `use_sliding_window` (else
  `sliding_window` is None and every layer is full).
- mistral, phi3: every layer uses `config.sliding_window` when it is set (`modeling_mistral.py` picks one mask
  function for the whole model; MistralConfig warns about and ignores `layer_types`).
- llama, gemma, olmo2: full attention everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYER_TYPES = ("full_attention", "sliding_attention")  # the `layer_types` entries ftplan models
_READS_LAYER_TYPES = ("gemma2", "gemma3_text", "qwen2", "qwen3")  # families whose modeling code reads config.layer_types


@dataclass(frozen=True)
class LayerKind:
    """One decoder layer's structure.

    Args:
        attention: "mha" (num_kv_heads == num_heads) or "gqa" (fewer key/value heads, shared by query heads).
        window: sliding-window size in keys, or None for full causal attention.
        mlp: "dense" (gate/up/down projections).
        post_attention_norm: an RMSNorm on the attention output before the residual add (Gemma-2, Gemma-3, OLMo-2).
        post_feedforward_norm: an RMSNorm on the feed-forward output before the residual add (Gemma-2, Gemma-3,
            OLMo-2).
        qk_norm: RMSNorms on q and k before rotary (Qwen3, Gemma-3, OLMo-2).
        qk_norm_over: what a q/k norm normalizes: "head" (each head's head_dim values: Qwen3, Gemma-3) or
            "projection" (the whole q or k projection, one rsqrt per token: OLMo-2, `Olmo2Attention`).
        pre_norms: the input RMSNorm before attention and the one before the feed-forward block (every family but
            OLMo-2, whose `Olmo2DecoderLayer` normalizes only the sub-blocks' outputs).
    """

    attention: str = "gqa"
    window: int | None = None
    mlp: str = "dense"
    post_attention_norm: bool = False
    post_feedforward_norm: bool = False
    qk_norm: bool = False
    qk_norm_over: str = "head"
    pre_norms: bool = True

    @property
    def norms(self) -> int:
        """hidden-size RMSNorms of the layer: the two pre-norms (when present) plus the post-norms."""
        return 2 * self.pre_norms + self.post_attention_norm + self.post_feedforward_norm

    def qk_norm_widths(self, head_dim: int, q_dim: int, kv_dim: int) -> tuple[int, int]:
        """Weights of the q and k norms: head_dim each (per head), or the q and k projection widths; (0, 0)."""
        if not self.qk_norm:
            return 0, 0
        return (head_dim, head_dim) if self.qk_norm_over == "head" else (q_dim, kv_dim)

    def norm_params(self, hidden_size: int, head_dim: int, q_dim: int = 0, kv_dim: int = 0) -> int:
        """Parameters of the layer's norms: `norms * hidden_size` plus the q/k norm weights."""
        return self.norms * hidden_size + sum(self.qk_norm_widths(head_dim, q_dim, kv_dim))

    def masked(self, kv_seq: int) -> bool:
        """Whether the layer attends through a materialized mask at this key length: transformers skips the mask
        (sdpa runs causal, native GQA) unless a sliding window is shorter than or equal to the keys
        (transformers 5.17 `masking_utils._ignore_causal_mask_sdpa`: `kv_length >= local_attention_size` keeps it)."""
        return self.window is not None and kv_seq >= self.window

    def replay_key(self, kv_seq: int) -> tuple[LayerKind, bool]:
        """What a replayed layer graph depends on at this key length: the kind without its window, and whether
        the window masks. Layers with equal keys have identical graphs (a window longer than the keys is full
        attention; the mask's size does not depend on the window)."""
        masked = self.masked(kv_seq)
        if self.window is None:
            return self, masked
        return LayerKind(self.attention, None, self.mlp, self.post_attention_norm, self.post_feedforward_norm,
                         self.qk_norm, self.qk_norm_over, self.pre_norms), masked

    @property
    def label(self) -> str:
        """Short description, e.g. `gqa sliding(4096) dense +post-norms`."""
        parts = [self.attention, f"sliding({self.window})" if self.window is not None else "full", self.mlp]
        if self.post_attention_norm or self.post_feedforward_norm:
            parts.append("+post-norms")
        if self.qk_norm:
            parts.append("+qk-norm" if self.qk_norm_over == "head" else "+qk-norm(projection)")
        if not self.pre_norms:
            parts.append("-pre-norms")
        return " ".join(parts)


# Norms per family (transformers 5.17 modeling_<family>.py, the decoder layer's and attention's __init__):
_POST_NORMS = ("gemma2", "gemma3_text", "olmo2")  # post_attention_layernorm + post_feedforward_layernorm on outputs
_QK_NORM = {"qwen3": "head", "gemma3_text": "head", "olmo2": "projection"}  # q_norm/k_norm and what they span
_NO_PRE_NORMS = ("olmo2",)  # Olmo2DecoderLayer has no input_layernorm nor pre-feed-forward norm


class LayerKindError(ValueError):
    """A `layer_types` list or window that ftplan cannot model (raised as ArchError by `arch_from_config`)."""


def layer_kinds_from_config(model_type: str, c: dict, num_layers: int, num_heads: int, num_kv_heads: int,
                            ) -> tuple[LayerKind, ...]:
    """The kind of every decoder layer (index 0 first) of a family, from its config `c` (family defaults applied).
    Equal kinds are one shared object."""
    attention = "mha" if num_kv_heads == num_heads else "gqa"
    post = model_type in _POST_NORMS
    base = dict(attention=attention, mlp="dense", post_attention_norm=post, post_feedforward_norm=post,
                qk_norm=model_type in _QK_NORM, qk_norm_over=_QK_NORM.get(model_type, "head"),
                pre_norms=model_type not in _NO_PRE_NORMS)
    window = _window(model_type, c)
    types = _layer_types(model_type, c, num_layers, window)
    shared: dict[LayerKind, LayerKind] = {}
    by_type = {}
    for t in LAYER_TYPES:
        k = LayerKind(window=window if t == "sliding_attention" else None, **base)
        by_type[t] = shared.setdefault(k, k)
    return tuple(by_type[t] for t in types)


def _window(model_type: str, c: dict) -> int | None:
    """The window of the family's sliding layers; None when it has none (Qwen2/Qwen3 without use_sliding_window:
    `sliding_window = sliding_window if use_sliding_window else None`; Llama and Gemma have no window)."""
    if model_type in ("mistral", "phi3", "gemma2", "gemma3_text"):
        w = c.get("sliding_window")
    elif model_type in ("qwen2", "qwen3") and c.get("use_sliding_window"):
        w = c.get("sliding_window")
    else:
        w = None
    if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 0):
        raise LayerKindError(f"'sliding_window' must be a positive integer or null, got {w!r}")
    return int(w) if w else None


def _layer_types(model_type: str, c: dict, num_layers: int, window: int | None) -> list[str]:
    """`full_attention` / `sliding_attention` per layer, as transformers 5.17 builds `config.layer_types`."""
    given = c.get("layer_types")
    if given is not None and model_type in _READS_LAYER_TYPES:
        if not isinstance(given, list) or len(given) != num_layers:
            raise LayerKindError(f"'layer_types' must be a list of num_hidden_layers ({num_layers}) entries, "
                                 f"got {given!r:.80}")
        bad = sorted({t for t in given if t not in LAYER_TYPES}, key=str)
        if bad:
            raise LayerKindError(f"'layer_types' entry {bad[0]!r} is not modelled; valid: {', '.join(LAYER_TYPES)}")
        return list(given)
    if model_type == "gemma2":
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    if model_type == "gemma3_text":
        pattern = c.get("sliding_window_pattern", 6)
        if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern <= 0:
            raise LayerKindError(f"'sliding_window_pattern' must be a positive integer, got {pattern!r}")
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    if model_type in ("qwen2", "qwen3"):
        first = c.get("max_window_layers", 28)
        if not isinstance(first, int) or isinstance(first, bool):
            raise LayerKindError(f"'max_window_layers' must be an integer, got {first!r}")
        return ["sliding_attention" if window is not None and i >= first else "full_attention"
                for i in range(num_layers)]
    if model_type in ("mistral", "phi3"):
        return ["sliding_attention" if window is not None else "full_attention"] * num_layers
    return ["full_attention"] * num_layers
