"""Layer kinds: every decoder layer's attention window and norms as data (`planner.layerkinds`), and the memory
model summing one replay per distinct kind."""

import random

import pytest

from planner.arch import ArchError, arch_from_config
from planner.config import TrainConfig
from planner.layerkinds import LayerKind
from planner.memory import _backward_candidates, estimate_memory
from planner.profiles import load_model

WINDOW = 1024


def _gemma(layer_types=None, layers=24, **extra):
    c = dict(load_model("gemma-2-2b").config, model_type="gemma2", num_hidden_layers=layers, sliding_window=WINDOW)
    if layer_types is not None:
        c["layer_types"] = layer_types
    return arch_from_config(dict(c, **extra), name="synthetic")


def _five_to_one(layers=24):
    """Gemma-3's pattern: five sliding layers, then one full-attention layer."""
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]


def test_kinds_compare_by_value_and_count_per_kind():
    a = LayerKind("gqa", WINDOW, post_attention_norm=True, post_feedforward_norm=True)
    assert a == LayerKind("gqa", WINDOW, post_attention_norm=True, post_feedforward_norm=True)
    assert a != LayerKind("gqa", None, post_attention_norm=True, post_feedforward_norm=True)
    assert len({a, LayerKind("gqa", WINDOW, post_attention_norm=True, post_feedforward_norm=True)}) == 1
    assert a.norms == 4 and LayerKind().norms == 2
    assert a.masked(WINDOW) and not a.masked(WINDOW - 1) and not LayerKind().masked(10**9)
    # the replay of a sliding layer below its window is the full-attention layer's
    assert a.replay_key(WINDOW - 1) == (LayerKind("gqa", None, "dense", True, True), False)
    assert a.replay_key(WINDOW) == (LayerKind("gqa", None, "dense", True, True), True)

    arch = _gemma(_five_to_one())
    (k1, n1), (k2, n2) = arch.kind_counts
    assert (k1.window, n1, k2.window, n2) == (WINDOW, 20, None, 4)
    assert arch.layer_kinds[0] is arch.layer_kinds[4]  # equal kinds are one object
    assert [i for i, k in enumerate(arch.layer_kinds) if k.window is None] == [5, 11, 17, 23]


def test_gemma2_default_pattern_is_transformers_layer_types():
    """Gemma2Config: `"sliding_attention" if (i + 1) % 2 else "full_attention"`: even layers slide."""
    arch = load_model("gemma-2-2b")
    assert [k.window for k in arch.layer_kinds[:4]] == [4096, None, 4096, None]
    assert arch.norms_per_layer == 4 and not arch.qk_norm and arch.sliding_window == 4096
    assert arch.masked_layers(4095) == 0 and arch.masked_layers(4096) == 13
    explicit = _gemma(["sliding_attention", "full_attention"] * 13, layers=26, sliding_window=4096)
    assert explicit.layer_kinds == arch.layer_kinds


