"""Mixture-of-experts decoder layers: the router, the experts as transformers 5.17 stores and runs them, shared
experts, and dense-first layers.

Storage (transformers 5.17 `modeling_<family>.py`): every family keeps its experts as two fused 3-D parameters of
one `<Family>Experts` module, not as per-expert `nn.Linear`s: `gate_up_proj` (E, 2I, h) and `down_proj` (E, h, I)
(gpt-oss: transposed, (E, h, 2I) and (E, I, h), plus biases (E, 2I) and (E, h), gate/up interleaved). The router
(`<Family>TopKRouter`) is an (E, h) parameter (gpt-oss adds an (E,) bias), also not an `nn.Linear`. Qwen2-MoE adds
a shared expert (an ordinary gate/up/down MLP of `shared_expert_intermediate_size`) and a `shared_expert_gate`
`nn.Linear(h, 1)`. Layers listed in `mlp_only_layers`, or off the `decoder_sparse_step` (Qwen MoE), have a dense
MLP of `intermediate_size` instead (the DeepSeek-style dense-first layers).

Dispatch: `@use_experts_implementation` picks `config._experts_implementation`, which
`PreTrainedModel.get_correct_experts_implementation` defaults to `grouped_mm` (integrations/moe.py
`grouped_mm_experts_forward`; `torch.nn.functional.grouped_mm` on sm80+ CUDA). Its buffers are sized by the
S = tokens x top_k routed (token, expert) pairs, whichever experts they go to: sorting by expert, a gather of the
S token rows, one grouped matmul per projection over all experts, the gate, the routing-weight product, the
inverse permutation and a sum over top_k. So memory does not depend on the routing distribution. FLOPs and
tokens/s use the active parameters per token (top_k experts); that equals the work done whatever the routing
(grouped_mm does S rows in all), but balanced routing (tokens x top_k / num_experts rows per expert) is assumed
for the matmul efficiency: a skewed routing makes some groups small and slower, not larger.

Families: mixtral, qwen2_moe, qwen3_moe, gpt_oss (experts and router; its attention has learned sinks and
transformers 5.17 gives it no sdpa path, `_supports_sdpa = False`).
Expert parallelism is not modelled: every GPU holds all experts (or its ZeRO/FSDP shard of them).

peft 0.21 and the experts: the fused experts and the router are `nn.Parameter`s, so `target_modules` reaches only
the attention projections (and Qwen2-MoE's shared expert and dense-first MLPs, which are `nn.Linear`s). peft's
`convert_peft_config_for_transformers` (utils/transformers_weight_conversion.py) rewrites `all-linear` (and the v4
names gate_proj/up_proj/down_proj, w1/w2/w3, gate) on mixtral- and qwen2_moe-pattern models (qwen3_moe included)
into `target_parameters` on `gate_up_proj`, `down_proj` and `gate.weight` with doubled rank for the fused gate_up;
those get `ParamWrapper`s (tuners/lora/layer.py), which refuse lora_dropout != 0 and build W + B A for the whole
expert stack on every forward. That path is refused here (not modelled).

Checkpointed MoE layers (what the trace showed, torch 2.13): the recomputation stops at the last saved tensor
(`graph.Timeline.recompute`), the gradient of the layer output and the (S, h) copy of the top-k sum's gradient are
live while it runs (`memory._recompute_pending`), and peft's `enable_input_require_grads` (PeftModel with
gradient checkpointing) makes the first layer's input need a gradient. The same three hold for dense layers but
are applied to MoE layers only, to leave the frozen dense snapshot unchanged; the integrator may extend them.
Residual gap: with a tiny vocabulary (the layers' transients as the peak) LoRA is off by up to 1.7 % (the last
layer's forward under, a checkpointed recomputation over); with realistic vocabularies every traced point is
within 0.11 % (calibrate/reference/trace-points-moe.jsonl).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")

# transformers 5.17 configuration_<family>.py defaults for keys a config.json may omit
FAMILY_DEFAULTS = {
    "mixtral": dict(hidden_act="silu", tie_word_embeddings=False, vocab_size=32000, num_key_value_heads=8,
                    num_local_experts=8, num_experts_per_tok=2, sliding_window=None, max_position_embeddings=131072,
                    output_router_logits=False, router_jitter_noise=0.0),
    "qwen2_moe": dict(hidden_act="silu", tie_word_embeddings=False, vocab_size=151936, num_key_value_heads=16,
                      moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
                      num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                      qkv_bias=True, use_sliding_window=False, max_window_layers=28, output_router_logits=False,
                      max_position_embeddings=32768),
    "qwen3_moe": dict(hidden_act="silu", tie_word_embeddings=False, vocab_size=151936, num_key_value_heads=4,
                      moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=False,
                      decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False, use_sliding_window=False,
                      max_window_layers=28, output_router_logits=False, max_position_embeddings=32768),
    "gpt_oss": dict(hidden_act="silu", tie_word_embeddings=False, vocab_size=201088, num_key_value_heads=8,
                    head_dim=64, num_local_experts=128, num_experts_per_tok=4, attention_bias=True, sliding_window=128,
                    output_router_logits=False, max_position_embeddings=131072),
}
# the dense family whose attention (and layer_types / window rules) each MoE family shares
ATTENTION_FAMILY = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3", "gpt_oss": "gpt_oss"}


class MoEError(ValueError):
    """A MoE config ftplan cannot model (raised as ArchError by `arch_from_config`)."""


@dataclass(frozen=True)
class MoE:
    """The sparse feed-forward block of a family.

    Args:
        num_experts: E, routed experts per MoE layer.
        top_k: experts per token (`num_experts_per_tok`).
        expert_intermediate: I, the width of one expert.
        norm_topk_prob: the top-k probabilities are renormalized to sum to 1 (Mixtral always; Qwen by config).
        softmax_first: softmax over all E logits in fp32, then top-k (Mixtral, Qwen); False: top-k of the logits,
            then softmax over the k (gpt-oss, in the logits' dtype).
        router_bias: the router has an (E,) bias (gpt-oss).
        expert_bias: the experts have biases (E, 2I) and (E, h) (gpt-oss).
        shared_intermediate: width of the always-on shared expert (Qwen2-MoE), 0 when none.
        shared_gate: a `Linear(h, 1)` sigmoid gate on the shared expert (Qwen2-MoE).
        gpt_oss_gate: gpt-oss's clamped `(up + 1) * gate * sigmoid(1.702 gate)` on interleaved gate/up columns
            instead of `silu(gate) * up`.
        aux_loss: `output_router_logits`: the load-balancing loss is computed in training.
    """

    num_experts: int
    top_k: int
    expert_intermediate: int
    norm_topk_prob: bool = True
    softmax_first: bool = True
    router_bias: bool = False
    expert_bias: bool = False
    shared_intermediate: int = 0
    shared_gate: bool = False
    gpt_oss_gate: bool = False
    aux_loss: bool = False

    def router_params(self, h: int) -> int:
        return self.num_experts * h + (self.num_experts if self.router_bias else 0)

    def expert_params(self, h: int) -> int:
        """All E experts of one layer: gate_up (E x 2I x h) + down (E x h x I), plus their biases."""
        E, I = self.num_experts, self.expert_intermediate
        return E * 3 * I * h + (E * (2 * I + h) if self.expert_bias else 0)

    def shared_params(self, h: int) -> int:
        return 3 * h * self.shared_intermediate + (h if self.shared_gate else 0)

    def layer_params(self, h: int) -> int:
        """Every parameter of one MoE block (router, all experts, shared expert)."""
        return self.router_params(h) + self.expert_params(h) + self.shared_params(h)

    def active_matmul_params(self, h: int) -> int:
        """Matmul weights one token goes through: the router, top_k experts, the shared expert and its gate."""
        return self.num_experts * h + self.top_k * 3 * self.expert_intermediate * h + self.shared_params(h)


def moe_from_config(model_type: str, c: dict) -> MoE:
    """The MoE block of a family from its config `c` (family defaults applied)."""

    def pos_int(key: str) -> int:
        v = c.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise MoEError(f"'{key}' must be a positive integer, got {v!r}")
        return v

    aux = bool(c.get("output_router_logits", False))
    if model_type == "mixtral":
        E, k = pos_int("num_local_experts"), pos_int("num_experts_per_tok")
        moe = MoE(E, k, pos_int("intermediate_size"), norm_topk_prob=True, aux_loss=aux)
        if c.get("router_jitter_noise"):
            raise MoEError("'router_jitter_noise' > 0 is not modelled (Mixtral multiplies the hidden states in place "
                           "by a noise tensor); valid: 0")
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        E, k = pos_int("num_experts"), pos_int("num_experts_per_tok")
        shared = pos_int("shared_expert_intermediate_size") if model_type == "qwen2_moe" else 0
        moe = MoE(E, k, pos_int("moe_intermediate_size"), norm_topk_prob=bool(c.get("norm_topk_prob")),
                  shared_intermediate=shared, shared_gate=model_type == "qwen2_moe", aux_loss=aux)
    elif model_type == "gpt_oss":
        E, k = pos_int("num_local_experts"), pos_int("num_experts_per_tok")
        moe = MoE(E, k, pos_int("intermediate_size"), norm_topk_prob=False, softmax_first=False, router_bias=True,
                  expert_bias=True, gpt_oss_gate=True, aux_loss=aux)
    else:  # pragma: no cover - arch_from_config only calls for MOE_MODEL_TYPES
        raise MoEError(f"model_type {model_type!r} is not a MoE family; valid: {', '.join(MOE_MODEL_TYPES)}")
    if k > E:
        raise MoEError(f"'num_experts_per_tok' {k} exceeds the number of experts {E}")
    return moe


def sparse_layers(model_type: str, c: dict, num_layers: int) -> list[bool]:
    """Which decoder layers have the MoE block. Qwen MoE: layer i is sparse unless `i in mlp_only_layers` or
    `(i + 1) % decoder_sparse_step != 0` (modeling_qwen3_moe.py `Qwen3MoeDecoderLayer.__init__`); Mixtral and
    gpt-oss: every layer."""
    if model_type not in ("qwen2_moe", "qwen3_moe"):
        return [True] * num_layers
    only = c.get("mlp_only_layers") or []
    step = c.get("decoder_sparse_step", 1)
    if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
        raise MoEError(f"'mlp_only_layers' must be a list of layer indices, got {only!r:.80}")
    if not isinstance(step, int) or isinstance(step, bool) or step <= 0:
        raise MoEError(f"'decoder_sparse_step' must be a positive integer, got {step!r}")
    return [i not in only and (i + 1) % step == 0 for i in range(num_layers)]


def with_moe_kinds(kinds: tuple, sparse: list[bool]) -> tuple:
    """The layer kinds with `mlp="moe"` on the sparse layers (equal kinds stay one shared object)."""
    shared: dict = {}
    out = []
    for k, s in zip(kinds, sparse):
        k2 = replace(k, mlp="moe") if s else k
        out.append(shared.setdefault(k2, k2))
    return tuple(out)


# -- parameters ------------------------------------------------------------------------------------------------------


def sparse_layer_count(arch) -> int:
    return sum(n for k, n in arch.kind_counts if k.mlp == "moe")


def dense_mlp_params(arch) -> int:
    """gate/up/down of one dense layer of a MoE model (`intermediate_size`, no bias)."""
    return 3 * arch.hidden_size * arch.intermediate_size


def mlp_params(arch) -> int:
    """Feed-forward parameters of every layer of a MoE model (the attention linears are `arch.linears`), plus
    gpt-oss's attention sinks (one per head and layer)."""
    n_sparse = sparse_layer_count(arch)
    n_dense = arch.num_layers - n_sparse
    sinks = arch.num_layers * arch.num_heads if arch.model_type == "gpt_oss" else 0
    return n_sparse * arch.moe.layer_params(arch.hidden_size) + n_dense * dense_mlp_params(arch) + sinks


def largest_mlp_params(arch) -> int:
    """Feed-forward parameters of the layer with the most (a MoE layer when there is one)."""
    h = arch.hidden_size
    best = 0
    for k, _ in arch.kind_counts:
        best = max(best, arch.moe.layer_params(h) if k.mlp == "moe" else dense_mlp_params(arch))
    return best + (arch.num_heads if arch.model_type == "gpt_oss" else 0)


def param_tensors(arch) -> list[tuple[str, tuple[int, int], int]]:
    """The feed-forward tensors of a MoE model as (group, (rows, cols), count), groups as in
    `planner.memory.param_tensors`: experts (a 3-D (E, a, b) parameter as (E * a, b)), router, linear (dense and
    shared-expert `nn.Linear`s), bias, sinks."""
    m, h = arch.moe, arch.hidden_size
    E, I = m.num_experts, m.expert_intermediate
    n_sparse = sparse_layer_count(arch)
    n_dense = arch.num_layers - n_sparse
    out = []
    if n_sparse:
        out += [("router", (E, h), n_sparse), ("experts", (E * 2 * I, h), n_sparse), ("experts", (E * h, I), n_sparse)]
        if m.router_bias:
            out.append(("bias", (1, E), n_sparse))
        if m.expert_bias:
            out += [("bias", (E, 2 * I), n_sparse), ("bias", (E, h), n_sparse)]
        if m.shared_intermediate:
            Is = m.shared_intermediate
            out += [("linear", (Is, h), 2 * n_sparse), ("linear", (h, Is), n_sparse)]
        if m.shared_gate:
            out.append(("linear", (1, h), n_sparse))
    if n_dense:
        I = arch.intermediate_size
        out += [("linear", (I, h), 2 * n_dense), ("linear", (h, I), n_dense)]
    if arch.model_type == "gpt_oss":
        out.append(("sinks", (1, arch.num_heads), arch.num_layers))
    return out


def active_matmul_params(arch) -> int:
    """Feed-forward matmul weights one token goes through, summed over layers (dense layers: their MLP)."""
    n_sparse = sparse_layer_count(arch)
    return (n_sparse * arch.moe.active_matmul_params(arch.hidden_size)
            + (arch.num_layers - n_sparse) * dense_mlp_params(arch))


def expert_bytes_note(arch, weight_bytes_per_param: int, gpu_bytes: int) -> str | None:
    """A note when the experts alone exceed one GPU: expert parallelism would be the answer, and ftplan does not
    model it."""
    experts = sparse_layer_count(arch) * arch.moe.expert_params(arch.hidden_size) * weight_bytes_per_param
    if experts <= gpu_bytes:
        return None
    return (f"the experts alone take {experts / 2**30:.1f} GiB, more than one GPU ({gpu_bytes / 2**30:.0f} GiB); "
            "expert parallelism would spread them, but ftplan does not model it (only ZeRO/FSDP sharding)")


# -- what is modelled ------------------------------------------------------------------------------------------------

MOE_METHODS = ("full", "lora")  # methods whose MoE graph is traced and tested


def unsupported(arch, tc) -> tuple[str, str] | None:
    """(field, message) when `tc` on the MoE model `arch` is outside what ftplan models; None when modelled (or
    when `arch` is dense). The field names the option to change."""
    if arch.moe is None:
        return None
    if arch.model_type == "gpt_oss":
        return ("model", f"{arch.name}: gpt-oss attention adds learned sinks and transformers 5.17 gives it no sdpa "
                         "path (GptOssPreTrainedModel._supports_sdpa = False: eager, flash or flex only); ftplan models "
                         "sdpa attention, so it counts gpt-oss parameters and FLOPs but does not plan its memory; "
                         f"MoE families planned: {', '.join(t for t in MOE_MODEL_TYPES if t != 'gpt_oss')}")
    if tc.method not in MOE_METHODS:
        return ("method", f"method {tc.method!r} on the MoE model {arch.name} is not modelled; valid: "
                          f"{', '.join(MOE_METHODS)}")
    if tc.base_quant.quantized:
        return ("quant", f"a {tc.quant} base on the MoE model {arch.name} is not modelled (bitsandbytes quantizes only "
                         "nn.Linear: the fused 3-D experts stay unquantized and k-bit preparation casts them to fp32); "
                         "valid: none")
    if tc.precision != "bf16":
        return ("precision", f"precision {tc.precision!r} on the MoE model {arch.name} is not modelled (grouped_mm runs "
                             "the experts in the weights' dtype outside autocast); valid: bf16")
    if arch.moe.aux_loss:
        return ("model", f"{arch.name}: output_router_logits (the load-balancing loss in training) is not modelled; "
                         "set it to false in config.json")
    return None


def check_supported(arch, tc) -> None:
    """ValueError with `unsupported`'s message."""
    bad = unsupported(arch, tc)
    if bad:
        raise ValueError(bad[1])
