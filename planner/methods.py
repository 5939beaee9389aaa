"""Fine-tuning methods: what each trains, how many parameters, and how they rank.

Adding a method is an entry in `METHODS` plus its trainable-parameter function and a test row. The counts
equal peft's `get_nb_trainable_parameters()` exactly (tests/test_methods_peft.py checks every method against
real peft on tiny models).
"""

from __future__ import annotations

from dataclasses import dataclass

from .arch import ModelArch
from .config import ALL_LINEAR, TrainConfig


@dataclass(frozen=True)
class MethodSpec:
    """Args:
    name: the `--method` value.
    label: how tables print it.
    description: one line for listings.

    How methods rank on quality is `planner.recommend.quality_score` (a stated heuristic with its sources).
    """

    name: str
    label: str
    description: str


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec("full", "Full FT", "all weights trained"),
        MethodSpec("lora", "LoRA", "low-rank adapters on linear layers, base frozen"),
        MethodSpec("qlora", "QLoRA", "LoRA over a 4-bit NF4 base (double quantization), bf16 compute"),
        MethodSpec("ia3", "IA3", "learned scaling vectors on k/v (or q/v) and the MLP down projection"),
        MethodSpec("prefix", "Prefix", "trained key/value prefix in every layer"),
        MethodSpec("prompt", "Prompt", "trained virtual-token embeddings before the input"),
    )
}

# peft's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / _FEEDFORWARD_MODULES_MAPPING (peft 0.21
# utils/constants.py). Phi-3 has no entry in peft; ftplan passes its fused equivalents explicitly.
IA3_TARGETS = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen3": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "phi3": (("qkv_proj", "down_proj"), ("down_proj",)),
}


def method_label(tc: TrainConfig) -> str:
    spec = METHODS[tc.method]
    if tc.method in ("lora", "qlora"):
        targets = ALL_LINEAR if tc.all_linear else ",".join(tc.target_modules)
        return f"{spec.label} r{tc.rank} {targets}"
    if tc.method in ("prefix", "prompt"):
        return f"{spec.label} {tc.num_virtual_tokens} tok"
    return spec.label


class TargetError(ValueError):
    """LoRA targets that the model does not have, or a rank larger than a targeted layer."""


def lora_targets(arch: ModelArch, tc: TrainConfig) -> tuple:
    """The `Linear`s of one decoder layer that LoRA adapts. `all-linear` is every linear layer of the decoder
    (peft excludes the output layer, lm_head). Unknown names raise TargetError listing the valid ones."""
    if tc.all_linear:
        return arch.linears
    names = set(arch.linear_names)
    missing = [t for t in tc.target_modules if t not in names]
    if missing:
        raise TargetError(
            f"target_modules {', '.join(missing)} not in {arch.name}; valid: {', '.join(arch.linear_names)}, all-linear"
        )
    targets = tuple(lin for lin in arch.linears if lin.name in tc.target_modules)
    for lin in targets:
        if tc.rank > min(lin.in_features, lin.out_features):
            raise TargetError(
                f"rank {tc.rank} exceeds {lin.name} ({lin.in_features} x {lin.out_features}); "
                f"valid: 1..{min(lin.in_features, lin.out_features)}"
            )
    return targets


def ia3_targets(arch: ModelArch) -> tuple[tuple, tuple]:
    """(targeted Linears, names treated as feed-forward) of IA3 with peft's defaults for the family."""
    targets, ff = IA3_TARGETS[arch.model_type]
    return tuple(lin for lin in arch.linears if lin.name in targets), ff


def lora_params(arch: ModelArch, tc: TrainConfig) -> int:
    """r x (in + out) per adapted linear (lora_A: in -> r, lora_B: r -> out, no bias), times layers.

    Llama-2-7b, r=8 on q_proj,v_proj: 32 x 2 x 8 x (4096 + 4096) = 4,194,304 (peft's README example)."""
    if tc.all_linear:
        targets = arch.linears
    else:
        targets = lora_targets(arch, tc)
    return arch.num_layers * sum(tc.rank * (lin.in_features + lin.out_features) for lin in targets)


def prefix_params(arch: ModelArch, tc: TrainConfig) -> int:
    """num_virtual_tokens x layers x 2 (key, value) x num_key_value_heads x head_dim: peft's PrefixEncoder
    without projection, whose token_dim is the KV width for GQA models (peft utils/other.py, #1901)."""
    return tc.num_virtual_tokens * arch.num_layers * 2 * arch.kv_dim


def prompt_params(arch: ModelArch, tc: TrainConfig) -> int:
    """num_virtual_tokens x hidden_size: peft's PromptEmbedding."""
    return tc.num_virtual_tokens * arch.hidden_size


def ia3_params(arch: ModelArch) -> int:
    """Per layer, one vector per targeted linear: out_features for attention projections (scales the output),
    in_features for the feed-forward one (scales the input); peft IA3Layer.update_layer."""
    targets, ff = ia3_targets(arch)
    return arch.num_layers * sum(lin.in_features if lin.name in ff else lin.out_features for lin in targets)


def trainable_params(arch: ModelArch, tc: TrainConfig) -> int:
    """Trainable parameters as peft counts them (`get_nb_trainable_parameters()[0]`)."""
    if tc.method == "full":
        return arch.total_params
    if tc.method in ("lora", "qlora"):
        return lora_params(arch, tc)
    if tc.method == "prefix":
        return prefix_params(arch, tc)
    if tc.method == "prompt":
        return prompt_params(arch, tc)
    if tc.method == "ia3":
        return ia3_params(arch)
    raise ValueError(f"unknown method {tc.method!r}")


def total_params(arch: ModelArch, tc: TrainConfig) -> int:
    """All parameters of the trained model, adapters included (peft's `all params`; 4-bit weights counted as
    their unquantized elements)."""
    return arch.total_params + (0 if tc.method == "full" else trainable_params(arch, tc))
