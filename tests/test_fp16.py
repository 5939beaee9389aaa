"""`--precision fp16`: fp32 master weights under fp16 autocast with a GradScaler, for GPUs without bf16 (T4, V100):
memory (mixed's, plus the scaler's blocks), speed on the fp16 tensor cores, the run's step, and recommend's pick."""

import pytest
from click.testing import CliRunner

from planner.cli import cli
from planner.config import TrainConfig
from planner.cost import throughput
from planner.memory import estimate_memory
from planner.profiles import load_gpu, load_model
from planner.recommend import Request, recommend

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300)


def test_fp16_memory_is_mixed_plus_the_grad_scaler():
    arch = load_model("llama-3.2-1b")
    for tc in (TrainConfig(method="full", precision="mixed", seq_len=1024),
               TrainConfig(method="lora", precision="mixed", target_modules=("all-linear",), batch_size=2)):
        mixed = estimate_memory(arch, tc)
        fp16 = estimate_memory(arch, tc.replace(precision="fp16"))
        assert fp16.peak_allocated_bytes - mixed.peak_allocated_bytes == 3 * 512
        assert fp16.trainable_params == mixed.trainable_params


def test_fp16_runs_on_the_fp16_tensor_cores_where_bf16_is_missing():
    arch = load_model("llama-3.2-1b")
    tc = TrainConfig(method="full", precision="mixed", seq_len=1024)
    for name in ("t4-16gb", "v100-sxm2-32gb"):
        gpu = load_gpu(name)
        assert not gpu.supports_bf16
        slow, fast = throughput(arch, tc, gpu), throughput(arch, tc.replace(precision="fp16"), gpu)
        # the GEMMs move from the CUDA cores (fp32 peak: 8 TFLOP/s on a T4) to the fp16 tensor cores (65); the
        # optimizer step and the bandwidth-bound ops do not change
        slow_mm = slow.parts_seconds["gemm"] + slow.parts_seconds["fp32_gemm"]
        fast_mm = fast.parts_seconds["gemm"] + fast.parts_seconds["fp32_gemm"]
        assert fast_mm < slow_mm / 4 and slow.parts_seconds["fp32_gemm"] > 0 == fast.parts_seconds["fp32_gemm"]
        assert fast.parts_seconds["optimizer"] == slow.parts_seconds["optimizer"]
        assert fast.tokens_per_s > 2 * slow.tokens_per_s
    h100 = load_gpu("h100-sxm-80gb")  # where bf16 exists fp16's tensor peak is the same: same speed
    assert throughput(arch, tc.replace(precision="fp16"), h100).tokens_per_s == pytest.approx(
        throughput(arch, tc, h100).tokens_per_s, rel=1e-9)


def test_recommend_picks_fp16_full_fine_tuning_on_a_t4_and_mixed_on_an_a100():
    arch = load_model("qwen2.5-0.5b")
    t4 = recommend(Request(arch=arch, gpu=load_gpu("t4-16gb"), seq_len=512, methods=("full",)))
    precisions = {p.train.precision for p in t4.ranked}
    assert "fp16" in precisions and "mixed" not in precisions
    a100 = recommend(Request(arch=arch, gpu=load_gpu("a100-sxm-80gb"), seq_len=512, methods=("full",)))
    assert "mixed" in {p.train.precision for p in a100.ranked} and "fp16" not in {p.train.precision for p in a100.ranked}


def test_fp16_step_scales_the_loss_and_unscales_before_the_clip():
    torch = pytest.importorskip("torch")
    from trainer import recipe as tr
    from trainer.step import TrainStep

    torch.manual_seed(0)
    tc = TrainConfig(method="full", precision="fp16", seq_len=64, batch_size=2)
    model = tr.apply_method(tr.build_model(TINY, tc), tc)
    params = tr.trainable_parameters(model)
    assert all(p.dtype == torch.float32 for p in params)  # fp32 master weights
    step = TrainStep(model, tr.make_optimizer(params, tc, lr=1e-3), params, tc, "cpu")
    before = params[0].detach().clone()
    r = step([tr.synthetic_batch(TINY["vocab_size"], tc, "cpu")])
    assert step.scaler is not None and step.scaler.get_scale() == 65536.0
    assert 0 < r.grad_norm.item() < 100  # the unscaled norm, not 65536 times it
    assert torch.isfinite(r.loss) and not torch.equal(before, params[0])


def test_fp16_trace_agrees_with_the_analytic_model():
    pytest.importorskip("torch")
    from calibrate.trace import trace_step
    from planner.arch import arch_from_config
    from planner.memory import cuda_workspace_bytes

    cfg = dict(TINY, hidden_size=512, intermediate_size=1024, num_attention_heads=8, vocab_size=32000,
               max_position_embeddings=4096)
    tc = TrainConfig(method="full", precision="fp16", seq_len=512)
    t = trace_step(cfg, tc, cuda_workspace_bytes=cuda_workspace_bytes(None))
    a = estimate_memory(arch_from_config(cfg), tc)
    assert abs(a.peak_allocated_bytes - t.peak_allocated_bytes) / t.peak_allocated_bytes < 0.005


def test_precision_fp16_on_the_cli_and_qlora_refuses_it():
    r = CliRunner().invoke(cli, ["estimate", "--model", "llama-3.2-1b", "--method", "full", "--precision", "fp16",
                                 "--gpu", "t4-16gb"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["estimate", "--model", "llama-3.2-1b", "--method", "qlora", "--precision", "fp16"])
    assert r.exit_code == 2 and "--precision" in r.output and "valid: bf16" in r.output
