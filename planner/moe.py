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

Families: mixtral, qwen2_moe, qwen3_moe, gpt_oss. gpt-oss (modeling_gpt_oss.py) is planned from bf16 weights,
its MXFP4 experts dequantized at load as the Hugging Face recipes do (`Mxfp4Config(dequantize=True)`; `model_notes`
says so in the output). Its attention has learned sinks and no sdpa path (`_supports_sdpa = False`): transformers'
default falls back to eager (`planner.attention.effective_implementation`, `planner.layers.Builder.eager_sinks`:
the sink column concatenated to the scores, a bf16 softmax, no fp32 copy), and flash_attention_2 is swapped for a
hub FlashAttention-3 kernel that is not modelled. Its layers alternate 128-token sliding and full attention
(`layer_types`; eager builds both masks), its RMSNorm multiplies the weight into the fp32 normalized tensor, its
rotary embedding rotates halves with half-width tables, its experts add per-expert biases gathered per routed row
and run the clamped `(up + 1) * gate * sigmoid(1.702 gate)` on interleaved gate/up columns
(`moe_graph._gpt_oss_gate`), and its router has a bias and softmaxes the top-k logits in their dtype.
Expert parallelism is not modelled: every GPU holds all experts (or its ZeRO/FSDP shard of them).

peft 0.21 and the experts (`lora_linears`, `expert_wrappers`, what peft built on each tiny family): the fused
experts and the router are `nn.Parameter`s, so `target_modules` reaches only `nn.Linear`s: the attention
projections, and Qwen2-MoE's shared expert, its `shared_expert_gate` and the dense-first MLPs. peft's
`convert_peft_config_for_transformers` (utils/transformers_weight_conversion.py) rewrites `all-linear` on Mixtral
and Qwen3-MoE (not Qwen2-MoE, not gpt-oss) into the attention projections plus `target_parameters` `gate_up_proj`
(rank and alpha doubled), `down_proj` and `gate.weight`; each gets a `ParamWrapper` (tuners/lora/layer.py), which
refuses lora_dropout != 0 (a clear error here too) and, on every forward, folds its adapters into a new
parameter-sized copy (`baddbmm(W, B, A)` for an expert stack), which grouped_mm saves with its input
(`moe_graph._lora_fold`): per MoE layer a bf16 copy of all its experts is kept for backward (one layer at a time
under checkpointing). Naming the experts' transformers-4 names (`gate_proj`/`up_proj`/`down_proj`, `w1`/`w3`/`w2`,
the router `gate`) does the same for those parameters (`wrapped_parameters`). Tokens/s times the fold's own
GEMMs (2 E a b r FLOPs per wrapped stack and micro-step, three times that with its backward, whatever the batch);
MFU counts only the tokens' FLOPs.