def test_five_to_one_pattern_masks_its_local_layers_and_sits_between_all_global_and_all_local():
    five = _gemma(_five_to_one())
    local = _gemma(["sliding_attention"] * 24)
    glob = _gemma(["full_attention"] * 24)
    assert (five.masked_layers(WINDOW), local.masked_layers(WINDOW), glob.masked_layers(WINDOW)) == (20, 24, 0)
    assert five.masked_layers(WINDOW - 1) == 0
    assert five.total_params == local.total_params == glob.total_params
    # equal hashes (layer kinds are not hashed) but unequal archs: the replay caches keep them apart
    assert hash(five) == hash(local) and five != local
    for tc in (TrainConfig(method="lora", seq_len=2048, batch_size=2),
               TrainConfig(method="full", seq_len=2048, batch_size=2), TrainConfig(method="prompt", seq_len=2048)):
        peaks = [estimate_memory(a, tc).peak_allocated_bytes for a in (glob, five, local)]
        assert peaks[0] < peaks[1] < peaks[2], peaks
        # below the window every layer is full attention: the three are the same model
        short = tc.replace(seq_len=WINDOW // 2)
        assert len({estimate_memory(a, short).peak_allocated_bytes for a in (glob, five, local)}) == 1


def test_a_global_layer_of_a_long_pattern_has_its_backward_event():
    est = estimate_memory(_gemma(_five_to_one()), TrainConfig(method="lora", seq_len=2048))
    # period 6: layers 1..6 and the last six (18..23); layer 5 is the first full-attention layer
    names = {f"layer {i} backward" for i in range(1, 7)} | {f"layer {i} backward" for i in range(18, 23)}
    assert names | {"first layer backward", "last layer backward"} == {n for n in est.events if "backward" in n
                                                                        and n.startswith(("layer", "first", "last"))}


@pytest.mark.parametrize("pattern", [[0], [0, 1], [0, 0, 0, 0, 0, 1], [0, 1, 1], None])
def test_backward_candidates_hold_the_worst_layer_of_every_pattern(pattern):
    """`_backward_candidates` keeps the layers where kept(<i) + held(>i) + grads(>i) + own peak is highest, for
    any per-kind sizes: checked against every layer on random sizes."""
    rng = random.Random(len(pattern or ()))
    for L in (1, 2, 3, 7, 26, 40):
        if pattern is None:  # Qwen2's max_window_layers: a full block, then a sliding block (no short period)
            keys = ["first"] + [1 if i >= L // 3 else 0 for i in range(1, L)]
        else:
            keys = ["first"] + [pattern[(i - 1) % len(pattern)] for i in range(1, L)]
        cands = _backward_candidates(keys)
        for _ in range(50):
            size = {k: [rng.randint(0, 1000) for _ in range(4)] for k in set(keys)}  # kept, held, grads, peak

            def live(i):
                return (sum(size[keys[j]][0] for j in range(i)) + sum(size[keys[j]][1] + size[keys[j]][2]
                        for j in range(i + 1, L)) + size[keys[i]][3])

            assert max(live(i) for i in cands) == max(live(i) for i in range(L)), (L, keys)


def test_qwen2_slides_from_max_window_layers_only_with_use_sliding_window():
    """Qwen2Config: `sliding_window` is None unless use_sliding_window; layer_types default to sliding for
    `i >= max_window_layers`."""
    c = dict(load_model("qwen2.5-0.5b").config, model_type="qwen2")
    assert load_model("qwen2.5-0.5b").masked_layers(10**6) == 0
    arch = arch_from_config(dict(c, use_sliding_window=True, sliding_window=2048, max_window_layers=10))
    assert [k.window for k in arch.layer_kinds] == [None] * 10 + [2048] * 14
    assert arch.masked_layers(2048) == 14
    q3 = arch_from_config(dict(c, model_type="qwen3", use_sliding_window=True, sliding_window=2048, max_window_layers=10))
    assert q3.masked_layers(2048) == 14 and q3.qk_norm


def test_mistral_and_phi3_slide_in_every_layer_and_ignore_layer_types():
    c = dict(load_model("mistral-7b").config, model_type="mistral", sliding_window=4096)
    c.pop("null_keys", None)
    arch = arch_from_config(dict(c, layer_types=["full_attention"] * 32))  # MistralConfig warns and ignores it
    assert arch.masked_layers(4096) == 32
    assert load_model("mistral-7b").masked_layers(10**6) == 0  # v0.3: sliding_window null
    phi = load_model("phi-3-mini")
    assert phi.masked_layers(2047) == 32 and phi.fused_qkv and phi.sliding_window == 2047


@pytest.mark.parametrize("layer_types, error", [
    (["full_attention"] * 3, "must be a list of num_hidden_layers (24)"),
    (["chunked_attention"] * 24, "'chunked_attention' is not modelled; valid: full_attention, sliding_attention"),
    ("sliding_attention", "must be a list"),
])
def test_bad_layer_types_name_the_field_and_the_choices(layer_types, error):
    with pytest.raises(ArchError, match="layer_types") as e:
        _gemma(layer_types)
    assert error in str(e.value)


@pytest.mark.slow
def test_the_traced_transformers_step_agrees_on_a_five_to_one_pattern():
    """The real Gemma2 model with a 5:1 `layer_types` on fake tensors (`calibrate.trace`) against the model."""
    pytest.importorskip("torch")
    from calibrate.trace import trace_step
    from planner.memory import cuda_workspace_bytes

    c = dict(load_model("gemma-2-2b").config, model_type="gemma2", num_hidden_layers=6, hidden_size=128,
             intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
             sliding_window=64, layer_types=_five_to_one(6))
    tc = TrainConfig(method="full", seq_len=128, batch_size=2)
    t = trace_step(c, tc, cuda_workspace_bytes=cuda_workspace_bytes(None))
    a = estimate_memory(arch_from_config(c), tc)
    assert arch_from_config(c).masked_layers(128) == 5
    assert abs(a.peak_allocated_bytes - t.peak_allocated_bytes) / t.peak_allocated_bytes < 0.005
