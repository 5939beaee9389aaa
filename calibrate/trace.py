"""`ftplan estimate --trace`: run the real training step on fake tensors and record what CUDA would allocate.

The model is the real transformers model, the method the real peft code, the step the one `ftplan run` takes
(`trainer.step.TrainStep`, one micro-batch per step): only the tensors are fake (`torch._subclasses.FakeTensorMode`),
so nothing is allocated and any size (70B included) traces on a CPU in seconds. A `TorchDispatchMode` keeps the
set of live storages, each rounded up to the CUDA caching allocator's 512-byte block, and its running peak: that is
the predicted `torch.cuda.max_memory_allocated()`.

The fake tensors live on the CPU device (a CPU build of torch cannot fake CUDA through autograd), so where CUDA
and CPU kernels allocate differently the trace substitutes the CUDA behaviour:

- sdpa: the flash / cuDNN kernels CUDA picks for bf16 without a mask save q, k, v, the output and an fp32
  logsumexp (B, H, S), and support GQA natively; with a mask (prefix tuning) the mem-efficient kernel also keeps the
  additive bias (B, 1, S, KV padded to 16). The CPU kernels differ (math fallback for GQA), so they are replaced.
- flash_attention_2 (`--attn`): flash-attn 2 is CUDA-only, so transformers' own flash path runs around stand-ins
  of `flash_attn_func` that allocate what flash-attn's `mha_fwd` / `mha_bwd` allocate (the model is built with sdpa,
  which transformers accepts without flash-attn installed, then switched), and of `flash_attn_varlen_func` for
  packed rows (the varlen kernels' allocations).
- dropout: CUDA's fused `native_dropout` keeps a 1-byte mask; the CPU path keeps a noise tensor of the input dtype.
- masks: transformers reads the values of the position ids (packed rows?) and of the attention mask (padding?)
  to decide which mask to build (`find_packed_sequence_indices`, `_ignore_causal_mask_sdpa`; flash-attn's
  `_is_packed_sequence`, `prepare_fa_kwargs_from_position_ids`), data checks fake tensors cannot make: the trace
  keeps the real tensors its synthetic batch is built from (`trainer.recipe.batch_shape_inputs`: packed position
  ids, a padded attention mask, or none) and runs transformers' own functions on them; the mask itself is then
  built by transformers' real mask code on the fake tensors and dispatched through `sdpa_dispatch`.
- AdamW / SGD: `foreach=True`, CUDA's default.
- fp16's GradScaler: the step is taken (its `found_inf.item()` check is a sync; no overflow assumed).
- losses (trainer/losses.py): TRL 1.16's fused LM head (`chunked`) runs for real, on its CUDA path: the compact
  scoring of the valid positions only (`_use_triton` true: `hidden_states[mask]`, whose `nonzero` fake tensors
  cannot size: every synthetic label is valid, so all of them, `_all_nonzero`), and its Triton kernels, which
  work in place on the logits tile and the per-token statistics, in place of the eager CPU fallback's fp32
  temporaries (`_TRL_TRITON`); CUDA's autocast policy for log_softmax / softmax / exp (fp32 on CUDA, bf16 on CPU);
  Liger's fused linear cross-entropy and Cut Cross-Entropy are Triton kernels: stand-ins allocate what their
  forward and backward allocate (`_LigerFLCECUDA`, `_CCECUDA`).
- bitsandbytes 4-bit (QLoRA): packed NF4 weights and double-quantized constants as bitsandbytes stores them, and
  the dequantize-then-matmul path bitsandbytes 0.50 takes on CUDA for more than 1536 tokens (a transient bf16
  copy of each weight in forward and backward).
- DoRA over a 4-bit base: peft dequantizes the base weight every forward (`dequantize_module_weight`); the trace
  allocates what `bnb.functional.dequantize_4bit` allocates (the nested absmax in fp32, the bf16 weight).
- offloaded checkpoints (`save_on_cpu(pin_memory=True)`, which transformers wraps around each checkpoint): pack
  copies the saved tensor into a new pinned host buffer, unpack copies it back into a new device tensor; on fake CPU
  tensors pinning needs an accelerator and `.to("cpu")` would return the same tensor, so the host buffer is counted
  in host memory (rounded as the pinned allocator rounds: a power of two) and unpack allocates the device copy.
- activation offloading (`Recipe.activation_offload`): TRL's own manager (trl 1.16.0, trainer/offload.py) runs on
  the fake tensors with the fake device standing for CUDA: its pinned host buffers are counted in host memory and
  their `.to(device)` in backward allocates the device copy (`_host_copies`); each storage gets a distinct address
  (`_storage_address`: TRL keys storages by `data_ptr()`, 0 on fake tensors); streams are torch.cpu's stand-ins,
  while TRL's stashes (what keeps in-flight tensors alive) run as written.
- MoE experts' `torch._grouped_mm` (transformers' `grouped_mm` experts) on fp32 or fp16 operands (experts cast to
  fp32 by k-bit preparation, or fp32 master weights under `mixed`: the op has no autocast kernel): CUDA runs them
  through `_grouped_mm_fallback` (an output in mat_a's dtype, one `mm_out` per group into it), while torch's meta
  kernel accepts bf16 only (`_grouped_mm_meta_cuda`).
- embedding backward (full fine-tuning, peft's trained embedding copy): above 3072 ids CUDA sorts them and sums
  partial segments in fp32 beside the gradient (`_embedding_backward_scratch_cuda`); the meta kernel does not.
- bitsandbytes 8-bit optimizers: their state buffers (uint8 x 2 + fp32 absmax per 256; fp32 below 4096 elements);
  paged buffers (>= 1e5 elements) are CUDA managed memory, outside `max_memory_allocated`, reported apart.

What the trace cannot follow: CUDA library workspaces (cuBLAS: 32 MiB per handle on Hopper, added as a constant),
fused or custom kernels' internal scratch, caching-allocator fragmentation (reserved memory). Multi-GPU FSDP2 is
traced by `calibrate.trace_multigpu` (one rank on a fake process group), DeepSpeed ZeRO-2/3 on 2 GPUs by
`calibrate.trace_zero` (the real engine, two CPU processes); other strategies are not traced.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from planner.config import TrainConfig
from calibrate import sdpa_dispatch
from trainer import recipe
from trainer.step import TrainStep

BLOCK_BYTES = 512  # CUDA caching allocator: every block is a multiple of 512 bytes (kMinBlockSize)
PAGED_MIN_NUMEL = 100_000  # bitsandbytes get_state_buffer: paged only from 1e5 elements
MIN_8BIT_SIZE = 4096  # bitsandbytes Optimizer2State: smaller tensors keep fp32 state
PHASE_TAGS = {"forward": "activations", "backward": "temporaries", "optimizer": "optimizer_state"}  # new storages


def _round_block(n: int) -> int:
    return 0 if n == 0 else -(-n // BLOCK_BYTES) * BLOCK_BYTES


class LiveBytes(TorchDispatchMode):
    """Live device bytes of every storage an op creates, by tag, with the running peak and its composition."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, object, str]] = {}
        self.current = 0
        self.peak = 0
        self.by_tag: dict[str, int] = {}
        self.peak_by_tag: dict[str, int] = {}
        self.phase = "load"
        self.peak_phase = "load"
        self.phase_peaks: dict[str, int] = {}
        self.default_tag = "activations"
        self.excluded: dict[int, int] = {}  # storages outside max_memory_allocated (paged): id -> bytes
        self.paused = False  # while True, new storages are CUDA managed memory (not the caching allocator's)
        self.on_host = False  # while True, new storages are host memory
        self.host_pinned = True  # ... pinned (else pageable)
        self.host_live: dict[int, tuple[int, object, bool]] = {}
        self.host_current = 0
        self.host_peak = 0

    @contextlib.contextmanager
    def host_memory(self, pinned: bool = True):
        """Storages created inside are host memory (offloaded tensors), counted apart from the device's: pinned
        (rounded as the pinned allocator rounds) or pageable (CPU-offloaded optimizer state: exact bytes)."""
        saved = self.on_host, self.host_pinned
        self.on_host, self.host_pinned = True, pinned
        try:
            yield
        finally:
            self.on_host, self.host_pinned = saved

    def is_host(self, t) -> bool:
        try:
            return id(t.untyped_storage()) in self.host_live
        except (RuntimeError, NotImplementedError):
            return False

    def _track_host(self, st, pinned: bool | None = None) -> None:
        key = id(st)
        if key in self.host_live:
            return
        pinned = self.host_pinned if pinned is None else pinned
        nbytes = st.nbytes()
        if pinned:
            n = 0 if nbytes == 0 else 1 << (nbytes - 1).bit_length()  # CachingHostAllocator: PowerOf2Ceil(size)
        else:
            n = nbytes

        def release(_ref, key=key):
            entry = self.host_live.pop(key, None)
            if entry is not None:
                self.host_current -= entry[0]

        self.host_live[key] = (n, weakref.ref(st, release), pinned)
        self.host_current += n
        self.host_peak = max(self.host_peak, self.host_current)

    @contextlib.contextmanager
    def managed_memory(self):
        """Storages created inside are counted apart (bitsandbytes paged buffers: cudaMallocManaged)."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def track(self, t, tag: str | None = None) -> None:
        if not isinstance(t, torch.Tensor):
            return
        if self.paused:
            try:
                st = t.untyped_storage()
                self.excluded[id(st)] = _round_block(st.nbytes())
            except (RuntimeError, NotImplementedError):
                pass
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = id(st)
        if key in self.host_live:
            return
        if self.on_host:
            self._track_host(st)
            return
        if key in self.live:
            if tag is not None:
                self.retag(key, tag)
            return
        n = _round_block(st.nbytes())
        tag = tag or self.default_tag

        def release(_ref, key=key):
            entry = self.live.pop(key, None)
            if entry is not None:
                self.current -= entry[0]
                self.by_tag[entry[2]] -= entry[0]

        self.live[key] = (n, weakref.ref(st, release), tag)
        self.current += n
        self.by_tag[tag] = self.by_tag.get(tag, 0) + n
        self._note_peak()

    def _note_peak(self) -> None:
        if self.current > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = self.current
        if self.current > self.peak:
            self.peak = self.current
            self.peak_phase = self.phase
            self.peak_by_tag = dict(self.by_tag)

    def retag(self, key_or_tensor, tag: str) -> None:
        key = key_or_tensor if isinstance(key_or_tensor, int) else id(key_or_tensor.untyped_storage())
        entry = self.live.get(key)
        if entry is None or entry[2] == tag:
            return
        n, ref, old = entry
        self.by_tag[old] -= n
        self.by_tag[tag] = self.by_tag.get(tag, 0) + n
        self.live[key] = (n, ref, tag)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if (
            func is torch.ops.aten.add.Tensor
            and self.phase.startswith("backward")
            and not torch.is_grad_enabled()
            and not kwargs
            and isinstance(args[1], torch.Tensor)
            and args[0].shape == args[1].shape
            and args[0].dtype == args[1].dtype
        ):
            # autograd sums a second gradient into the first in place (InputBuffer::accumulate) for plain tensors,
            # but out of place for tensor subclasses such as FakeTensor; do what CUDA does.
            return torch.ops.aten.add_.Tensor(args[0], args[1])
        if func is torch.ops.aten.embedding_dense_backward.default:
            scratch = _embedding_backward_scratch_cuda(*args, **(kwargs or {}))
            for t in scratch:
                self.track(t)
            out = func(*args, **(kwargs or {}))
            self.track(out)  # the gradient, allocated while the scratch is live
            del scratch
            return out
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out


# -- CUDA behaviour on fake CPU tensors --------------------------------------------------------------------------


def _embedding_backward_scratch_cuda(grad, indices, num_weights, padding_idx, scale_grad_by_freq):
    """The buffers CUDA's `embedding_dense_backward_cuda` holds beside the gradient (torch Embedding.cu,
    EmbeddingBackwardKernel.cu): none for at most 3072 ids (a direct kernel); else the sorted and original ids and
    the segment offsets (N int64 each), the partial-segment counts and offsets (min(N, V) int64 each), the partial
    segment offsets (M int64) and the per-partial-segment sums (M x h in the op-math dtype, fp32 for bf16/fp16),
    M = N // 10 + min(N, V). The meta kernel of fake tensors allocates only the gradient."""
    n = indices.numel()
    if n <= 3072 and not scale_grad_by_freq:
        return []
    segs = min(n, int(num_weights))
    m = n // 10 + segs
    acc = torch.float32 if grad.dtype in (torch.bfloat16, torch.float16) else grad.dtype
    ints = [torch.empty(k, dtype=torch.int64) for k in (n, n, n, segs, segs, m)]
    return ints + [torch.empty(m, grad.shape[-1], dtype=acc)]



