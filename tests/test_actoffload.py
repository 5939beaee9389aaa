"""TRL's activation offloading (`Recipe.activation_offload`, issue 11 item 4): the analytic model (planner.graph
`Offload`) against the trace of TRL's own manager (trl 1.16.0) on full FT, LoRA and QLoRA with and without checkpointing
on a GQA and a non-GQA tiny family (`python -m calibrate.trace_grid --grid actoffload --out
calibrate/reference/trace-points-actoffload.jsonl`), device peak and pinned host memory; and `ftplan run` with it."""

import json
from pathlib import Path

import pytest

import statistics

from calibrate.trace_grid import SMALL_VOCAB, TINY_FAMILIES, model_arch, read_points
from planner.config import TrainConfig
from planner.memory import estimate_memory
from planner.recipe import Recipe


def _points():
    return read_points("trace-points-actoffload.jsonl")


def test_the_grid_crosses_methods_checkpointing_and_two_families():
    """Full FT, LoRA, QLoRA x checkpointing x a GQA and a non-GQA family, plain and chunked losses, bf16 and mixed;
    the small-vocabulary points put the peak in the decoder layers (their stash and copies), not the logits."""
    tcs = [(p["model"], TrainConfig.from_dict(p["train"])) for p in _points()]
    assert all(tc.recipe.activation_offload for _, tc in tcs)
    assert {m for m, _ in tcs} == set(TINY_FAMILIES) | set(SMALL_VOCAB)
    assert {tc.method_name for _, tc in tcs} == {"full", "lora", "qlora"}
    assert {tc.grad_ckpt for _, tc in tcs} == {False, True}
    assert {tc.recipe.loss for _, tc in tcs} == {"plain", "chunked"} and {tc.precision for _, tc in tcs} >= {"bf16", "mixed"}
    assert any(tc.recipe.offload_checkpoints for _, tc in tcs)
    events = {estimate_memory(model_arch(m), tc).peak_event for m, tc in tcs}
    assert any("layer" in e for e in events) and "loss backward" in events


def test_the_grid_median_error_is_tiny():
    errs = []
    for p in _points():
        est = estimate_memory(model_arch(p["model"]), TrainConfig.from_dict(p["train"]))
        errs.append(abs(est.peak_allocated_bytes / p["trace"]["peak_allocated_bytes"] - 1))
    assert statistics.median(errs) < 0.002


@pytest.mark.parametrize("point", _points(), ids=lambda p: f"{p['id']}-{p['model']}")
def test_analytic_matches_the_trace_of_trls_manager(point):
    tc = TrainConfig.from_dict(point["train"])
    est = estimate_memory(model_arch(point["model"]), tc)
    trace = point["trace"]
    err = (est.peak_allocated_bytes - trace["peak_allocated_bytes"]) / trace["peak_allocated_bytes"]
    assert abs(err) <= 0.02, f"{tc.describe()}: device {err:+.2%} at {est.peak_event}"
    host_err = (est.host_pinned_bytes - trace["host_pinned_bytes"]) / trace["host_pinned_bytes"]
    assert abs(host_err) <= 0.02, f"{tc.describe()}: pinned host {host_err:+.2%}"


@pytest.mark.parametrize("ckpt", [False, True])
def test_offloading_moves_memory_from_the_device_to_the_host(ckpt):
    """Same configuration with and without: the device peak does not grow, and what leaves it is in pinned host memory
    (without checkpointing most of every layer's saved tensors; with it, the checkpoints' inputs)."""
    arch = model_arch("tiny-llama-gqa")
    kw = dict(method="lora", rank=16, target_modules=("all-linear",), seq_len=4096, batch_size=4, grad_ckpt=ckpt)
    off = estimate_memory(arch, TrainConfig(**kw, recipe=Recipe(activation_offload=True)))
    on = estimate_memory(arch, TrainConfig(**kw))
    assert on.host_pinned_bytes == 0 < off.host_pinned_bytes
    assert off.peak_allocated_bytes < on.peak_allocated_bytes