QLoRA (what bitsandbytes 0.50, transformers 5.17 and peft 0.21 did to each tiny family, built for real on the CPU):
the bnb quantizer (integrations/bitsandbytes.py `replace_with_bnb_linear`) replaces only `nn.Linear`s by
`Linear4bit`: the attention projections, and Qwen2-MoE's shared expert and `shared_expert_gate` and the dense-first
layers' MLPs. The fused 3-D experts and the router are `nn.Parameter`s of non-Linear modules: they stay in the load
dtype (bf16), and peft's `prepare_model_for_kbit_training` (utils/other.py) casts every non-`Params4bit` bf16
parameter to fp32, the experts and routers included, so the experts take twice their bf16 bytes (`model_notes`
says so). The residual stream is then fp32 (fp32 embeddings and norms), the router's logits fp32, and
`grouped_mm` runs the experts in fp32 (transformers casts its input to the weights' dtype; torch 2.13's CUDA
`_grouped_mm` takes fp32 operands through `_grouped_mm_fallback`, one `mm` per expert): the ops of
`moe_graph` in the "qlora" regime's dtypes. all-linear on Mixtral/Qwen3-MoE wraps the fp32 experts as under bf16
(the fold W + B A in fp32). Without k-bit preparation (`--no-kbit-prep`, TRL's path) everything not quantized
stays bf16 and the MoE block runs as in bf16 LoRA. Traced: calibrate/reference/trace-points-moe.jsonl t076 on.

Checkpointed MoE layers (what the trace showed, torch 2.13): the recomputation stops at the last saved tensor
(`graph.Timeline.recompute`), the gradient of the layer output and the (S, h) copy of the top-k sum's gradient are
live while it runs (`memory._recompute_pending`), and peft's `enable_input_require_grads` (PeftModel with
gradient checkpointing) makes the first layer's input need a gradient. The same three hold for dense layers but
are applied to MoE layers only, to leave the frozen dense snapshot unchanged; the integrator may extend them.
Residual gap (calibrate/reference/trace-points-moe.jsonl, 76 points, median 0.02 %): with a tiny vocabulary (the
layers' transients as the peak) LoRA is off by up to 1.7 % (the last layer's forward under, a checkpointed
recomputation over); Mixtral's checkpointed layers (fp32 routing weights, so fp32 (S, h) products around the
recomputation's end) are within 1.35 % either way, all-linear included (not explained: the trace's out-of-place
index backward on FakeTensor accounts for only 0.03 MiB of t059's 4 MiB); every other point with a realistic
vocabulary, gpt-oss and the folded experts included, is within 0.5 %. QLoRA (t076-t084) is within 0.55 %; mixed
and fp32 (t085-t090) within 0.3 % except Mixtral's checkpointed all-linear on the tiny vocabulary, +1.08 % (the
Mixtral gap above). DeepSeek-V3 under mixed (calibrate/reference/trace-points-deepseek.jsonl t019, t020): +0.76 %
and +0.57 %; its router is planned with fp32 logits (`x.type(float32)`), which autocast turns into a bf16 F.linear.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .attention import family_implementation_error

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
        aux_loss: `output_router_logits`: the load-balancing loss is computed in training (the routers' logits
            held by the outputs, their softmax saved: `moe_graph.aux_loss_ops`).
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


def model_notes(arch, tc) -> list[str]:
    """What ftplan plans for a family when it is not the checkpoint as published. gpt-oss: the experts ship in MXFP4
    (`quantization_config` quant_method mxfp4) and train as bf16, dequantized at load as the Hugging Face gpt-oss
    fine-tuning recipe does (`Mxfp4Config(dequantize=True)`); its attention runs eager with the learned sinks
    (`planner.attention.effective_implementation`). A 4-bit base: `qlora_note`."""
    notes = []
    if arch.model_type == "gpt_oss":
        notes.append("gpt-oss planned from bf16 weights: the MXFP4 experts dequantized at load "
                     "(Mxfp4Config(dequantize=True), as the Hugging Face gpt-oss recipes train); attention runs eager "
                     "with its learned sinks (transformers 5.17 has no sdpa path for gpt-oss)")
    note = qlora_note(arch, tc)
    if note:
        notes.append(note)
    return notes


def experts_bytes(arch, bytes_per_param: int) -> int:
    """All routed experts of the model (every MoE layer's fused stacks and their biases) at `bytes_per_param`."""
    return sparse_layer_count(arch) * arch.moe.expert_params(arch.hidden_size) * bytes_per_param


