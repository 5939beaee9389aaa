"""torch 2.13's CUDA sdpa backend choice, applied to the real tensors a traced model passes to sdpa.

The trace runs on CPU, where sdpa would dispatch to CPU kernels; this module answers what CUDA would run for
the same call, so the trace allocates what that kernel allocates. It is written apart from `planner.attention`
(which reasons about an abstract call the analytic model builds) and reads everything from the tensors: dtypes,
sizes, strides (last dimension contiguous), the mask's shape and stride, requires_grad and grad mode; a test
compares the two on a grid (tests/test_attention.py), so a wrong rule in either shows up as a disagreement.

Source: aten/src/ATen/native/transformers/cuda/sdp_utils.cpp (`select_sdp_backend`, `can_use_flash_attention`,
`can_use_mem_efficient_attention`, `can_use_cudnn_attention`; pytorch commit 001f694) and the installed torch 2.13
header include/ATen/native/transformers/sdp_utils_cpp.h (`check_batch_size_and_num_heads_dense`,
`check_last_dim_stride_equals_1_dense`, `check_attn_mask_shape`); the default order from ATen/Context.h
(`sdp_priority_order`: flash, efficient, math, cuDNN). Each constraint below names the torch function it follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HALF = (torch.float16, torch.bfloat16)
CUDNN_VERSION = 91002  # the cuDNN runtime assumed (torch's CUDA 12 wheels: nvidia-cudnn-cu12 9.10.2)


@dataclass
class Params:
    """`sdp_params` (sdp_utils_cpp.h) plus the device's compute capability."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    dropout: float
    is_causal: bool
    enable_gqa: bool
    sm: tuple

    @property
    def requires_grad(self) -> bool:  # input_requires_grad
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.query, self.key, self.value))


def _sm_in(p: Params, lo, hi) -> bool:  # check_sm_version<lo, hi>
    return tuple(lo) <= tuple(p.sm) <= tuple(hi)


def _dtypes(p: Params, allowed) -> bool:  # check_tensor_dtype
    return p.query.dtype == p.key.dtype == p.value.dtype and p.query.dtype in allowed


def _four_dims(p: Params) -> bool:  # check_tensor_shapes
    return p.query.dim() == p.key.dim() == p.value.dim() == 4


def _nonzero_lengths(p: Params) -> bool:  # check_nonzero_sequence_lengths_dense
    return p.query.size(-2) != 0 and p.key.size(-2) != 0


def _last_dim_stride_1(p: Params, ignore_singleton: bool) -> bool:  # check_last_dim_stride_equals_1_dense
    ok = all(t.stride(-1) == 1 for t in (p.query, p.key, p.value))
    if ignore_singleton:
        ok = ok or p.query.size(-1) == 1
    mask_ok = p.attn_mask is None or p.attn_mask.stride(-1) == 1  # a CUDA query: the mask is checked too
    return ok and mask_ok


def _heads(p: Params, supports_gqa: bool, same_kv_heads: bool = True) -> bool:
    """check_batch_size_and_num_heads_dense<supports_gqa, requires_same_num_heads> (torch 2.13)."""
    q, k, v = p.query, p.key, p.value
    if not (q.size(0) == k.size(0) == v.size(0)):
        return False
    hq, hk, hv = q.size(-3), k.size(-3), v.size(-3)
    if p.enable_gqa and supports_gqa:  # check_grouped_query_attention<requires_same_num_heads>
        if same_kv_heads and hk != hv:
            return False
        return hq % hk == 0 and (same_kv_heads or hq % hv == 0)
    return hq == hk == hv


def _flash(p: Params) -> bool:
    """can_use_flash_attention."""
    q, k, v = p.query, p.key, p.value
    if not _four_dims(p) or p.attn_mask is not None:  # check_tensor_shapes, check_for_attn_mask
        return False
    d = q.size(-1)
    if not (d == k.size(-1) == v.size(-1) and d <= 256):  # check_head_dim_size_flash
        return False
    if not _sm_in(p, (8, 0), (12, 1)):  # check_flash_attention_hardware_support
        return False
    if p.requires_grad and (_sm_in(p, (8, 6), (8, 9)) or _sm_in(p, (12, 0), (12, 1))):
        # check_requires_grad_and_head_dim_gt192_constraints_on_sm86_89_or_120
        if not (d <= 192 or (p.dropout == 0.0 and d > 224)):
            return False
    if p.is_causal and q.size(-2) != k.size(-2):  # check_flash_causal_non_square_seqlens
        return False
    if not _dtypes(p, HALF):  # check_dtypes_flash_attention -> check_dtypes_low_precision (sm >= 80)
        return False
    return _heads(p, True) and _nonzero_lengths(p) and _last_dim_stride_1(p, True)