def test_with_offloaded_checkpoints_the_inputs_go_to_save_on_cpu_once():
    """TRL's offloading with transformers' offloaded checkpointing: the checkpoints' inputs are pinned once (by
    save_on_cpu, whose hooks are the innermost), what the embedding and the loss save by TRL's hooks."""
    from planner.memory import activation_offload_host_bytes, offloaded_checkpoint_bytes

    arch = model_arch("tiny-llama-gqa")
    kw = dict(method="lora", rank=16, target_modules=("all-linear",), seq_len=1024, batch_size=2, grad_ckpt=True)
    both = TrainConfig(**kw, recipe=Recipe(activation_offload=True, offload_checkpoints=True))
    trl = TrainConfig(**kw, recipe=Recipe(activation_offload=True))
    ckpt = TrainConfig(**kw, recipe=Recipe(offload_checkpoints=True))
    assert estimate_memory(arch, both).host_pinned_bytes == estimate_memory(arch, trl).host_pinned_bytes
    assert offloaded_checkpoint_bytes(arch, both) == offloaded_checkpoint_bytes(arch, ckpt) > 0
    assert 0 < activation_offload_host_bytes(arch, both) < activation_offload_host_bytes(arch, trl)


def test_one_live_trace_matches_its_reference_point():
    """The reference file is what the trace gives today (TRL installed: the train extra)."""
    pytest.importorskip("trl")
    from calibrate.trace import trace_step
    from calibrate.trace_grid import CUDA_WORKSPACE_H100

    point = next(p for p in _points() if p["train"]["method"] == "lora" and not p["train"]["grad_ckpt"])
    tc = TrainConfig.from_dict(point["train"])
    config = dict(model_arch(point["model"]).config, max_position_embeddings=16384)
    config.pop("rope_scaling", None)
    r = trace_step(config, tc, cuda_workspace_bytes=CUDA_WORKSPACE_H100)
    assert r.peak_allocated_bytes == point["trace"]["peak_allocated_bytes"]
    assert r.host_pinned_bytes == point["trace"]["host_pinned_bytes"]


@pytest.mark.slow
def test_ftplan_run_with_activation_offload_trains_the_same_numbers_on_cpu(tiny_plan, tmp_path, monkeypatch):
    """`ftplan run --activation-offload` on CPU runs TRL's own hooks (the CPU standing for the device: trainer/offload.py)
    around each micro-batch: every saved tensor of 1 KiB and more is copied out and back, and the losses are those of
    the same run without it."""
    pytest.importorskip("trl")
    from click.testing import CliRunner

    import calibrate.record
    from planner.cli import cli
    from trainer import offload

    from conftest import EXAMPLES_DIR

    monkeypatch.setattr(calibrate.record, "RESULTS_DIR", tmp_path / "results")
    made = []
    context = offload.context
    monkeypatch.setattr(offload, "context", lambda model, **kw: made.append(context(model, **kw)) or made[-1])
    data = str(Path(EXAMPLES_DIR) / "text.jsonl")
    plan = tiny_plan(method="lora", max_steps=4)
    runs = {}
    for flag in ("--activation-offload", "--no-activation-offload"):
        out = tmp_path / flag
        res = CliRunner().invoke(cli, ["run", str(plan), "--data", data, "--output-dir", str(out), "--device", "cpu",
                                       "--no-progress", flag], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        runs[flag] = [json.loads(line)["loss"] for line in (out / "trainer_log.jsonl").read_text().splitlines()
                      if "loss" in json.loads(line)]
    assert len(made) == 1 and made[0].ctx.tensor_id > 0  # TRL's pack hook ran (ids of the last micro-batch)
    assert len(runs["--activation-offload"]) == 4
    assert runs["--activation-offload"] == pytest.approx(runs["--no-activation-offload"], rel=1e-5)


def test_cli_flag_reaches_the_estimate_and_the_host_report():
    """`--activation-offload` on estimate: the pinned host memory is reported, and `--host-ram` says when the host is
    the limit; `--offload-ckpt` without `--grad-ckpt` stays a usage error naming the flag (exit 2, no traceback)."""
    from click.testing import CliRunner

    from planner.cli import cli

    args = ["estimate", "--model", "llama-3.1-8b", "--method", "lora", "--seq-len", "4096", "--json"]
    off = json.loads(CliRunner().invoke(cli, args + ["--activation-offload", "--host-ram", "1"]).output)
    on = json.loads(CliRunner().invoke(cli, args).output)
    assert off["host_pinned_bytes"] > 0 == on.get("host_pinned_bytes", 0)
    assert off["peak_allocated_bytes"] < on["peak_allocated_bytes"]
    assert off["host_fits"] is False and off["host_ram_bytes"] == 2**30
    res = CliRunner().invoke(cli, args + ["--offload-ckpt", "--activation-offload"])
    assert res.exit_code == 2 and "--offload-ckpt" in res.output and "Traceback" not in res.output
