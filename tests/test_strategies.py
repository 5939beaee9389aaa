"""The strategy registry: every strategy says what it shards and the planner does what it says; ZeRO-1 (the
strategy added through the registry alone) shards the optimizer state and nothing else, and launches as DeepSpeed
stage 1."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from planner import strategies
from planner.cli import cli
from planner.config import STRATEGIES, TrainConfig
from planner.cost import comm_bytes_per_step, throughput
from planner.memory import estimate_memory, gradient_bytes, optimizer_state_bytes
from planner.profiles import load_gpu, load_model
from planner.recommend import _layouts
from planner.strategies import OPTIMIZER_STATE, WEIGHTS
from trainer import launch

MODEL = "qwen2.5-0.5b"
FULL = dict(method="full", precision="mixed", seq_len=256, grad_ckpt=True, optimizer="paged_adamw8bit")


def test_the_choices_are_the_registry():
    assert STRATEGIES == ("ddp", "fsdp", "zero1", "zero2", "zero3")
    assert STRATEGIES == tuple(sorted(s.name for s in strategies.all_strategies() if s.multi_gpu))
    assert TrainConfig(num_gpus=2, strategy="zero1").strategy == "zero1"
    # one device: the implicit single strategy, stored as "ddp" (plan files and records have it)
    one = TrainConfig(num_gpus=1, strategy="zero1")
    assert one.strategy == "ddp" and strategies.strategy_of(one).name == "single"
    for bad in ("single", "zero4"):
        with pytest.raises(ValueError, match="strategy must be one of ddp, fsdp, zero1, zero2, zero3"):
            TrainConfig(num_gpus=2, strategy=bad)
    with pytest.raises(ValueError, match="valid with offload: fsdp, zero1, zero2, zero3"):
        TrainConfig(num_gpus=2, strategy="ddp", cpu_offload=True)
    with pytest.raises(ValueError, match="already registered"):
        strategies.registry.register(strategies.get("zero1"))


def test_the_cli_offers_zero1_and_names_the_choices_on_a_bad_one():
    r = CliRunner().invoke(cli, ["estimate", "--model", MODEL, "--num-gpus", "2", "--strategy", "zero9"])
    assert r.exit_code == 2 and "zero1" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["estimate", "--model", MODEL, "--num-gpus", "4", "--strategy", "zero1", "--json"])
    assert r.exit_code == 0, r.output
    assert any(n.startswith("ZeRO-1: optimizer state sharded 4 ways") for n in json.loads(r.stdout)["notes"])


@pytest.mark.parametrize("name", STRATEGIES)
def test_memory_shards_what_the_strategy_says(name):
    """Static terms at the optimizer step, n = 4 against one device: divided exactly when declared sharded."""
    s = strategies.get(name)
    arch, n = load_model(MODEL), 4
    one = estimate_memory(arch, TrainConfig(**FULL))
    many = estimate_memory(arch, TrainConfig(**FULL, num_gpus=n, strategy=name))
    two = estimate_memory(arch, TrainConfig(**FULL, num_gpus=2, strategy=name))
    for term, kind in (("weights", WEIGHTS), ("optimizer_state", OPTIMIZER_STATE)):
        if s.launcher.deepspeed_stage is None:  # the recipe's own model states, divided
            expect = -(-one.breakdown[term] // n) if kind in s.shards else one.breakdown[term]
            assert many.breakdown[term] == expect, term
        # DeepSpeed's bf16 mode has model states of its own (test_strategies_deepspeed.py): 4 ways = half of 2 ways
        if kind in s.shards:
            assert abs(n * many.breakdown[term] - 2 * two.breakdown[term]) <= n, term
        else:
            assert many.breakdown[term] == two.breakdown[term], term
    assert many.paged_bytes == one.paged_bytes // s.ways(OPTIMIZER_STATE, n) and one.paged_bytes > 0
    assert many.breakdown["sharding_buffers"] > 0
    assert many.notes[0].startswith(f"{s.label}: ")


def test_zero1_keeps_whole_gradients_and_replicated_weights():
    arch, n = load_model(MODEL), 8
    tc = TrainConfig(**FULL)
    m = {s: estimate_memory(arch, tc.replace(num_gpus=n, strategy=s)) for s in ("ddp", "zero1", "zero2")}
    grads = 2 * tc.spec.trainable_params(arch, tc)  # DeepSpeed's bf16 mode: bf16 gradients
    # at the optimizer step ZeRO-1 holds every gradient, ZeRO-2 its 1/n: the only difference between them
    step = {s: e.events["optimizer step"] for s, e in m.items()}
    assert step["zero1"] - step["zero2"] == grads - -(-grads // n)
    # against DDP: the state and the step's scratch are sharded, the reduce bucket replaces DDP's gradient buckets
    assert m["zero2"].peak_allocated_bytes < m["zero1"].peak_allocated_bytes < m["ddp"].peak_allocated_bytes
    assert m["zero1"].breakdown["sharding_buffers"] == m["zero2"].breakdown["sharding_buffers"] < grads
    # backward: ZeRO-1 does not reduce-scatter per layer, so the layers' gradients accumulate whole as under DDP
    assert m["zero1"].events["first layer backward"] - m["zero2"].events["first layer backward"] > (n - 1) / n * grads / 2


def test_zero1_offload_moves_the_state_only():
    arch = load_model(MODEL)
    tc = TrainConfig(**FULL, num_gpus=4, strategy="zero1")
    on, off = estimate_memory(arch, tc), estimate_memory(arch, tc.replace(cpu_offload=True))
    # the state (fp32 master + optimizer state) and ZeRO-Offload's pinned host buffers (the fp32 gradient partition
    # DeepSpeed copies out to the host, the bf16 staging partition, the temporary gradient buffer)
    from planner.strategies.zero import zero_offload_device_bytes, zero_offload_host_bytes

    fp32_grads = -(-4 * tc.spec.trainable_params(arch, tc) // 4)
    host_buffers = zero_offload_host_bytes(arch, tc, False)
    assert off.cpu_offload_bytes == on.breakdown["optimizer_state"] + host_buffers and host_buffers > fp32_grads
    assert off.breakdown["sharding_buffers"] - on.breakdown["sharding_buffers"] == zero_offload_device_bytes(arch, tc,
                                                                                                            False)
    assert "optimizer_state" not in off.breakdown and off.breakdown["weights"] == on.breakdown["weights"]
    assert off.notes[1:] == ["CPU offload: optimizer state and step on the host"]


def test_zero1_sends_what_zero2_and_ddp_send_and_steps_a_shard():
    arch, gpu = load_model(MODEL), load_gpu("h100")
    tc = TrainConfig(**FULL, batch_size=2, num_gpus=8)
    comm = {s: comm_bytes_per_step(arch, tc.replace(strategy=s)) for s in STRATEGIES}
    grads = gradient_bytes(arch, tc)
    assert comm["zero1"] == comm["zero2"] == comm["ddp"] == int(2 * 7 / 8 * grads)
    # the bf16 weights all-gathered twice per micro-step, the gradients reduce-scattered once per step
    assert comm["zero3"] == comm["fsdp"] == int(7 / 8 * (2 * (2 * arch.total_params) * tc.grad_accum + grads))
    t = {s: throughput(arch, tc.replace(strategy=s), gpu).parts_seconds for s in ("ddp", "zero1", "zero2")}
    assert t["zero1"] == t["zero2"] and t["zero1"]["optimizer"] < t["ddp"]["optimizer"]
    assert comm_bytes_per_step(arch, tc.replace(num_gpus=1)) == 0
    off = throughput(arch, tc.replace(strategy="zero1", cpu_offload=True), gpu).parts_seconds
    assert off["optimizer"] == 0.0
    from planner.comm import topology

    assert off["communication"] - t["zero1"]["communication"] == pytest.approx(  # over the card's PCIe link
        2 * optimizer_state_bytes(arch, tc)["state"] / 8 / (topology(gpu).host_link_gb_per_s * 1e9))


def test_recommend_tries_the_registry_layouts():
    from planner.recipe import Recipe

    class Req:
        max_gpus = 4
        recipe = Recipe.REFERENCE

    assert _layouts(Req()) == [(1, "ddp", False)] + [
        (n, s, o) for n in (2, 4) for s, o in
        (("ddp", False), ("zero2", False), ("zero3", False), ("fsdp", False), ("zero3", True), ("fsdp", True))]
    Req.recipe = Recipe(modules_to_save=("lm_head",))  # peft's copies are modelled on one GPU
    assert _layouts(Req()) == [(1, "ddp", False)]
    assert strategies.most_sharded().name == "zero3"
    assert not strategies.get("zero1").recommend_offload  # dominated by ZeRO-2 in this model


@pytest.mark.parametrize("name,offload", [(s.name, off) for s in strategies.all_strategies() if s.multi_gpu
                                           for off in ((False, True) if s.offloads else (False,))])
def test_every_strategy_launches_as_it_declares(tmp_path, name, offload):
    from accelerate.commands.config.config_args import load_config_from_file

    s = strategies.get(name)
    tc = TrainConfig(method="lora", num_gpus=4, strategy=name, cpu_offload=offload, batch_size=2, grad_accum=2)
    cfg = load_config_from_file(str(launch.write_configs(tmp_path, tc, device="cuda", model_type="llama")))
    assert cfg.distributed_type == s.launcher.distributed_type and cfg.num_processes == 4
    ds_file = tmp_path / "ds_config.json"
    assert ds_file.exists() is (s.launcher.deepspeed_stage is not None)
    if ds_file.exists():
        zero = json.loads(ds_file.read_text())["zero_optimization"]
        assert zero["stage"] == s.launcher.deepspeed_stage
        assert ("offload_optimizer" in zero) is (offload and OPTIMIZER_STATE in s.offloads)
        assert ("offload_param" in zero) is (offload and WEIGHTS in s.offloads)
        assert cfg.deepspeed_config["zero3_init_flag"] is (s.launcher.deepspeed_stage == 3)
    if s.launcher.fsdp_version:
        assert cfg.fsdp_config["fsdp_version"] == s.launcher.fsdp_version
        assert cfg.fsdp_config["fsdp_offload_params"] is offload


def test_zero1_deepspeed_config_is_stage_1():
    tc = TrainConfig(method="full", num_gpus=2, strategy="zero1", cpu_offload=True, batch_size=1, grad_accum=4)
    zero = launch.deepspeed_config(tc)["zero_optimization"]
    assert zero["stage"] == 1 and "offload_param" not in zero and zero["offload_optimizer"]["device"] == "cpu"
    assert "stage3_gather_16bit_weights_on_model_save" not in zero
    with pytest.raises(ValueError, match="does not run on DeepSpeed"):
        launch.deepspeed_config(tc.replace(strategy="fsdp"))


def test_recommend_across_gpus_says_which_layout_wins_and_the_fewest_gpus_with_host_ram():
    """Issue 12 item 5: a 70B QLoRA on 24 GB cards; FSDP and ZeRO-3 with CPU offload are searched, the winner's
    layout and the fewest GPUs that fit are named with their device memory and host RAM per GPU."""
    from planner.plan import Workload
    from planner.recommend import Request, explain, recommend

    req = Request(arch=load_model("70b"), gpu=load_gpu("rtx-4090"), seq_len=2048, workload=Workload(None, 1.0),
                  effective_batch=16, objective="quality", margin=0.05, max_gpus=8, methods=("qlora",))
    res = recommend(req)
    assert {(p.train.strategy, p.train.cpu_offload) for p in res.ranked if p.train.num_gpus > 1} >= {
        ("fsdp", True), ("zero3", True)}
    fewest = min(p.train.num_gpus for p in res.ranked)
    assert fewest == 2 and all(p.train.cpu_offload for p in res.ranked if p.train.num_gpus == 2)
    text = explain(res)
    assert "Across GPUs:" in text and "host RAM per GPU" in text
    if res.best.train.num_gpus > 2:
        assert "The fewest GPUs it fits on: 2 x rtx-4090-24gb" in text