def qlora_note(arch, tc) -> str | None:
    """A 4-bit base on a MoE model: bitsandbytes quantizes only `nn.Linear`s, so the fused experts stay unquantized,
    and k-bit preparation casts them to fp32 (module docstring, "QLoRA")."""
    if arch.moe is None or not tc.base_quant.quantized:
        return None
    gib = experts_bytes(arch, 2) / 2**30
    if tc.recipe.kbit_preparation:
        note = (f"QLoRA on a MoE model: bitsandbytes quantizes only nn.Linear layers, so the fused experts "
                f"({gib:.1f} GiB in bf16) stay unquantized, and k-bit preparation casts them to fp32 "
                f"({2 * gib:.1f} GiB) and runs them in fp32; --no-kbit-prep keeps them bf16")
    else:
        note = (f"QLoRA on a MoE model: bitsandbytes quantizes only nn.Linear layers, so the fused experts stay bf16 "
                f"({gib:.1f} GiB)")
    shipped = PUBLISHED_QUANT.get(arch.model_type)
    if shipped:
        # transformers 5.17 quantizers/auto.py `merge_quantization_configs`: a BitsAndBytesConfig over a checkpoint
        # whose config.json carries another quantization_config raises ValueError
        note += (f"; the published checkpoint ships {shipped} weights, over which transformers refuses a "
                 "BitsAndBytesConfig: this plans a bf16 copy (dequantized and saved first)")
    return note


# the families whose published checkpoints carry a quantization_config (the catalog profiles leave it out)
PUBLISHED_QUANT = {"gpt_oss": "MXFP4", "deepseek_v3": "FP8"}


def expert_bytes_note(arch, weight_bytes_per_param: int, gpu_bytes: int) -> str | None:
    """A note when the experts alone exceed one GPU: expert parallelism would be the answer, and ftplan does not
    model it."""
    experts = experts_bytes(arch, weight_bytes_per_param)
    if experts <= gpu_bytes:
        return None
    return (f"the experts alone take {experts / 2**30:.1f} GiB, more than one GPU ({gpu_bytes / 2**30:.0f} GiB); "
            "expert parallelism would spread them, but ftplan does not model it (only ZeRO/FSDP sharding)")


# -- LoRA on a MoE model (peft 0.21 on transformers 5.17) ------------------------------------------------------------

# Families whose `all-linear` peft 0.21 rewrites (utils/transformers_weight_conversion.py `_convert_peft_config_moe`,
# `_MODEL_TO_CONVERSION_PATTERN`: mixtral, and qwen3_moe and deepseek_v3 through the qwen2_moe pattern) into
# `target_parameters` on the fused experts and the router: `gate_up_proj` (rank and alpha doubled: gate and up are fused), `down_proj`,
# `gate.weight`; each becomes a `ParamWrapper`. Their dense-first layers' MLP `nn.Linear`s are then not adapted
# (their names moved to target_parameters, which match no parameter there). Qwen2-MoE is not converted: `all-linear`
# reaches its `nn.Linear`s (shared expert, `shared_expert_gate`, dense-first MLPs); gpt-oss is not converted either:
# its only `nn.Linear`s are the attention projections. What peft 0.21 built on each tiny family (tests/test_moe.py).
EXPERTS_WRAPPED = ("qwen3_moe", "mixtral", "deepseek_v3")
# peft 0.21 `_MOE_TARGET_MODULE_MAPPING`: the transformers-4 module names that `target_modules` may still use on those
# families, and the parameter each becomes; `_MOE_FUSED_TARGETS`: names fused into one parameter, which peft refuses
# to convert unless all are named ("Cannot convert PEFT target(s) ... without also targeting ...")
EXPERT_TARGETS = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen3_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
# DeepSeek-V3 converts through the qwen2_moe pattern too (transformers conversion_mapping.py
# `_MODEL_TO_CONVERSION_PATTERN["deepseek_v3"]`): the same names, its shared experts' and dense-first MLPs'
# `nn.Linear`s of those names then unadapted (what peft 0.21 built on tests/test_deepseek.py TINY)
EXPERT_TARGETS["deepseek_v3"] = EXPERT_TARGETS["qwen3_moe"]
FUSED_TARGETS = {"mixtral": ("w1", "w3"), "qwen3_moe": ("gate_proj", "up_proj"),
                 "deepseek_v3": ("gate_proj", "up_proj")}
