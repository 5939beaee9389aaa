"""Time of a multi-GPU step's collectives and host transfers, and how much of it the compute hides.

What each device sends per optimizer step comes from its strategy (`Strategy.comm_bytes_per_step`,
`planner.strategies`: ring all-reduce 2 (n-1)/n x G for DDP and ZeRO-1/2; all-gathers of every unit before its
forward and its backward plus the gradients' reduce-scatter for FSDP2 and ZeRO-3). Here those bytes become seconds:

- **Links.** A ring over n devices runs at the slowest link it crosses: within a node the GPU's
  `interconnect_gb_per_s` (NVLink where the form factor has it, else PCIe); once n exceeds `gpus_per_node`, every
  ring also crosses the network, where each GPU has `inter_node_gb_per_s` (its share of the node's NICs: InfiniBand
  or Ethernet). NCCL reaches `COLLECTIVE_EFFICIENCY` of the link (bus bandwidth / link bandwidth at large messages).
- **Overlap.** FSDP2 prefetches the next unit's all-gather while the current unit computes, in forward and in
  backward, and reduce-scatters each unit's gradients while the previous one runs its backward
  (torch/distributed/fsdp/_fully_shard/_fsdp_state.py: `_pre_forward` / `_pre_backward` prefetch; DeepSpeed ZeRO-3's
  prefetch bucket does the same, stage3.py `PartitionedParameterCoordinator`): compute hides the traffic up to its
  own length, and the first unit's gather is always exposed. DDP all-reduces its 25 MiB buckets as backward
  produces them (torch/nn/parallel/distributed.py, `Reducer`), and ZeRO-1/2 with `overlap_comm` reduce-scatter the
  same way (deepspeed/runtime/zero/stage_1_and_2.py `reduce_independent_p_g_buckets_and_remove_grads`): backward
  (two thirds of the matmul work) hides the reduction, the last bucket waits. ZeRO-1/2's all-gather of the updated
  weights comes after the optimizer step, with nothing to hide it.
- **Host.** CPU offload moves each device's share of the state over its PCIe link (`host_link_gb_per_s`) and runs
  the optimizer on the host, which nothing overlaps.

The GPU profile may give `gpus_per_node`, `inter_node_gb_per_s` and `host_link_gb_per_s`; otherwise the defaults
below (with their sources) apply by form factor. Pure Python, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# NCCL's bus bandwidth at large messages over the link bandwidth: nccl-tests on a DGX H100 report ~370-400 GB/s
# all-reduce busbw against NVLink 4's 450 GB/s per direction (NVIDIA, "NCCL tests" README and DGX H100 user guide).
COLLECTIVE_EFFICIENCY = 0.8
# DDP's bucket (torch/nn/parallel/distributed.py: bucket_cap_mb=25): the last one is reduced after backward ends.
DDP_BUCKET_BYTES = 25 * 2**20
# Share of the matmul work in backward (2 of forward+backward's 3 units of 2 x params FLOPs per token).
BACKWARD_SHARE = 2 / 3


@dataclass(frozen=True)
class Topology:
    """The links of one GPU in a cluster of `gpus_per_node`-GPU nodes (10^9 B/s per direction)."""

    gpus_per_node: int
    intra_node_gb_per_s: float
    inter_node_gb_per_s: float
    host_link_gb_per_s: float

    def ring_gb_per_s(self, num_gpus: int) -> float:
        """The slowest link a ring over `num_gpus` devices crosses, times NCCL's efficiency."""
        link = self.intra_node_gb_per_s
        if num_gpus > self.gpus_per_node:
            link = min(link, self.inter_node_gb_per_s)
        return link * COLLECTIVE_EFFICIENCY

    def nodes(self, num_gpus: int) -> int:
        return math.ceil(num_gpus / self.gpus_per_node)


