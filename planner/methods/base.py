"""`Method`: everything ftplan knows about one fine-tuning method, in one place.

A method (one module per method in this package, registered in `planner.methods`) supplies:

- its trainable tensors (`trainable_tensors`): with the recipe's trained copies of embed_tokens / lm_head
  (`all_trainable_tensors`, `planner.modules_to_save`) the one source for parameter counts, gradients, optimizer
  state and adapter bytes;
- its ops in a layer's graph (`before_linear`, `after_linear`, `layer_prefix`, `head`, `extra_piece`): hooks that
  `planner.layers.Builder` calls with itself, so the method adds its tensors with the builder's primitives;
- its matmul FLOPs per token (`adapter_matmul_params`; its time comes from its graph ops, `planner.kernels`);
- what it combines with (`supports_grad_ckpt`, `supports_merge`, `quants`), checked by `validate`;
- its quality tier with the reason (`quality`), what `recommend` enumerates (`families`) and a default
  learning rate;
- its peft config (`peft_config`, peft imported lazily: `planner` never imports torch).

The quantization of the frozen base (`--quant none|nf4`) is not a method: see `planner.quant`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..arch import ModelArch


@dataclass(frozen=True)
class Trainable:
    """`count` trainable tensors of shape (rows, cols) with `dtype_bytes` per element (1-D tensors: rows = 1)."""

    rows: int
    cols: int
    count: int
    dtype_bytes: int

    @property
    def numel(self) -> int:
        return self.rows * self.cols


class TargetError(ValueError):
    """LoRA targets that the model does not have, or a rank larger than a targeted layer."""


class Method:
    """Base class: a method that trains nothing extra and adds no ops (override what differs)."""

    name: str = ""
    label: str = ""
    description: str = ""
    trains_base: bool = False  # the base weights are the trainable parameters (full fine-tuning)
    uses_rank: bool = False  # rank, alpha, dropout and target modules apply
    bf16_adapters: bool = False  # `Recipe.adapter_dtype="bf16"` is modelled (LoRA under a bf16 compute)
    uses_virtual_tokens: bool = False  # num_virtual_tokens applies
    supports_grad_ckpt: bool = True
    grad_ckpt_reason: str = ""
    supports_merge: bool = True  # `ftplan merge` can fold it into the base model
    supports_packing: bool = True  # `ftplan run --packing` (padding-free rows) works with it
    supports_modules_to_save: bool = False  # peft `modules_to_save` copies beside it (planner.modules_to_save)
    modules_to_save_reason: str = "not modelled with this method"
    quants: tuple = ("none",)  # base quantizations (planner.quant) it combines with
    quality_tier: float = 4.0
    quality_reason: str = ""
    default_lr: float = 2e-4
    peft_type: str | None = None  # peft's PeftType name, for runs and merges

    # -- configuration ------------------------------------------------------------------------------------------
    def validate(self, tc) -> None:
        """Raise ValueError naming the field when `tc` combines this method with something it cannot do."""
        if tc.grad_ckpt and not self.supports_grad_ckpt:
            raise ValueError(f"grad_ckpt: {self.grad_ckpt_reason}; use --no-grad-ckpt or another method")
        from ..modules_to_save import validate as validate_saved

        validate_saved(tc)

    def config_label(self, tc) -> str:
        """How a table names this configuration of the method (`LoRA r16 all-linear`)."""
        return self.label

    def efficiency_key(self, tc) -> str:
        """The throughput calibration key of `tc` (planner.cost)."""
        return tc.base_quant.key_prefix + self.name

    def quality(self, tc) -> float:
        """Lower is better: the method's tier (see `quality_reason`), before optimizer and quantization terms."""
        return self.quality_tier

    def families(self) -> list[dict]:
        """Method-level settings `recommend` enumerates (each a dict of TrainConfig fields)."""
        return [dict(method=self.name)]

    def family_label(self, fam: dict) -> str:
        return self.label

    # -- parameters ---------------------------------------------------------------------------------------------
    def trainable_tensors(self, arch: ModelArch, tc) -> list[Trainable]:
        return []

    def all_trainable_tensors(self, arch: ModelArch, tc) -> list[Trainable]:
        """The method's tensors plus the recipe's trained copies of embed_tokens / lm_head (`planner.modules_to_save`)."""
        from ..modules_to_save import saved_module_tensors

        return self.trainable_tensors(arch, tc) + saved_module_tensors(arch, tc)

    def trainable_params(self, arch: ModelArch, tc) -> int:
        """Trainable parameters as peft counts them (`get_nb_trainable_parameters()[0]`)."""
        return sum(t.numel * t.count for t in self.all_trainable_tensors(arch, tc))

    def extra_params(self, arch: ModelArch, tc) -> int:
        """Parameters the method adds to the model (peft's `all params` minus the base's)."""
        return 0 if self.trains_base else self.trainable_params(arch, tc)

    def fixed_targets_note(self, arch: ModelArch) -> str | None:
        """When the method chooses its own modules (IA3), a sentence naming them; None otherwise."""
        return None

    # -- the step's graph ---------------------------------------------------------------------------------------
    def virtual_tokens(self, tc) -> tuple[int, int]:
        """(tokens added to every sequence the layers see, keys added to every attention)."""
        return 0, 0

    def first_input_requires_grad(self) -> bool:
        """Whether the first decoder layer's input needs a gradient (trained embeddings or prompt)."""
        return self.trains_base

    def before_linear(self, b, x: int, name: str, n_in: int) -> int:
        """Ops on a linear layer's input before the base layer runs (IA3's feed-forward scaling)."""
        return x

    def after_linear(self, b, x: int, y: int, name: str, n_in: int, n_out: int) -> int:
        """Ops that turn the base layer's output `y` (input `x`) into the module's output (LoRA, IA3)."""
        return y

    def layer_prefix(self, b, arch: ModelArch, tc):
        """Per-layer key/value prefix tensors (prefix tuning), or None."""
        return None

    def head(self, b, e: int, arch: ModelArch, tc) -> int:
        """Ops after the embedding lookup (prompt tuning's virtual tokens)."""
        return e

    def extra_piece(self, arch: ModelArch, tc):
        """A piece of the step outside the layers (prefix tuning's encoder): (Graph, tensor receiving a gradient)."""
        return None

    # -- throughput ---------------------------------------------------------------------------------------------
    def adapter_matmul_params(self, arch: ModelArch, tc) -> int:
        """Weights of the method's own matmuls per token (LoRA's A and B)."""
        return 0

    # -- running ------------------------------------------------------------------------------------------------
    def peft_config(self, tc, model_type: str | None = None):
        """The peft config (None: no peft wrapper). peft is imported here, never at module level."""
        return None


class VirtualTokenMethod(Method):
    """Prefix and prompt tuning: `num_virtual_tokens` trained positions, nothing to merge into the weights, and
    rows that peft prepends to (so no packing)."""

    uses_virtual_tokens = True
    supports_merge = False  # virtual tokens are not a weight delta
    supports_packing = False  # peft prepends the virtual tokens to every row and ignores position_ids
    quality_tier = 4.0
    default_lr = 3e-2
    family_name = ""  # how recommend's tables name it
    modules_to_save_reason = "peft's prompt encoder reads the input embeddings; not modelled with trained copies"

    def validate(self, tc) -> None:
        super().validate(tc)
        n = tc.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {n!r}")

    def config_label(self, tc) -> str:
        return f"{self.label} {tc.num_virtual_tokens} tok"

    def families(self) -> list[dict]:
        return [dict(method=self.name, num_virtual_tokens=20)]

    def family_label(self, fam: dict) -> str:
        return self.family_name


def rank_label(prefix: str, tc) -> str:
    from ..config import ALL_LINEAR

    targets = ALL_LINEAR if tc.all_linear else ",".join(tc.target_modules)
    return f"{prefix} r{tc.rank} {targets}" + (" rs" if tc.use_rslora else "")
