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


def ds_zero2_cpu_bytes(total_params: int, num_gpus: int) -> int:
    """stage_1_and_2.py `estimate_zero2_model_states_mem_needs`, cpu_offload=True: host bytes of a node (one node
    of N GPUs), P x max(4N, 16) x 1.5 (their buffer factor)."""
    return int(total_params * max(4 * num_gpus, 16) * 1.5)


def ds_zero3_cpu_bytes(total_params: int, cpu_offload_params: bool) -> int:
    """stage3.py `estimate_zero3_model_states_mem_needs`, cpu_offload=True, zero_init: host bytes of a node,
    18 P x 1.5 with the parameters offloaded, 16 P x 1.5 without."""
    return int(total_params * (18 if cpu_offload_params else 16) * 1.5)


OFFLOAD_CASES = [(m, n) for m in ("llama-3.1-8b", "llama-3.2-1b") for n in (2, 8)]


@pytest.mark.parametrize("model,n", OFFLOAD_CASES)
def test_zero2_offload_model_states_match_deepspeed(model, n):
    """ZeRO-2 + offload_optimizer: the device keeps the bf16 weights (DeepSpeed's 2P) and no gradient partition;
    the host per node, before the pinned allocator's rounding (`planner.strategies.zero.zero_offload_host_bytes`:
    18P/N per rank + the largest parameter's staging buffer), lies between the model states DeepSpeed's estimator
    counts (16 P) and its figure with the 1.5 margin; the rounding to powers of two adds at most as much again
    (llama-3.2-1b at N = 2: 16.2 GB per rank for 11.1 GB of buffers, past DeepSpeed's margin)."""
    from planner.strategies.zero import largest_trainable_numel

    from planner.memory import estimate_memory

    arch = load_model(model)
    P = arch.total_params
    tc = TrainConfig(method="full", precision="bf16", num_gpus=n, strategy="zero2", cpu_offload=True)
    static, grads, _opt_temp, offload, _notes, _paged, _params = _static_terms(arch, tc, 0)
    assert static["weights"] + static["optimizer_state"] + grads == pytest.approx(ds_zero2_gpu_bytes(P, n, True),
                                                                                 rel=0.03)
    assert static["optimizer_state"] == 0 and grads == 0
    unrounded = 18 * -(-P // n) + 2 * largest_trainable_numel(arch, tc)
    assert 16 * P <= n * unrounded <= ds_zero2_cpu_bytes(P, n)
    assert unrounded <= offload < 2 * unrounded
    m = estimate_memory(arch, tc)
    assert "gradients" not in m.breakdown  # none on the device, in backward or at the step
    assert m.cpu_offload_bytes == offload


@pytest.mark.parametrize("model,n", OFFLOAD_CASES)
def test_zero3_offload_model_states_match_deepspeed(model, n):
    """ZeRO-3 + offload_optimizer + offload_param: the device keeps no model states, only gathered parameters
    (DeepSpeed's estimator: 4 x largest layer, the first step's; the engine keeps more from the second); the host per node before the pinned rounding (20P/N per rank: 2 bf16 parameters, 4 master, 8 Adam, 4
    fp32 and 2 bf16 gradient partitions) lies between 18 P (the states DeepSpeed counts) and its estimate with the
    margin; the rounding adds less than the pinned buffers' 8P/N."""
    from planner.memory import estimate_memory
    from planner.strategies.zero import zero3_live_bytes

    arch = load_model(model)
    P = arch.total_params
    tc = TrainConfig(method="full", precision="bf16", num_gpus=n, strategy="zero3", cpu_offload=True)
    static, grads, _opt_temp, offload, _notes, _paged, _params = _static_terms(arch, tc, 0)
    largest = largest_module_params(arch)
    # DeepSpeed's device bytes with both offloads are only the gathered parameters (4 B x the largest module): no
    # weights, state or gradients stay on the device
    assert ds_zero3_gpu_bytes(P, largest, n, True, True) == 4 * largest
    assert static["weights"] + static["optimizer_state"] + grads == 0
    # the gathered parameters: the estimator's figure is the first step's; from the second on the engine keeps the
    # units within its reuse distance (`zero3_kept_params`, held to the real engine by tests/test_trace_zero.py)
    assert zero3_live_bytes(arch, tc) >= 2 * largest
    unrounded = 20 * -(-P // n)
    assert 18 * P <= n * unrounded <= ds_zero3_cpu_bytes(P, True)
    assert unrounded <= offload < unrounded + 8 * -(-P // n)
    m = estimate_memory(arch, tc)
    assert "gradients" not in m.breakdown and m.breakdown.get("weights", 0) == 0
    # offload moves the gradients off the device during backward too: the peak drops by more than the states
    on_device = estimate_memory(arch, tc.replace(cpu_offload=False))
    assert m.peak_allocated_bytes < on_device.peak_allocated_bytes - on_device.breakdown.get("optimizer_state", 0)


def test_zero2_offload_buffers_follow_the_engine():
    """What ZeRO-Offload allocates beyond the states, counted from DeepSpeed's own buffers (stage_1_and_2.py):
    `temp_grad_buffer_for_gpu_offload` on the device (the largest trainable parameter, bf16), and on the host the
    fp32 gradient partition, the bf16 staging partition and `temp_grad_buffer_for_cpu_offload`, each pinned (a
    power of two). LoRA: P is the adapters'; the frozen bf16 weights stay whole on the device."""
    from planner.memory import pinned_block_bytes, trainable_tensors
    from planner.strategies.zero import zero_offload_device_bytes, zero_offload_host_bytes

    arch = load_model("llama-3.1-8b")
    tc = TrainConfig(method="lora", rank=16, target_modules=("all-linear",), precision="bf16", num_gpus=4,
                     strategy="zero2", cpu_offload=True)
    P = tc.spec.trainable_params(arch, tc)
    largest = max(t.rows * t.cols for t in trainable_tensors(arch, tc))
    p = -(-P // 4)
    assert zero_offload_device_bytes(arch, tc, False) == 2 * largest
    assert zero_offload_host_bytes(arch, tc, False) == (pinned_block_bytes(4 * p) - 4 * p + pinned_block_bytes(4 * p)
                                                        + pinned_block_bytes(2 * p) + pinned_block_bytes(2 * largest))
    off = _static_terms(arch, tc, 0)
    on = _static_terms(arch, tc.replace(cpu_offload=False), 0)
    assert off[0]["sharding_buffers"] - on[0]["sharding_buffers"] == 2 * largest
    assert off[0]["weights"] == on[0]["weights"]


def test_the_real_estimators_when_deepspeed_is_importable():
    ds = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    s3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    for p, ll, n in ((8_030_261_248, 525_336_576, 8), (1_235_814_400, 262_668_288, 2)):
        assert ds.estimate_zero2_model_states_mem_needs(p, n, 1, False)[1] == ds_zero2_gpu_bytes(p, n, False)
        assert s3.estimate_zero3_model_states_mem_needs(p, ll, n, 1, False, False)[1] == \
            ds_zero3_gpu_bytes(p, ll, n, False, False)
        # with CPU offload: (cpu, gpu) as the oracles above say
        assert ds.estimate_zero2_model_states_mem_needs(p, n, 1, True) == (ds_zero2_cpu_bytes(p, n),
                                                                          ds_zero2_gpu_bytes(p, n, True))
        for params in (True, False):
            assert s3.estimate_zero3_model_states_mem_needs(p, ll, n, 1, True, params)[:2] == (
                ds_zero3_cpu_bytes(p, params), ds_zero3_gpu_bytes(p, ll, n, True, params))


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
