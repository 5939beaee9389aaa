"""Multi-process plans: the accelerate config files (FSDP, ZeRO-2/3 with offload; checked by accelerate's own loader)
and a real 2-process CPU run (DDP on gloo) through `accelerate launch`. DeepSpeed is not installed here, so for
ZeRO only the config content is tested."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from planner.cli import cli
from planner.config import TrainConfig
from trainer import launch

from conftest import EXAMPLES_DIR


def _load(path):
    """The config as `accelerate launch --config_file` reads it."""
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(path))


def test_fsdp_full_shard_config(tmp_path):
    tc = TrainConfig(method="full", precision="mixed", num_gpus=8, strategy="fsdp", cpu_offload=True,
                     batch_size=2, grad_accum=4)
    path = launch.write_configs(tmp_path, tc, device="cuda", model_type="qwen2")
    cfg = _load(path)
    assert cfg.distributed_type == "FSDP" and cfg.num_processes == 8 and cfg.use_cpu is False
    fsdp = cfg.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # full shard
    assert fsdp["fsdp_offload_params"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"
    assert cfg.mixed_precision == "no"  # the recipe's own autocast
    assert not (tmp_path / "ds_config.json").exists()


@pytest.mark.parametrize("strategy,offload", [("zero2", False), ("zero2", True), ("zero3", False), ("zero3", True)])
def test_deepspeed_zero_configs(tmp_path, strategy, offload):
    tc = TrainConfig(method="lora", precision="bf16", num_gpus=4, strategy=strategy, cpu_offload=offload,
                     batch_size=2, grad_accum=8)
    path = launch.write_configs(tmp_path, tc, device="cuda", model_type="llama", max_grad_norm=0.5)
    cfg = _load(path)
    assert cfg.distributed_type == "DEEPSPEED" and cfg.num_processes == 4
    ds_file = cfg.deepspeed_config["deepspeed_config_file"]
    assert ds_file == str(tmp_path / "ds_config.json")
    assert cfg.deepspeed_config["zero3_init_flag"] is (strategy == "zero3")
    ds = json.loads(open(ds_file).read())
    zero = ds["zero_optimization"]
    assert zero["stage"] == (3 if strategy == "zero3" else 2)
    assert ("offload_optimizer" in zero) is offload
    assert ("offload_param" in zero) is (offload and strategy == "zero3")
    if offload:
        assert zero["offload_optimizer"]["device"] == "cpu"
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 8, 64)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True


def test_ddp_configs_and_launch_command(tmp_path):
    tc = TrainConfig(num_gpus=2, batch_size=2)
    cfg = _load(launch.write_configs(tmp_path / "gpu", tc, device="cuda"))
    assert cfg.distributed_type == "MULTI_GPU" and cfg.use_cpu is False and cfg.num_processes == 2
    # several CPU processes: torchrun's launcher (MULTI_GPU) with use_cpu, each process on gloo
    path = launch.write_configs(tmp_path / "cpu", tc, device="cpu")
    cfg = _load(path)
    assert cfg.distributed_type == "MULTI_GPU" and cfg.use_cpu is True and isinstance(cfg.main_process_port, int)
    cmd = launch.launch_command(path, tmp_path / "run_spec.json")
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert cmd[-4:] == ["-m", "trainer.loop", "--spec", str(tmp_path / "run_spec.json")]


@pytest.mark.slow
def test_two_process_cpu_run_through_accelerate_launch(tiny_plan, tmp_path):
    out = tmp_path / "out"
    plan = tiny_plan(method="lora", max_steps=8, batch_size=2, save_steps=4)
    res = CliRunner().invoke(cli, ["run", str(plan), "--data", os.path.join(EXAMPLES_DIR, "alpaca.jsonl"),
                                   "--output-dir", str(out), "--device", "cpu", "--num-gpus", "2", "--no-progress",
                                   "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["status"] == "completed" and summary["processes"] == 2 and summary["optimizer_steps"] == 8
    assert _load(out / "accelerate_config.yaml").num_processes == 2
    steps = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    assert [s["step"] for s in steps] == list(range(1, 9))
    # 2 processes x batch 2: each step covers 4 distinct examples, and the stream continues step after step
    from trainer import data as D

    order = D.ExampleOrder(summary["data"]["examples"], seed=0)
    assert all(s["examples"] == order.take((s["step"] - 1) * 4, 4) for s in steps)
    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(out)


@pytest.mark.slow
def test_out_of_memory_in_a_launched_run_relaunches_with_the_next_plan(tiny_plan, tmp_path, monkeypatch):
    """Each launched process gets CUDA's out-of-memory error for micro-batches over 1 (injected at interpreter start
    through a sitecustomize module: the processes are not this one); the launcher relaunches with the plan's fallback
    (micro-batch 1, accumulation 2: same effective batch) from the checkpoint."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "if '--spec' in sys.argv:  # the training processes only, not the launcher\n"
        "    import torch\n"
        "    from trainer import recipe\n"
        "    _real = recipe.forward\n"
        "    def forward(model, batch, tc, device_type):\n"
        "        if batch['input_ids'].shape[0] > 1 and model.training:\n"
        "            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 9.00 GiB (simulated)')\n"
        "        return _real(model, batch, tc, device_type)\n"
        "    recipe.forward = forward\n")
    monkeypatch.setenv("PYTHONPATH", str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "out"
    plan = tiny_plan(method="lora", max_steps=4, batch_size=2, fallback=[{"batch_size": 1, "grad_accum": 2}])
    res = CliRunner().invoke(cli, ["run", str(plan), "--data", os.path.join(EXAMPLES_DIR, "text.jsonl"),
                                   "--output-dir", str(out), "--device", "cpu", "--num-gpus", "2", "--no-progress",
                                   "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["status"] == "completed" and summary["fallback_used"]
    assert summary["attempts"][0]["status"] == "oom" and summary["attempts"][0]["config"]["batch_size"] == 2
    assert (summary["config"]["batch_size"], summary["config"]["grad_accum"]) == (1, 2)
    assert "relaunching with the next plan" in res.stderr
    from calibrate.record import load_records

    assert {r["status"] for r in load_records([out / "records"])} == {"oom"}


def _run(plan, out, *extra):
    return CliRunner().invoke(cli, ["run", str(plan), "--data", os.path.join(EXAMPLES_DIR, "alpaca.jsonl"),
                                    "--output-dir", str(out), "--device", "cpu", "--num-gpus", "2", "--no-progress",
                                    "--json", *extra], catch_exceptions=False)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_process_cpu_fsdp2_run_shards_saves_and_loads(tiny_plan, tmp_path, method):
    """FSDP2 over 2 gloo processes (`trainer.fsdp`): each process holds half of every sharded parameter, the
    checkpoint is sharded (torch.distributed.checkpoint), and the gathered final model loads in transformers/peft
    with the weights the processes trained."""
    out = tmp_path / "out"
    plan = tiny_plan(method=method, max_steps=4, batch_size=2, save_steps=2, strategy="fsdp", num_gpus=2)
    res = _run(plan, out)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["status"] == "completed" and summary["processes"] == 2 and summary["optimizer_steps"] == 4
    assert summary["config"]["strategy"] == "fsdp"
    ck = out / "checkpoint-2"
    assert (ck / "fsdp" / ".metadata").exists() and len(list((ck / "fsdp").glob("*.distcp"))) == 2
    steps = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert len(losses) == 4 and all(l == l for l in losses)  # finite, one per step
    if method == "lora":
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(out)
        b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert b and any(float(p.abs().sum()) > 0 for p in b)  # trained (B starts at zero), gathered whole
    else:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.slow
def test_two_process_cpu_fsdp2_resume_continues_the_uninterrupted_run(tiny_plan, tmp_path):
    """Stopped at step 2 (a run of max_steps 2 writes its checkpoint... here: max_steps 4 with a checkpoint at 2, then
    the checkpoint of step 4 removed), resumed: the resumed steps 3-4 match the uninterrupted run's losses."""
    full = tmp_path / "full"
    plan = tiny_plan(method="lora", max_steps=4, batch_size=2, save_steps=2, strategy="fsdp", num_gpus=2)
    res = _run(plan, full)
    assert res.exit_code == 0, res.output
    ref = [json.loads(line) for line in (full / "trainer_log.jsonl").read_text().splitlines()]
    ref = {s["step"]: s["loss"] for s in ref if "loss" in s}
    # a copy of the run as it stood at step 2: its checkpoint, its log up to step 2
    import shutil

    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    log = [line for line in (full / "trainer_log.jsonl").read_text().splitlines()
           if json.loads(line).get("step", 0) <= 2]
    (part / "trainer_log.jsonl").write_text("\n".join(log) + "\n")
    shutil.copy(full / "plan.toml", part / "plan.toml")
    res = _run(plan, part, "--resume")
    assert res.exit_code == 0, res.output
    got = [json.loads(line) for line in (part / "trainer_log.jsonl").read_text().splitlines()]
    got = {s["step"]: s["loss"] for s in got if "loss" in s}
    assert got[3] == pytest.approx(ref[3], rel=1e-5) and got[4] == pytest.approx(ref[4], rel=1e-5)


def test_cpu_processes_refuse_offload_and_deepspeed_when_it_is_missing(tiny_plan, tmp_path):
    from trainer import zero

    cases = [(["--strategy", "fsdp", "--cpu-offload"], "--cpu-offload", "nothing to offload")]
    if not zero.available():
        cases.append((["--strategy", "zero2"], "--strategy", "pip install 'ftplan[deepspeed]'"))
    for extra, option, words in cases:
        res = _run(tiny_plan(method="lora", max_steps=2), tmp_path / option.strip("-"), *extra)
        assert res.exit_code == 2 and option in res.output and words in res.output, res.output
        assert "Traceback" not in res.output


needs_deepspeed = pytest.mark.skipif("not __import__('trainer.zero').zero.available()",
                                     reason="deepspeed not installed (pip install 'ftplan[deepspeed]')")


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("strategy,method", [("zero2", "lora"), ("zero3", "full")])
def test_two_process_cpu_deepspeed_run_checkpoints_resumes_and_saves(tiny_plan, tmp_path, strategy, method):
    """The DeepSpeed engine over 2 gloo processes (`trainer.zero`): it trains with the plan's ZeRO stage, writes
    DeepSpeed's partitioned checkpoint, resumes from it to the uninterrupted run's losses, and the gathered final
    weights load in transformers / peft."""
    import shutil

    full = tmp_path / "full"
    plan = tiny_plan(method=method, max_steps=4, batch_size=2, grad_accum=2, save_steps=2, strategy=strategy,
                     num_gpus=2)
    res = _run(plan, full)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["status"] == "completed" and summary["config"]["strategy"] == strategy
    ck = full / "checkpoint-2" / "deepspeed" / "state"
    assert ck.is_dir() and any(ck.glob("*optim_states.pt"))
    ref = {s["step"]: s for s in map(json.loads, (full / "trainer_log.jsonl").read_text().splitlines()) if "loss" in s}
    assert all(ref[i]["grad_norm"] > 0 for i in ref)  # DeepSpeed's own norm of the partitioned gradients
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    (part / "trainer_log.jsonl").write_text("".join(
        line + "\n" for line in (full / "trainer_log.jsonl").read_text().splitlines()
        if json.loads(line).get("step", 0) <= 2))
    res = _run(plan, part, "--resume")
    assert res.exit_code == 0, res.output
    got = {s["step"]: s for s in map(json.loads, (part / "trainer_log.jsonl").read_text().splitlines()) if "loss" in s}
    assert [got[i]["loss"] for i in (3, 4)] == pytest.approx([ref[i]["loss"] for i in (3, 4)], rel=1e-5)
    if method == "lora":
        from peft import AutoPeftModelForCausalLM

        AutoPeftModelForCausalLM.from_pretrained(full)
    else:
        import torch
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(full)
        assert all(p.numel() > 0 and torch.isfinite(p).all() for p in m.parameters())  # gathered, not partitions


def test_print_launch_shows_each_machines_command(tiny_plan, tmp_path):
    plan = tiny_plan(method="lora", num_gpus=4, strategy="fsdp")
    out = tmp_path / "out"
    args = ["run", str(plan), "--data", "train.jsonl", "--output-dir", str(out), "--num-machines", "2",
            "--main-process-ip", "10.0.0.1", "--print-launch", "--json"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["num_machines"] == 2 and got["num_processes"] == 4 and [n["machine_rank"] for n in got["nodes"]] == [0, 1]
    for n in got["nodes"]:
        assert n["processes"] == 2 and "--print-launch" not in n["ftplan"]
        assert n["ftplan"][-2:] == ["--machine-rank", str(n["machine_rank"])]
        assert f"accelerate_config.node{n['machine_rank']}.yaml" in " ".join(n["accelerate"])
    assert not out.exists()  # nothing written, nothing run
    text = CliRunner().invoke(cli, args[:-1]).output
    assert "machine 1: 2 process(es)" in text and "10.0.0.1:29500" in text


def test_each_machine_writes_its_accelerate_config(tmp_path):
    tc = TrainConfig(method="lora", num_gpus=8, strategy="fsdp")
    nodes = launch.Nodes(num_machines=2, machine_rank=1, main_process_ip="10.0.0.1")
    cfg = _load(launch.write_configs(tmp_path, tc, device="cuda", model_type="llama", nodes=nodes))
    assert (cfg.num_machines, cfg.machine_rank, cfg.num_processes) == (2, 1, 8)
    assert cfg.main_process_ip == "10.0.0.1" and cfg.main_process_port == 29500
    assert (tmp_path / "accelerate_config.node1.yaml").exists()


@pytest.mark.parametrize("args,option", [
    (["--num-machines", "2", "--machine-rank", "2", "--main-process-ip", "h"], "--machine-rank"),
    (["--num-machines", "3", "--main-process-ip", "h"], "--num-machines"),
    (["--num-machines", "2"], "--main-process-ip"),
    (["--num-machines", "0"], "--num-machines"),
    (["--num-machines", "2", "--main-process-ip", "h", "--main-process-port", "70000"], "--main-process-port"),
])
def test_bad_machine_options_exit_2_naming_the_option(tiny_plan, tmp_path, args, option):
    plan = tiny_plan(method="lora", num_gpus=4, strategy="fsdp")
    res = CliRunner().invoke(cli, ["run", str(plan), "--data", "x.jsonl", "--output-dir", str(tmp_path / "o"),
                                   "--print-launch", *args])
    assert res.exit_code == 2 and option in res.output and "Traceback" not in res.output, res.output


def test_plan_launch_table_round_trips_and_is_validated(tiny_plan, tmp_path):
    import dataclasses

    from planner.planfile import read_plan, write_plan

    pf = dataclasses.replace(read_plan(tiny_plan(num_gpus=4)), launch={"num_machines": 2, "main_process_ip": "h1"})
    write_plan(pf, tmp_path / "p.toml")
    assert read_plan(tmp_path / "p.toml").launch == {"num_machines": 2, "main_process_ip": "h1"}
    text = (tmp_path / "p.toml").read_text().replace('main_process_ip = "h1"', "main_process_ip = 3")
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ValueError, match=r"\[launch\] main_process_ip must be a string"):
        read_plan(tmp_path / "bad.toml")


@pytest.mark.slow
def test_two_machines_on_localhost_train_one_ddp_run(tiny_plan, tmp_path):
    """Two `ftplan run` commands, machine rank 0 and 1 of 2, one process each, rendezvous on 127.0.0.1: one run of 2
    processes whose results machine 0 writes (the output folder is shared, as on a cluster filesystem)."""
    import subprocess
    import sys

    plan = tiny_plan(method="lora", max_steps=3, batch_size=2, num_gpus=2)
    out = tmp_path / "out"
    port = str(launch.free_port())
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-c", "from planner.cli import main; main()", "run", str(plan), "--data", os.path.join(EXAMPLES_DIR, "alpaca.jsonl"),
           "--output-dir", str(out), "--device", "cpu", "--no-progress", "--json", "--num-machines", "2",
           "--main-process-ip", "127.0.0.1", "--main-process-port", port]
    procs = [subprocess.Popen(cmd + ["--machine-rank", str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    main = json.loads(outs[0][0])
    assert main["status"] == "completed" and main["processes"] == 2 and main["optimizer_steps"] == 3
    assert json.loads(outs[1][0])["status"] == "completed"
    assert (out / "accelerate_config.node0.yaml").exists() and (out / "accelerate_config.node1.yaml").exists()


@pytest.mark.slow
def test_a_failing_process_is_named_by_rank_and_no_process_is_left(tiny_plan, tmp_path, monkeypatch):
    """Rank 1 crashes in its first forward (injected at interpreter start, as in the out-of-memory test): the run
    fails with the rank, host and error in its message, and no training process survives."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if '--spec' in sys.argv and os.environ.get('RANK') == '1':\n"
        "    from trainer import recipe\n"
        "    def forward(model, batch, tc, device_type):\n"
        "        raise RuntimeError('injected failure on rank 1')\n"
        "    recipe.forward = forward\n")
    monkeypatch.setenv("PYTHONPATH", str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "out"
    res = _run(tiny_plan(method="lora", max_steps=2, batch_size=2, num_gpus=2), out)
    assert res.exit_code == 1, res.output
    assert "rank 1" in res.output and "injected failure on rank 1" in res.output and "Traceback" not in res.stdout
    import subprocess

    left = subprocess.run(["pgrep", "-f", str(out / "run_spec.json")], capture_output=True, text=True).stdout
    assert left == "", left
