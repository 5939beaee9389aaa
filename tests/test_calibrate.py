"""`ftplan calibrate` on the CPU, end to end: a tiny model measured in a fresh subprocess through the real CLI, a
sweep where out-of-memory and crashing children become records, the busy-GPU refusal (NVML mocked), the
matrix format, and the child's use of the reference recipe. The real CUDA path: tests/test_calibrate_gpu.py."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from calibrate import harness
from calibrate.record import load_records, records_frame, validate_record, write_record
from planner.cli import cli
from planner.config import TrainConfig

from conftest import TINY_LLAMA_CONFIG as TINY  # noqa: E402
FTPLAN = str(Path(sys.executable).parent / "ftplan")


@pytest.fixture
def tiny_config(make_tiny_config) -> Path:
    return make_tiny_config()


def run(*args, code=0, env=None):
    r = CliRunner().invoke(cli, list(args), env=env)
    assert r.exit_code == code, r.output + (repr(r.exception) if r.exception and code == 0 else "")
    assert "Traceback" not in r.output
    return r


def test_cpu_calibration_of_a_tiny_model_writes_a_valid_record(tiny_config, tmp_path):
    """The CI path: the real `ftplan` executable, a fresh child process, one immutable record."""
    out = tmp_path / "r"
    args = [FTPLAN, "calibrate", "--model", str(tiny_config), "--method", "full", "--device", "cpu", "--steps", "4",
            "--seq-len", "32", "--batch-size", "2", "--out", str(out)]
    p = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    files = sorted((out / "cpu").glob("*.json"))
    assert len(files) == 1 and str(files[0]) in p.stdout
    (rec,) = load_records([out])
    validate_record(rec)
    assert rec["kind"] == "calibrate" and rec["status"] == "ok" and rec["error"] is None
    assert rec["command"] == "ftplan " + " ".join(args[1:])
    assert rec["model"]["name"] == "tiny" and rec["model"]["config"]["hidden_size"] == 64
    assert rec["train"]["method"] == "full" and rec["train"]["seq_len"] == 32
    m = rec["measured"]
    assert m["device"] == "cpu" and m["peak_allocated_bytes"] is None and m["nvml_peak_used_bytes"] is None
    assert m["process_peak_rss_bytes"] > 50 * 2**20
    assert m["steps"] == 4 and m["warmup_steps"] == 2 and len(m["step_seconds"]) == 4
    assert m["tokens_per_s"] == pytest.approx(64 / statistics.median(m["step_seconds"][2:]), rel=1e-3)
    pred = rec["prediction"]
    assert pred["peak_allocated_bytes"] > 0 and pred["tokens_per_s"] is None  # no GPU: memory only
    meta = rec["meta_info"]
    assert meta["versions"]["torch"] and meta["versions"]["transformers"] and meta["versions"]["peft"]
    assert "bitsandbytes" in meta["versions"] and meta["host"]["hostname"]
    assert meta["trainable_params"] > 0
    assert len(meta["losses"]) == 4

    # validate lists it (nothing comparable on a CPU: exit 0), pandas loads it
    r = run("validate", "--results", str(out))
    assert "tiny" in r.output and "no record has a comparable figure" in r.output
    df = records_frame(load_records([out]))
    assert df.loc[0, "measured.device"] == "cpu" and df.loc[0, "gpu"] == "cpu"

    # a record is written once: the same record again is refused, the file stays as it was
    before = files[0].read_bytes()
    rec.pop("_path")
    with pytest.raises(FileExistsError):
        write_record(rec, out)
    assert files[0].read_bytes() == before


def test_sweep_records_out_of_memory_and_goes_on(tiny_config, tmp_path):
    matrix = tmp_path / "m.toml"
    matrix.write_text('[defaults]\nseq_len = 32\nbatch_size = 2\nsteps = 3\n\n'
                      '[[point]]\nmodel = "tiny/config.json"\nmethod = ["full", "lora"]\nlabel = "two"\n')
    out = tmp_path / "r"
    r = run("calibrate", "--matrix", str(matrix), "--device", "cpu", "--out", str(out), "--json",
            env={harness.INJECT_ENV: "oom@step2"})
    doc = json.loads(r.stdout)
    assert doc["counts"] == {"ok": 0, "oom": 2, "error": 0}
    recs = load_records([out])
    assert sorted(x["train"]["method"] for x in recs) == ["full", "lora"]
    for rec in recs:
        assert rec["status"] == "oom" and "step2" in rec["error"] and rec["meta_info"]["phase"] == "step2"
        assert rec["measured"]["steps"] == 1  # step 1 completed before the injected OOM
        assert rec["source"] == "m.toml#1 two"
        assert rec["train"]["seq_len"] == 32


def test_a_crashed_child_becomes_an_error_record(tiny_config, tmp_path):
    out = tmp_path / "r"
    r = run("calibrate", "--model", str(tiny_config), "--device", "cpu", "--seq-len", "32", "--out", str(out),
            code=1, env={harness.INJECT_ENV: "crash@load"})
    (rec,) = load_records([out])
    assert rec["status"] == "error" and "SIGABRT" in rec["error"]
    assert rec["prediction"]["peak_allocated_bytes"] > 0  # the parent still records the configuration
    assert "1 error" in r.output


def test_a_hung_child_is_killed_at_the_timeout(tiny_config, tmp_path):
    out = tmp_path / "r"
    run("calibrate", "--model", str(tiny_config), "--device", "cpu", "--seq-len", "32", "--out", str(out),
        "--timeout", "3", code=1, env={harness.INJECT_ENV: "hang@load"})
    (rec,) = load_records([out])
    assert rec["status"] == "error" and "timed out after 3 s" in rec["error"]


# -- in-process: the child's measurement itself --------------------------------------------------------------------


def _spec(tmp_path, tc: TrainConfig, steps=3, checkpoint=None) -> dict:
    return {"model_name": "tiny", "model_ref": "tiny", "config": TINY, "train": tc.to_dict(), "checkpoint": checkpoint,
            "steps": steps, "warmup": harness.warmup_steps(steps), "device": "cpu", "out_dir": str(tmp_path),
            "command": "test", "source": "", "gpu": {}, "git": None, "host": None, "versions": None,
            "result_path": str(tmp_path / "res.json"), "forced": False}


def test_the_child_runs_the_reference_recipe(tmp_path, monkeypatch):
    """One recipe: the harness's step is the run's (trainer.step: recipe.forward per micro-step, then
    optimizer_step), grad_accum micro-steps each."""
    from trainer import recipe, step

    calls = {"forward": 0, "optimizer_step": 0, "build_model": 0, "apply_method": 0}
    for name in calls:
        module = step if name == "optimizer_step" else recipe
        orig = getattr(module, name)

        def wrapped(*a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(module, name, wrapped)
    tc = TrainConfig(method="lora", seq_len=16, batch_size=2, grad_accum=2)
    rec = harness.measure(_spec(tmp_path, tc, steps=3))
    assert rec["status"] == "ok"
    assert calls == {"forward": 6, "optimizer_step": 3, "build_model": 1, "apply_method": 1}
    assert rec["measured"]["tokens_per_s"] == pytest.approx(64 / rec["measured"]["step_seconds"][2], rel=1e-3)


def test_a_checkpoint_folder_loads_real_weights(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.recipe import hf_config

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(hf_config(TINY))
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    assert harness.checkpoint_folder(str(ckpt)) == str(ckpt.resolve())
    assert harness.checkpoint_folder(str(ckpt / "config.json")) is None  # a config.json: random weights
    tc = TrainConfig(method="full", precision="fp32", seq_len=16, batch_size=1)
    with torch.no_grad():
        ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
        expected = model(input_ids=ids, labels=ids).loss.item()
    rec = harness.measure(_spec(tmp_path, tc, steps=1, checkpoint=str(ckpt)))
    assert rec["status"] == "ok" and rec["meta_info"]["checkpoint"] == str(ckpt)
    assert rec["meta_info"]["losses"][0] == pytest.approx(expected, abs=1e-3)  # the saved weights, not fresh ones


def test_oom_classification():
    import torch

    assert harness.is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert harness.is_oom(RuntimeError("CUDA error: out of memory"))
    assert harness.is_oom(RuntimeError("cuBLAS error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert harness.is_oom(MemoryError())
    assert not harness.is_oom(RuntimeError("shape mismatch"))
    assert not harness.is_oom(ValueError("out of memory"))


def test_warmup_keeps_a_measured_step():
    assert [harness.warmup_steps(n) for n in (1, 2, 3, 4, 6, 10)] == [0, 1, 2, 2, 2, 2]


# -- busy GPU (NVML mocked: only what needs a GPU) -----------------------------------------------------------------


@pytest.fixture
def busy_gpu(monkeypatch):
    """NVML reports an H100 with 6 GiB already in use; spawning a child fails the test."""
    from calibrate import nvml

    info = {"name": "NVIDIA H100 80GB HBM3", "total_bytes": 85520809984, "used_bytes": 6 * 2**30, "driver": "550.54.15"}
    monkeypatch.setattr(nvml, "device_info", lambda index=0: dict(info))
    monkeypatch.setattr(harness, "nvml_index", lambda: 0)

    def no_spawn(*a, **k):
        raise AssertionError("a child was started on a busy GPU")

    monkeypatch.setattr(harness, "_run_one", no_spawn)
    return info


def _point():
    from planner.arch import arch_from_config

    return harness.point_from_arch(arch_from_config(TINY, name="tiny"), TrainConfig(seq_len=32))


def test_a_busy_gpu_is_refused(busy_gpu, tmp_path):
    with pytest.raises(harness.GpuBusyError, match="6.00 GiB in use.*--force"):
        harness.run_points([_point()], device="cuda", out_dir=tmp_path)
    r = run("calibrate", "--model", "llama-3.2-1b", "--out", str(tmp_path), code=1)
    assert "--force" in r.output and "6.00 GiB" in r.output
    assert not list(tmp_path.rglob("*.json"))


def test_force_measures_a_busy_gpu(busy_gpu, tmp_path, monkeypatch):
    seen = {}

    def fake_run_one(point, **kw):
        seen.update(kw)
        rec = harness._error_record(point, device="cuda", command="c", gpu=kw["gpu"], git=None, host={},
                                    versions={}, message="stub", status="oom")
        return harness.Outcome(point, "oom", harness.write_record(rec, tmp_path), rec, 0.0)

    monkeypatch.setattr(harness, "_run_one", fake_run_one)
    (o,) = harness.run_points([_point()], device="cuda", out_dir=tmp_path, force=True)
    assert seen["forced"] is True and seen["gpu"]["profile"] == "h100-sxm-80gb"
    assert o.path.parent.name == "h100-sxm-80gb"  # one folder per GPU
    assert o.record["meta_info"]["gpu_name"] == "NVIDIA H100 80GB HBM3"
    assert o.record["prediction"]["tokens_per_s"] > 0  # predicted for the detected GPU


def test_the_threshold_is_an_option(busy_gpu, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "_run_one", lambda point, **kw: (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit):  # 8 GiB threshold: 6 GiB in use is idle enough, the run starts
        harness.run_points([_point()], device="cuda", out_dir=tmp_path, busy_threshold_bytes=8 * 2**30)


# -- the command line: errors are usage errors (exit 2), never tracebacks ----------------------------------------


@pytest.mark.parametrize("args, hint", [
    ([], "--model"),
    (["--model", "7b", "--matrix", "calibrate/matrix.toml"], "--matrix"),
    (["--model", "nonexistent-model-xyz"], "--model"),
    (["--model", "7b", "--num-gpus", "2", "--strategy", "zero3"], "--num-gpus"),
    (["--model", "7b", "--method", "vera"], "--method"),
    (["--model", "7b", "--steps", "0"], "--steps"),
    (["--model", "7b", "--target-modules", "qq_proj"], "--target-modules"),
    (["--model", "7b", "--device", "tpu"], "--device"),
    (["--model", "7b", "--timeout", "0"], "--timeout"),
    (["--matrix", "calibrate/matrix.toml", "--method", "full"], "--method"),
    (["--model", "7b", "fit"], "--model"),
])
def test_usage_errors(args, hint):
    r = run("calibrate", *args, code=2)
    assert hint in r.output


def test_cuda_without_a_gpu_is_a_usage_error(monkeypatch):
    from calibrate import nvml

    monkeypatch.setattr(nvml, "device_info", lambda index=0: None)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = run("calibrate", "--model", "llama-3.2-1b", code=2)
    assert "--device" in r.output and "cpu" in r.output


# -- the matrix format -----------------------------------------------------------------------------------------------


def test_the_shipped_matrix_loads():
    points = harness.load_matrix(Path(__file__).resolve().parent.parent / "calibrate" / "matrix.toml")
    assert len(points) >= 30
    assert all(p.train.num_gpus == 1 and p.steps == 6 for p in points)
    methods = {p.train.method_name for p in points}
    assert methods == {"full", "lora", "qlora", "dora", "qdora", "prefix", "prompt", "ia3"}
    names = {p.model_name for p in points}
    assert {"llama-2-7b", "llama-3.1-8b", "llama-2-13b", "qwen2.5-0.5b", "llama-3.2-1b"} <= names
    assert any(p.train.method == "full" and p.train.grad_ckpt for p in points)


def test_matrix_lists_multiply_and_steps_override(tmp_path, tiny_config):
    m = tmp_path / "m.toml"
    m.write_text('[defaults]\nseq_len = 32\n\n[[point]]\nmodel = "tiny/config.json"\nmethod = ["lora", "ia3"]\n'
                 'batch_size = [1, 2, 4]\nsteps = 5\n\n[[point]]\nmodel = "llama-3.2-1b"\n'
                 'target_modules = ["q_proj,v_proj", "all-linear"]\n')
    pts = harness.load_matrix(m)
    assert len(pts) == 8
    assert [p.steps for p in pts] == [5] * 6 + [6] * 2
    assert {(p.train.method, p.train.batch_size) for p in pts[:6]} == {(a, b) for a in ("lora", "ia3") for b in (1, 2, 4)}
    assert pts[0].model_name == "tiny" and pts[0].config["hidden_size"] == 64  # relative to the matrix file
    assert pts[7].train.all_linear and pts[0].source == "m.toml#1"
    assert {p.steps for p in harness.load_matrix(m, steps=3)} == {3}


@pytest.mark.parametrize("text, needle", [
    ('[[point]]\nmodel = "7b"\nbatchsize = 2\n', "unknown key(s) batchsize; valid:"),
    ('[[point]]\nmethod = "lora"\n', "'model' is required"),
    ('[[point]]\nmodel = "7b"\nmethod = ["lora", "vera"]\n', "point 1 (method=vera): method must be one of"),
    ('[[point]]\nmodel = "7b"\nnum_gpus = 8\n', "calibrate measures one device"),
    ('[[point]]\nmodel = "no-such-model"\n', "unknown model"),
    ('[sweep]\n', "unknown table(s) sweep"),
    ('[[point]\n', "invalid TOML"),
])
def test_matrix_errors_name_the_entry(tmp_path, text, needle):
    m = tmp_path / "bad.toml"
    m.write_text(text)
    with pytest.raises(harness.MatrixError) as e:
        harness.load_matrix(m)
    assert needle in str(e.value) and "bad.toml" in str(e.value)
    r = run("calibrate", "--matrix", str(m), code=2)
    assert "--matrix" in r.output


def test_record_command_is_the_invocation(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/ftplan", "calibrate", "--model", "a b", "--steps", "4"])
    assert harness.invocation() == "ftplan calibrate --model 'a b' --steps 4"
