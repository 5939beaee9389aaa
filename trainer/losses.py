"""The recipe's loss (`Recipe.loss`), installed on the causal LM so that `model(**batch)` computes it.

- `plain`: transformers' own `ForCausalLMLoss` (nothing installed; the logits are returned and kept).
- `chunked`: TRL's fused LM head, the loss of `SFTTrainer` (TRL 1.16.0, the train extra's pin: `loss_type="nll"` by
  default, `"chunked_nll"` its deprecated alias). TRL's own code runs: `trl.trainer.utils.add_fused_lm_head(model,
  outputs=("log_probs", "entropy", "is_top1"))` on the causal LM (as `SFTTrainer.__init__` does, on the peft model's
  base model), then `model(**batch, fused_lm_head=True)` and the loss as `SFTTrainer.compute_loss` forms it:
  `(-outputs.log_probs).sum() / outputs.label_mask.sum().clamp(min=1)`. The fused forward runs the backbone with
  `use_cache=False`, and `_ChunkedLogProbFunction` projects through the lm_head in tiles of 4096 tokens x 32768
  vocabulary columns (trl/kernels/chunked_logprob.py), never keeping the logits; on CUDA (Triton) only the valid
  positions are scored (`hidden_states[mask]`), elsewhere (CPU) every position, clamped labels, masked after.
- `liger`: Liger-Kernel's fused linear cross-entropy (`LigerForCausalLMLoss`, linkedin/Liger-Kernel at ead96b6,
  `src/liger_kernel/transformers/model/loss_utils.py` and `ops/fused_linear_cross_entropy.py`): the backbone as
  transformers runs it (KV cache as usual), then the fused loss on the flattened hidden states, which computes the
  gradients of the hidden states and lm_head in the forward. Needs `liger-kernel` (Triton, CUDA).
- `cce`: Apple's Cut Cross-Entropy as Axolotl loads it (`cut_cross_entropy.transformers` patch: apple/ml-cross-entropy
  at d42911f, `transformers/utils.py` `apply_lce`: `linear_cross_entropy(hidden, lm_head.weight, labels,
  shift=True, impl="cce")`). Needs `cut-cross-entropy` (Triton, CUDA, bf16-capable GPU).

The trace (calibrate/trace.py) runs `chunked` for real on fake tensors, with TRL's CUDA path substituted (see
there), and replaces the Triton kernels of `liger` and `cce` by stand-ins that allocate what their forward
and backward allocate (`LIGER_IMPL` / `CCE_IMPL` below are the hooks).
"""

from __future__ import annotations

import types


IGNORE_INDEX = -100

# the fused kernels: None = import the library on first use; the trace installs its stand-ins here
LIGER_IMPL = None
CCE_IMPL = None


class LossLibraryMissing(RuntimeError):
    """The recipe's loss needs a library that is not installed (the message says which to install)."""


# the per-token fields SFTTrainer asks of the fused head (trl 1.16.0 sft_trainer.py `__init__`)
TRL_OUTPUTS = ("log_probs", "entropy", "is_top1")


def _liger_impl():
    global LIGER_IMPL
    if LIGER_IMPL is None:
        try:
            from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss
        except ImportError as e:
            raise LossLibraryMissing("recipe.loss = 'liger' needs Liger-Kernel: pip install liger-kernel "
                                     "(Triton and a CUDA GPU)") from e
        LIGER_IMPL = LigerForCausalLMLoss
    return LIGER_IMPL


def _cce_impl():
    global CCE_IMPL
    if CCE_IMPL is None:
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as e:
            raise LossLibraryMissing("recipe.loss = 'cce' needs Cut Cross-Entropy: pip install cut-cross-entropy "
                                     "(Triton and a CUDA GPU with bf16)") from e

        def cce(hidden, weight, labels, softcap=None):
            return linear_cross_entropy(hidden, weight, labels, shift=True, impl="cce", softcap=softcap)

        CCE_IMPL = cce
    return CCE_IMPL


def check_available(loss: str) -> None:
    """Raise `LossLibraryMissing` now (before building a model) when `loss` needs a library that is absent."""
    if loss == "liger":
        _liger_impl()
    elif loss == "cce":
        _cce_impl()


def install(model, loss: str) -> None:
    """Make `model(**batch)` compute `loss` (see the module docstring). `model`: the transformers causal LM or a
    peft model around one; as TRL does, the inner causal LM's forward is patched, so peft's adapters (and prompt
    learning's virtual tokens) run as usual."""
    if loss == "plain":
        return
    check_available(loss)
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm_head = target.get_output_embeddings()
    softcap = getattr(target.config, "final_logit_softcapping", None)
    if loss == "chunked":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(target, outputs=TRL_OUTPUTS)
    original = target.forward

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if labels is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        kwargs.pop("num_items_in_batch", None)
        if loss == "chunked":  # trl 1.16.0 sft_trainer.py `compute_loss` (no num_items_in_batch: one micro-batch)
            out = original(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                           **kwargs)
            value = (-out.log_probs).sum() / out.label_mask.sum().clamp(min=1)
            return CausalLMOutputWithPast(loss=value, logits=None)
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out.last_hidden_state
        if loss == "liger":
            value = _liger_impl()(hidden, lm_head.weight, labels, hidden_size=hidden.size(-1),
                                  final_logit_softcapping=softcap)
        else:
            value = _cce_impl()(hidden, lm_head.weight, labels, softcap=softcap)
        return CausalLMOutputWithPast(loss=value, logits=None, past_key_values=out.past_key_values)

    target.forward = types.MethodType(forward, target)
