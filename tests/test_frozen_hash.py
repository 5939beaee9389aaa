"""The planner hashes TrainConfig and ModelArch once (planner.frozen): equal objects must still hash equal, including
configurations that __post_init__ normalizes, and the hash must follow every compared field."""

from dataclasses import fields, replace

from planner.config import TrainConfig
from planner.profiles import load_model
from planner.recipe import Recipe


def test_normalized_configs_hash_as_the_configs_they_equal():
    pairs = [
        (TrainConfig(num_gpus=1, strategy="fsdp"), TrainConfig()),  # one GPU: the strategy becomes ddp
        (TrainConfig(method="qlora"), TrainConfig(method="lora", quant="nf4")),  # the alias
        (TrainConfig(recipe={"loss": "chunked"}), TrainConfig(recipe=Recipe(loss="chunked"))),
        (TrainConfig(extra={"note": 1}), TrainConfig()),  # extra is neither compared nor hashed
    ]
    for a, b in pairs:
        assert a == b and hash(a) == hash(b)
        assert len({a, b}) == 1


def test_the_hash_follows_every_hashed_field():
    base = TrainConfig(method="lora", num_gpus=2, strategy="fsdp")
    changed = dict(rank=8, seq_len=4096, batch_size=4, grad_ckpt=True, optimizer="adamw8bit", num_gpus=4,
                   strategy="zero3", target_modules=("all-linear",), recipe=Recipe(loss="liger"))
    assert set(changed) <= {f.name for f in fields(TrainConfig)}
    for name, value in changed.items():
        other = replace(base, **{name: value})
        assert other != base and hash(other) != hash(base), name


def test_model_arch_hash_ignores_only_what_dataclass_ignores():
    a = load_model("llama-3.1-8b")
    assert hash(replace(a)) == hash(a) and replace(a) == a
    assert hash(replace(a, config={"x": 1})) == hash(a)  # config: not hashed
    assert hash(replace(a, hidden_size=4608)) != hash(a)