# Qwen2-MoE's feed-forward `nn.Linear`s that `target_modules` names reach: the shared expert's (and the dense-first
# layers' MLP, same names) and the shared expert's gate
QWEN2_MOE_LINEARS = ("gate_proj", "up_proj", "down_proj", "shared_expert_gate")


def wrapped_parameters(arch, tc) -> tuple[str, ...]:
    """The MoE parameters peft wraps with `ParamWrapper` for LoRA `tc` (`EXPERTS_WRAPPED` families): all three
    with `all-linear`, else those `EXPERT_TARGETS` maps the named modules to. ValueError as peft's when one of a
    fused pair is named alone."""
    if arch.moe is None or arch.model_type not in EXPERTS_WRAPPED or not tc.spec.uses_rank:
        return ()
    if tc.all_linear:
        return ("gate_up_proj", "down_proj", "gate.weight")
    mapping = EXPERT_TARGETS[arch.model_type]
    named = [t for t in tc.target_modules if t in mapping]
    fused = FUSED_TARGETS[arch.model_type]
    present = [t for t in fused if t in named]
    if 0 < len(present) < len(fused):
        missing = [t for t in fused if t not in named]
        raise MoEError(f"target_modules {', '.join(present)} without {', '.join(missing)}: peft 0.21 cannot convert "
                       f"them, they are fused into gate_up_proj on {arch.name}; valid: name "
                       f"{' and '.join(fused)} together")
    return tuple(dict.fromkeys(mapping[t] for t in named))


def lora_wraps_experts(arch, tc) -> bool:
    """LoRA on a family whose experts or router peft wraps with `ParamWrapper` (`wrapped_parameters`)."""
    return bool(wrapped_parameters(arch, tc))


def lora_target_names(arch) -> tuple[str, ...]:
    """`target_modules` names valid on a MoE model: the attention projections, Qwen2-MoE's feed-forward
    `nn.Linear`s, and the transformers-4 expert and router names peft converts on Mixtral and Qwen3-MoE."""
    extra = QWEN2_MOE_LINEARS if arch.model_type == "qwen2_moe" else tuple(EXPERT_TARGETS.get(arch.model_type, ()))
    return arch.linear_names + extra


def lora_linears(arch, tc, kind) -> tuple[tuple[str, int, int], ...]:
    """(name, in, out) of the `nn.Linear`s LoRA adapts in a decoder layer of `kind`: the attention projections
    named (all four with all-linear), and on Qwen2-MoE the shared expert (sparse layers) or the dense MLP (dense
    layers) and the shared expert's gate. On Mixtral/Qwen3-MoE the expert names become parameters
    (`wrapped_parameters`), so their dense-first MLPs are not adapted."""
    names = set(lora_target_names(arch)) if tc.all_linear else set(tc.target_modules)
    out = [(lin.name, lin.in_features, lin.out_features) for lin in arch.linears if lin.name in names]
    if arch.model_type == "qwen2_moe":
        h = arch.hidden_size
        inner = arch.moe.shared_intermediate if kind.mlp == "moe" else arch.intermediate_size
        mlp = [("gate_proj", h, inner), ("up_proj", h, inner), ("down_proj", inner, h)]
        if kind.mlp == "moe":
            mlp.append(("shared_expert_gate", h, 1))
        out += [m for m in mlp if m[0] in names]
    return tuple(out)