class _AttentionCUDA(torch.autograd.Function):
    """Allocations of CUDA's fused sdpa kernels: out (B, S, H, D layout), fp32 logsumexp (B, H, S; mem-efficient
    pads S to 32); saved for backward with q, k, v (and the mask bias when one is given); backward returns dq, dk,
    dv plus fp32 scratch freed at once: flash / cuDNN softmax_d (B, H, S rounded to 128) and dq_accum (B, S rounded
    to 128, H, D); mem-efficient its delta (B, H, S rounded to 32) and, for fp16/bf16 outputs, an fp32 dq
    accumulator (cutlass `kNeedsAccumGradQ`: the output type differs from the fp32 accumulator)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, efficient):
        b, h, s, _ = q.shape
        out = torch.empty(b, s, h, v.shape[-1], dtype=q.dtype).transpose(1, 2)
        lse = torch.empty(b, h, -(-s // 32) * 32 if efficient else s, dtype=torch.float32)
        ctx.efficient = efficient
        ctx.save_for_backward(q, k, v, out, lse, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, _out, _lse, _bias = ctx.saved_tensors
        b, h, s, d = q.shape
        s_round = -(-s // 128) * 128
        if ctx.efficient:
            scratch = [torch.empty(b, h, -(-s // 32) * 32, dtype=torch.float32)]
            if q.dtype != torch.float32:
                scratch.append(torch.empty(b, s_round, h, d, dtype=torch.float32))
        else:
            scratch = [torch.empty(b, h, s_round, dtype=torch.float32), torch.empty(b, s_round, h, d, dtype=torch.float32)]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del scratch
        return dq, dk, dv, None, None


_CAPABILITY = [(9, 0)]  # the traced GPU's compute capability (set by `cuda_behaviour`)
SDPA_BACKENDS: list = []  # the backend of every sdpa call of the current trace, in order


def _sdpa_cuda(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """CUDA's sdpa on fake CPU tensors: the backend torch 2.13 selects for these tensors on the traced GPU
    (calibrate.sdpa_dispatch), then what that kernel allocates: flash / cuDNN / memory-efficient through
    `_AttentionCUDA`; math through torch's own `_scaled_dot_product_attention_math` (a composite op: its
    decomposition allocates and saves on any device what it does on CUDA). Under autocast, sdpa is a
    `lower_precision_fp` op: its inputs are cast to the autocast dtype and the op runs with the Autocast dispatch key
    excluded (torch 2.13 aten/src/ATen/autocast_mode.h `WrapFunction_<CastPolicy::lower_precision_fp>`:
    `ExcludeDispatchKeyGuard no_autocast`), so the math kernel's own ops (its fp32 upcast, bmm, softmax) are not
    cast again; here autocast is turned off for the call likewise."""
    if not torch.is_autocast_enabled("cpu"):
        return _sdpa_cuda_kernel(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    dt = torch.get_autocast_dtype("cpu")
    with torch.autocast("cpu", enabled=False):
        return _sdpa_cuda_kernel(query.to(dt), key.to(dt), value.to(dt), attn_mask, dropout_p, is_causal, scale,
                                 enable_gqa)


def _sdpa_cuda_kernel(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """The kernel `_sdpa_cuda` dispatches to, on inputs already in their final dtype."""
    backend = sdpa_dispatch.select(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, _CAPABILITY[0])
    SDPA_BACKENDS.append(backend)
    if backend == "math":
        mask = attn_mask
        if mask is not None and mask.dtype == torch.bool:  # the composite turns a bool mask into an additive one
            mask = torch.zeros(mask.shape, dtype=query.dtype).masked_fill(mask.logical_not(), float("-inf"))
        return torch.ops.aten._scaled_dot_product_attention_math(
            query, key, value, mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa)[0]
    bias = None
    if attn_mask is not None:
        # the mem-efficient kernel turns a bool mask into an additive bias of q's dtype, last dim padded to 16
        kv = attn_mask.shape[-1]
        padded = -(-kv // 16) * 16
        bias = torch.empty(*attn_mask.shape[:-1], padded, dtype=query.dtype)[..., :kv]
    return _AttentionCUDA.apply(query, key, value, bias, backend == "efficient")


class _FlashAttn2CUDA(torch.autograd.Function):
    """flash-attn 2's `FlashAttnFunc` as its CUDA extension allocates (csrc/flash_attn/flash_api.cpp, Dao-AILab/
    flash-attention 765fbd9): `mha_fwd` writes out (B, S, H, D) in the inputs' dtype, softmax_lse (B, H, S) fp32 and
    an rng_state (2 int64), all saved with q, k, v; `mha_bwd` allocates dq, dk, dv (empty_like), softmax_d
    (B, H, S rounded to 128) and dq_accum (B, S rounded to 128, H, D rounded to 32) in fp32, and for grouped
    heads dk_expanded / dv_expanded (B, S_k, H, D) summed into dk, dv; the scratch is freed on return."""

    @staticmethod
    def forward(ctx, q, k, v):
        b, s, h, _ = q.shape
        out = torch.empty(b, s, h, v.shape[-1], dtype=q.dtype)
        lse = torch.empty(b, h, s, dtype=torch.float32)
        rng = torch.empty(2, dtype=torch.int64)
        ctx.save_for_backward(q, k, v, out, lse, rng)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, _out, _lse, _rng = ctx.saved_tensors
        b, s, h, d = q.shape
        round_up = lambda x, m: -(-x // m) * m  # noqa: E731
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        softmax_d = torch.empty(b, h, round_up(s, 128), dtype=torch.float32)
        dq_accum = torch.empty(b, round_up(s, 128), h, round_up(d, 32) if d <= 192 else 256, dtype=torch.float32)
        expanded = []
        if k.shape[2] != h:
            expanded = [torch.empty(b, k.shape[1], h, d, dtype=k.dtype), torch.empty(b, v.shape[1], h, v.shape[-1], dtype=v.dtype)]
        del softmax_d, dq_accum, expanded
        return dq, dk, dv


def _flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                     alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2 `flash_attn_func` (q, k, v: (B, S, heads, D), last dimension contiguous)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")  # mha_fwd's own check
    return _FlashAttn2CUDA.apply(q, k, v)


class _FlashAttn2VarlenCUDA(torch.autograd.Function):
    """flash-attn 2's `FlashAttnVarlenFunc` as its CUDA extension allocates (csrc/flash_attn/flash_api.cpp,
    Dao-AILab/flash-attention 00979f5): `mha_varlen_fwd` writes out (total_q, H, D) and softmax_lse (H, total_q)
    fp32 (unpadded) and an rng_state (2 int64), saved with q, k, v; `mha_varlen_bwd` allocates dq, dk, dv
    (empty_like), softmax_d (H, total_q + 128 b) and dq_accum (total_q + 128 b, H, D rounded to 32) in fp32 for b
    sequences (`cu_seqlens_q` has b + 1 entries), and for grouped heads dk_expanded / dv_expanded (total_k, H, D)
    summed into dk, dv; the scratch is freed on return."""

    @staticmethod
    def forward(ctx, q, k, v, n_seqs):
        total, h, _ = q.shape
        out = torch.empty(total, h, v.shape[-1], dtype=q.dtype)
        lse = torch.empty(h, total, dtype=torch.float32)
        rng = torch.empty(2, dtype=torch.int64)
        ctx.n_seqs = n_seqs
        ctx.save_for_backward(q, k, v, out, lse, rng)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, _out, _lse, _rng = ctx.saved_tensors
        total, h, d = q.shape
        rows = total + 128 * ctx.n_seqs
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        softmax_d = torch.empty(h, rows, dtype=torch.float32)
        dq_accum = torch.empty(rows, h, -(-d // 32) * 32 if d <= 192 else 256, dtype=torch.float32)
        expanded = []
        if k.shape[1] != h:
            expanded = [torch.empty(k.shape[0], h, d, dtype=k.dtype), torch.empty(v.shape[0], h, v.shape[-1], dtype=v.dtype)]
        del softmax_d, dq_accum, expanded
        return dq, dk, dv, None


def _flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                            deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn 2 `flash_attn_varlen_func` (q: (total_q, heads, D), k, v: (total_k, kv heads, D))."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")  # mha_varlen_fwd's own check
    return _FlashAttn2VarlenCUDA.apply(q, k, v, cu_seqlens_q.shape[0] - 1)


def _lazy_import_flash_attention(implementation=None, attention_wrapper=None, allow_all_kernels=False):
    """Stand-in for transformers' `lazy_import_flash_attention`: flash-attn 2's entry points (above) with
    transformers' own pad/unpad helpers and kwargs processing, so transformers' real code runs around them."""
    from transformers import modeling_flash_attention_utils as mfu

    fns = (_flash_attn_func, _flash_attn_varlen_func, None, mfu._pad_input, mfu._unpad_input)
    return fns, mfu._lazy_define_process_function(_flash_attn_varlen_func)


# -- questions transformers asks the batch's data ------------------------------------------------------------------
# transformers decides from the values of the position ids and the attention mask whether rows are packed or padded
# (a data check a fake tensor cannot answer). The trace keeps the real, non-fake tensors its synthetic batch is
# built from (`trainer.recipe.batch_shape_inputs`) and answers each question by running transformers' own function
# on them; what the function allocates on the device is then replayed on the fake tensors.

_REAL_BATCH: dict = {}  # "position_ids" / "attention_mask" of the traced batch, real CPU tensors
_ORIGINAL: dict = {}  # the transformers functions replaced while tracing


def _real_position_ids(shape) -> torch.Tensor:
    """The real position ids of the traced batch at `shape` (B, S): the batch's own or, when it passes none, the
    ones the model makes (transformers 5.17 modeling_llama.py: `position_ids = cache_position.unsqueeze(0)`, with
    `cache_position = arange(past_seen_tokens, past_seen_tokens + S)` and nothing seen before)."""
    ids = _REAL_BATCH.get("position_ids")
    if ids is None:
        ids = torch.arange(shape[-1]).unsqueeze(0)
    return ids.expand(shape[0], -1) if ids.shape[0] != shape[0] else ids


def _find_packed_sequence_indices(position_ids):
    """transformers' `masking_utils.find_packed_sequence_indices`, answered on the real ids; when they are packed,
    its ops (`diff` with the prepended first id - 1, `!= 1`, `cumsum`) run on the traced ids, as on the GPU."""
    with _disable_current_modes():
        answer = _ORIGINAL["find_packed"](_real_position_ids(tuple(position_ids.shape)))
    if answer is None:
        return None
    first = position_ids[:, :1] - 1
    diff = torch.diff(position_ids, prepend=first, dim=-1)
    return (diff != 1).cumsum(-1)


def _ignore_causal_mask_sdpa(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
    """transformers' `masking_utils._ignore_causal_mask_sdpa` on the real padding mask (the batch's attention_mask
    as `_preprocess_mask_arguments` and `prepare_padding_mask` turn it: bool, padded to the keys)."""
    import transformers.masking_utils as mu

    with _disable_current_modes():
        real = None
        if padding_mask is not None:
            real = mu.prepare_padding_mask(_REAL_BATCH["attention_mask"].to(torch.bool), kv_length, kv_offset)
        return _ORIGINAL["ignore_causal"](real, q_length, kv_length, q_offset, kv_offset, local_attention_size)


def _is_packed_sequence(position_ids, batch_size):
    """transformers' `modeling_flash_attention_utils._is_packed_sequence` on the real position ids."""
    if position_ids is None:
        return False
    with _disable_current_modes():
        return bool(_ORIGINAL["is_packed"](_real_position_ids(tuple(position_ids.shape)), batch_size))


