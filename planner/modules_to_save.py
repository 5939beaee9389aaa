"""peft's `modules_to_save`: trained full copies of embed_tokens and/or lm_head beside the method's adapters.

Read from peft 0.21 (`utils/other.py`):

- `set_additional_trainable_modules` -> `_set_trainable` wraps every module whose name ends with a listed name in a
  `ModulesToSaveWrapper`; `ModulesToSaveWrapper.update` makes `copy.deepcopy(original_module)` (same dtype and
  device as the original: no cast) and freezes the original (`original_module.requires_grad_(False)`), and the
  forward runs the copy (`_forward_wrapped`). So each listed module adds one trained (V, h) tensor, its gradient
  and its optimizer state; the frozen original stays on the device.
- peft's `cast_adapter_dtype` (`tuners/tuners_utils.py`, `autocast_adapter_dtype=True`) upcasts only the adapters
  of `BaseTunerLayer`s; a `ModulesToSaveWrapper` is an `AuxiliaryTrainingWrapper`, not one, so the copy keeps the
  original's dtype: bf16 under `--precision bf16`, fp32 under mixed/fp16/fp32, fp32 on a 4-bit base after
  `prepare_model_for_kbit_training` (which runs before `get_peft_model`), bf16 without it.
- Tied embeddings (`tie_word_embeddings`, e.g. Qwen2.5-0.5B, Llama-3.2-1B): `_set_trainable` walks
  `named_modules(remove_duplicate=False)`, and the deepcopy of one tied module gives it its own weight, untied from
  the other (which stays frozen). With both listed, the two copies are independent unless the config asks for
  `ensure_weight_tying=True` (it defaults to False; `BaseTuner._check_tied_modules` warns "Model has
  `tie_word_embeddings=True` and a tied layer is part of the adapter ..."): ftplan passes peft's default, so two
  copies. The embedding's copy trains, so its output, the first decoder layer's input, needs a gradient.

Which methods take it: the methods built on peft's `BaseTuner` (LoRA, DoRA, IA3: `Method.supports_modules_to_save`; this module is
what they share, outside `planner.methods`, which holds one module per method).
Full fine-tuning trains both modules already; prefix and prompt tuning (whose prompt encoder reads the input
embeddings) are not modelled with it.
"""

from __future__ import annotations

EMBEDDING, LM_HEAD = "embed_tokens", "lm_head"


def saved_modules(tc) -> tuple:
    """The modules of `tc` that peft copies and trains (`Recipe.modules_to_save`, in `CHOICES` order)."""
    return tc.recipe.modules_to_save


def trains_embedding(tc) -> bool:
    """Whether the input embedding (or its copy) is trained: full fine-tuning, or `embed_tokens` listed."""
    return tc.spec.trains_base or EMBEDDING in tc.recipe.modules_to_save


def trains_lm_head(tc) -> bool:
    """Whether the output layer (or its copy) is trained: full fine-tuning, or `lm_head` listed."""
    return tc.spec.trains_base or LM_HEAD in tc.recipe.modules_to_save


def first_input_requires_grad(tc) -> bool:
    """Whether the first decoder layer's input needs a gradient: the method's own rule (trained embeddings,
    prompt tuning), or a trained copy of the embedding (its output is the layer's input)."""
    return tc.spec.first_input_requires_grad() or EMBEDDING in tc.recipe.modules_to_save


def copy_dtype_bytes(tc) -> int:
    """Bytes per element of a copy: the original's dtype (`copy.deepcopy`, no upcast: see the module docstring), which
    is the regime's unquantized weight dtype (`planner.layers.regime(tc).weight`)."""
    from .layers import regime

    return regime(tc).weight


def saved_module_tensors(arch, tc) -> list:
    """One trained (vocab_size, hidden_size) tensor per listed module, tied model or not (peft's default
    `ensure_weight_tying=False` gives each listed module its own copy), in the original's dtype. No bias: the
    catalog's lm_heads have none (`bias=False` in every supported family)."""
    from .methods.base import Trainable  # (planner.methods imports this module)

    dt = copy_dtype_bytes(tc)
    return [Trainable(arch.vocab_size, arch.hidden_size, 1, dt) for _ in saved_modules(tc)]


def validate(tc) -> None:
    """Raise ValueError naming `recipe.modules_to_save` when `tc` combines it with what is not modelled."""
    mts = saved_modules(tc)
    if not mts:
        return
    spec = tc.spec
    if not spec.supports_modules_to_save:
        raise ValueError(f"recipe.modules_to_save is not valid with method {tc.method_name}: "
                         f"{spec.modules_to_save_reason} (valid methods: lora, qlora, dora, qdora, ia3)")
    if tc.num_gpus > 1:
        raise ValueError("recipe.modules_to_save is modelled on one GPU (how the strategies shard the copies is not "
                         "modelled yet; valid with modules_to_save: num_gpus 1)")
    if tc.recipe.adapter_dtype == "bf16" and tc.base_quant.quantized and tc.recipe.kbit_preparation:
        # TRL's cast would turn the fp32 copies bf16 while the k-bit-prepared residual stream stays fp32
        raise ValueError("recipe.modules_to_save with adapter_dtype 'bf16' on a k-bit-prepared 4-bit base is not "
                         "modelled (bf16 copies in an fp32 residual stream); valid: adapter_dtype fp32, or --no-kbit-prep")


def peft_kwargs(tc) -> dict:
    """The `modules_to_save` argument of the peft config (None when empty: peft's default)."""
    mts = saved_modules(tc)
    return {"modules_to_save": list(mts)} if mts else {}
