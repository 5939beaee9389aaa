"""Prompt tuning (peft `PromptTuningConfig`): trained virtual-token embeddings placed before the input."""

from __future__ import annotations

from ..units import FP32, param_bytes
from .base import Trainable, VirtualTokenMethod


class Prompt(VirtualTokenMethod):
    name = "prompt"
    label = "Prompt"
    family_name = "Prompt tuning"
    description = "trained virtual-token embeddings before the input"
    quality_reason = "prompt tuning trails LoRA at model sizes people fine-tune (arXiv:2104.08691)"
    peft_type = "PROMPT_TUNING"

    def trainable_tensors(self, arch, tc) -> list[Trainable]:
        """num_virtual_tokens x hidden_size: peft's PromptEmbedding, fp32."""
        return [Trainable(tc.num_virtual_tokens, arch.hidden_size, 1, FP32)]

    def virtual_tokens(self, tc) -> tuple[int, int]:
        return tc.num_virtual_tokens, 0

    def first_input_requires_grad(self) -> bool:
        return True

    def head(self, b, e: int, arch, tc) -> int:
        """peft's prompt encoder output (fp32, n x h per sequence), cast to the embeddings' dtype and concatenated
        before the input embeddings."""
        g, act = b.g, b.R.act
        n, h = tc.num_virtual_tokens, arch.hidden_size
        pe = g.tensor((n * h * FP32, 0), rg=True)
        b.dtype[pe] = FP32
        g.op("prompt_encoder", [], [pe], param_grad=(0, param_bytes(n * h, FP32)))
        pc = g.tensor((n * h * act, 0), rg=True)
        b.dtype[pc] = act
        g.op("to_copy", [pe], [pc])
        cat = b.new(h, act, True)
        g.op("cat", [pc, e], [cat])
        return cat

    def peft_config(self, tc, model_type=None):
        import peft

        return peft.PromptTuningConfig(num_virtual_tokens=tc.num_virtual_tokens, task_type="CAUSAL_LM")


METHOD = Prompt()
