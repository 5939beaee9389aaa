"""Collective time across GPUs (planner/comm.py): links by node count, overlap by strategy, host transfers."""

from __future__ import annotations

import pytest

from planner import comm
from planner.config import TrainConfig
from planner.profiles import load_gpu, load_model
from planner.strategies import strategy_of


def _time(model, gpu, compute_s, **kw):
    arch = load_model(model)
    tc = TrainConfig(method="full", precision="bf16", **kw)
    S = strategy_of(tc)
    g = load_gpu(gpu)
    from planner.cost import comm_bytes_per_step

    return comm.communication_time(S, arch, tc, g, compute_s, comm_bytes_per_step(arch, tc), 0.0)


def test_a_ring_that_leaves_the_node_runs_at_the_network_share_of_each_gpu():
    g = load_gpu("h100-sxm-80gb")
    t = comm.topology(g)
    assert t.gpus_per_node == 8
    assert t.ring_gb_per_s(8) == pytest.approx(450 * comm.COLLECTIVE_EFFICIENCY)
    assert t.ring_gb_per_s(16) == pytest.approx(50 * comm.COLLECTIVE_EFFICIENCY)  # 400 Gb/s NIC per GPU
    assert t.nodes(16) == 2 and t.host_link_gb_per_s == 50.0  # PCIe Gen5 x16
    pcie = comm.topology(load_gpu("l40s-48gb"))
    assert pcie.inter_node_gb_per_s < pcie.intra_node_gb_per_s and pcie.host_link_gb_per_s == 25.0


def test_compute_hides_fsdp_gathers_up_to_its_length_and_never_the_first_unit():
    slow = _time("llama-3.1-8b", "h100-sxm-80gb", 0.0, num_gpus=8, strategy="fsdp")
    assert slow.exposed_seconds == pytest.approx(slow.collective_seconds)
    busy = _time("llama-3.1-8b", "h100-sxm-80gb", 100.0, num_gpus=8, strategy="fsdp")
    assert busy.exposed_seconds == pytest.approx(busy.collective_seconds / (3 * 33))
    two_nodes = _time("llama-3.1-8b", "h100-sxm-80gb", 0.0, num_gpus=16, strategy="fsdp")
    assert two_nodes.nodes == 2 and two_nodes.collective_seconds > 8 * slow.collective_seconds


def test_ddp_hides_its_reduction_behind_backward_and_zero2_cannot_hide_its_gather():
    ddp = _time("llama-3.2-1b", "a100-sxm-80gb", 100.0, num_gpus=4, strategy="ddp")
    assert ddp.exposed_seconds == pytest.approx(comm.DDP_BUCKET_BYTES / (ddp.ring_gb_per_s * 1e9))
    z2 = _time("llama-3.2-1b", "a100-sxm-80gb", 100.0, num_gpus=4, strategy="zero2")
    assert z2.exposed_seconds >= z2.collective_seconds / 2  # the weights' all-gather after the step
    idle = _time("llama-3.2-1b", "a100-sxm-80gb", 0.0, num_gpus=4, strategy="ddp")
    assert idle.exposed_seconds == pytest.approx(idle.collective_seconds)


def test_host_transfers_go_over_the_cards_pcie_link():
    g = load_gpu("a100-sxm-80gb")
    arch = None
    tc = TrainConfig(method="full", num_gpus=2, strategy="zero2", cpu_offload=True)
    t = comm.communication_time(strategy_of(tc), arch, tc, g, 1.0, 0, 25e9)
    assert t.host_seconds == pytest.approx(1.0) and t.exposed_seconds == 0.0
