"""The recipe's loss (`Recipe.loss`), installed on the causal LM so that `model(**batch)` computes it.

- `plain`: transformers' own `ForCausalLMLoss` (nothing installed; the logits are returned and kept).
- `chunked`: TRL's `loss_type="chunked_nll"` (the `SFTTrainer` default). Source read: huggingface/trl at f2cd577,
  `trl/trainer/sft_trainer.py` (`_patch_chunked_ce_lm_head`, `_chunked_cross_entropy_loss`, `_chunk`,
  `_CHUNKED_LM_HEAD_CHUNK_SIZE = 256`). The algorithm, re-implemented here (TRL is not a dependency):
  the backbone runs with `use_cache=False` and the lm_head is skipped; the hidden states are shifted
  (`[..., :-1, :]`, flattened) with their labels, the valid tokens are packed to the front
  (`argsort` of the int8 valid mask, then `hidden[order]`, a copy), and each chunk of 256 tokens runs under
  non-reentrant `torch.utils.checkpoint`: `h.float() @ w.float().t()` (an fp32 copy of the lm_head weight per
  chunk unless it is already fp32), `log_softmax`, `nll_loss(reduction="sum")`, plus the accuracy (`argmax`) and
  entropy (`exp(log_p) * log_p`) metrics; the sum is divided by the valid-token count. No logits are returned.
- `liger`: Liger-Kernel's fused linear cross-entropy (`LigerForCausalLMLoss`, linkedin/Liger-Kernel at ead96b6,
  `src/liger_kernel/transformers/model/loss_utils.py` and `ops/fused_linear_cross_entropy.py`): the backbone as
  transformers runs it (KV cache as usual), then the fused loss on the flattened hidden states, which computes the
  gradients of the hidden states and lm_head in the forward. Needs `liger-kernel` (Triton, CUDA).
- `cce`: Apple's Cut Cross-Entropy as Axolotl loads it (`cut_cross_entropy.transformers` patch: apple/ml-cross-entropy
  at d42911f, `transformers/utils.py` `apply_lce`: `linear_cross_entropy(hidden, lm_head.weight, labels,
  shift=True, impl="cce")`). Needs `cut-cross-entropy` (Triton, CUDA, bf16-capable GPU).

The trace (calibrate/trace.py) runs `chunked` for real on fake tensors (only the valid-token count, a data-dependent
value, is given) and replaces the Triton kernels of `liger` and `cce` by stand-ins that allocate what their forward
and backward allocate (`LIGER_IMPL` / `CCE_IMPL` below are the hooks).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

TRL_CHUNK_SIZE = 256  # trl/trainer/sft_trainer.py `_CHUNKED_LM_HEAD_CHUNK_SIZE`
IGNORE_INDEX = -100

# the fused kernels: None = import the library on first use; the trace installs its stand-ins here
LIGER_IMPL = None
CCE_IMPL = None


class LossLibraryMissing(RuntimeError):
    """The recipe's loss needs a library that is not installed (the message says which to install)."""


def count_valid(valid: torch.Tensor) -> int:
    """Number of valid (non-ignored) target tokens: a data-dependent value (a device sync, as TRL's `range` over the
    padded count is). The trace, on fake tensors, replaces this with the count of its synthetic batch."""
    return int(valid.sum())


def _chunk(h, w, b, lbl, softcap):
    """One chunk of TRL's `_chunk`: fp32 logits of `h` against the lm_head, log-softmax, summed NLL, and the two
    metrics TRL computes alongside (correct tokens, entropy sum)."""
    logits = h.float() @ w.float().t()
    if b is not None:
        logits = logits + b.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_p = F.log_softmax(logits, dim=-1)
    loss = F.nll_loss(log_p, lbl, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = lbl != IGNORE_INDEX
    correct = ((logits.argmax(dim=-1) == lbl) & valid).sum().float()
    entropy = (-(log_p.exp() * log_p).sum(dim=-1) * valid).sum()
    return loss, correct, entropy


def chunked_nll(hidden_states, weight, labels, *, bias=None, softcap=None, chunk_size: int = TRL_CHUNK_SIZE):
    """TRL's chunked NLL over `hidden_states` (B, S, H) and the lm_head `weight` (V, H); mean over valid tokens.
    Returns (loss, correct tokens, entropy sum, valid tokens); the metrics are detached (TRL's outputs holding them
    are dropped before backward)."""
    hidden = hidden_states[..., :-1, :].reshape(-1, hidden_states.size(-1))
    lbl = labels[..., 1:].reshape(-1)
    valid = lbl != IGNORE_INDEX
    n_valid = count_valid(valid)
    if n_valid == 0:
        loss = (hidden_states.float().sum() + weight.float().sum()) * 0.0
        zero = hidden.new_zeros((), dtype=torch.float32)
        return loss, zero, zero, 0
    order = valid.to(torch.int8).argsort(descending=True, stable=True)
    hidden = hidden[order]
    lbl = lbl[order]
    n_padded = -(-n_valid // chunk_size) * chunk_size
    loss = hidden.new_zeros((), dtype=torch.float32)
    correct = loss.detach().clone()
    entropy = loss.detach().clone()
    for start in range(0, n_padded, chunk_size):
        c_loss, c_correct, c_entropy = torch.utils.checkpoint.checkpoint(
            _chunk, hidden[start:start + chunk_size], weight, bias, lbl[start:start + chunk_size], softcap,
            use_reentrant=False)
        loss = loss + c_loss
        correct = correct + c_correct.detach()
        entropy = entropy + c_entropy.detach()
        del c_loss, c_correct, c_entropy
    return loss / n_valid, correct, entropy, n_valid


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
    original = target.forward

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if labels is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if loss == "chunked":  # TRL: `kwargs.pop("use_cache")`, then the backbone with use_cache=False
            kwargs.pop("use_cache", None)
            kwargs["use_cache"] = False
        kwargs.pop("num_items_in_batch", None)
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out.last_hidden_state
        if loss == "chunked":
            value = chunked_nll(hidden, lm_head.weight, labels, bias=lm_head.bias, softcap=softcap)[0]
        elif loss == "liger":
            value = _liger_impl()(hidden, lm_head.weight, labels, hidden_size=hidden.size(-1),
                                  final_logit_softcapping=softcap)
        else:
            value = _cce_impl()(hidden, lm_head.weight, labels, softcap=softcap)
        return CausalLMOutputWithPast(loss=value, logits=None, past_key_values=out.past_key_values)

    target.forward = types.MethodType(forward, target)
