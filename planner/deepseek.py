"""DeepSeek-V3 (`model_type` deepseek_v3): its config, layer kinds, router and MoE block.

Source: transformers 5.17 `models/deepseek_v3/configuration_deepseek_v3.py` and `modeling_deepseek_v3.py`.

- Attention: Multi-head Latent Attention (`planner.mla`).
- Layers `i < first_k_dense_replace` have a dense `DeepseekV3MLP` of `intermediate_size`; the others a
  `DeepseekV3MoE`: `n_routed_experts` experts of `moe_intermediate_size`, stored fused as `DeepseekV3Experts`
  (`gate_up_proj` (E, 2I, h), `down_proj` (E, h, I)) and run by `@use_experts_implementation` (grouped_mm by
  default, as the other MoE families: `planner.moe_graph`), plus `shared_experts`, one `DeepseekV3MLP` of
  `moe_intermediate_size x n_shared_experts` (`nn.Linear`s gate_proj/up_proj/down_proj, no gate) applied to the
  block's input and added after the routed experts.
- Router (`DeepseekV3TopkRouter`): an (E, h) parameter and an fp32 `e_score_correction_bias` buffer (E, not a
  parameter). Everything in fp32: `F.linear(x.float(), W.float())`, `sigmoid`, the bias added for the choice
  only, group-limited top-k (top-2 sum per each of `n_group` groups, `topk_group` groups kept, the others masked
  to -inf), `topk` indices, the weights gathered from the sigmoid scores, renormalized when `norm_topk_prob`
  (`+ 1e-20`, in place), times `routed_scaling_factor`. The choice (group scores, masks, top-k values) carries
  no gradient to the loss: its autograd nodes die with the forward; only sigmoid -> gather -> weights backprop.
  The fp32 weights then multiply the bf16 expert outputs, so the unsummed (S, h) product is fp32 (as Mixtral's).
- `DeepseekV3ForCausalLM` builds `num_hidden_layers` layers; the multi-token-prediction layer of the checkpoint
  (`num_nextn_predict_layers`) is not built (`_keys_to_ignore_on_load_unexpected`). No load-balancing loss.
- peft 0.21 maps deepseek_v3 to the qwen2_moe conversion pattern (transformers `conversion_mapping.py`), so
  `all-linear` becomes `target_parameters` on the fused experts (refused, as for the other MoE families) and has
  no default target modules (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING` has no deepseek_v3 entry):
  ftplan's default is the attention projections.
"""

from __future__ import annotations

from .graph import ZERO
from .mla import MLAError, mla_from_config
from .moe import MoE, MoEError, expert_wrappers
from .units import BOOL, FP32, param_bytes

MODEL_TYPE = "deepseek_v3"

# configuration_deepseek_v3.py DeepseekV3Config defaults (transformers 5.17)
FAMILY_DEFAULTS = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
    routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
    qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
    norm_topk_prob=True, hidden_act="silu", max_position_embeddings=4096, tie_word_embeddings=False,
    rope_interleave=True, attention_bias=False, attention_dropout=0.0,
)

I64 = 8


def _pos_int(c: dict, key: str) -> int:
    v = c.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise MoEError(f"'{key}' must be a positive integer, got {v!r}")
    return v


