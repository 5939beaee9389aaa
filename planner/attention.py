"""Which kernel `F.scaled_dot_product_attention` runs on a CUDA GPU, as torch 2.13 chooses it (pure Python).

Two steps, each from its source:

1. What transformers 5.17 passes to sdpa (`integrations/sdpa_attention.py`, `sdpa_attention_forward`): when the
   module has grouped key/value heads, `use_gqa_in_sdpa(mask, key, value)` (CUDA: `attention_mask is None and
   key.shape[-1] == value.shape[-1] <= 256`) decides between `enable_gqa=True` (keys/values keep their K heads)
   and `repeat_kv` (copied to all H heads); `is_causal = q_len > 1 and attention_mask is None and
   module.is_causal`.
2. torch's `select_sdp_backend` (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, read at pytorch commit
   001f694, with the dense-input head-count template of the installed torch 2.13 header
   `include/ATen/native/transformers/sdp_utils_cpp.h`, `check_batch_size_and_num_heads_dense<supports_gqa,
   requires_same_num_heads>`): walk the priority order and take the first backend whose constraints all pass.

   - order (`priority_order`, ATen/Context.h `sdp_priority_order`): flash, efficient, math, cuDNN; cuDNN moves
     first (`check_prefer_cudnn_attention`) only with a cuDNN runtime newer than 9.15.0 on sm90/sm100 (CUDA < 13:
     minor 0 or 3). ftplan assumes the cuDNN torch 2.13's CUDA 12 wheel ships (`CUDNN_RUNTIME_VERSION`).
   - flash (`can_use_flash_attention`): no attn_mask (`check_for_attn_mask`); q, k, v head dims equal and <= 256
     (`check_head_dim_size_flash`); sm80..sm121 (`check_flash_attention_hardware_support`); on sm86-89 and
     sm120-121 when training: head_dim <= 192, or > 224 without dropout
     (`check_requires_grad_and_head_dim_gt192_constraints_on_sm86_89_or_120`); is_causal only with q_len ==
     kv_len (`check_flash_causal_non_square_seqlens`); fp16 or bf16 (`check_dtypes_low_precision`, sm >= 80);
     dense: equal heads, or `enable_gqa` with H % K == 0 (`check_batch_size_and_num_heads_dense<true>`); nonzero
     lengths; last dim contiguous.
   - memory-efficient (`can_use_mem_efficient_attention`): sm50..sm121; q and k head dims equal, q and v head dims
     multiples of the GEMM alignment (`minimum_gemm_alignment`: tensor cores on sm >= 80, or sm70+ in half
     precision; 4 elements on sm >= 80, at least 128 bits per row on tensor cores: 8 for fp16/bf16, 4 for fp32;
     else 1); dense: equal heads (torch 2.13 passes `supports_gqa=false` here: memory-efficient GQA arrived
     with pytorch PR #191085, after 2.13), last dim contiguous (the mask's too); dtypes fp16/fp32/bf16 on
     sm >= 80, fp16/fp32 below.
   - cuDNN (`can_use_cudnn_attention`): fp16/bf16, sm80..sm121, dropout a multiple of 1/16, mask of a
     broadcastable shape, head dims multiples of 8 and <= 128 (256 on sm90/sm100 with a recent cuDNN), GQA with
     `enable_gqa` (`check_batch_size_and_num_heads_dense<true, false>`), kv_len != 1.
   - math: always (`userEnabledMathSDP`).

The trace checks these rules with its own implementation on the real tensors (calibrate/sdpa_dispatch.py);
tests/test_attention.py compares the two on a grid.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("flash", "efficient", "cudnn", "math")
DEFAULT_CAPABILITY = (9, 0)  # the H100 the reference measurements ran on (calibrate/results)
CUDNN_RUNTIME_VERSION = 91002  # cuDNN 9.10.2: what torch's CUDA 12 wheels pin (nvidia-cudnn-cu12 9.10.2.21)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class SdpaCall:
    """The tensors reaching `F.scaled_dot_product_attention` (dense, (B, heads, seq, head_dim))."""

    dtype: str  # of q, k and v: fp32 | bf16 | fp16
    q_heads: int
    kv_heads: int  # keys/values as passed (after repeat_kv when transformers copies them)
    head_dim: int
    q_len: int
    kv_len: int
    mask: bool  # an attn_mask tensor is passed (padding, block-diagonal packing, sliding window, prefix)
    is_causal: bool
    enable_gqa: bool
    dropout: float = 0.0
    requires_grad: bool = True
    value_head_dim: int | None = None

    @property
    def v_dim(self) -> int:
        return self.head_dim if self.value_head_dim is None else self.value_head_dim


def transformers_sdpa_call(dtype: str, num_heads: int, num_kv_heads: int, head_dim: int, q_len: int, kv_len: int,
                           mask: bool, dropout: float = 0.0, requires_grad: bool = True) -> SdpaCall:
    """What transformers 5.17 `sdpa_attention_forward` passes: `enable_gqa=True` when the module has grouped heads,
    no mask and head_dim <= 256 (`use_gqa_in_sdpa`), else `repeat_kv` to all heads; `is_causal` when there is no
    mask and more than one query."""
    grouped = num_kv_heads != num_heads
    gqa = grouped and not mask and head_dim <= 256
    kv = num_kv_heads if gqa else num_heads
    return SdpaCall(dtype, num_heads, kv, head_dim, q_len, kv_len, mask, is_causal=q_len > 1 and not mask,
                    enable_gqa=gqa, dropout=dropout, requires_grad=requires_grad)


def _between(sm: tuple, lo: tuple, hi: tuple) -> bool:
    return lo <= tuple(sm) <= hi


def _heads_ok(c: SdpaCall, supports_gqa: bool) -> bool:
    """`check_batch_size_and_num_heads_dense<supports_gqa>` (sdp_utils_cpp.h, torch 2.13)."""
    if c.enable_gqa and supports_gqa:
        return c.kv_heads > 0 and c.q_heads % c.kv_heads == 0
    return c.q_heads == c.kv_heads


def gemm_alignment(dtype: str, sm: tuple) -> int:
    """`minimum_gemm_alignment` (sdp_utils.cpp): elements a head dimension must be a multiple of."""
    half = dtype in ("fp16", "bf16")
    tensor_cores = sm[0] >= 8 or (sm[0] >= 7 and half)
    mn = 4 if sm[0] >= 8 else 1
    if tensor_cores:
        mn = max(mn, 128 // (16 if half else 32))
    return mn


def can_use_flash(c: SdpaCall, sm: tuple) -> bool:
    if c.mask:
        return False
    if not (c.head_dim == c.v_dim and c.head_dim <= 256):
        return False
    if not _between(sm, (8, 0), (12, 1)):
        return False
    if c.requires_grad and (_between(sm, (8, 6), (8, 9)) or _between(sm, (12, 0), (12, 1))):
        if not (c.head_dim <= 192 or (c.dropout == 0.0 and c.head_dim > 224)):
            return False
    if c.is_causal and c.q_len != c.kv_len:
        return False
    if c.dtype not in ("fp16", "bf16"):
        return False
    return _heads_ok(c, True) and c.q_len > 0 and c.kv_len > 0


def can_use_efficient(c: SdpaCall, sm: tuple) -> bool:
    if not _between(sm, (5, 0), (12, 1)):
        return False
    a = gemm_alignment(c.dtype, sm)
    if c.head_dim % a or c.v_dim % a or c.head_dim <= 0 or c.v_dim <= 0:
        return False
    if not (c.q_len > 0 and c.kv_len > 0 and _heads_ok(c, False)):
        return False
    return c.dtype in (("fp16", "fp32", "bf16") if sm[0] >= 8 else ("fp16", "fp32"))


def cudnn_head_dim_limit(sm: tuple, cudnn_version: int) -> int:
    """`check_cudnn_tensor_shapes`: 128, or 256 on sm90/sm10x with cuDNN newer than 9.22 (front end >= 1.24)."""
    sm90_10x = tuple(sm) == (9, 0) or sm[0] == 10
    return 256 if sm90_10x and cudnn_version > 92200 else 128


def can_use_cudnn(c: SdpaCall, sm: tuple, cudnn_version: int = CUDNN_RUNTIME_VERSION) -> bool:
    if c.dtype not in ("fp16", "bf16") or not _between(sm, (8, 0), (12, 1)):
        return False
    if c.dropout * 16.0 != int(c.dropout * 16.0):
        return False
    if c.dropout > 0.0 and 91100 < cudnn_version < 91400:
        return False
    if not (c.q_len > 0 and c.kv_len > 0 and _heads_ok(c, True)):
        return False
    lim = cudnn_head_dim_limit(sm, cudnn_version)
    if c.head_dim > lim or c.v_dim > lim or c.head_dim % 8 or c.v_dim % 8:
        return False
    return c.kv_len != 1


def prefers_cudnn(sm: tuple, cudnn_version: int = CUDNN_RUNTIME_VERSION, cuda_major: int = 12) -> bool:
    """`check_prefer_cudnn_attention`: cuDNN > 9.15.0 on sm90/sm100 (CUDA < 13: minor 0 or 3)."""
    if cudnn_version <= 91500 or sm[0] not in (9, 10):
        return False
    return cuda_major >= 13 or sm[1] in (0, 3)


def priority_order(sm: tuple, cudnn_version: int = CUDNN_RUNTIME_VERSION) -> tuple:
    if prefers_cudnn(sm, cudnn_version):
        return ("cudnn", "flash", "efficient", "math")
    return ("flash", "efficient", "math", "cudnn")


def select_backend(c: SdpaCall, sm: tuple = DEFAULT_CAPABILITY, cudnn_version: int = CUDNN_RUNTIME_VERSION) -> str:
    """The backend torch 2.13's `select_sdp_backend` runs for `c` on a GPU of compute capability `sm`."""
    sm = tuple(sm)
    checks = {"flash": lambda: can_use_flash(c, sm), "efficient": lambda: can_use_efficient(c, sm),
              "cudnn": lambda: can_use_cudnn(c, sm, cudnn_version), "math": lambda: True}
    for b in priority_order(sm, cudnn_version):
        if checks[b]():
            return b
    return "math"  # pragma: no cover - math is always enabled


