"""FLOPs per token, throughput structure and multi-GPU sharding: the arithmetic behind time and cost."""

import pytest

from planner.config import TrainConfig
from planner.cost import flops_per_token, matmul_params, throughput
from planner.kernels import step_ops
from planner.memory import batch_free
from planner.memory import estimate_memory
from planner.profiles import load_gpu, load_model


def test_full_fine_tuning_is_six_n_plus_attention():
    arch = load_model("llama-2-7b")
    tc = TrainConfig(method="full", seq_len=2048)
    f = flops_per_token(arch, tc)
    n = matmul_params(arch)
    attn = 4 * arch.q_dim * 1024 * arch.num_layers
    assert f["forward"] == pytest.approx(2 * n + attn)
    assert f["total"] == pytest.approx(6 * n + 3.5 * attn)


def test_frozen_weights_skip_weight_gradients_and_checkpointing_recomputes():
    arch = load_model("llama-3.1-8b")
    full = flops_per_token(arch, TrainConfig(method="full"))["total"]
    lora = flops_per_token(arch, TrainConfig(method="lora", target_modules=("all-linear",)))["total"]
    assert 0.64 < lora / full < 0.70  # ~4N of 6N
    ck = flops_per_token(arch, TrainConfig(method="lora", target_modules=("all-linear",), grad_ckpt=True))
    assert ck["recompute"] > 0 and ck["total"] > lora


def test_qlora_dequantizes_every_weight_per_pass():
    arch = load_model("llama-2-7b")
    linear = arch.num_layers * sum(lin.in_features * lin.out_features for lin in arch.linears)
    one_layer = linear // arch.num_layers

    def dequant(**kw):
        return step_ops(arch, batch_free(TrainConfig(**kw))).dequant_bytes

    # read 0.5 + write 2 bytes per weight, forward and backward; layer 0's q, k, v, gate and up get no input
    # gradient (the frozen embeddings need none), so bitsandbytes skips their backward dequantization
    lin = {l.name: l.in_features * l.out_features for l in arch.linears}
    skipped = sum(lin[n] for n in ("q_proj", "k_proj", "v_proj"))
    q = dequant(method="qlora")
    assert 2.5 * (2 * linear - one_layer) <= q <= 2.5 * (2 * linear - skipped)
    assert dequant(method="qlora", grad_ckpt=True) == q + int(2.5 * linear)  # the recomputed forward
    assert dequant(method="lora") == 0


def test_throughput_scales_with_gpus_and_peak():
    arch = load_model("llama-3.1-8b")
    tc = TrainConfig(method="lora", target_modules=("all-linear",), batch_size=4)
    h100, a100 = load_gpu("h100"), load_gpu("a100-80")
    t_h, t_a = throughput(arch, tc, h100), throughput(arch, tc, a100)
    assert t_h.tokens_per_s > t_a.tokens_per_s
    t8 = throughput(arch, tc.replace(num_gpus=8, strategy="ddp"), h100)
    assert 6 * t_h.tokens_per_s < t8.tokens_per_s <= 8 * t_h.tokens_per_s
    assert t_h.step_seconds == pytest.approx(sum(t_h.parts_seconds.values()))


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "fsdp"])
def test_sharding_divides_state_and_gradients(strategy):
    arch = load_model("llama-3.1-8b")
    tc = TrainConfig(method="full", precision="mixed", seq_len=1024, batch_size=1, grad_ckpt=True)
    one = estimate_memory(arch, tc)
    n = estimate_memory(arch, tc.replace(num_gpus=8, strategy=strategy))
    assert n.peak_allocated_bytes < one.peak_allocated_bytes / 3
    ddp = estimate_memory(arch, tc.replace(num_gpus=8, strategy="ddp"))
    assert ddp.peak_allocated_bytes > one.peak_allocated_bytes  # a full replica plus gradient buckets


def test_cpu_offload_moves_state_to_the_host():
    arch = load_model("llama-3.1-8b")
    tc = TrainConfig(method="full", precision="mixed", seq_len=1024, grad_ckpt=True, num_gpus=4, strategy="zero3")
    on, off = estimate_memory(arch, tc), estimate_memory(arch, tc.replace(cpu_offload=True))
    assert off.peak_allocated_bytes < on.peak_allocated_bytes and off.cpu_offload_bytes > 0
    with pytest.raises(ValueError, match="cpu_offload"):
        TrainConfig(cpu_offload=True)