def expert_wrappers(arch, tc) -> tuple[tuple[str, int, int, int, int], ...]:
    """The `ParamWrapper`s of one MoE layer (`wrapped_parameters`): (parameter, experts, in, out,
    rank). peft 0.21 tuners/lora/layer.py `ParamWrapper._get_in_out_features`/`update_layer`: a 3-D (E, a, b)
    parameter is E experts of in = b, out = a (transformers' (E, out, in) layout), lora_A `Linear(in, r E)`,
    lora_B `Linear(r E, out)`; the 2-D router (E, h) is one of in = h, out = E. gate_up_proj gets rank 2r."""
    wrapped = wrapped_parameters(arch, tc)
    if not wrapped:
        return ()
    m, h, r = arch.moe, arch.hidden_size, tc.rank
    E, I = m.num_experts, m.expert_intermediate
    every = (("gate_up_proj", E, h, 2 * I, 2 * r), ("down_proj", E, I, h, r), ("gate.weight", 1, h, E, r))
    return tuple(w for w in every if w[0] in wrapped)


def lora_trainable(arch, tc, dtype_bytes: int) -> list:
    """LoRA's trainable tensors on a MoE model: per layer kind, A (r x in) and B (out x r) of each adapted
    `nn.Linear` (`lora_linears`), and on the sparse layers the wrapped experts and router: A (r E x in), B
    (out x r E) (`expert_wrappers`)."""
    from .methods.base import Trainable

    out = []
    for kind, n in arch.kind_counts:
        for _, n_in, n_out in lora_linears(arch, tc, kind):
            out += [Trainable(tc.rank, n_in, n, dtype_bytes), Trainable(n_out, tc.rank, n, dtype_bytes)]
    n_sparse = sparse_layer_count(arch)
    for _, E, n_in, n_out, r in expert_wrappers(arch, tc):
        out += [Trainable(r * E, n_in, n_sparse, dtype_bytes), Trainable(n_out, r * E, n_sparse, dtype_bytes)]
    return out


# -- what is modelled ------------------------------------------------------------------------------------------------

MOE_METHODS = ("full", "lora")  # methods whose MoE graph is traced and tested
# precisions traced per family (None: the others). `mixed` (fp32 master weights, bf16 autocast): torch 2.13 has no
# autocast kernel for `aten::_grouped_mm` (nor transformers' fallback op), and transformers casts the experts' input
# to the weights' dtype, so the experts run in fp32 (the CUDA fallback path: `calibrate.trace._grouped_mm_meta_cuda`)
# while the attention and router linears run in bf16; gpt-oss's eager attention with sinks under autocast is not
# traced (its fp32 scores' bf16 copy for `matmul(probs, v)` and its backward). fp16: the GPUs it is for (sm < 80)
# run transformers' `grouped_mm_fallback` op (integrations/moe.py `_can_use_grouped_mm`), not modelled.
MOE_PRECISIONS = {None: ("bf16", "mixed", "fp32"), "gpt_oss": ("bf16", "fp32")}


def unsupported(arch, tc) -> tuple[str, str] | None:
    """(field, message) when `tc` on the MoE model `arch` is outside what ftplan models; None when modelled (or
    when `arch` is dense). The field names the option to change."""
    if arch.moe is None:
        return None
    attn_err = family_implementation_error(arch.model_type, arch.name, tc.recipe.attn_implementation)
    if attn_err:
        return ("attn_implementation", attn_err)
    if tc.method not in MOE_METHODS:
        return ("method", f"method {tc.method!r} on the MoE model {arch.name} is not modelled; valid: "
                          f"{', '.join(MOE_METHODS)}")
    valid = MOE_PRECISIONS.get(arch.model_type, MOE_PRECISIONS[None])
    if tc.precision not in valid:
        why = ("gpt-oss's eager attention with sinks under autocast is not traced" if arch.model_type == "gpt_oss"
               and tc.precision == "mixed" else "the GPUs fp16 trains on (sm < 80) run transformers' grouped_mm "
               "fallback op, not modelled")
        return ("precision", f"precision {tc.precision!r} on the MoE model {arch.name} is not modelled ({why}); "
                             f"valid: {', '.join(valid)}")
    return None


def check_supported(arch, tc) -> None:
    """ValueError with `unsupported`'s message."""
    bad = unsupported(arch, tc)
    if bad:
        raise ValueError(bad[1])