def parse_capability(s: str) -> tuple[int, int]:
    """'8.6' -> (8, 6): a GPU profile's `compute_capability`."""
    major, _, minor = str(s).partition(".")
    return int(major), int(minor or 0)


_CANONICAL: dict = {}


def canonical_capability(sm: tuple, cudnn_version: int = CUDNN_RUNTIME_VERSION) -> tuple:
    """A representative of the capabilities every rule above treats alike (the first one seen), so that a
    cache keyed on it (planner.memory) replays each model once per distinct dispatch, not once per GPU."""
    sm = tuple(sm)
    cls = (_between(sm, (5, 0), (12, 1)), _between(sm, (8, 0), (12, 1)),
           _between(sm, (8, 6), (8, 9)) or _between(sm, (12, 0), (12, 1)), sm[0] >= 8, sm[0] >= 7,
           prefers_cudnn(sm, cudnn_version), cudnn_head_dim_limit(sm, cudnn_version))
    return _CANONICAL.setdefault(cls, sm)


IMPLEMENTATIONS_BELOW_SM80 = ("sdpa", "eager")

# Families whose transformers 5.17 model class has no sdpa path (`_supports_sdpa = False`): gpt-oss, whose learned
# attention sinks (`GptOssAttention.sinks`) only the eager, flex and sink-aware flash kernels take (modeling_gpt_oss.py)
NO_SDPA_FAMILIES = ("gpt_oss",)