def _gemm_alignment(p: Params) -> int:
    """minimum_gemm_alignment: elements per GEMM row alignment."""
    half = p.query.dtype in HALF
    major = p.sm[0]
    use_tc = major >= 8 or (major >= 7 and half)  # use_tensor_cores
    align = 4 if major >= 8 else 1
    if use_tc:
        align = max(align, 128 // (16 if half else 32))
    return align


def _efficient(p: Params) -> bool:
    """can_use_mem_efficient_attention (dense inputs; torch 2.13: no grouped-query support here)."""
    q, k, v = p.query, p.key, p.value
    if not _sm_in(p, (5, 0), (12, 1)) or not _four_dims(p):  # check_mem_efficient_hardware_support, shapes
        return False
    a = _gemm_alignment(p)  # check_head_dim_size_mem_efficient
    if not (q.size(-1) == k.size(-1) and q.size(-1) % a == 0 and q.size(-1) > 0 and v.size(-1) % a == 0
            and v.size(-1) > 0):
        return False
    # check_data_ptr_alignment_mem_efficient: storage offsets of the views transformers passes are 0 or
    # multiples of a head (q/k/v of a fused projection): aligned
    if any((t.storage_offset() * t.element_size()) % (a * q.element_size()) for t in (q, k, v)) and p.sm[0] >= 8:
        return False
    if not (_nonzero_lengths(p) and _last_dim_stride_1(p, False) and _heads(p, False)):
        return False
    allowed = (torch.float16, torch.float32, torch.bfloat16) if p.sm[0] >= 8 else (torch.float16, torch.float32)
    return _dtypes(p, allowed)


def _mask_shape_ok(p: Params) -> bool:  # check_attn_mask_shape
    m = p.attn_mask
    if m is None:
        return True
    if m.requires_grad:
        return False
    if m.size(-2) not in (p.query.size(2), 1) or m.size(-1) not in (p.key.size(2), 1):
        return False
    if m.dim() == 2:
        return True
    return m.dim() == 4 and m.size(0) in (1, p.query.size(0)) and m.size(1) in (1, p.query.size(1))


def _cudnn(p: Params) -> bool:
    """can_use_cudnn_attention (dense inputs)."""
    q, k, v = p.query, p.key, p.value
    if p.dropout > 0.0 and 91100 < CUDNN_VERSION < 91400:
        return False
    if not (_four_dims(p) and _dtypes(p, HALF) and _mask_shape_ok(p) and _sm_in(p, (8, 0), (12, 1))):
        return False
    if p.dropout * 16.0 != int(p.dropout * 16.0):  # check_cudnn_dropout
        return False
    if not (_nonzero_lengths(p) and _last_dim_stride_1(p, True) and _heads(p, True, same_kv_heads=False)):
        return False
    if q.size(0) > 65535 or q.size(1) > 65535:  # check_cudnn_tensor_shapes
        return False
    d_qk, d_v = q.size(3), v.size(3)
    sm90_10x = tuple(p.sm) == (9, 0) or p.sm[0] == 10
    limit = 256 if (sm90_10x and CUDNN_VERSION > 92200) else 128
    if d_qk > limit or d_v > limit or d_qk % 8 or d_v % 8:
        return False
    return k.size(2) != 1 and not (p.dropout != 0.0 and q.size(2) == 1)


def _order(p: Params) -> tuple:
    """priority_order: cuDNN first only where check_prefer_cudnn_attention (cuDNN > 9.15.0 on sm90/sm100)."""
    if CUDNN_VERSION > 91500 and p.sm[0] in (9, 10) and p.sm[1] in (0, 3):
        return ("cudnn", "flash", "efficient", "math")
    return ("flash", "efficient", "math", "cudnn")


def select(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, enable_gqa=False,
           sm=(9, 0)) -> str:
    """`select_sdp_backend` for these tensors on a GPU of compute capability `sm`: flash | efficient | cudnn | math."""
    p = Params(query, key, value, attn_mask, float(dropout_p), bool(is_causal), bool(enable_gqa), tuple(sm))
    usable = {"flash": _flash, "efficient": _efficient, "cudnn": _cudnn, "math": lambda _p: True}
    for name in _order(p):
        if usable[name](p):
            return name
    return "math"
