"""Prefix tuning (peft `PrefixTuningConfig`): a trained key/value prefix in every layer, passed as a cache."""

from __future__ import annotations

from ..graph import Graph
from ..units import FP32, param_bytes
from .base import Trainable, VirtualTokenMethod


class Prefix(VirtualTokenMethod):
    name = "prefix"
    label = "Prefix"
    family_name = "Prefix tuning"
    description = "trained key/value prefix in every layer"
    supports_grad_ckpt = False
    grad_ckpt_reason = ("prefix tuning does not work with gradient checkpointing (peft refuses it: the prefix "
                        "key/values enter every layer as a cache)")
    quality_reason = "prefix tuning trails LoRA at model sizes people fine-tune (arXiv:2101.00190)"
    peft_type = "PREFIX_TUNING"

    def trainable_tensors(self, arch, tc) -> list[Trainable]:
        """num_virtual_tokens x (layers x 2 (key, value) x num_key_value_heads x head_dim): peft's PrefixEncoder
        without projection, whose token_dim is the KV width for GQA models (peft utils/other.py, #1901); fp32."""
        return [Trainable(tc.num_virtual_tokens, arch.num_layers * 2 * arch.kv_dim, 1, FP32)]

    def virtual_tokens(self, tc) -> tuple[int, int]:
        return 0, tc.num_virtual_tokens

    def layer_prefix(self, b, arch, tc):
        """This layer's prefix keys and values, cast to the base model's dtype by peft (external to the layer):
        the regime's weight dtype, or the one `planner.memory.prefix_cast_dtype` gives the builder."""
        dt = getattr(b, "prefix_dtype", 0) or b.R.weight
        pk = b.g.tensor((tc.num_virtual_tokens * arch.kv_dim * dt, 0), rg=True, external=True)
        pv = b.g.tensor((tc.num_virtual_tokens * arch.kv_dim * dt, 0), rg=True, external=True)
        b.dtype[pk] = b.dtype[pv] = dt
        return pk, pv

    def extra_piece(self, arch, tc):
        """peft's prefix encoder: an fp32 embedding of n x (layers x 2 x kv width), looked up per sequence, cast to
        the base dtype and split into per-layer keys/values (held by the cache through backward)."""
        from ..layers import regime

        g = Graph()
        n = tc.num_virtual_tokens
        width = arch.num_layers * 2 * arch.kv_dim
        e = g.tensor((n * width * FP32, 0), rg=True)
        g.op("prefix_encoder", [], [e], param_grad=(0, param_bytes(n * width, FP32)))
        c = g.tensor((n * width * regime(tc).weight, 0), rg=True, held=True)
        g.op("to_copy", [e], [c])
        return g, c

    def peft_config(self, tc, model_type=None):
        import peft

        return peft.PrefixTuningConfig(num_virtual_tokens=tc.num_virtual_tokens, task_type="CAUSAL_LM")


METHOD = Prefix()