def _flash_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                          attention_mask=None, **kwargs):
    """transformers' `masking_utils.flash_attention_mask` (the 2D mask sliced to the keys, or None when it has no
    padding: `attention_mask.all()`), answered on the real mask; the traced mask is sliced as it slices it."""
    with _disable_current_modes():
        real = None if attention_mask is None else _REAL_BATCH["attention_mask"].to(torch.bool)
        kept = _ORIGINAL["fa_mask"](batch_size, q_length, kv_length, q_offset, kv_offset,
                                    attention_mask=real) is not None
    return attention_mask[:, -kv_length:] if kept else None


def _get_unpad_data(attention_mask):
    """transformers' `_get_unpad_data` (`nonzero` of the mask, `max().item()`) on the real mask; on the device its
    int32 lengths, the int64 indices of the real tokens and the int32 cumulative lengths, of the real sizes."""
    with _disable_current_modes():
        indices, cu, max_len = _ORIGINAL["unpad_data"](_REAL_BATCH["attention_mask"])
        n_tokens, n_cu, max_len = indices.numel(), cu.numel(), int(max_len)
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    del seqlens
    return torch.empty(n_tokens, dtype=torch.int64), torch.empty(n_cu, dtype=torch.int32), max_len


def _fa_kwargs_from_position_ids(position_ids):
    """transformers' `prepare_fa_kwargs_from_position_ids` (a `nonzero` of the ids' values) on the real ids; on the
    device, the int32 cumulative lengths (one tensor for q and k) of the same size."""
    with _disable_current_modes():
        (cu_q, _cu_k), (max_q, max_k) = _ORIGINAL["fa_kwargs"](_real_position_ids(tuple(position_ids.shape)))
        shape, dtype, lengths = tuple(cu_q.shape), cu_q.dtype, (int(max_q), int(max_k))
    cu = torch.empty(shape, dtype=dtype)
    return (cu, cu), lengths


