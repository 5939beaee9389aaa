"""Units: integer bytes and SI counts inside, conversions only at the edges.

GiB = 2**30 bytes (what `torch.cuda.max_memory_allocated() / 2**30` and `nvidia-smi` MiB/1024 show);
GB = 10**9 bytes (what datasheets and bandwidths use). Keep them apart: a name says which.
"""

from __future__ import annotations

import re

KIB = 1024
MIB = 1024**2
GIB = 1024**3
TIB = 1024**4
GB = 10**9
TB = 10**12

# Bytes per element of the dtypes a training step touches.
DTYPE_BYTES = {
    "fp32": 4,
    "float32": 4,
    "tf32": 4,
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "int64": 8,
    "int32": 4,
}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of `dtype` (`bf16`, `fp32`, ...); raises ValueError naming the valid choices."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(sorted(DTYPE_BYTES))}") from None


def to_gib(n_bytes: int | float) -> float:
    return n_bytes / GIB


def fmt_gib(n_bytes: int | float, digits: int = 2) -> str:
    """`17179869184` -> `'16.00 GiB'`."""
    return f"{n_bytes / GIB:.{digits}f} GiB"


def fmt_bytes(n_bytes: int | float) -> str:
    """Human size in binary units: `'512 B'`, `'3.1 MiB'`, `'16.0 GiB'`, `'1.02 TiB'`."""
    n = float(n_bytes)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size:
            return f"{sign}{n / size:.{2 if unit in ('TiB', 'GiB') else 1}f} {unit}"
    return f"{sign}{int(n)} B"


def fmt_count(n: int | float) -> str:
    """SI count: `6738415616` -> `'6.74B'`, `4194304` -> `'4.19M'`."""
    n = float(n)
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{int(n)}"


def fmt_hours(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} d"


_SI = {"": 1, "k": 10**3, "K": 10**3, "m": 10**6, "M": 10**6, "b": 10**9, "B": 10**9, "g": 10**9, "G": 10**9, "t": 10**12, "T": 10**12}


def parse_count(text: str | int) -> int:
    """Parse an SI token count as users write it: `50M`, `1.5B`, `200k`, `1e9`, `1_000_000`.

    Raises ValueError with the accepted forms.
    """
    if isinstance(text, int):
        return text
    s = str(text).strip().replace("_", "").replace(",", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)", s)
    if not m:
        raise ValueError(f"cannot read {text!r} as a count; write e.g. 50M, 1.5B, 200k or 1000000")
    value = float(m.group(1)) * _SI[m.group(2)]
    return int(round(value))


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n (0 stays 0)."""
    return -(-n // multiple) * multiple


# Bytes per element of the tensors the memory model tracks.
FP32, BF16, BOOL = 4, 2, 1
BLOCK_BYTES = 512  # CUDA caching allocator: every block is a multiple of 512 bytes (kMinBlockSize)


def param_bytes(numel: int, dtype_bytes: int) -> int:
    """A parameter-like tensor as the CUDA caching allocator counts it: rounded up to 512-byte blocks
    (c10/cuda/CUDACachingAllocator.cpp `round_size`, kMinBlockSize = 512)."""
    return round_up(numel * dtype_bytes, BLOCK_BYTES)
