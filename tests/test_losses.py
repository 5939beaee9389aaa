"""The recipe's losses (`--loss`): the trainer computes what the library computes, the trace runs it on fake tensors,
and the analytic model follows the trace; a loss that cannot run says what to install."""

import json

import pytest
from click.testing import CliRunner

from planner.cli import cli
from planner.config import TrainConfig
from planner.memory import estimate_memory
from planner.profiles import load_model
from planner.recipe import Recipe

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300)


def _train(loss, precision, method="full"):
    torch = pytest.importorskip("torch")
    from trainer import recipe as tr

    torch.manual_seed(0)
    tc = TrainConfig(method=method, precision=precision, seq_len=300, batch_size=2, recipe=Recipe(loss=loss))
    model = tr.apply_method(tr.build_model(TINY, tc), tc)
    g = torch.Generator().manual_seed(1)
    batch = tr.synthetic_batch(TINY["vocab_size"], tc, "cpu", generator=g)
    batch["labels"] = batch["labels"].clone()
    batch["labels"][0, :100] = -100  # a prompt masked out: chunks of valid tokens only
    out = tr.forward(model, batch, tc, "cpu")
    out.loss.backward()
    head = model.get_output_embeddings().weight.grad
    return out, head


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_chunked_nll_is_the_plain_loss_in_chunks(precision):
    """TRL 1.16's fused LM head (its own code, on CPU the path scoring every position) gives transformers' loss and
    gradients, without returning logits."""
    torch = pytest.importorskip("torch")
    plain, g_plain = _train("plain", precision)
    chunked, g_chunked = _train("chunked", precision)
    assert chunked.logits is None and plain.logits is not None
    assert torch.allclose(plain.loss.float(), chunked.loss.float(), rtol=1e-3)
    assert torch.allclose(g_plain.float(), g_chunked.float(), rtol=2e-2, atol=1e-4)


def test_chunked_loss_turns_the_kv_cache_off_and_keeps_no_logits():
    arch = load_model("llama-3.2-1b")
    tc = TrainConfig(method="lora", target_modules=("all-linear",), seq_len=2048, batch_size=2)
    plain = estimate_memory(arch, tc)
    chunked = estimate_memory(arch, tc.replace(recipe=Recipe(loss="chunked")))
    # the plain recipe's peak holds fp32 logits (2 x 2048 x 128256 x 4 B = 2 GiB and their copies); chunked's does not
    assert chunked.peak_allocated_bytes < plain.peak_allocated_bytes - 2 * 2**30
    assert "logits" not in chunked.breakdown


CASES = [
    (dict(method="lora", precision="bf16"), 1),
    (dict(method="lora", precision="mixed"), 2),
    (dict(method="full", precision="bf16"), 2),
    (dict(method="full", precision="mixed"), 1),
    (dict(method="qlora"), 2),
    (dict(method="lora", precision="mixed"), 12),  # 6132 valid tokens: two token tiles of TRL's kernel
]


@pytest.mark.parametrize("kw, batch", CASES, ids=lambda v: str(v))
def test_chunked_trace_agrees_with_the_analytic_model(kw, batch):
    """The trace runs TRL 1.16's fused LM head on fake tensors on its CUDA path (valid positions only, the Triton
    kernels in place); the analytic model's tile buffers and copies follow it, across the one-tile boundary."""
    pytest.importorskip("torch")
    from calibrate.trace import trace_step
    from planner.arch import arch_from_config
    from planner.memory import cuda_workspace_bytes

    cfg = dict(TINY, hidden_size=1024, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=8,
               vocab_size=16000, max_position_embeddings=4096)
    tc = TrainConfig(seq_len=512, batch_size=batch, target_modules=("all-linear",), recipe=Recipe(loss="chunked"), **kw)
    t = trace_step(cfg, tc, cuda_workspace_bytes=cuda_workspace_bytes(None))
    a = estimate_memory(arch_from_config(cfg), tc)
    assert abs(a.peak_allocated_bytes - t.peak_allocated_bytes) / t.peak_allocated_bytes < 0.01, (a.peak_event, t.peak_phase)


def test_chunked_trace_two_vocabulary_tiles():
    """A vocabulary of two of TRL's 32768-column tiles and 20 x 511 tokens (three token tiles), the lm_head in fp32
    under autocast: the backward holds two bf16 copies of lm_head tiles at once (the next beside the previous), the
    smaller last one beside the first, and the analytic model says so."""
    pytest.importorskip("torch")
    from calibrate.trace import trace_step
    from planner.arch import arch_from_config
    from planner.layers import chunked_loss_chunks
    from planner.memory import cuda_workspace_bytes

    cfg = dict(TINY, hidden_size=1024, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=8,
               vocab_size=40000, max_position_embeddings=4096)
    tc = TrainConfig(method="lora", precision="mixed", seq_len=512, batch_size=20, target_modules=("all-linear",),
                     recipe=Recipe(loss="chunked"))
    assert chunked_loss_chunks(tc) == 3
    t = trace_step(cfg, tc, cuda_workspace_bytes=cuda_workspace_bytes(None))
    a = estimate_memory(arch_from_config(cfg), tc)
    assert abs(a.peak_allocated_bytes - t.peak_allocated_bytes) / t.peak_allocated_bytes < 0.01, (a.peak_event, t.peak_phase)