def effective_implementation(model_type: str, attn: str) -> str:
    """The attention transformers 5.17 runs for the recipe's `attn` on a family. ftplan's `sdpa` is transformers'
    default (no `attn_implementation` requested): `PreTrainedModel.get_correct_attn_implementation(None)` tries sdpa
    and falls back to eager when `_sdpa_can_dispatch` raises, as it does for gpt-oss (`_supports_sdpa = False`); the
    Hugging Face gpt-oss fine-tuning recipe asks for `attn_implementation="eager"` explicitly. The others run what
    they are asked."""
    return "eager" if attn == "sdpa" and model_type in NO_SDPA_FAMILIES else attn


def family_implementation_error(model_type: str, name: str, attn: str) -> str | None:
    """Why `attn` is not modelled on this family, or None. gpt-oss with flash_attention_2: transformers 5.17
    (`_check_and_adjust_attn_implementation`) swaps it for the model's first `_compatible_flash_implementations`
    entry, the hub kernel `kernels-community/vllm-flash-attn3` (FlashAttention-3 with sinks), which ftplan does not
    model."""
    if model_type in NO_SDPA_FAMILIES and attn == "flash_attention_2":
        return (f"attn_implementation 'flash_attention_2' on {name}: transformers 5.17 replaces it for gpt-oss by the "
                "hub kernel kernels-community/vllm-flash-attn3 (FlashAttention-3 with attention sinks), which ftplan "
                "does not model; valid: eager (sdpa, transformers' default, falls back to eager for gpt-oss)")
    return None


def implementation_error(attn: str, gpu_name: str, capability: tuple) -> str | None:
    """Why `attn` cannot run on this GPU, or None. flash-attn 2 runs on sm80 and newer only (flash_api.cpp
    `mha_fwd`: "FlashAttention only supports Ampere GPUs or newer")."""
    if attn == "flash_attention_2" and tuple(capability) < (8, 0):
        return (f"attn_implementation 'flash_attention_2' needs compute capability 8.0 or newer (flash-attn 2: Ampere "
                f"or newer); {gpu_name} is sm{capability[0]}{capability[1]} (valid on it: "
                f"{', '.join(IMPLEMENTATIONS_BELOW_SM80)})")
    return None
