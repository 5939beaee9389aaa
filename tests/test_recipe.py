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
    (dict(packing=True), ["recipe.packing", "not modelled", "False"]),
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