def default_topology(gpu) -> Topology:
    """Links a GPU profile does not state. Sources:
    - SXM / NVLink boards come as 8-GPU HGX nodes with one 400 Gb/s NIC per GPU on H100/H200 (DGX H100 datasheet:
      8 x ConnectX-7 400 Gb/s = 50 GB/s per GPU) and one 200 Gb/s NIC per GPU on A100 (DGX A100 datasheet: 8 x
      ConnectX-6 200 Gb/s HDR = 25 GB/s per GPU); V100 DGX-1: 4 x 100 Gb/s EDR for 8 GPUs (6.25 GB/s per GPU).
    - PCIe cards (L4, L40S, A10G, T4, RTX): cloud servers of up to 8 cards behind one 100 Gb/s Ethernet NIC (AWS
      g5.48xlarge / g6.48xlarge: 8 GPUs, 100 Gbps): 12.5 GB/s shared by 8 = 1.56 GB/s per GPU.
    - Host link: the card's PCIe generation, x16, per direction, at the ~80 % PCIe achieves (PCI-SIG: Gen5 x16
      64 GB/s, Gen4 32 GB/s, Gen3 16 GB/s raw): 50 / 25 / 12.5 GB/s; by compute capability: Hopper Gen5, Ampere
      and Ada Gen4, Volta and Turing Gen3.
    """
    cc = float(getattr(gpu, "compute_capability", "8.0") or "8.0")
    host = 50.0 if cc >= 9.0 else 25.0 if cc >= 8.0 else 12.5
    name = getattr(gpu, "name", "")
    nvlink = "sxm" in name
    if nvlink:
        inter = 50.0 if cc >= 9.0 else 25.0 if cc >= 8.0 else 6.25
    else:
        inter = 12.5 / 8
    return Topology(gpus_per_node=8, intra_node_gb_per_s=gpu.interconnect_gb_per_s, inter_node_gb_per_s=inter,
                    host_link_gb_per_s=host)


def topology(gpu) -> Topology:
    """The profile's links where it states them (`gpus_per_node`, `inter_node_gb_per_s`, `host_link_gb_per_s`),
    else `default_topology`."""
    d = default_topology(gpu)
    return Topology(
        gpus_per_node=int(getattr(gpu, "gpus_per_node", None) or d.gpus_per_node),
        intra_node_gb_per_s=d.intra_node_gb_per_s,
        inter_node_gb_per_s=float(getattr(gpu, "inter_node_gb_per_s", None) or d.inter_node_gb_per_s),
        host_link_gb_per_s=float(getattr(gpu, "host_link_gb_per_s", None) or d.host_link_gb_per_s),
    )


def exposed_gather_seconds(comm_s: float, compute_s: float, units: int) -> float:
    """FSDP2 / ZeRO-3: prefetch hides the traffic behind the compute up to its length; the first unit's forward
    gather is always exposed. Each unit moves three equal volumes per step (forward gather, backward gather,
    gradient reduce-scatter), so one gather is comm / (3 x units)."""
    first = comm_s / (3 * max(units, 1))
    return max(comm_s - compute_s, first)


def exposed_reduce_seconds(reduce_s: float, backward_s: float, last_bucket_s: float) -> float:
    """DDP / ZeRO-1/2 gradient reduction during backward: hidden up to the backward's length; the last bucket is
    reduced after backward ends, so at least its time shows."""
    return max(reduce_s - backward_s, min(reduce_s, last_bucket_s))


@dataclass(frozen=True)
class CommTime:
    collective_seconds: float  # all the collective traffic at the ring's bandwidth
    exposed_seconds: float  # what the compute does not hide (added to the step)
    host_seconds: float  # CPU offload: PCIe transfers (not overlapped)
    ring_gb_per_s: float
    nodes: int


def communication_time(strategy, arch, tc, gpu, compute_seconds: float, comm_bytes: int,
                       offload_bytes: float) -> CommTime:
    """Seconds per optimizer step of `comm_bytes` collective traffic and `offload_bytes` host traffic per device,
    with `compute_seconds` of GPU work to hide behind (module docstring)."""
    from .strategies import WEIGHTS

    topo = topology(gpu)
    n = tc.num_gpus
    ring = topo.ring_gb_per_s(n) * 1e9
    comm_s = comm_bytes / ring if comm_bytes else 0.0
    if comm_s == 0.0:
        exposed = 0.0
    elif WEIGHTS in strategy.shards:  # per-unit gathers, prefetched
        units = arch.num_layers + 1  # the decoder layers and the root / tail group
        exposed = exposed_gather_seconds(comm_s, compute_seconds, units)
    elif strategy.name == "ddp":
        exposed = exposed_reduce_seconds(comm_s, BACKWARD_SHARE * compute_seconds, DDP_BUCKET_BYTES / ring)
    else:  # ZeRO-1/2: half the volume is the reduce-scatter in backward, half the all-gather after the step
        half = comm_s / 2
        exposed = exposed_reduce_seconds(half, BACKWARD_SHARE * compute_seconds, DDP_BUCKET_BYTES / ring) + half
    host = offload_bytes / (topo.host_link_gb_per_s * 1e9) if offload_bytes else 0.0
    return CommTime(collective_seconds=comm_s, exposed_seconds=exposed, host_seconds=host,
                    ring_gb_per_s=ring / 1e9, nodes=topo.nodes(n))