def _cuda_autocast_policy():
    """CUDA's autocast policy for the ops whose CPU autocast policy differs (torch 2.13 `ATen/autocast_mode.h`):
    `log_softmax` and `softmax` are `AT_FORALL_FP32_SET_OPT_DTYPE` on CUDA (a bf16 input gives an fp32 result) and
    `exp` is `AT_FORALL_FP32` (its input is cast to fp32), while CPU autocast leaves them in bf16. The chunked loss
    (TRL) runs them on bf16 logits under `mixed`. Registered as AutocastCPU kernels on a `torch.library.Library`
    that is destroyed (registrations removed) when the trace ends."""
    lib = torch.library.Library("aten", "IMPL")
    low = (torch.bfloat16, torch.float16)

    def set_opt_dtype(op):
        def kernel(x, dim, dtype=None):
            with torch.autocast("cpu", enabled=False):
                if dtype is None and x.dtype in low:
                    dtype = torch.float32
                return op(x, dim, dtype)
        return kernel

    def exp(x):
        with torch.autocast("cpu", enabled=False):
            return torch.ops.aten.exp.default(x.float() if x.dtype in low else x)

    lib.impl("log_softmax.int", set_opt_dtype(torch.ops.aten.log_softmax.int), "AutocastCPU")
    lib.impl("softmax.int", set_opt_dtype(torch.ops.aten.softmax.int), "AutocastCPU")
    lib.impl("exp", exp, "AutocastCPU")
    return lib


_F_DROPOUT = F.dropout


def _dropout_cuda(input, p=0.5, training=True, inplace=False):
    if training and 0.0 < p < 1.0 and not inplace:
        return torch.native_dropout(input, p, True)[0]
    return _F_DROPOUT(input, p, training, inplace)


class _SaveOnCPUCUDA(torch.autograd.graph.saved_tensors_hooks):
    """torch's `save_on_cpu(pin_memory=True)` as it runs on CUDA (torch 2.13 `autograd/graph.py`): `pack_to_cpu`
    makes a new pinned host tensor of the saved tensor's size and copies into it; `unpack_from_cpu` returns
    `tensor.to(device)`, a new device tensor. Here the host tensor is counted in the trace's host memory and the
    unpack allocates the device copy (`.to("cpu")` of a fake CPU tensor would return the tensor itself)."""

    tracker: "LiveBytes | None" = None

    def __init__(self, pin_memory: bool = False, device_type: str = "cuda"):
        tracker = _SaveOnCPUCUDA.tracker

        def pack(t):
            with tracker.host_memory() if tracker is not None else contextlib.nullcontext():
                packed = torch.empty(t.size(), dtype=t.dtype, layout=t.layout)
            packed.copy_(t)
            return packed

        def unpack(packed):
            return torch.empty_like(packed).copy_(packed)

        super().__init__(pack, unpack)


@contextlib.contextmanager
def _host_copies(tracker: "LiveBytes"):
    """CUDA's host copies on fake CPU tensors, for TRL's activation offloading (trl 1.16.0
    `models/activation_offloading.py`): `torch.empty_like(x, pin_memory=True, device="cpu")` (and `torch.empty`, its
    broadcast path) is a new pinned host buffer, counted in the trace's host memory (pinning itself needs an
    accelerator); `host.to(device)` of such a buffer is a new device tensor (on the fake CPU device it would return
    the host tensor itself); `record_stream` (TRL calls it when a view of a copy outlives its node) is a no-op: on
    CUDA it delays the block's reuse, not its release from `memory_allocated`; a storage's `data_ptr()` is a distinct
    address (`_storage_address`). Patched as module attributes, which TRL's hooks look up on every call (a
    TorchFunctionMode would miss the hooks that autograd runs inside another torch function)."""
    from trainer.offload import _record_stream

    empty_like, empty, to, record = torch.empty_like, torch.empty, torch.Tensor.to, torch.Tensor.record_stream
    data_ptr = torch.UntypedStorage.data_ptr

    def pinned(func):
        def alloc(*args, **kwargs):
            if not kwargs.pop("pin_memory", False):
                return func(*args, **kwargs)
            with tracker.host_memory():
                return func(*args, **kwargs)
        return alloc

    def to_device(self, *args, **kwargs):
        if tracker.is_host(self):
            return empty_like(self).copy_(self)
        return to(self, *args, **kwargs)

    torch.empty_like, torch.empty, torch.Tensor.to = pinned(empty_like), pinned(empty), to_device
    torch.Tensor.record_stream = _record_stream(record)
    torch.UntypedStorage.data_ptr = _storage_address
    try:
        yield
    finally:
        torch.empty_like, torch.empty, torch.Tensor.to = empty_like, empty, to
        torch.Tensor.record_stream = record
        torch.UntypedStorage.data_ptr = data_ptr


