"""ZeRO model states against DeepSpeed's own estimators (DeepSpeed 38327e07f6cd39b63418f60cedd1651b0be3e7c3,
deepspeed/runtime/zero/stage_1_and_2.py `estimate_zero2_model_states_mem_needs` and stage3.py
`estimate_zero3_model_states_mem_needs` with `model_to_params`), within 3 %: full fine-tuning, bf16, AdamW, as
`ftplan run` configures DeepSpeed (bf16.enabled). deepspeed is not a dependency; the oracles below follow those
functions line by line (GPU side; the CPU side carries their 1.5 buffer factor, a margin, not a prediction). When
deepspeed is importable the real functions are called too."""

from __future__ import annotations

import pytest

from planner.config import TrainConfig
from planner.memory import _static_terms
from planner.profiles import load_model


def ds_zero2_gpu_bytes(total_params: int, num_gpus: int, cpu_offload: bool) -> int:
    """stage_1_and_2.py L2436-2444: offload 2P; else 2P + int(18P / N)."""
    if cpu_offload:
        return 2 * total_params
    return 2 * total_params + int(18 * total_params / num_gpus)


def ds_zero3_gpu_bytes(total_params: int, largest_layer_params: int, num_gpus: int, cpu_offload: bool,
                       cpu_offload_params: bool) -> int:
    """stage3.py L3017-3038: 4 x largest layer; + int(2P / N) offloading the optimizer only; + int(18P / N)
    without offload."""
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        if cpu_offload_params:
            return largest_layer_memory
        return largest_layer_memory + int(2 * total_params / num_gpus)
    return largest_layer_memory + int(18 * total_params / num_gpus)


def largest_module_params(arch) -> int:
    """stage3.py `model_to_params`: the largest module's own parameters (recurse=False): the embedding, an untied
    lm_head or the largest linear."""
    return max(arch.embedding_params, arch.lm_head_params, max(lin.params for lin in arch.linears))


