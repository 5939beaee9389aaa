"""`ftplan run` end to end on CPU: every CPU method trains, outputs load with plain peft/transformers, overrides,
user errors, the out-of-memory fallback (simulated: it needs a GPU to happen for real, see test_run_gpu.py), and
checkpoint/resume through real signals (SIGTERM, SIGKILL) on a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from calibrate.record import load_records
from planner.cli import cli
from planner.planfile import read_plan
from trainer import data as D

from conftest import EXAMPLES_DIR

FTPLAN = [sys.executable, "-c", "from planner.cli import cli; cli()"]


def ex(name: str) -> str:
    return os.path.join(EXAMPLES_DIR, f"{name}.jsonl")


def invoke(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)], catch_exceptions=False)


def flat(res) -> str:
    """The command's output with click's line wrapping undone."""
    return " ".join(res.output.split())


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in log(out) if "loss" in r]


def generate(model, tokenizer) -> str:
    ids = tokenizer("The capital of", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    return tokenizer.decode(out[0, ids.shape[1]:])


# method, data format, extra options
CPU_METHODS = [
    ("full", "text", []),
    ("lora", "alpaca", ["--target-modules", "all-linear", "--eval-data", ex("alpaca"), "--eval-steps", "10", "--json"]),
    ("prefix", "prompt_completion", []),
    ("prompt", "chat", []),
    ("ia3", "alpaca", ["--packing"]),
    ("dora", "alpaca", ["--target-modules", "all-linear", "--use-rslora"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,fmt,extra", CPU_METHODS, ids=[m for m, _, _ in CPU_METHODS])
def test_each_cpu_method_trains_and_its_output_loads(tiny_plan, tmp_path, monkeypatch, method, fmt, extra):
    import calibrate.record

    monkeypatch.setattr(calibrate.record, "RESULTS_DIR", tmp_path / "results")  # a CPU run must not record there
    out = tmp_path / "out"
    res = invoke(tiny_plan(method=method), "--data", ex(fmt), "--output-dir", out, "--device", "cpu", *extra)
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output

    ls = losses(out)
    assert len(ls) == 25 and [r["step"] for r in log(out) if "loss" in r] == list(range(1, 26))
    first, last = statistics.fmean(ls[:5]), statistics.fmean(ls[-5:])
    assert last < first - 0.05, f"{method}: loss {first:.3f} -> {last:.3f}"

    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["optimizer_steps"] == 25 and summary["method"] == method
    assert summary["data"]["format"] == fmt
    if "--json" in extra:
        assert json.loads(res.stdout) == summary  # stdout is the JSON alone; messages went to stderr
        assert summary["eval_loss"] is not None and summary["eval_loss"] < 10
        assert [r["step"] for r in log(out) if "eval_loss" in r] == [10, 20, 25]
    assert summary["prediction"]["peak_allocated_bytes"] > 0  # the planner's number for the plan's GPU

    # outputs: plan, run record (calibrate format), loss curve, tokenizer, adapter or model
    plan = read_plan(out / "plan.toml")
    assert plan.train.method == method and Path(plan.model_path).is_absolute()
    # --packing is the recipe's packing: the run packs its data and its plan (and prediction) say so
    assert plan.train.recipe.packing == summary["data"]["packed"] == ("--packing" in extra)
    (rec,) = load_records([out / "run_record.json"])
    assert rec["kind"] == "run" and rec["status"] == "ok" and rec["measured"]["device"] == "cpu"
    assert rec["measured"]["steps"] == 25 and rec["measured"]["tokens_per_s"] > 0
    assert rec["model"]["config"]["model_type"] == "llama"
    assert (out / "loss.png").stat().st_size > 1000
    assert not (tmp_path / "results").exists()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    if method == "full":
        assert not (out / "adapter_config.json").exists()
        model = AutoModelForCausalLM.from_pretrained(out)
    else:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(out)
        assert model.peft_config["default"].peft_type.value.lower().startswith(
            {"lora": "lora", "dora": "lora", "prefix": "prefix", "prompt": "prompt", "ia3": "ia3"}[method])
        assert getattr(model.peft_config["default"], "use_dora", False) == (method == "dora")
    generate(model.eval(), tok)


def test_only_options_passed_override_the_plan(tiny_plan, tmp_path):
    plan = tiny_plan(method="lora", rank=8, batch_size=4, seq_len=64)
    out = tmp_path / "a"
    res = invoke(plan, "--data", ex("text"), "--output-dir", out, "--device", "cpu", "--method", "lora",
                 "--max-steps", "2", "--no-progress")
    assert res.exit_code == 0, res.output
    tc = read_plan(out / "plan.toml").train
    # --method was passed (same value); rank, batch and seq_len are the plan's, not the CLI defaults (16, 1, 2048)
    assert (tc.method, tc.rank, tc.batch_size, tc.seq_len) == ("lora", 8, 4, 64)
    assert read_plan(out / "plan.toml").schedule.max_steps == 2

    out = tmp_path / "b"
    res = invoke(plan, "--data", ex("text"), "--output-dir", out, "--device", "cpu", "--rank", "4", "--batch-size",
                 "2", "--grad-accum", "2", "--lr", "1e-3", "--max-steps", "2", "--no-progress")
    assert res.exit_code == 0, res.output
    pf = read_plan(out / "plan.toml")
    assert (pf.train.rank, pf.train.batch_size, pf.train.grad_accum) == (4, 2, 2)
    assert pf.schedule.learning_rate == 1e-3
    assert all(len(r["examples"]) == 4 for r in log(out) if "loss" in r)


@pytest.mark.parametrize("args,option,words", [
    (["--method", "qlora", "--precision", "bf16"], "--method", "qlora needs CUDA"),
    (["--method", "qlora"], "--precision", "not valid with qlora"),
    (["--optimizer", "adamw8bit"], "--optimizer", "needs CUDA"),
    (["--method", "prefix", "--grad-ckpt"], "--grad-ckpt", "prefix tuning does not work with gradient checkpointing"),
    (["--method", "prompt", "--packing"], "--packing", "valid with packing"),
    (["--batch-size", "0"], "--batch-size", "batch_size must be a positive integer"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio", "warmup_ratio must be in [0, 1)"),
    (["--model-path", "/no/such/model"], "--model-path", "no such folder"),
    (["--format", "alpaca"], "--data", "missing 'instruction'"),
    (["--method", "nonsense"], "--method", "'nonsense' is not one of"),
])
def test_user_errors_exit_2_naming_the_option(tiny_plan, tmp_path, args, option, words):
    res = invoke(tiny_plan(), "--data", ex("text"), "--output-dir", tmp_path / "out", "--device", "cpu", *args)
    assert res.exit_code == 2, res.output
    assert option in res.output and words in flat(res)
    assert "Traceback" not in res.output


def test_plan_and_output_dir_errors(tiny_plan, tmp_path, tiny_model_dir):
    bad = tiny_plan()
    bad.write_text(bad.read_text().replace("[train]\n", "[train]\nwarp_drive = true\n"))
    res = invoke(bad, "--data", ex("text"), "--output-dir", tmp_path / "o1", "--device", "cpu")
    assert res.exit_code == 2 and "[train] unknown training field(s) warp_drive" in flat(res)

    no_weights = tmp_path / "config-only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((Path(tiny_model_dir) / "config.json").read_text())
    res = invoke(tiny_plan(), "--data", ex("text"), "--output-dir", tmp_path / "o2", "--device", "cpu",
                 "--model-path", no_weights)
    assert res.exit_code == 2 and "no weights" in flat(res)

    out = tmp_path / "o3"
    assert invoke(tiny_plan(max_steps=2), "--data", ex("text"), "--output-dir", out, "--device", "cpu",
                  "--no-progress").exit_code == 0
    res = invoke(tiny_plan(max_steps=2), "--data", ex("text"), "--output-dir", out, "--device", "cpu")
    assert res.exit_code == 2 and "--resume" in flat(res) and "--overwrite" in flat(res)
    res = invoke(tiny_plan(max_steps=2), "--data", ex("text"), "--output-dir", out, "--device", "cpu", "--resume")
    assert res.exit_code == 0 and "already holds a completed run" in flat(res)
    res = invoke(tiny_plan(max_steps=3), "--data", ex("text"), "--output-dir", out, "--device", "cpu", "--overwrite",
                 "--no-progress")
    assert res.exit_code == 0 and len(losses(out)) == 3


def _fake_oom_over(batch_limit: int, after_calls: int = 0):
    """recipe.forward raising CUDA's out-of-memory error for micro-batches larger than `batch_limit` (after
    `after_calls` successful forwards): what a too-large plan does on a real GPU."""
    from trainer import recipe

    real = recipe.forward
    calls = {"n": 0}

    def forward(model, batch, tc, device_type):
        calls["n"] += 1
        if batch["input_ids"].shape[0] > batch_limit and calls["n"] > after_calls and model.training:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return real(model, batch, tc, device_type)

    return forward


def test_out_of_memory_falls_back_to_the_next_plan(tiny_plan, tmp_path, monkeypatch):
    from trainer import recipe

    # 4 optimizer steps fit, then a step runs out of memory: the next plan (same effective batch of 4) continues
    # from the checkpoint at step 3, and every optimizer step still sees the same examples
    monkeypatch.setattr(recipe, "forward", _fake_oom_over(2, after_calls=4))
    plan = tiny_plan(max_steps=8, save_steps=3, fallback=[{"batch_size": 2, "grad_accum": 2}])
    out = tmp_path / "out"
    res = invoke(plan, "--data", ex("text"), "--output-dir", out, "--device", "cpu", "--no-progress", "--json")
    assert res.exit_code == 0, res.output
    assert "OUT OF MEMORY at optimizer step 5" in res.stderr and "from checkpoint-3" in res.stderr
    summary = json.loads(res.stdout)
    assert summary["fallback_used"] and summary["attempts"][0]["status"] == "oom"
    assert (summary["config"]["batch_size"], summary["config"]["grad_accum"]) == (2, 2)
    (miss,) = load_records([out / "records"])
    assert miss["status"] == "oom" and miss["train"]["batch_size"] == 4 and "out of memory" in miss["error"]
    steps = [r for r in log(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    order = D.ExampleOrder(summary["data"]["examples"], seed=0)
    assert all(r["examples"] == order.take((r["step"] - 1) * 4, 4) for r in steps)
    assert read_plan(out / "plan.toml").train.batch_size == 2  # the plan that ran

    # --no-fallback: say so plainly, record the miss, exit 1
    monkeypatch.setattr(recipe, "forward", _fake_oom_over(2))
    out = tmp_path / "nofb"
    res = invoke(plan, "--data", ex("text"), "--output-dir", out, "--device", "cpu", "--no-fallback", "--no-progress")
    assert res.exit_code == 1
    assert "out of memory with LoRA" in flat(res) and "--no-fallback" in flat(res)
    assert "Traceback" not in res.output
    (miss,) = load_records([out / "records"])
    assert miss["status"] == "oom"
    assert json.loads((out / "run_summary.json").read_text())["status"] == "oom"


def test_fallback_chain_without_fallback_tables(tiny_plan, tmp_path, monkeypatch):
    """A hand-written plan with no [[fallback]]: halve the micro-batch, double the accumulation, checkpointing on."""
    from trainer import recipe
    from trainer.loop import fallback_chain

    from planner.config import TrainConfig

    chain = fallback_chain(TrainConfig(batch_size=8, grad_accum=1), [])
    assert [(c.batch_size, c.grad_accum, c.grad_ckpt) for c in chain] == [(8, 1, True), (4, 2, True), (2, 4, True),
                                                                         (1, 8, True)]
    chain = fallback_chain(TrainConfig(method="prefix", batch_size=2), [{"batch_size": 1, "grad_accum": 3}])
    assert [(c.batch_size, c.grad_accum) for c in chain] == [(1, 2)]  # the plan's table changed the batch: synthesized

    monkeypatch.setattr(recipe, "forward", _fake_oom_over(1))
    out = tmp_path / "out"
    res = invoke(tiny_plan(max_steps=3), "--data", ex("text"), "--output-dir", out, "--device", "cpu", "--no-progress")
    assert res.exit_code == 0, res.output
    s = json.loads((out / "run_summary.json").read_text())
    assert [a["status"] for a in s["attempts"]] == ["oom", "oom", "oom", "ok"]
    assert (s["config"]["batch_size"], s["config"]["grad_accum"], s["config"]["grad_ckpt"]) == (1, 4, True)


def _start(args, env):
    return subprocess.Popen([*FTPLAN, "run", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path.name} appeared:\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_matches_an_uninterrupted_run(tiny_plan, tmp_path):
    """SIGTERM: checkpoint at the current step, exit 143. SIGKILL after a checkpoint: at most one checkpoint interval
    lost. Each resume continues the same data order; the result equals an uninterrupted run bit for bit (same RNG,
    optimizer, scheduler and data position)."""
    plan = tiny_plan(method="lora", max_steps=150, save_steps=5, lr=2e-3)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["--data", ex("alpaca"), "--device", "cpu", "--no-progress"]
    out = tmp_path / "out"
    args = [plan, *common, "--output-dir", out]

    p = _start(args, env)
    _wait_for(out / "checkpoint-5", p)
    p.send_signal(signal.SIGTERM)
    text = p.communicate(timeout=120)[0]
    assert p.returncode == 128 + signal.SIGTERM, text
    assert "stopped by SIGTERM" in text and "--resume" in text
    s = json.loads((out / "run_summary.json").read_text())
    assert s["status"] == "interrupted" and s["signal"] == "SIGTERM"
    stopped_at = s["optimizer_steps"]
    assert 5 <= stopped_at < 150 and (out / f"checkpoint-{stopped_at}").exists()

    p = _start([*args, "--resume"], env)
    first_new = stopped_at + (5 - stopped_at % 5)
    _wait_for(out / f"checkpoint-{first_new}", p)
    p.kill()  # SIGKILL: no chance to checkpoint
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists()

    p = _start([*args, "--resume"], env)
    text = p.communicate(timeout=300)[0]
    assert p.returncode == 0, text
    assert "resumed from checkpoint-" in text

    ref = tmp_path / "ref"
    r = subprocess.run([*FTPLAN, "run", *map(str, [plan, *common, "--output-dir", ref])], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr

    got, want = [x for x in log(out) if "loss" in x], [x for x in log(ref) if "loss" in x]
    assert [x["step"] for x in got] == list(range(1, 151))  # every step once: same total steps
    assert [x["examples"] for x in got] == [x["examples"] for x in want]  # the data order continued
    assert [x["loss"] for x in got] == [x["loss"] for x in want]
    s = json.loads((out / "run_summary.json").read_text())
    assert s["status"] == "completed" and s["optimizer_steps"] == 150
    from safetensors.torch import load_file

    a, b = load_file(out / "adapter_model.safetensors"), load_file(ref / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert len(list(out.glob("checkpoint-*"))) <= 2  # --keep-checkpoints 2


def test_sigint_after_a_fallback_then_resume_keeps_the_fallback_plan(tiny_plan, tmp_path, monkeypatch):
    """Ctrl-C (a real SIGINT to this process) during a run that fell back to micro-batch 2: checkpoint and exit 130;
    --resume with the original plan goes on with the checkpoint's micro-batch settings."""
    from trainer import recipe

    oom = _fake_oom_over(2)
    calls = {"n": 0}

    def forward(model, batch, tc, device_type):
        out = oom(model, batch, tc, device_type)
        calls["n"] += 1
        if calls["n"] == 9:  # the first micro-step of optimizer step 5 (micro-batch 2 x accumulation 2)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(recipe, "forward", forward)
    plan = tiny_plan(max_steps=8, save_steps=100, fallback=[{"batch_size": 2, "grad_accum": 2}])
    out = tmp_path / "out"
    args = [plan, "--data", ex("text"), "--output-dir", out, "--device", "cpu", "--no-progress"]
    res = invoke(*args)
    assert res.exit_code == 130, res.output
    assert "stopped by SIGINT at step 5 of 8" in flat(res)
    assert (out / "checkpoint-5").exists()
    saved = json.loads((out / "checkpoint-5" / "state.json").read_text())
    assert (saved["train"]["batch_size"], saved["train"]["grad_accum"]) == (2, 2)
    assert (saved["epoch"], saved["index_in_epoch"], saved["examples_seen"]) == (0, 20, 20)

    monkeypatch.undo()
    res = invoke(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert "resuming with the checkpoint's micro-batch settings" in flat(res)
    steps = [r for r in log(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    order = D.ExampleOrder(60, seed=0)
    assert all(r["examples"] == order.take((r["step"] - 1) * 4, 4) for r in steps)
    assert read_plan(out / "plan.toml").train.batch_size == 2


def test_resume_refuses_a_checkpoint_of_other_settings(tiny_plan, tmp_path):
    out = tmp_path / "out"
    plan = tiny_plan(max_steps=6, save_steps=3)
    assert invoke(plan, "--data", ex("text"), "--output-dir", out, "--device", "cpu", "--no-progress").exit_code == 0
    (out / "run_summary.json").unlink()  # as if it had been stopped after checkpoint-3
    res = invoke(plan, "--data", ex("text"), "--output-dir", out, "--device", "cpu", "--resume", "--rank", "4")
    assert res.exit_code == 2
    assert "cannot continue this run: rank: checkpoint 8, now 4" in flat(res)
    res = invoke(plan, "--data", ex("alpaca"), "--output-dir", out, "--device", "cpu", "--resume")
    assert res.exit_code == 2 and "the training data changed" in flat(res)
    res = invoke(plan, "--data", ex("text"), "--output-dir", out, "--device", "cpu", "--resume", "--no-progress")
    assert res.exit_code == 0 and "resumed from checkpoint-3" in flat(res)
    assert [r["step"] for r in log(out) if "loss" in r] == list(range(1, 7))


def test_hub_id_resolves_from_the_local_cache_only(tmp_path, tiny_model_dir, monkeypatch):
    """[model] ref as a Hugging Face id with no path: the snapshot in the local cache (HF_HOME) is used; a model
    that is not cached is a usage error saying how to get it (ftplan never downloads)."""
    import shutil

    from huggingface_hub import constants

    from conftest import write_tiny_plan

    # huggingface_hub reads HF_HOME once, at import: point it at this test's HF_HOME as a fresh process would
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(os.environ["HF_HOME"]) / "hub"))
    hub = Path(os.environ["HF_HOME"]) / "hub" / "models--tiny-org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, hub / "snapshots" / commit)
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text(commit)
    plan = write_tiny_plan(tmp_path / "plan.toml", "tiny-org/tiny-llama", max_steps=1)
    plan.write_text(plan.read_text().replace('path = "tiny-org/tiny-llama"', 'path = ""'))
    assert read_plan(plan).model_path == ""
    out = tmp_path / "out"
    res = invoke(plan, "--data", ex("text"), "--output-dir", out, "--device", "cpu", "--no-progress")
    assert res.exit_code == 0, res.output
    assert read_plan(out / "plan.toml").model_path == str(hub / "snapshots" / commit)

    plan = write_tiny_plan(tmp_path / "plan2.toml", "llama-3.2-1b", max_steps=1)
    plan.write_text(plan.read_text().replace('path = "llama-3.2-1b"', 'path = ""'))
    res = invoke(plan, "--data", ex("text"), "--output-dir", tmp_path / "o2", "--device", "cpu")
    assert res.exit_code == 2
    assert "not in the local Hugging Face cache" in flat(res) and "hf download meta-llama/Llama-3.2-1B" in flat(res)


@pytest.mark.parametrize("optimizer,precision,extra", [("sgd", "fp32", ["--lr", "0.5"]),
                                                       ("adafactor", "mixed", ["--grad-ckpt"]),
                                                       ("adamw", "bf16", [])])
def test_cpu_optimizers_and_precisions(tiny_plan, tmp_path, optimizer, precision, extra):
    out = tmp_path / "out"
    res = invoke(tiny_plan(method="lora", optimizer=optimizer, precision=precision, max_steps=3), "--data",
                 ex("alpaca"), "--output-dir", out, "--device", "cpu", "--no-progress", *extra)
    assert res.exit_code == 0, res.output
    tc = read_plan(out / "plan.toml").train
    assert (tc.optimizer, tc.precision) == (optimizer, precision)
    assert all(r["loss"] == r["loss"] for r in log(out) if "loss" in r)  # finite (not NaN)


def test_no_matplotlib_means_no_loss_curve(tiny_plan, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    out = tmp_path / "out"
    res = invoke(tiny_plan(max_steps=2), "--data", ex("text"), "--output-dir", out, "--device", "cpu", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "matplotlib is not installed: no loss curve" in flat(res)
    assert not (out / "loss.png").exists() and (out / "run_record.json").exists()


def test_the_cli_module_does_not_import_torch():
    code = ("import sys, planner.cli.run; from planner.cli import cli; cli.get_command(None, 'run'); "
            "heavy = {'torch', 'transformers', 'peft', 'accelerate', 'bitsandbytes', 'numpy', 'matplotlib'}; "
            "assert not heavy & {m.split('.')[0] for m in sys.modules}")
    subprocess.run([sys.executable, "-c", code], check=True)