_ADDRESSES: dict = {}
_NEXT_ADDRESS = itertools.count(1)


def _storage_address(storage) -> int:
    """`UntypedStorage.data_ptr()` on CUDA: a distinct address per live storage (a fake storage's is 0, which would
    make every storage of TRL's storage keys, `(data_ptr + offset, dtype)`, one). Addresses 2**40 apart, so a
    storage offset never reaches the next."""
    key = id(storage)
    addr = _ADDRESSES.get(key)
    if addr is None:
        addr = _ADDRESSES[key] = next(_NEXT_ADDRESS) << 40
        weakref.finalize(storage, _ADDRESSES.pop, key, None)
    return addr


def _offload_context_cuda(model, pin_memory=None):
    """TRL's `get_act_offloading_ctx_manager(model)` with SFTTrainer's defaults (pinned, streams, 1 KiB minimum,
    stash of 5, lm_head under `NoOpManager`), on the fake tensors' device standing for CUDA: streams are torch.cpu's
    (their waits order work on a GPU; what stays alive is held by TRL's Python stashes, which run unchanged)."""
    from trl.models.activation_offloading import get_act_offloading_ctx_manager
    from trainer import offload

    with offload.cpu_device():
        return get_act_offloading_ctx_manager(model)


class _Matmul4bitCUDA(torch.autograd.Function):
    """bitsandbytes 0.50 on CUDA for M > 1536 tokens: dequantize the nested absmax (fp32, + offset), the NF4 weight
    to bf16 (N, K), then F.linear; backward dequantizes again for grad_input. Nothing large is saved."""

    @staticmethod
    def forward(ctx, x, n_out, n_in, n_blocks, bias):
        w = _dequantized(n_out, n_in, n_blocks, x.dtype)
        out = F.linear(x, w, bias)
        ctx.shape = (n_out, n_in, n_blocks)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        n_out, n_in, n_blocks = ctx.shape
        w = _dequantized(n_out, n_in, n_blocks, grad_out.dtype)
        return torch.matmul(grad_out, w), None, None, None, None


def _dequantized(n_out, n_in, n_blocks, dtype):
    absmax = torch.empty(n_blocks, dtype=torch.float32)
    absmax = absmax + torch.empty((), dtype=torch.float32)  # absmax_dq + offset: a second fp32 buffer
    return torch.empty(n_out, n_in, dtype=dtype)


def _linear4bit_forward(self, x):
    """Stand-in for `bnb.nn.Linear4bit.forward` (cast to compute dtype, 4-bit matmul, cast back)."""
    n_out, n_in, n_blocks = self._ftplan_4bit
    inp_dtype = x.dtype
    x = x.to(torch.bfloat16)
    bias = None if self.bias is None else self.bias.to(torch.bfloat16)
    return _Matmul4bitCUDA.apply(x, n_out, n_in, n_blocks, bias).to(inp_dtype)


