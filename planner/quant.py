"""How the frozen base weights are stored: `--quant none|nf4`. A setting of its own, not a method.

`nf4` is bitsandbytes' 4-bit NormalFloat with double quantization and bf16 compute, as QLoRA loads it
(`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=torch.bfloat16)`), followed by peft's `prepare_model_for_kbit_training`. Any method whose
`quants` lists `nf4` runs over it: LoRA (QLoRA) and DoRA (QDoRA). An 8-bit base would be one more entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .units import FP32, param_bytes


@dataclass(frozen=True)
class BaseQuant:
    """Args:
    name: the `--quant` value.
    quantized: the decoder's linear weights are stored quantized (frozen) and dequantized per matmul.
    label_prefix: prepended to a method's label (`Q` + `LoRA`).
    key_prefix: prepended to a method's throughput-calibration key (`lora` -> `qlora`).
    precision_label: what tables print in the precision column.
    quality_penalty: added to the quality score (QLoRA paper arXiv:2305.14314: 4-bit NF4 matches 16-bit LoRA
        on its benchmarks; +0.3 states the residual doubt).
    description: one line for listings.
    """

    name: str
    quantized: bool
    label_prefix: str
    key_prefix: str
    precision_label: str
    quality_penalty: float
    description: str

    def linear_bytes(self, numel: int) -> dict[str, int]:
        """Device bytes of one quantized linear weight of `numel` elements, by breakdown term."""
        if self.name == "nf4":
            return nf4_linear_bytes(numel)
        raise ValueError(f"{self.name} does not quantize")


QUANTS: dict[str, BaseQuant] = {
    q.name: q
    for q in (
        BaseQuant("none", False, "", "", "", 0.0, "base weights in the precision's dtype"),
        BaseQuant("nf4", True, "Q", "q", "nf4+bf16", 0.3,
                  "4-bit NF4 base with double quantization, bf16 compute (bitsandbytes), k-bit prepared (peft)"),
    )
}


def get_quant(name: str) -> BaseQuant:
    try:
        return QUANTS[name]
    except KeyError:
        raise ValueError(f"quant must be one of {', '.join(QUANTS)}; got {name!r}") from None


def nf4_linear_bytes(numel: int) -> dict[str, int]:
    """One bitsandbytes NF4 weight with double quantization (blocksize 64; absmax quantized to 8 bits in blocks
    of 256 with an fp32 scale per block, its 256-entry fp32 code and an fp32 offset; the 16-entry NF4 code):
    `numel/2` bytes of packed weight plus ~`numel/64` bytes of constants (bitsandbytes `quantize_4bit`,
    QLoRA paper arXiv:2305.14314 Sec. 3: 0.127 bits per parameter of constants instead of 0.5)."""
    blocks = -(-numel // 64)
    return {
        "weights": param_bytes((numel + 1) // 2, 1),
        "quant_constants": param_bytes(blocks, 1)
        + param_bytes(-(-blocks // 256), FP32)
        + param_bytes(256, FP32)
        + param_bytes(1, FP32)
        + param_bytes(16, FP32),
    }
