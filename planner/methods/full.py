"""Full fine-tuning: every base parameter is trained, in the weights' dtype (no peft wrapper)."""

from __future__ import annotations

from .base import Method, Trainable


class Full(Method):
    name = "full"
    label = "Full FT"
    description = "all weights trained"
    trains_base = True
    supports_merge = False  # nothing to fold: the run folder is the model
    quality_reason = ("fp32 master weights 1.0; pure bf16 1.2, since bf16 AdamW updates lose small steps "
                      "(LoRA Learns Less and Forgets Less, arXiv:2405.09673)")
    default_lr = 2e-5
    modules_to_save_reason = "full fine-tuning trains embed_tokens and lm_head already"

    def quality(self, tc) -> float:
        return 1.0 if tc.precision in ("mixed", "fp32", "fp16") else 1.2

    def efficiency_key(self, tc) -> str:
        """Full fine-tuning under fp32 master weights (`mixed`, `fp16`, `fp32`) has its own key, `full-mixed`."""
        return "full-mixed" if tc.precision != "bf16" else "full"

    def families(self) -> list[dict]:
        return [dict(method="full", precision="mixed"), dict(method="full", precision="bf16")]

    def family_label(self, fam: dict) -> str:
        labels = {"mixed": "mixed precision (fp32 master)", "fp16": "fp16 mixed precision (fp32 master)"}
        return f"Full FT, {labels.get(fam.get('precision'), 'bf16')}"

    def trainable_tensors(self, arch, tc) -> list[Trainable]:
        """Every base parameter tensor (planner.memory.param_tensors) in the weights' dtype."""
        from ..layers import regime
        from ..memory import param_tensors

        w = regime(tc).weight
        return [Trainable(rows, cols, count, w) for _, (rows, cols), count in param_tensors(arch)]

    def trainable_params(self, arch, tc) -> int:
        return arch.total_params


METHOD = Full()