class Emulated8bitOptimizer(torch.optim.Optimizer):
    """State buffers of bitsandbytes `AdamW8bit` / `PagedAdamW8bit` (Optimizer2State.init_state); the update itself
    runs in place in a CUDA kernel and allocates nothing."""

    def __init__(self, params, lr, paged: bool, tracker: LiveBytes):
        super().__init__(params, dict(lr=lr))
        self.paged = paged
        self.tracker = tracker

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or self.state[p]:
                    continue
                st = self.state[p]
                n = p.numel()
                dtype = torch.float32 if n < MIN_8BIT_SIZE else torch.uint8
                paged = self.paged and n >= PAGED_MIN_NUMEL
                with self.tracker.managed_memory() if paged else contextlib.nullcontext():
                    st["state1"] = torch.zeros_like(p, dtype=dtype)
                    st["state2"] = torch.zeros_like(p, dtype=dtype)
                if dtype == torch.uint8:
                    blocks = -(-n // 256)
                    st["absmax1"] = torch.zeros(blocks, dtype=torch.float32)
                    st["absmax2"] = torch.zeros(blocks, dtype=torch.float32)


def _all_nonzero(fake_mode, func, arg):
    """`aten.nonzero` on a fake tensor (data-dependent: fake tensors refuse it). Its one caller in a traced step is
    TRL 1.16's fused LM head on CUDA (trl/trainer/utils.py `add_fused_lm_head`: `hidden_states[mask]`,
    `labels[mask]`, mask = labels != -100), and every synthetic label is valid: every element is nonzero, the
    (numel, dim) int64 result torch's own meta kernel gives under `meta_nonzero_assume_all_nonzero`."""
    n = arg.numel()
    return arg.new_empty_strided((n, arg.dim()), (1, n), dtype=torch.int64)


def _trl_forward_tile(*args, **kwargs):
    """TRL 1.16 `_forward_kernel` (trl/kernels/chunked_logprob.py), one program per token: loads the tile's row
    block by block and stores the running max / sum-exp / target logit in the per-token fp32 buffers it is given;
    it allocates nothing (the eager `_forward_tile` makes fp32 copies of the tile instead)."""


def _trl_backward_tile(*args, **kwargs):
    """TRL 1.16 `_backward_kernel`: overwrites the logits tile in place with the gradient of the projection output;
    it allocates nothing (the eager `_backward_tile` makes fp32 copies of the tile instead)."""


def _trl_addmm_fp32(acc, a, b):
    """TRL 1.16 `_addmm_fp32` on CUDA: for bf16/fp16 inputs `torch.addmm(acc, a, b, out_dtype=torch.float32,
    out=acc)` (torch >= 2.8) accumulates in place, with no fp32 copies of `a` and `b` (the CPU path's
    `acc.addmm_(a.float(), b.float())`); fp32 inputs take the same path on both."""
    if a.dtype in (torch.bfloat16, torch.float16):
        return
    acc.addmm_(a, b)


def _step_without_overflow(self, optimizer, optimizer_state, *args, **kwargs):
    """`GradScaler._maybe_opt_step` on fake tensors: it reads `found_inf` back (`.item()`, a sync fake tensors cannot
    answer) and steps when no gradient overflowed, the case of every step but the rare skipped one."""
    return optimizer.step(*args, **kwargs)


_PEFT_DEQUANTIZE = None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class _LigerFLCECUDA(torch.autograd.Function):
    """Allocations of Liger-Kernel's `LigerFusedLinearCrossEntropyFunction` (linkedin/Liger-Kernel ead96b6,
    `ops/fused_linear_cross_entropy.py`, reduction "mean"): the forward allocates the gradient of the input (zeros,
    BT x H) and, when the lm_head trains, of the weight (zeros like it), the fp32 per-token loss (BT), then per chunk
    of `next_pow2(ceil(BT / ceil(V / H)))` rows: the logits `x_chunk @ w.t()` (Triton overwrites them in place with
    their gradient: nothing allocated), `grad_input[chunk] = grad_logits @ w` (a chunk x H product copied in), and
    the weight gradient: on sm80+ with an fp32 weight and bf16 logits `addmm(..., out_dtype=fp32, out=grad_weight)`
    in place (the input chunk cast to bf16 first), else `grad_weight += mm(grad_logits.t(), x_chunk).float()`.
    Saved: the two gradients; backward returns them (the in-place rescale when grad_output != 1 allocates nothing)."""

    @staticmethod
    def forward(ctx, x, weight, target):
        bt, h = x.shape
        v = weight.shape[0]
        chunk = _next_pow2(-(-bt // -(-v // h)))
        grad_input = torch.zeros_like(x)
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        loss_1d = torch.zeros(bt, dtype=torch.float32)
        target_mask = target != -100
        del target_mask
        for start in range(0, bt, chunk):
            x_c = x[start:start + chunk]
            logits = x_c @ weight.t()
            grad_input[start:start + chunk] = logits @ weight
            if grad_weight is not None:
                if grad_weight.dtype == torch.float32 and logits.dtype in (torch.float16, torch.bfloat16):
                    x_c16 = x_c.to(logits.dtype) if x_c.dtype != logits.dtype else x_c
                    del x_c16  # addmm(out=grad_weight, out_dtype=fp32): in place
                else:
                    grad_weight += torch.mm(logits.t(), x_c).float()
            del logits
        loss = torch.sum(loss_1d)
        ctx.save_for_backward(grad_input, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_input, grad_weight = ctx.saved_tensors
        return grad_input, grad_weight, None


def _liger_cuda(hidden_states, lm_head_weight, labels, hidden_size, final_logit_softcapping=None, **kwargs):
    """`LigerForCausalLMLoss` (Liger-Kernel ead96b6 `transformers/model/loss_utils.py`): pad the labels by one
    ignored token and take `[..., 1:].contiguous()` (int64 copies), flatten the hidden states (a view), then the fused
    function (its Triton kernel replaced by `_LigerFLCECUDA`'s allocations)."""
    labels = F.pad(labels, (0, 1), value=-100)
    shift_labels = labels[..., 1:].contiguous()
    return _LigerFLCECUDA.apply(hidden_states.view(-1, hidden_size), lm_head_weight, shift_labels.view(-1))


class _CCECUDA(torch.autograd.Function):
    """Allocations of Cut Cross-Entropy's `LinearCrossEntropyFunction` with the "cce" preset (apple/ml-cross-entropy
    d42911f, `cce.py`, `cce_lse_forward.py`, `indexed_dot.py`, `cce_backward.py`): under autocast e and c are cast to
    the autocast dtype; forward allocates the fp32 log-sum-exp per valid token, its locks, the fp32 running logit
    average (V; filter_eps "auto" when a gradient is needed) and the fp32 negated target logits (nll = neg_dot.add_(lse)
    in place); saved: e, c (as cast), lse, the targets, the valid indices, the logit average. Backward: argsort of the
    logit average (int64 -> int32), `de = zeros_like(e)` and `dc = zeros_like(c)` for what needs a gradient (the "cce"
    preset accumulates in their dtype), per-128-row int32 locks, then each cast back to its input's dtype."""

    @staticmethod
    def forward(ctx, e, c, targets, valids):
        ctx.e_info = (e.dtype, e.requires_grad)
        ctx.c_info = (c.dtype, c.requires_grad)
        if torch.is_autocast_enabled("cpu"):
            dt = torch.get_autocast_dtype("cpu")
            e, c = e.to(dt), c.to(dt)
        n = valids.numel()
        v = c.shape[0]
        lse = torch.empty(n, dtype=torch.float32)
        locks = torch.empty(-(-n // 128), dtype=torch.int32)
        del locks
        logit_avg = torch.zeros(v, dtype=torch.float32)
        neg_dot = torch.zeros(n, dtype=torch.float32)
        nll = neg_dot.add_(lse)
        ctx.save_for_backward(e, c, lse, targets, valids, logit_avg)
        return nll.mean()

    @staticmethod
    def backward(ctx, grad_out):
        e, c, lse, targets, valids, logit_avg = ctx.saved_tensors
        order = torch.argsort(logit_avg).to(torch.int32)
        de = torch.zeros_like(e) if ctx.e_info[1] else None
        dc = torch.zeros_like(c) if ctx.c_info[1] else None
        locks = [torch.zeros(-(-t.shape[0] // 128), 8, dtype=torch.int32) for t in (e, c)]
        del order, locks
        if dc is not None:
            dc = dc.to(ctx.c_info[0])
        if de is not None:
            de = de.to(ctx.e_info[0])
        return de, dc, None, None


def _cce_cuda(hidden, weight, labels, softcap=None):
    """`linear_cross_entropy(e, c, labels, shift=True, impl="cce")` as Axolotl's patch calls it: the valid indices of
    the shifted targets (`nonzero` int64 (M, 2) -> int32, scaled by the strides, summed to int64 M), then the
    function (its Triton kernels replaced by `_CCECUDA`'s allocations)."""
    targets = labels[..., 1:]
    mask = targets != -100
    # `mask.nonzero()`: data-dependent on fake tensors; every synthetic label is valid, so M = all shifted tokens
    valids = torch.empty(mask.numel(), mask.dim(), dtype=torch.int64).to(torch.int32)
    valids = valids * torch.tensor([targets.stride(0), 1], dtype=torch.int32)
    valids = valids.sum(1)
    return _CCECUDA.apply(hidden.flatten(0, -2), weight, labels.flatten(), valids)


def _dequantize_module_weight(module):
    """Stand-in for peft's `dequantize_module_weight` on a bitsandbytes 4-bit layer (DoRA calls it every forward):
    `bnb.functional.dequantize_4bit` with double quantization dequantizes the nested absmax into one fp32 buffer
    (`dequantize_blockwise`, then `absmax += offset` in place: bitsandbytes 0.50 functional.py) and writes the
    weight in the compute dtype (N, K); on the meta device (model build) only the shape is needed."""
    shape = getattr(module, "_ftplan_4bit", None)
    if shape is not None:
        n_out, n_in, n_blocks = shape
        absmax = torch.empty(n_blocks, dtype=torch.float32)
        out = torch.empty(n_out, n_in, dtype=torch.bfloat16)
        del absmax
        return out
    w = getattr(module, "weight", None)
    if w is not None and type(w).__name__ == "Params4bit" and w.device.type == "meta":
        return torch.empty(module.out_features, module.in_features, dtype=torch.bfloat16, device="meta")
    return _PEFT_DEQUANTIZE(module)


_BINCOUNT = torch.bincount


def _bincount_bounded(input, weights=None, minlength=0):
    """`torch.bincount` has a data-dependent length, which fake tensors cannot give. Its one caller in a traced
    step, the MoE load-balancing loss (transformers 5.17 `load_balancing_loss_func`, `output_router_logits`),
    counts top-k expert indices, all below `minlength` = num_experts, so the counts have exactly `minlength` bins
    (int64, or the weights' dtype)."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(input, FakeTensor) and minlength:
        dtype = weights.dtype if weights is not None else torch.int64
        return torch.zeros(minlength, dtype=dtype, device=input.device)
    return _BINCOUNT(input, weights, minlength)


def _grouped_mm_meta_cuda(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    """`aten::_grouped_mm` as torch 2.13's CUDA kernel shapes its output (aten/src/ATen/native/cuda/GroupedBlas.cpp
    `_grouped_mm_cuda`, GroupedMMUtils.h): bf16 x bf16 takes the CUTLASS fast path (torch's own meta kernel, kept
    for it), fp32 and fp16 operands `_grouped_mm_fallback`, a loop of `mm_out` per group into one output of mat_a's
    dtype (`_resolve_grouped_mm_out_dtype`: out_dtype must equal it), allocating nothing else. torch's meta kernel
    checks for bf16 only, so an fp32 expert stack (k-bit preparation, fp32 master weights) would not trace."""
    if mat_a.dtype == torch.bfloat16 and mat_b.dtype == torch.bfloat16:
        return _GROUPED_MM_META(mat_a, mat_b, offs, bias, out_dtype)
    from torch._meta_registrations import _create_grouped_mm_output_tensor

    ok = (torch.float32, torch.bfloat16, torch.float16)
    torch._check(mat_a.dtype in ok and mat_b.dtype in ok,
                 lambda: f"Expected mat_a and mat_b to be Float32, BFloat16 or Float16, got {mat_a.dtype}, {mat_b.dtype}")
    torch._check(out_dtype is None or out_dtype == mat_a.dtype,
                 lambda: "Grouped gemm output dtype must match `mat_a` dtype")
    torch._check(bias is None, lambda: "Bias not supported yet")
    return _create_grouped_mm_output_tensor(mat_a, mat_b, offs, mat_a.dtype)


_GROUPED_MM_META = None


@contextlib.contextmanager
def cuda_behaviour(capability: tuple = (9, 0), tc: TrainConfig | None = None):
    """Swap in the CUDA allocation behaviour (see module docstring) for the duration of a trace on a GPU of
    compute capability `capability` (which sdpa kernel runs). `tc`: the traced configuration, whose real batch
    shape inputs (`trainer.recipe.batch_shape_inputs`) answer transformers' questions about the data."""
    import transformers.masking_utils as mu
    import transformers.modeling_utils as modeling

    _CAPABILITY[0] = tuple(capability)
    SDPA_BACKENDS.clear()
    _REAL_BATCH.clear()  # the real tensors the batch's shape of data comes from
    if tc is not None:
        _REAL_BATCH.update({k: v for k, v in recipe.batch_shape_inputs(tc).items() if isinstance(v, torch.Tensor)})
    import transformers.modeling_flash_attention_utils as mfu
    from trainer import losses

    saved = (F.scaled_dot_product_attention, F.dropout, mu.find_packed_sequence_indices, modeling.save_on_cpu)
    saved_masks = mu._ignore_causal_mask_sdpa
    saved_fa = (mfu.lazy_import_flash_attention, mfu._is_packed_sequence, mfu.prepare_fa_kwargs_from_position_ids)
    mask_functions = mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    saved_fa_mask = (mask_functions.get("flash_attention_2"), mfu._get_unpad_data)
    _ORIGINAL.update(find_packed=mu.find_packed_sequence_indices, ignore_causal=mu._ignore_causal_mask_sdpa,
                     is_packed=mfu._is_packed_sequence, fa_kwargs=mfu.prepare_fa_kwargs_from_position_ids,
                     fa_mask=mu.flash_attention_mask, unpad_data=mfu._get_unpad_data)
    mask_functions["flash_attention_2"], mfu._get_unpad_data = _flash_attention_mask, _get_unpad_data
    saved_losses = (losses.LIGER_IMPL, losses.CCE_IMPL)
    import torch._subclasses.fake_impls as fake_impls
    import trl.kernels.chunked_logprob as trl_kernels
    import trl.trainer.utils as trl_utils

    saved_trl = (trl_utils._use_triton, trl_kernels._forward_tile, trl_kernels._backward_tile,
                 trl_kernels._addmm_fp32, fake_impls.op_implementations_dict[torch.ops.aten.nonzero.default])
    trl_utils._use_triton = lambda device: True  # the compact path: Triton on CUDA
    trl_kernels._forward_tile, trl_kernels._backward_tile = _trl_forward_tile, _trl_backward_tile
    trl_kernels._addmm_fp32 = _trl_addmm_fp32
    fake_impls.op_implementations_dict[torch.ops.aten.nonzero.default] = _all_nonzero
    from trainer import offload

    saved_offload = offload.context
    offload.context = _offload_context_cuda
    F.scaled_dot_product_attention = _sdpa_cuda
    F.dropout = _dropout_cuda
    torch.bincount = _bincount_bounded
    mu.find_packed_sequence_indices = _find_packed_sequence_indices
    mu._ignore_causal_mask_sdpa = _ignore_causal_mask_sdpa
    modeling.save_on_cpu = _SaveOnCPUCUDA
    mfu.lazy_import_flash_attention, mfu._is_packed_sequence = _lazy_import_flash_attention, _is_packed_sequence
    mfu.prepare_fa_kwargs_from_position_ids = _fa_kwargs_from_position_ids
    losses.LIGER_IMPL, losses.CCE_IMPL = _liger_cuda, _cce_cuda
    autocast_lib = _cuda_autocast_policy()
    global _GROUPED_MM_META
    from torch._meta_registrations import meta_grouped_mm

    _GROUPED_MM_META = meta_grouped_mm
    grouped_mm_lib = torch.library.Library("aten", "IMPL")
    grouped_mm_lib.impl("_grouped_mm", _grouped_mm_meta_cuda, "Meta")
    scaler_step = torch.amp.GradScaler._maybe_opt_step
    torch.amp.GradScaler._maybe_opt_step = _step_without_overflow
    linear4bit = None
    try:
        import bitsandbytes as bnb

        linear4bit = (bnb.nn.Linear4bit, bnb.nn.Linear4bit.forward)
        bnb.nn.Linear4bit.forward = _linear4bit_forward
    except ImportError:  # pragma: no cover - bitsandbytes is in the train extra
        pass
    global _PEFT_DEQUANTIZE
    import peft.tuners.lora.dora as peft_dora

    _PEFT_DEQUANTIZE = peft_dora.dequantize_module_weight
    peft_dora.dequantize_module_weight = _dequantize_module_weight
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.dropout, mu.find_packed_sequence_indices, modeling.save_on_cpu = saved
        torch.bincount = _BINCOUNT
        mu._ignore_causal_mask_sdpa = saved_masks
        mask_functions["flash_attention_2"], mfu._get_unpad_data = saved_fa_mask
        mfu.lazy_import_flash_attention, mfu._is_packed_sequence, mfu.prepare_fa_kwargs_from_position_ids = saved_fa
        _REAL_BATCH.clear()
        losses.LIGER_IMPL, losses.CCE_IMPL = saved_losses
        (trl_utils._use_triton, trl_kernels._forward_tile, trl_kernels._backward_tile, trl_kernels._addmm_fp32,
         fake_impls.op_implementations_dict[torch.ops.aten.nonzero.default]) = saved_trl
        offload.context = saved_offload
        autocast_lib._destroy()
        grouped_mm_lib._destroy()
        torch.amp.GradScaler._maybe_opt_step = scaler_step
        peft_dora.dequantize_module_weight = _PEFT_DEQUANTIZE
        if linear4bit is not None:
            linear4bit[0].forward = linear4bit[1]


# -- building the model on meta, then fake ---------------------------------------------------------------------


def _quantize_on_meta(model, **storage) -> None:
    """Replace linear layers by bitsandbytes Linear4bit exactly as transformers' bnb quantizer selects them;
    `storage`: the recipe's `bnb_4bit_quant_storage` (`trainer.recipe.quant_storage_kwargs`), if any."""
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import _assign_is_quantized, get_keys_to_not_convert

    qc = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16,
        **storage,
    )
    replace_with_bnb_linear(model, modules_to_not_convert=get_keys_to_not_convert(model), quantization_config=qc)
    model.is_loaded_in_4bit = True
    # what the quantizer does after loading (quantizers/base.py `postprocess_model`): flash_attention_2 reads it
    # to cast fp32 inputs back to `config.dtype`
    model.config.quantization_config = qc
    _assign_is_quantized(model)


def _materialize(model, fake_mode, tracker: LiveBytes) -> None:
    """Swap every meta parameter and buffer for a fake CPU tensor (tied tensors stay one tensor); 4-bit weights
    become their packed bytes and double-quantized constants."""
    import bitsandbytes as bnb

    memo: dict[int, torch.Tensor] = {}

    def fake(shape, dtype, stride=None):
        with fake_mode:
            if stride is None:
                return torch.empty(shape, dtype=dtype)
            return torch.empty_strided(shape, stride, dtype=dtype)

    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            n_out, n_in = mod.out_features, mod.in_features
            numel = n_out * n_in
            n_blocks = -(-numel // 64)  # NF4 blocksize 64
            mod._ftplan_4bit = (n_out, n_in, n_blocks)
            mod._ftplan_quant = [
                fake(((numel + 1) // 2, 1), torch.uint8),  # packed 4-bit weight
                fake((n_blocks,), torch.uint8),  # absmax, 8-bit (double quantization)
                fake((-(-n_blocks // 256),), torch.float32),  # second-level absmax, block 256
                fake((256,), torch.float32),  # second-level code
                fake((), torch.float32),  # offset
                fake((16,), torch.float32),  # NF4 code
            ]
            tracker.track(mod._ftplan_quant[0], "weights")
            for t in mod._ftplan_quant[1:]:
                tracker.track(t, "quant_constants")
            w = mod._parameters.get("weight")
            mod._parameters["weight"] = torch.nn.Parameter(fake((0,), torch.uint8), requires_grad=False)
            del w
        for name, p in list(mod._parameters.items()):
            if p is None or (isinstance(mod, bnb.nn.Linear4bit) and name == "weight"):
                continue
            if id(p) not in memo:
                memo[id(p)] = torch.nn.Parameter(fake(p.shape, p.dtype, p.stride()), requires_grad=p.requires_grad)
            mod._parameters[name] = memo[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is None:
                continue
            if id(b) not in memo:
                memo[id(b)] = fake(b.shape, b.dtype, b.stride())
            mod._buffers[name] = memo[id(b)]


def build_traced_model(config: dict, tc: TrainConfig, fake_mode, tracker: LiveBytes):
    """The recipe's model and method on the meta device, then swapped for fake tensors. flash_attention_2: built
    with sdpa (transformers refuses flash-attn where it is not installed), then switched to it; its kernels are
    the stand-ins above."""
    attn = tc.recipe.attn_implementation
    build_tc = tc
    if attn == "flash_attention_2":
        build_tc = tc.replace(recipe=tc.recipe.__class__(**{**tc.recipe.to_dict(), "attn_implementation": "sdpa"}))
    with torch.device("meta"):
        if tc.base_quant.quantized:
            from transformers import AutoModelForCausalLM

            # sdpa: transformers' default, as `recipe.build_model` asks for it (None), which falls back to eager
            # for a model class without an sdpa path (gpt-oss)
            qattn = build_tc.recipe.attn_implementation
            model = AutoModelForCausalLM.from_config(recipe.hf_config(config), dtype=torch.bfloat16,
                                                     attn_implementation=None if qattn == "sdpa" else qattn)
            _quantize_on_meta(model)
        else:
            model = recipe.build_model(config, build_tc, device="meta")
        if attn == "flash_attention_2":
            model.config._attn_implementation = attn
        model = recipe.apply_method(model, tc)
    _materialize(model, fake_mode, tracker)
    return model


# -- the trace -----------------------------------------------------------------------------------------------------


@dataclass
class TraceResult:
    """What the trace saw. Bytes are per device, rounded to 512-byte blocks as the CUDA allocator counts them."""

    peak_allocated_bytes: int
    peak_phase: str
    peak_by_tag: dict
    phase_peaks: dict
    paged_bytes: int
    trainable_params: int
    total_params: int
    seconds: float
    steps: int
    cuda_workspace_bytes: int = 0
    notes: list = field(default_factory=list)
    host_pinned_bytes: int = 0  # peak pinned host memory (offloaded tensors)
    host_bytes: int | None = None  # peak host memory, pinned and pageable (FSDP2 CPU offload); None: not traced

    def to_dict(self) -> dict:
        return {
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_phase": self.peak_phase,
            "peak_by_tag": dict(self.peak_by_tag),
            "phase_peaks": dict(self.phase_peaks),
            "paged_bytes": self.paged_bytes,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "cuda_workspace_bytes": self.cuda_workspace_bytes,
            "host_pinned_bytes": self.host_pinned_bytes,
            **({"host_bytes": self.host_bytes} if self.host_bytes is not None else {}),
            "seconds": round(self.seconds, 3),
            "steps": self.steps,
            "notes": list(self.notes),
        }


def trace_step(config: dict, tc: TrainConfig, *, steps: int = 2, cuda_workspace_bytes: int = 0,
               capability: tuple = (9, 0)) -> TraceResult:
    """Trace `steps` training steps (the second one has optimizer state) of the recipe on fake tensors.

    `config`: Hugging Face config.json fields. `cuda_workspace_bytes`: library workspace added to the peak
    (see `planner.memory.cuda_workspace_bytes`). Multi-GPU strategies are not traced: the result is one device
    holding everything (num_gpus must be 1)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if tc.num_gpus != 1:
        raise ValueError("the trace follows one device; set num_gpus=1 (sharding is modelled analytically)")
    t0 = time.perf_counter()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = LiveBytes()
    _SaveOnCPUCUDA.tracker = tracker
    notes = []
    with cuda_behaviour(capability, tc):
        model = build_traced_model(config, tc, fake_mode, tracker)
        params = recipe.trainable_parameters(model)
        n_trainable = sum(p.numel() for p in params)
        n_total = _count_params(model)
        host_copies = _host_copies(tracker) if tc.recipe.activation_offload else contextlib.nullcontext()
        with fake_mode, tracker, host_copies:
            for p in model.parameters():
                tracker.track(p, "weights")
            for b in model.buffers():
                tracker.track(b, "weights")
            for p in params:
                tracker.retag(p, "trainable")
                p.register_post_accumulate_grad_hook(lambda q: tracker.track(q.grad, "gradients"))
            if tc.optimizer in ("adamw8bit", "paged_adamw8bit"):
                opt = Emulated8bitOptimizer(params, recipe.DEFAULT_LR, tc.optimizer == "paged_adamw8bit", tracker)
                notes.append("8-bit optimizer: bitsandbytes state layout emulated")
            else:
                opt = recipe.make_optimizer(params, tc, foreach=True if tc.optimizer in ("adamw", "sgd") else None)
            if tc.base_quant.quantized:
                notes.append("4-bit weights: bitsandbytes NF4 storage and dequantize+matmul path emulated")
            vocab = int(config["vocab_size"])
            step_no = 0

            def phase(name: str) -> None:
                tracker.phase, tracker.default_tag = f"{name}{step_no}", PHASE_TAGS[name]

            # the run's own step (trainer.step), one micro-batch per step; the norm is dropped at once
            train_step = TrainStep(model, opt, params, tc, "cpu", max_grad_norm=1.0, foreach=True,
                                   keep_grad_norm=False, phase=phase)
            for step_no in range(steps):
                batch = recipe.synthetic_batch(vocab, tc, device="cpu")
                train_step([batch], micro_steps=1)
            train_step.release()
    if SDPA_BACKENDS:
        notes.append(f"sdpa on sm{capability[0]}{capability[1]}: " + ", ".join(sorted(set(SDPA_BACKENDS))))
    peak_by_tag = {k: v for k, v in tracker.peak_by_tag.items() if v}
    if cuda_workspace_bytes:
        peak_by_tag["cuda_workspace"] = cuda_workspace_bytes
    return TraceResult(
        peak_allocated_bytes=tracker.peak + cuda_workspace_bytes,
        peak_phase=tracker.peak_phase,
        peak_by_tag=peak_by_tag,
        phase_peaks=tracker.phase_peaks,
        paged_bytes=sum(tracker.excluded.values()),
        trainable_params=n_trainable,
        total_params=n_total,
        seconds=time.perf_counter() - t0,
        steps=steps,
        cuda_workspace_bytes=cuda_workspace_bytes,
        notes=notes,
        host_pinned_bytes=tracker.host_peak,
    )


def _count_params(model) -> int:
    """Parameters as the unquantized model has them (a 4-bit weight counts its N x K elements)."""
    n = 0
    seen = set()
    for mod in model.modules():
        shape = getattr(mod, "_ftplan_4bit", None)
        for name, p in mod._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            n += shape[0] * shape[1] if (shape is not None and name == "weight") else p.numel()
    return n