def model_states(arch, tc) -> int:
    """ftplan's per-device model states as DeepSpeed's estimators count them: weights, gradients (as held at the
    step), optimizer state (fp32 master + AdamW) and the step's fp32 gradient partition. ZeRO-3's gradients are
    its preallocated partition (`zero3_gradient_partition`, in `sharding_buffers`). Not its gathered parameters:
    the estimator's 4 x largest layer is the first step's; the engine keeps more from the second on
    (`zero3_kept_params`, held to the real engine by tests/test_trace_zero.py)."""
    from planner.strategies.zero import zero3_gradient_partition

    static, grads, opt_temp, _offload, _notes, _paged, _params = _static_terms(arch, tc, 0)
    P = tc.spec.trainable_params(arch, tc)
    fp32_grads = -(-4 * P // tc.num_gpus) if not tc.cpu_offload else 0
    if tc.strategy == "zero3":
        grads = zero3_gradient_partition(arch, tc, 2 * P)
    return static["weights"] + static["optimizer_state"] + grads + fp32_grads


CASES = [(m, n) for m in ("llama-3.1-8b", "qwen2.5-7b", "llama-3.2-1b") for n in (2, 8, 64)]


@pytest.mark.parametrize("model,n", CASES)
def test_zero2_model_states_match_deepspeed(model, n):
    arch = load_model(model)
    tc = TrainConfig(method="full", precision="bf16", num_gpus=n, strategy="zero2")
    expect = ds_zero2_gpu_bytes(arch.total_params, n, cpu_offload=False)
    assert model_states(arch, tc) == pytest.approx(expect, rel=0.03)


@pytest.mark.parametrize("model,n", CASES)
def test_zero3_model_states_match_deepspeed(model, n):
    """DeepSpeed's 18P/N, plus the bf16 gradient partition its estimator leaves out: in bf16 mode stage 3 reduces
    into a partition of `gradient_accumulation_dtype` (bf16 unless ds_config sets it: engine.py `get_data_types`)
    and makes the fp32 copy the estimator counts only at the step (`_prepare_fp32_grad_for_sub_group`); traced."""
    arch = load_model(model)
    tc = TrainConfig(method="full", precision="bf16", num_gpus=n, strategy="zero3")
    P = arch.total_params
    expect = ds_zero3_gpu_bytes(P, largest_module_params(arch), n, False, False) - 4 * largest_module_params(arch)
    assert model_states(arch, tc) == pytest.approx(expect + 2 * P / n, rel=0.03)


@pytest.mark.parametrize("n", (2, 8))
def test_offload_moves_master_state_and_fp32_grads_to_the_host(n):
    """ZeRO-3 with optimizer and parameter offload: the device keeps what DeepSpeed's estimator keeps (4 x the
    largest layer, plus the buckets), and the host holds the 16P/N (master, Adam, fp32 gradients) + 2P/N bf16
    parameters of each rank."""
    from planner.memory import estimate_memory

    arch = load_model("llama-3.1-8b")
    tc = TrainConfig(method="full", precision="bf16", num_gpus=n, strategy="zero3", cpu_offload=True)
    m = estimate_memory(arch, tc)
    P = arch.total_params
    assert m.cpu_offload_bytes == pytest.approx(18 * P / n, rel=0.01)
    assert m.breakdown.get("optimizer_state", 0) == 0 and m.breakdown.get("weights", 0) == 0
    z2 = estimate_memory(arch, tc.replace(strategy="zero2"))
    assert z2.cpu_offload_bytes == pytest.approx(16 * P / n, rel=0.01)
    assert z2.breakdown["weights"] == pytest.approx(ds_zero2_gpu_bytes(P, n, True), rel=0.01)


def test_the_real_estimators_when_deepspeed_is_importable():
    ds = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    s3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    for p, ll, n in ((8_030_261_248, 525_336_576, 8), (1_235_814_400, 262_668_288, 2)):
        assert ds.estimate_zero2_model_states_mem_needs(p, n, 1, False)[1] == ds_zero2_gpu_bytes(p, n, False)
        assert s3.estimate_zero3_model_states_mem_needs(p, ll, n, 1, False, False)[1] == \
            ds_zero3_gpu_bytes(p, ll, n, False, False)


def test_ds_config_writes_the_buckets_the_planner_counts():
    from planner.strategies.zero import zero_buckets
    from trainer import launch

    for stage, name in ((2, "zero2"), (3, "zero3")):
        tc = TrainConfig(method="full", num_gpus=8, strategy=name)
        cfg = launch.deepspeed_config(tc, hidden_size=4096)
        z = cfg["zero_optimization"]
        assert cfg["bf16"]["enabled"] and z["stage"] == stage
        assert z["reduce_bucket_size"] == zero_buckets(4096)["reduce_bucket_size"] == 4096 ** 2
        if stage == 3:
            assert z["stage3_prefetch_bucket_size"] == int(0.9 * 4096 ** 2)
            assert z["stage3_max_live_parameters"] == 10 ** 9
        else:
            assert z["allgather_bucket_size"] == 4096 ** 2


def test_zero3_qlora_partitions_the_bf16_stored_4bit_weights_and_keeps_the_constants_whole():
    """ZeRO-3 over a 4-bit base (`planner.strategies.zero.zero3_qlora`): DeepSpeed partitions the packed weights
    (stored as bf16, as `ftplan run` loads them) like any parameter, but not bitsandbytes' quantization constants
    (a QuantState attribute): those are whole on every GPU. The estimate says so, and the trace refuses it."""
    import pytest

    from planner.config import TrainConfig
    from planner.memory import estimate_memory
    from planner.profiles import load_model
    from planner.strategies.zero import ZERO3_QLORA_NOTE

    arch = load_model("llama-3.2-1b")
    tc = TrainConfig(method="lora", quant="nf4", rank=16, target_modules=("all-linear",), seq_len=512,
                     num_gpus=2, strategy="zero3")
    two = estimate_memory(arch, tc)
    eight = estimate_memory(arch, tc.replace(num_gpus=8))
    one = estimate_memory(arch, tc.replace(num_gpus=1, strategy="ddp"))
    assert two.breakdown["quant_constants"] == eight.breakdown["quant_constants"] == one.breakdown["quant_constants"]
    assert ZERO3_QLORA_NOTE in two.notes and ZERO3_QLORA_NOTE not in one.notes
    zero2 = estimate_memory(arch, tc.replace(strategy="zero2"))
    assert ZERO3_QLORA_NOTE not in zero2.notes
    assert zero2.breakdown["weights"] > 1.9 * two.breakdown["weights"]  # ZeRO-2 keeps every weight, ZeRO-3 half

    pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from calibrate.trace_multigpu import trace_sharded_step

    config = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    with pytest.raises(ValueError, match="fsdp"):
        trace_sharded_step(config, tc)
