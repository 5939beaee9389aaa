"""`Recipe`: one value read by the analytic model, the trace and the trainer; the reference recipe is the default
and invisible in files; a recipe ftplan cannot predict is refused, naming the field."""

import pytest

from planner.config import TrainConfig
from planner.recipe import Recipe


def test_the_reference_recipe_is_the_default_and_files_do_not_change():
    tc = TrainConfig()
    assert tc.recipe is Recipe.REFERENCE and tc.recipe.is_reference
    assert "recipe" not in tc.to_dict()
    assert TrainConfig.from_dict({**tc.to_dict(), "recipe": Recipe.REFERENCE.to_dict()}) == tc


@pytest.mark.parametrize("kw, words", [
    (dict(packing=True, padding="longest"), ["recipe.padding", "recipe.packing", "valid with packing: none"]),
    (dict(padding="max_length"), ["recipe.padding", "must be one of", "none, longest"]),
    (dict(attn_implementation="flash"), ["recipe.attn_implementation", "must be one of", "flash_attention_2"]),
    (dict(packing="yes"), ["recipe.packing", "must be one of"]),
])
def test_what_ftplan_cannot_predict_is_refused_naming_the_field(kw, words):
    with pytest.raises(ValueError) as e:
        Recipe(**kw)
    assert all(w in str(e.value) for w in words)
    with pytest.raises(ValueError, match="unknown recipe field"):
        TrainConfig.from_dict({"recipe": {"loss_impl": "plain"}})


def test_the_trainer_and_the_analytic_model_read_the_same_recipe():
    """eager attention: the trainer builds what the recipe names, and the analytic model prices it (eager keeps
    the fp32 probabilities and their cast copy, far more than sdpa's flash kernel)."""
    torch = pytest.importorskip("torch")
    from planner.memory import estimate_memory
    from planner.profiles import load_model
    from trainer import recipe as trainer_recipe

    tc = TrainConfig(method="lora", recipe=Recipe(attn_implementation="eager"), seq_len=64)
    config = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    with torch.device("meta"):
        model = trainer_recipe.build_model(config, tc, device="meta")
    assert model.config._attn_implementation == "eager"
    arch = load_model("llama-3.2-1b")
    long = tc.replace(seq_len=2048)
    assert estimate_memory(arch, long).peak_allocated_bytes > estimate_memory(arch, long.replace(recipe=Recipe())).peak_allocated_bytes


@pytest.mark.parametrize("kw, words", [
    (dict(method="prefix", recipe=Recipe(packing=True)), ["recipe.packing", "'prefix'", "position_ids", "lora"]),
    (dict(method="prompt", recipe=Recipe(packing=True)), ["recipe.packing", "'prompt'", "valid with packing"]),
    (dict(method="prompt", recipe=Recipe(padding="longest")), ["recipe.padding", "'prompt'", "valid here: none"]),
    (dict(method="lora", batch_size=2, recipe=Recipe(packing=True, attn_implementation="flash_attention_2")),
     ["batch_size 2", "recipe.packing", "one row per micro-batch", "batch_size 1"]),
])
def test_a_shape_of_data_a_method_or_kernel_cannot_run_is_refused(kw, words):
    """Packing with prefix/prompt tuning (peft prepends virtual tokens and ignores position_ids), padding with
    them (not modelled), and flash-attn's packed rows beyond one row per micro-batch (transformers 5.17
    `_is_packed_sequence`): each named with what is valid."""
    with pytest.raises(ValueError) as e:
        TrainConfig(**kw)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_packing_and_padding_are_priced_and_the_reference_is_unchanged():
    """sdpa with a packed or padded batch: a (B, 1, S, S) bool mask, the mem-efficient kernel's bias and keys and
    values copied to every head (no `enable_gqa` with a mask), so more memory than the reference's causal flash
    call at a long sequence; the reference recipe is still the default and invisible in files."""
    from planner.memory import estimate_memory
    from planner.profiles import load_model

    arch = load_model("llama-3.2-1b")
    tc = TrainConfig(method="lora", seq_len=4096, batch_size=2, grad_ckpt=True)
    ref = estimate_memory(arch, tc).peak_allocated_bytes
    for r in (Recipe(packing=True), Recipe(padding="longest")):
        assert estimate_memory(arch, tc.replace(recipe=r)).peak_allocated_bytes > ref + 2 * 4096 * 4096
        assert TrainConfig.from_dict(tc.replace(recipe=r).to_dict()).recipe == r
    assert "recipe" not in tc.to_dict()