def moe_from_config(c: dict) -> MoE:
    """The routed + shared experts of a deepseek_v3 config (defaults applied). `num_local_experts` is an alias of
    `n_routed_experts` (`DeepseekV3Config.attribute_map`)."""
    E = c.get("n_routed_experts", c.get("num_local_experts"))
    c = dict(c, n_routed_experts=E)
    E, k = _pos_int(c, "n_routed_experts"), _pos_int(c, "num_experts_per_tok")
    if k > E:
        raise MoEError(f"'num_experts_per_tok' {k} exceeds the number of experts {E}")
    n_shared = _pos_int(c, "n_shared_experts")
    inter = _pos_int(c, "moe_intermediate_size")
    G, TG = _pos_int(c, "n_group"), _pos_int(c, "topk_group")
    if E % G:
        raise MoEError(f"'n_group' {G} must divide n_routed_experts {E}")
    if TG > G:
        raise MoEError(f"'topk_group' {TG} exceeds n_group {G}")
    if E // G < 2:
        raise MoEError(f"n_routed_experts / n_group must be at least 2 (the router sums each group's top 2), got "
                       f"{E // G}")
    if k > TG * (E // G):
        raise MoEError(f"'num_experts_per_tok' {k} exceeds the experts of the topk_group groups ({TG * (E // G)})")
    return MoE(E, k, inter, norm_topk_prob=bool(c.get("norm_topk_prob", True)), shared_intermediate=n_shared * inter)


def sparse_layers(c: dict, num_layers: int) -> list[bool]:
    """Layer i has the MoE block when `i >= first_k_dense_replace` (`DeepseekV3DecoderLayer.__init__`)."""
    k = c.get("first_k_dense_replace")
    if k is None:
        k = 0
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise MoEError(f"'first_k_dense_replace' must be a non-negative integer, got {k!r}")
    return [i >= k for i in range(num_layers)]


def buffer_bytes(arch) -> int:
    """The routers' `e_score_correction_bias` buffers: E fp32 values per MoE layer (`_keep_in_fp32_modules_strict`),
    each its own 512-byte block."""
    n_sparse = sum(n for k, n in arch.kind_counts if k.mlp == "moe")
    return n_sparse * param_bytes(arch.moe.num_experts, FP32)


def router_config(arch) -> dict:
    """n_group, topk_group, routed_scaling_factor of the arch's config (defaults applied)."""
    c = dict(FAMILY_DEFAULTS)
    c.update(arch.config)
    return c


def check_config(c: dict) -> None:
    """MoEError / MLAError for what ftplan cannot model in a deepseek_v3 config."""
    H, K = c.get("num_attention_heads"), c.get("num_key_value_heads")
    if K is not None and K != H:
        raise MoEError(f"'num_key_value_heads' {K} must equal num_attention_heads {H} (MLA expands its latent to every "
                       "head; transformers' repeat_kv would apply on top)")
    mla_from_config(c)


def build_arch(c: dict, config: dict, *, name, hf_id, aliases, source, h, n_layers, n_heads, inter, vocab, tie, act):
    """The `ModelArch` of a deepseek_v3 config (`c`: family defaults applied): MLA linears as `linears`, the MoE
    block on layers from `first_k_dense_replace`, `head_dim` = qk_rope_head_dim (the rotary tables' width)."""
    from .arch import ArchError, Linear, ModelArch
    from .layerkinds import LayerKind

    label = name or "config"
    try:
        check_config(c)
        mla = mla_from_config(c)
        block = moe_from_config(c)
        sparse = sparse_layers(c, n_layers)
    except (MoEError, MLAError) as e:
        raise ArchError(f"{label}: {e}") from None
    dense, moe = LayerKind(attention="mha"), LayerKind(attention="mha", mlp="moe")
    kinds = tuple(moe if s else dense for s in sparse)
    linears = tuple(Linear(*shape) for shape in mla.linear_shapes(h, n_heads))
    return ModelArch(
        name=name or c.get("_name_or_path") or MODEL_TYPE, model_type=MODEL_TYPE, hidden_size=h, num_layers=n_layers,
        num_heads=n_heads, num_kv_heads=n_heads, head_dim=mla.qk_rope_head_dim, intermediate_size=inter,
        vocab_size=vocab, tie_word_embeddings=tie, linears=linears, layer_kinds=kinds, hidden_act=act,
        max_position_embeddings=int(c.get("max_position_embeddings") or 0), hf_id=hf_id, aliases=tuple(aliases),
        source=source, moe=block, mla=mla, config=dict(config),
    )


# -- the graph --------------------------------------------------------------------------------------------------------


def moe_block(b, x: int) -> int:
    """`DeepseekV3MoE.forward`: the router, the routed experts (grouped_mm), then the shared experts on the same
    input, added last."""
    from .moe_graph import _experts_grouped_mm, _shared_expert

    h = b.arch.hidden_size
    scores = router(b, x)
    out = _experts_grouped_mm(b, x, scores)
    shared = _shared_expert(b, x)
    return b.add(out, shared, h)


def router(b, x: int) -> int:
    """`DeepseekV3TopkRouter.forward` on the normed hidden states; returns the fp32 routing weights (top_k per
    token).

    `x.type(float32)` (an fp32 copy of bf16 x; saved by the linear when the weight trains), `W.type(float32)` (an
    fp32 copy of the (E, h) weight, saved when x needs a gradient; its gradient is cast back to the weight's
    dtype), logits (E, fp32), sigmoid (saves its output), the choice without gradient (scores + bias, group
    top-2 values and indices, their sum, the group top-k indices, the zero/scatter group mask, the expanded mask
    reshaped (a copy, fp32), its bool and negation, the masked scores, the top-k indices: all dropped when the
    router returns), `gather` (saves the indices), the optional renormalization (sum + eps, in-place division:
    autograd keeps the values before it), times the scaling factor (nothing saved)."""
    g, a, R = b.g, b.arch, b.R
    m, h = a.moe, a.hidden_size
    E, k = m.num_experts, m.top_k
    rc = router_config(a)
    G, TG = rc["n_group"], rc["topk_group"]
    trained = b.full
    x32 = b.cast(x, h, FP32)
    pgrad = (0, param_bytes(E * h, R.weight)) if trained else ZERO
    wrapped = {w[0]: w for w in expert_wrappers(a, b.tc)}
    if "gate.weight" in wrapped:
        from .moe_graph import _lora_fold

        # LoRA on the router (all-linear, or `gate` named): peft's ParamWrapper makes `self.weight` the fold
        # W + (B A scaling) (`moe_graph._lora_fold`), which `.type(float32)` copies; both operands need a gradient,
        # so the linear saves both
        _, _, n_in, n_out, r = wrapped["gate.weight"]
        w32 = fold = _lora_fold(b, n_in * n_out, r * (n_in + n_out), factors=False)
        if R.weight != FP32:
            w32 = b.fixed(param_bytes(E * h, FP32), rg=True, kind="activations", dtype=FP32)
            g.op("to_copy", [fold], [w32])
        ins, lin_pgrad, saved = [x32, w32], ZERO, [x32, w32]
    elif R.weight != FP32:
        w32 = b.fixed(param_bytes(E * h, FP32), rg=trained, kind="weight_copies", dtype=FP32)
        g.op("weight_cast", [], [w32], param_grad=pgrad)
        ins, lin_pgrad = [x32, w32], ZERO
        saved = ([x32] if trained else []) + ([w32] if g.rg(x32) else [])
    else:
        ins, lin_pgrad = [x32], pgrad
        saved = [x32] if trained else []
    logits = b.new(E, FP32, g.rg(x32) or trained)
    g.op("linear", ins, [logits], saved=saved, param_grad=lin_pgrad)
    rg = g.rg(logits)
    scores = b.new(E, FP32, rg)
    g.op("sigmoid", [logits], [scores], saved=[scores] if rg else [])
    # the choice: no gradient reaches it
    choice = b.new(E, FP32, False)
    g.op("add_bias", [scores], [choice])
    gtop, gidx = b.new(2 * G, FP32, False), b.new(2 * G, I64, False)
    g.op("topk", [choice], [gtop, gidx])
    gsc = b.new(G, FP32, False)
    g.op("sum", [gtop], [gsc])
    gsel, gsel_idx = b.new(TG, FP32, False), b.new(TG, I64, False)
    g.op("topk", [gsc], [gsel, gsel_idx])
    gmask = b.new(G, FP32, False)
    g.op("zeros_scatter", [gsel_idx], [gmask])
    smask = b.new(E, FP32, False)
    g.op("expand_reshape", [gmask], [smask])
    sb = b.new(E, BOOL, False)
    g.op("bool", [smask], [sb])
    nb = b.new(E, BOOL, False)
    g.op("not", [sb], [nb])
    masked = b.new(E, FP32, False)
    g.op("masked_fill", [choice, nb], [masked])
    tv, idx = b.new(k, FP32, False), b.new(k, I64, False)
    g.op("topk", [masked], [tv, idx])
    top = b.new(k, FP32, rg)
    g.op("gather", [scores, idx], [top], saved=[idx] if rg else [])
    if m.norm_topk_prob:
        s = b.new(1, FP32, rg)
        g.op("sum", [top], [s])
        s2 = b.new(1, FP32, rg)
        g.op("add_eps", [s], [s2], grad_alias=[s])
        orig = b.new(k, FP32, False)  # in-place div: autograd keeps the values before the division
        g.op("clone", [top], [orig])
        normed = b.new(k, FP32, rg)
        g.op("div_", [top, s2], [normed], saved=[s2, orig] if rg else [], grad_alias=[top])
        top = normed
    out = b.new(k, FP32, rg)
    g.op("mul_scalar", [top], [out])
    # Python locals of the router's forward live until it returns
    g.op("return", [x32, logits, choice, gsc, gsel_idx, gmask, smask, masked, idx], [])
    return out
