"""IA3 (peft `IA3Config`): learned scaling vectors on k/v (or q/v) outputs and the MLP down projection's input, fp32
(peft's `autocast_adapter_dtype`) or bf16 (`Recipe.adapter_dtype`; and as FSDP2's bf16 gathers hand them to the
layers: `planner.memory.gathered_adapter_dtype`)."""

from __future__ import annotations

from ..units import param_bytes
from .base import Method, Trainable
from ..modules_to_save import peft_kwargs as saved_peft_kwargs

# peft's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / _FEEDFORWARD_MODULES_MAPPING (peft 0.21
# utils/constants.py). Phi-3 has no entry in peft; ftplan passes its fused equivalents explicitly.
IA3_TARGETS = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen3": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "phi3": (("qkv_proj", "down_proj"), ("down_proj",)),
    "gemma3_text": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    # OLMo-2 has no entry in peft; ftplan passes Llama's (the IA3 paper's keys, values and feed-forward input)
    "olmo2": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
}


def ia3_targets(arch) -> tuple[tuple, tuple]:
    """(targeted Linears, names treated as feed-forward) of IA3 with peft's defaults for the family."""
    targets, ff = IA3_TARGETS[arch.model_type]
    return tuple(lin for lin in arch.linears if lin.name in targets), ff


class IA3(Method):
    name = "ia3"
    label = "IA3"
    description = "learned scaling vectors on k/v (or q/v) and the MLP down projection"
    quality_tier = 3.0
    quality_reason = "IA3 trains ~0.01% of the weights: between LoRA and prompt methods (arXiv:2205.05638)"
    default_lr = 3e-2
    peft_type = "IA3"
    supports_modules_to_save = True
    bf16_adapters = True  # `vector_dtype`: bf16 vectors multiply in bf16, with no fp32 copy of the input

    def trainable_tensors(self, arch, tc) -> list[Trainable]:
        """Per layer, one vector (`vector_dtype`) per targeted linear: out_features for attention projections
        (scales the output, shape (out, 1)), in_features for the feed-forward one (scales the input, shape (1, in));
        peft IA3Layer.update_layer."""
        targets, ff = ia3_targets(arch)
        L = arch.num_layers
        vd = vector_dtype(tc)
        return [Trainable(1, lin.in_features if lin.name in ff else lin.out_features, L, vd) for lin in targets]

    def fixed_targets_note(self, arch) -> str | None:
        if arch.model_type in IA3_TARGETS:
            targets, ff = IA3_TARGETS[arch.model_type]
            uses = f"{', '.join(targets)} (feed-forward: {', '.join(ff)})"
        else:
            uses = "peft's defaults"
        return f"IA3 uses the {arch.model_type} family's targets: {uses}"

    def before_linear(self, b, x: int, name: str, n_in: int) -> int:
        """peft IA3 on the feed-forward projection (peft 0.21 tuners/ia3/layer.py `Linear.forward`):
        `(x.to(v) * ia3_l.flatten()).to(x dtype)` before the base layer, v the vector's dtype (`vector_dtype`);
        saves x in v: an fp32 copy under fp32 vectors, x itself when v is x's dtype."""
        targets, ff = IA3_TARGETS[b.arch.model_type]
        if name not in ff or name not in targets:
            return x
        g = b.g
        xd = b.dtype[x]
        vd = vector_dtype(b.tc)
        xv = b.cast(x, n_in, vd)
        vec = b.fixed(param_bytes(n_in, vd), rg=True, kind="weight_copies", dtype=vd)
        g.op("ia3_flatten", [], [vec], param_grad=(0, param_bytes(n_in, vd)))
        p = b.new(n_in, vd, True)
        g.op("mul_ia3", [xv, vec], [p], saved=[xv] + ([vec] if g.rg(xv) else []), bwd_temp=(b.seq * n_in * vd, 0))
        return b.cast(p, n_in, xd)

    def after_linear(self, b, x: int, y: int, name: str, n_in: int, n_out: int) -> int:
        """peft IA3 on an attention projection: `(result * ia3_l.flatten()).to(result dtype)`; the product is in
        the wider of the two dtypes (fp32 with fp32 vectors) and saves `result` (for the vector's gradient)."""
        targets, ff = IA3_TARGETS[b.arch.model_type]
        if name not in targets or name in ff:
            return y
        g = b.g
        vd = vector_dtype(b.tc)
        pd = max(vd, b.dtype[y])
        vec = b.fixed(param_bytes(n_out, vd), rg=True, kind="weight_copies", dtype=vd)
        g.op("ia3_flatten", [], [vec], param_grad=(0, param_bytes(n_out, vd)))
        p = b.new(n_out, pd, True)
        g.op("mul_ia3", [y, vec], [p], saved=[y] + ([vec] if g.rg(y) else []), bwd_temp=(b.seq * n_out * pd, 0))
        return b.cast(p, n_out, b.dtype[y])

    def peft_config(self, tc, model_type=None):
        """IA3 with ftplan's table of targets (peft's defaults where peft has them), so that the planner's count and
        the run agree for every family."""
        import peft

        if model_type in IA3_TARGETS:
            targets, ff = IA3_TARGETS[model_type]
            return peft.IA3Config(target_modules=list(targets), feedforward_modules=list(ff), task_type="CAUSAL_LM",
                                  **saved_peft_kwargs(tc))
        return peft.IA3Config(task_type="CAUSAL_LM", **saved_peft_kwargs(tc))


METHOD = IA3()


def vector_dtype(tc) -> int:
    """Bytes per element of the IA3 vectors: fp32 (peft's `autocast_adapter_dtype=True` upcasts them), bf16 when the
    recipe casts the trainable parameters (`Recipe.adapter_dtype`, trainer/recipe.py) or FSDP2 gathers them in bf16
    (`planner.memory.gathered_adapter_dtype` sets the pieces' adapter dtype): peft multiplies in the vector's own
    dtype (`dtype = self.ia3_l[active_adapter].dtype`)."""
    from .lora import adapter_dtype

    return adapter_dtype(tc)
