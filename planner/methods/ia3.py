"""IA3 (peft `IA3Config`): learned fp32 scaling vectors on k/v (or q/v) outputs and the MLP down projection's input."""

from __future__ import annotations

from ..units import FP32, param_bytes
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

    def trainable_tensors(self, arch, tc) -> list[Trainable]:
        """Per layer, one fp32 vector per targeted linear: out_features for attention projections (scales the
        output, shape (out, 1)), in_features for the feed-forward one (scales the input, shape (1, in));
        peft IA3Layer.update_layer."""
        targets, ff = ia3_targets(arch)
        L = arch.num_layers
        return [Trainable(1, lin.in_features if lin.name in ff else lin.out_features, L, FP32) for lin in targets]

    def fixed_targets_note(self, arch) -> str | None:
        if arch.model_type in IA3_TARGETS:
            targets, ff = IA3_TARGETS[arch.model_type]
            uses = f"{', '.join(targets)} (feed-forward: {', '.join(ff)})"
        else:
            uses = "peft's defaults"
        return f"IA3 uses the {arch.model_type} family's targets: {uses}"

    def before_linear(self, b, x: int, name: str, n_in: int) -> int:
        """peft IA3 on the feed-forward projection: `(x.to(fp32) * ia3_l.flatten()).to(x dtype)` before the base
        layer; saves the fp32 copy of x."""
        targets, ff = IA3_TARGETS[b.arch.model_type]
        if name not in ff or name not in targets:
            return x
        g = b.g
        xd = b.dtype[x]
        x32 = b.cast(x, n_in, FP32)
        vec = b.fixed(param_bytes(n_in, FP32), rg=True, kind="weight_copies", dtype=FP32)
        g.op("ia3_flatten", [], [vec], param_grad=(0, param_bytes(n_in, FP32)))
        p = b.new(n_in, FP32, True)
        g.op("mul_ia3", [x32, vec], [p], saved=[x32] + ([vec] if g.rg(x32) else []), bwd_temp=(b.seq * n_in * FP32, 0))
        return b.cast(p, n_in, xd)

    def after_linear(self, b, x: int, y: int, name: str, n_in: int, n_out: int) -> int:
        """peft IA3 on an attention projection: `(result * ia3_l.flatten()).to(result dtype)`; the product with
        the fp32 vector is fp32 and saves `result` (for the vector's gradient)."""
        targets, ff = IA3_TARGETS[b.arch.model_type]
        if name not in targets or name in ff:
            return y
        g = b.g
        vec = b.fixed(param_bytes(n_out, FP32), rg=True, kind="weight_copies", dtype=FP32)
        g.op("ia3_flatten", [], [vec], param_grad=(0, param_bytes(n_out, FP32)))
        p = b.new(n_out, FP32, True)
        g.op("mul_ia3", [y, vec], [p], saved=[y] + ([vec] if g.rg(y) else []), bwd_temp=(b.seq * n_out * FP32, 0))
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