def test_loss_option_and_bad_values():
    r = CliRunner().invoke(cli, ["estimate", "--model", "llama-3.2-1b", "--loss", "chunked", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["peak_allocated_bytes"] > 0
    r = CliRunner().invoke(cli, ["estimate", "--model", "llama-3.2-1b", "--loss", "softmax"])
    assert r.exit_code == 2 and "--loss" in r.output and "chunked" in r.output


FUSED_CASES = [
    ("liger", dict(method="lora", precision="mixed"), 2),
    ("liger", dict(method="full", precision="bf16"), 2),
    ("cce", dict(method="lora", precision="mixed"), 1),
    ("cce", dict(method="full", precision="mixed"), 2),
]


@pytest.mark.parametrize("loss, kw, batch", FUSED_CASES, ids=lambda v: str(v))
def test_fused_losses_trace_agrees_with_the_analytic_model(loss, kw, batch):
    """Liger's and CCE's Triton kernels are stand-ins in the trace that allocate what their forward and backward
    allocate (gradients computed in Liger's forward; CCE's bf16 casts, lse and logit average); no logits kept."""
    pytest.importorskip("torch")
    from calibrate.trace import trace_step
    from planner.arch import arch_from_config
    from planner.memory import cuda_workspace_bytes

    cfg = dict(TINY, hidden_size=512, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
               num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096)
    tc = TrainConfig(seq_len=512, batch_size=batch, target_modules=("all-linear",), recipe=Recipe(loss=loss), **kw)
    t = trace_step(cfg, tc, cuda_workspace_bytes=cuda_workspace_bytes(None))
    a = estimate_memory(arch_from_config(cfg), tc)
    assert "logits" not in a.breakdown or a.breakdown["logits"] < 32000 * 512
    assert abs(a.peak_allocated_bytes - t.peak_allocated_bytes) / t.peak_allocated_bytes < 0.02, (a.peak_event, t.peak_phase)


def test_fused_losses_need_their_library_and_say_which():
    pytest.importorskip("torch")
    from trainer import losses

    for loss, package in (("liger", "liger-kernel"), ("cce", "cut-cross-entropy")):
        try:
            losses.check_available(loss)
        except losses.LossLibraryMissing as e:
            assert f"pip install {package}" in str(e) and f"'{loss}'" in str(e)
        else:  # installed (a GPU machine): nothing to say
            pass


def test_cce_refuses_fp32_naming_the_key_and_the_valid_precisions():
    r = CliRunner().invoke(cli, ["estimate", "--model", "llama-3.2-1b", "--method", "full", "--precision", "fp32",
                                 "--loss", "cce"])
    assert r.exit_code == 2 and "--loss" in r.output and "'cce'" in r.output and "bf16, mixed" in r.output
    assert "Traceback" not in r.output


def test_fused_losses_cut_the_logits_from_the_peak():
    arch = load_model("llama-3.1-8b")
    tc = TrainConfig(method="qlora", target_modules=("all-linear",), seq_len=4096, batch_size=2, grad_ckpt=True)
    plain = estimate_memory(arch, tc).peak_allocated_bytes
    for loss in ("chunked", "liger", "cce"):
        assert estimate_memory(arch, tc.replace(recipe=Recipe(loss=loss))).peak_allocated_bytes < plain - 2**30, loss


@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["liger", "cce"])
def test_fused_loss_runs_for_real_on_cuda(loss):
    """With the library installed and a GPU: the fused loss gives transformers' loss on a tiny model."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from trainer import losses
    from trainer import recipe as tr

    try:
        losses.check_available(loss)
    except losses.LossLibraryMissing:
        pytest.skip(f"{loss} library not installed")
    values = {}
    for name in ("plain", loss):
        torch.manual_seed(0)
        tc = TrainConfig(method="lora", precision="bf16", seq_len=256, batch_size=2, recipe=Recipe(loss=name))
        model = tr.apply_method(tr.build_model(TINY, tc, device="cuda"), tc)
        batch = tr.synthetic_batch(TINY["vocab_size"], tc, "cuda", generator=torch.Generator("cuda").manual_seed(1))
        out = tr.forward(model, batch, tc, "cuda")
        out.loss.backward()
        values[name] = out.loss.float().item()
    assert abs(values["plain"] - values[loss]) / values["plain"] < 1e-2
