"""`Recipe`: how the training step is run, one value that the analytic model, the trace and `ftplan run` all read.

A `TrainConfig` says what is trained (method, rank, batch, precision...); its `recipe` says how the step runs:
which attention implementation transformers is asked for, which loss computes the cross-entropy, whether rows are
packed, whether saved activations are offloaded, and what the trainer does to a quantized base. `Recipe.REFERENCE`
is the step ftplan has always modelled and measured (`trainer/recipe.py`, README "The memory model"):

- `attn_implementation="sdpa"`: transformers' default; `F.scaled_dot_product_attention` with CUDA's kernels;
- `loss="plain"`: transformers' `ForCausalLMLoss` (logits upcast to fp32, `cross_entropy`); also chunked, liger, cce;
- `packing=False`: every row is one full-length sequence;
- `padding="none"`: no row is padded, so no attention mask reaches the model;
- `activation_offload=False`: saved tensors stay on the GPU (True: TRL's activation offloading);
- `offload_checkpoints=False`: with gradient checkpointing, each layer's input stays on the GPU;
- `kbit_preparation=True`: peft's `prepare_model_for_kbit_training` on a 4-bit base (fp32 embeddings, norms, head);
- `modules_to_save=()`: no trained copies of embed_tokens / lm_head beside the adapters.

Readers: `planner.layers` (attention, loss, the quantized regime, trained embedding / lm_head copies),
`planner.memory` (the k-bit preparation event, activation offloading through `planner.graph.Offload`),
`planner.modules_to_save` (the copies' tensors), `trainer.recipe` (`attn_implementation` when building the
model, the k-bit preparation), `trainer.step` (TRL's offloading context, trainer/offload.py) and so the trace. A value
is accepted here only once all three model it; the others are named with what is supported, so a recipe ftplan
cannot predict is an error, never a silent guess. Adding an option: a field here, its effect in each reader, and
its values in `MODELLED`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

# every value a field may name (what the libraries offer), and the ones ftplan models today
CHOICES = {
    "attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "loss": ("plain", "chunked", "liger", "cce"),
    "adapter_dtype": ("fp32", "bf16"),
    "padding": ("none", "longest"),
    "modules_to_save": ("embed_tokens", "lm_head"),  # a tuple field: each element one of these
}
MODELLED = {
    "attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "loss": ("plain", "chunked", "liger", "cce"),
    "packing": (False, True),
    "activation_offload": (False, True),
    "offload_checkpoints": (False, True),
    "kbit_preparation": (True, False),
    "adapter_dtype": ("fp32", "bf16"),
    "padding": ("none", "longest"),
    "modules_to_save": ("embed_tokens", "lm_head"),
}
TUPLE_FIELDS = ("modules_to_save",)  # fields holding a set of CHOICES, kept as a tuple in CHOICES' order


@dataclass(frozen=True)
class Recipe:
    """Args:
    attn_implementation: transformers' `attn_implementation`: sdpa (the kernel torch selects, planner.attention) or
        eager (transformers' matmul-softmax-matmul, planner.layers `Builder.eager`) or flash_attention_2 (flash-attn
        2, sm80 and newer; bf16 or mixed precision, or a quantized base).
    loss: plain `ForCausalLMLoss`; chunked (TRL 1.16's fused LM head, SFTTrainer's nll), liger (Liger's fused linear
        cross-entropy), cce (Cut Cross-Entropy as Axolotl loads it): trainer/losses.py, `planner.layers.LOSSES`.
    packing: padding-free rows: each row concatenates examples, `position_ids` restart at 0 at each one and no
        attention mask is passed (`ftplan run --packing`, TRL padding_free / packing bfd, Axolotl sample_packing,
        LLaMA-Factory neat_packing). transformers 5.17 builds from the position ids a block-diagonal bool mask for
        sdpa (`masking_utils.find_packed_sequence_indices`), an additive one for eager, and for flash_attention_2
        runs flash-attn's varlen kernel (`_is_packed_sequence`: one row per micro-batch only); the batch passes
        `use_cache=False` (with a KV cache transformers skips the detection).
    padding: "none": rows are full length and unpadded (the reference; calibrate's synthetic batches); "longest":
        each micro-batch is right-padded to its longest row and its `attention_mask` has zeros (TRL's default
        collator, Axolotl and LLaMA-Factory without packing, `ftplan run` on data of varied lengths). The worst
        batch is predicted: rows of `seq_len` tokens with a padded position, so transformers builds the padding
        mask (a bool (B, 1, S, S) mask for sdpa, the additive one for eager).
    activation_offload: TRL's activation offloading (`SFTConfig.activation_offloading`, Axolotl's
        `activation_offloading: true`; trl 1.16.0 `get_act_offloading_ctx_manager` with its defaults): saved tensors
        of 1 KiB and more that are not parameters go to pinned host memory, the last few offloaded stay on the GPU
        in its forward stash, and backward copies each back when its node runs (`planner.graph.Offload`); the
        lm_head's own saved tensors stay (`NoOpManager`). Under gradient checkpointing its hooks see only each
        checkpoint's saved input (and the embedding's and the loss's tensors); with `offload_checkpoints` too,
        transformers' save_on_cpu takes those inputs (its hooks are entered inside TRL's, around each checkpoint).
    offload_checkpoints: with gradient checkpointing, each checkpointed layer's input in pinned host memory
        (transformers' `gradient_checkpointing_enable(offload=True)`: `save_on_cpu(pin_memory=True)` around each
        checkpoint, as Unsloth's and Axolotl's offloaded checkpointing do); needs `grad_ckpt`.
    kbit_preparation: `peft.prepare_model_for_kbit_training` on a quantized base (True, as Axolotl; False as TRL and
        LLaMA-Factory: non-quantized parameters and the residual stream stay bf16).
    adapter_dtype: fp32 (peft's `autocast_adapter_dtype=True`) or bf16 (TRL casts a quantized model's trainable
        parameters to bf16 after `get_peft_model`: trl f2cd577 sft_trainer.py); bf16 is modelled for LoRA under a
        bf16 compute (bf16, QLoRA).
    modules_to_save: peft's `modules_to_save` (`--modules-to-save embed_tokens,lm_head`): a trained full copy of
        each named module beside the adapters, the original frozen (peft 0.21 `utils/other.py`
        `ModulesToSaveWrapper`; `planner.modules_to_save`). Given as a tuple, a list or a comma string; kept as a
        tuple in `CHOICES` order without repeats.
    """

    attn_implementation: str = "sdpa"
    loss: str = "plain"
    packing: bool = False
    activation_offload: bool = False
    offload_checkpoints: bool = False
    kbit_preparation: bool = True
    adapter_dtype: str = "fp32"
    padding: str = "none"
    modules_to_save: tuple = ()

    REFERENCE: ClassVar["Recipe"]

    def __post_init__(self) -> None:
        for name in TUPLE_FIELDS:
            object.__setattr__(self, name, _choice_set(name, getattr(self, name)))
        for f in fields(self):
            if f.name in TUPLE_FIELDS:
                continue
            v = getattr(self, f.name)
            valid = CHOICES.get(f.name, (False, True))
            if v not in valid or (isinstance(v, bool) != (str(f.type) == "bool")):
                raise ValueError(f"recipe.{f.name} must be one of {', '.join(map(str, valid))}; got {v!r}")
            if v not in MODELLED[f.name]:
                raise ValueError(f"recipe.{f.name} = {v!r} is not modelled yet (modelled: "
                                 f"{', '.join(map(str, MODELLED[f.name]))}); the prediction would be a guess")
        if self.packing and self.padding != "none":
            raise ValueError(f"recipe.padding {self.padding!r} is not valid with recipe.packing: packed rows are "
                             "padding-free (position ids, no attention mask); valid with packing: none")

    @property
    def is_reference(self) -> bool:
        return self == Recipe.REFERENCE

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in TUPLE_FIELDS:  # plain lists, as plan files and JSON write them; empty: left out (files as before)
            if d[name]:
                d[name] = list(d[name])
            else:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """From a plain dict (a plan file's `recipe` table); unknown keys are an error naming the valid ones."""
        if isinstance(d, Recipe):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"recipe must be a table of {', '.join(f.name for f in fields(cls))}; got {d!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown recipe field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**d)


def _choice_set(name: str, value) -> tuple:
    """A tuple field's value (a tuple, a list or a comma string) as a tuple of `CHOICES[name]` in their order,
    without repeats; an unknown element is an error naming the valid ones."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise ValueError(f"recipe.{name} must be a list of {', '.join(CHOICES[name])} (or empty); got {value!r}")
    items = [v for v in items if v]
    unknown = [v for v in items if v not in CHOICES[name]]
    if unknown:
        raise ValueError(f"recipe.{name}: unknown module(s) {', '.join(unknown)}; valid: {', '.join(CHOICES[name])}")
    missing = [v for v in items if v not in MODELLED[name]]
    if missing:
        raise ValueError(f"recipe.{name} = {', '.join(missing)} is not modelled yet (modelled: "
                         f"{', '.join(MODELLED[name])}); the prediction would be a guess")
    return tuple(v for v in CHOICES[name] if v in items)


Recipe.REFERENCE = Recipe()
