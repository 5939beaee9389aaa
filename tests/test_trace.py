"""`ftplan estimate --trace`: the real training step on fake tensors, against the H100 measurements."""

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from calibrate.record import load_records  # noqa: E402
from calibrate.trace import trace_step  # noqa: E402
from planner.arch import arch_from_config  # noqa: E402
from planner.config import TrainConfig  # noqa: E402
from planner.memory import cuda_workspace_bytes, estimate_memory  # noqa: E402
from planner.profiles import load_gpu, load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
H100 = load_gpu("h100-sxm-80gb")


def _rows():
    return [r for r in load_records([ROOT / "calibrate" / "results" / "h100-sxm-80gb"]) if r["kind"] == "import"]


@pytest.mark.slow
@pytest.mark.parametrize("rec", _rows(), ids=lambda r: r["source"])
def test_trace_reproduces_the_measured_peak(rec):
    tc = TrainConfig.from_dict(rec["train"])
    t = trace_step(rec["model"]["config"], tc, cuda_workspace_bytes=cuda_workspace_bytes(H100))
    measured = rec["measured"]["peak_allocated_bytes"]
    assert abs(t.peak_allocated_bytes - measured) / measured < 0.01
    assert t.trainable_params == estimate_memory(arch_from_config(rec["model"]["config"]), tc).trainable_params


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "prefix", "prompt", "ia3"])
def test_every_cpu_traceable_method_agrees_with_the_analytic_model(method):
    config = dict(load_model("qwen2.5-0.5b").config)
    tc = TrainConfig(method=method, seq_len=512, batch_size=2, target_modules=("all-linear",))
    t = trace_step(config, tc, cuda_workspace_bytes=cuda_workspace_bytes(None))
    a = estimate_memory(load_model("qwen2.5-0.5b"), tc)
    assert abs(t.peak_allocated_bytes - a.peak_allocated_bytes) / t.peak_allocated_bytes < 0.01
    assert t.trainable_params == a.trainable_params


@pytest.mark.slow
def test_70b_lora_trace_finishes_in_minutes():
    config = dict(load_model("llama-3.1-70b").config)
    tc = TrainConfig(method="lora", target_modules=("all-linear",), seq_len=2048, batch_size=1, grad_ckpt=True)
    t0 = time.perf_counter()
    t = trace_step(config, tc, cuda_workspace_bytes=cuda_workspace_bytes(None))
    assert time.perf_counter() - t0 < 180
    a = estimate_memory(load_model("llama-3.1-70b"), tc)
    assert abs(t.peak_allocated_bytes - a.peak_allocated_bytes) / t.peak_allocated_bytes < 0.02


@pytest.mark.slow
def test_estimate_trace_flag(tmp_path):
    from click.testing import CliRunner

    from planner.cli import cli

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=300, model_type="llama", architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(cli, ["estimate", "--model", str(tmp_path / "config.json"), "--method", "lora", "--seq-len", "64",
                                 "--batch-size", "2", "--trace", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["trace"]["peak_allocated_bytes"] > 0 and d["trace"]["trainable_params"] == d["trainable_params"]
    text = CliRunner().invoke(cli, ["estimate", "--model", str(tmp_path / "config.json"), "--trace"]).output
    assert "trace" in text and "analytic differs" in text


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--method", "dora"], ["--method", "qdora", "--grad-ckpt"], ["--method", "lora", "--use-rslora"]],
                         ids=["dora", "qdora", "rslora"])
def test_estimate_trace_of_dora_and_rslora(tmp_path, extra):
    """A new method works through `estimate --trace` with no change outside its module: the real peft DoRA code
    (and bitsandbytes' dequantization of a 4-bit base) traced, agreeing with the analytic model."""
    from click.testing import CliRunner

    from planner.cli import cli

    cfg = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=512, model_type="llama", architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(cli, ["estimate", "--model", str(tmp_path / "config.json"), "--target-modules", "all-linear",
                                 "--seq-len", "256", "--batch-size", "2", "--trace", "--json", *extra])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["trace"]["trainable_params"] == d["trainable_params"]
    err = abs(d["peak_allocated_bytes"] - d["trace"]["peak_allocated_bytes"]) / d["trace"]["peak_allocated_bytes"]
    assert err < 0.02, (extra, err)
