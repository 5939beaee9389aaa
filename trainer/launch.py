"""Plans with more than one GPU: an accelerate config beside the run, then `accelerate launch`.

`ftplan run` writes into the output folder

    accelerate_config.yaml   DDP (MULTI_GPU), FSDP full shard (accelerate's FSDP plugin, FSDP2), or DeepSpeed
    ds_config.json           ZeRO-1 / 2 / 3 (+ CPU offload of optimizer state, and of parameters for ZeRO-3)
    run_spec.json            the resolved run (`trainer.loop.RunSpec`)

as the plan's strategy says (`planner.strategies`: `Strategy.launcher`, `Strategy.offloads`), and runs
`python -m accelerate.commands.launch --config_file accelerate_config.yaml -m trainer.loop --spec run_spec.json`.
Each process runs the same loop as a single-GPU run; an `Accelerator` built from the launcher's
environment wraps the model and optimizer (DDP, FSDP or DeepSpeed).

Several CPU processes (DDP on gloo) use `distributed_type: MULTI_GPU` with `use_cpu: true`: accelerate 1.15 starts a
`MULTI_CPU` config, like `accelerate launch --cpu --num_processes 2`, as one process unless an mpirun hostfile is given,
while the MULTI_GPU launcher (torchrun) starts all of them and each process then runs on the CPU with gloo.

Several machines (`ftplan run --num-machines M --machine-rank R --main-process-ip HOST`, or the plan's `[launch]`
table): the same command on every node with its own rank; each node writes `accelerate_config.node<R>.yaml` (the
plan's processes split evenly over the machines, `num_machines`, `machine_rank`, `main_process_ip`/`port` as
accelerate's static rendezvous takes them) and starts its share of the processes. The output folder must be on a
filesystem every node sees (sharded checkpoints are written by every process); the main node (rank 0) holds its lock
and writes the plan and the results. `ftplan run --print-launch` prints each node's command and stops.

An out-of-memory in one process ends the launch (torchrun stops the others); the next plan of the fallback chain is
then launched again, continuing from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from planner.config import STRATEGIES, TrainConfig
from planner.strategies import OPTIMIZER_STATE, WEIGHTS, strategy_of

DECODER_LAYERS = {
    "llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "qwen2": "Qwen2DecoderLayer",
    "qwen3": "Qwen3DecoderLayer", "gemma": "GemmaDecoderLayer", "gemma2": "Gemma2DecoderLayer",
    "phi3": "Phi3DecoderLayer",
}
CONFIG_NAME = "accelerate_config.yaml"
DS_CONFIG_NAME = "ds_config.json"


DEFAULT_PORT = 29500  # torchrun's / accelerate's default rendezvous port: every node must name the same one


@dataclasses.dataclass(frozen=True)
class Nodes:
    """The machines of a launch: `num_machines`, this node's `machine_rank`, the main node's address and port."""

    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None

    def check(self, num_processes: int) -> None:
        """Usage errors naming the option: ranks outside the machines, processes that do not split evenly, no main
        address for several machines."""
        if self.num_machines < 1:
            raise ValueError(f"--num-machines must be >= 1, got {self.num_machines}")
        if not 0 <= self.machine_rank < self.num_machines:
            raise ValueError(f"--machine-rank {self.machine_rank} is outside the {self.num_machines} machine(s): "
                             f"valid 0..{self.num_machines - 1}")
        if num_processes % self.num_machines:
            raise ValueError(f"--num-machines {self.num_machines} does not divide the plan's {num_processes} GPUs "
                             f"(--num-gpus): each machine runs the same number of processes")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("--main-process-ip is needed with --num-machines > 1: the address of machine rank 0, "
                             "which every node connects to")
        if self.main_process_port is not None and not 0 < self.main_process_port < 65536:
            raise ValueError(f"--main-process-port must be 1..65535, got {self.main_process_port}")

    @property
    def several(self) -> bool:
        return self.num_machines > 1

    def config_name(self) -> str:
        return f"accelerate_config.node{self.machine_rank}.yaml" if self.several else CONFIG_NAME

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(tc: TrainConfig, *, max_grad_norm: float = 1.0, hidden_size: int | None = None) -> dict:
    """DeepSpeed config for ZeRO-1/2/3 (the strategy's `launcher.deepspeed_stage`) with the plan's micro-batch,
    accumulation and clipping (explicit numbers: the loop does not hand accelerate a dataloader to fill "auto"
    values from); CPU offload moves what the strategy offloads (optimizer state; and parameters for ZeRO-3)."""
    strategy = strategy_of(tc)
    stage = strategy.launcher.deepspeed_stage
    if stage is None:
        raise ValueError(f"strategy {tc.strategy} on {tc.num_gpus} GPU(s) does not run on DeepSpeed")
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if hidden_size:  # the buckets the planner counts (planner.strategies.zero.zero_buckets), as numbers
        from planner.strategies.zero import zero_buckets

        b = zero_buckets(hidden_size)
        keys = (("reduce_bucket_size", "allgather_bucket_size") if stage < 3 else
                ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                 "stage3_max_live_parameters"))
        zero.update({k: b[k] for k in keys})
    if tc.cpu_offload:
        if OPTIMIZER_STATE in strategy.offloads:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if WEIGHTS in strategy.offloads:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.batch_size * tc.grad_accum * tc.num_gpus,
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": tc.precision in ("bf16", "mixed") or tc.base_quant.quantized},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the recipe's torch / bitsandbytes optimizers
        "zero_force_ds_cpu_optimizer": False,
        "wall_clock_breakdown": False,
    }


def fsdp_config(tc: TrainConfig, model_type: str | None = None) -> dict:
    """accelerate's `fsdp_config` block for the plan's FSDP strategy. The mixed-precision policy is not a key
    accelerate's yaml can carry (its `mixed_precision: bf16` would also reduce in bf16 and upcast trainable weights
    to fp32): `trainer.dist` hands it to accelerate's FSDP plugin from the same function the planner and the trace
    read (`planner.strategies.fsdp2.mixed_precision_policy`); `write_configs` states it in a comment."""
    strategy = strategy_of(tc)
    launcher = strategy.launcher
    fsdp = {
        "fsdp_version": launcher.fsdp_version,
        "fsdp_reshard_after_forward": launcher.fsdp_reshard_after_forward,  # True: FULL_SHARD
        "fsdp_offload_params": bool(tc.cpu_offload) and WEIGHTS in strategy.offloads,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_activation_checkpointing": False,  # the recipe's gradient_checkpointing_enable, where on
    }
    if model_type in DECODER_LAYERS:
        fsdp["fsdp_transformer_layer_cls_to_wrap"] = DECODER_LAYERS[model_type]
    return fsdp


def accelerate_config(tc: TrainConfig, *, device: str, model_type: str | None = None, port: int | None = None,
                      ds_config_file: str | None = None, nodes: Nodes = Nodes()) -> dict:
    """The accelerate config (as a dict) of a plan with `tc.num_gpus` processes over `nodes.num_machines` machines."""
    if nodes.several:
        port = port or nodes.main_process_port or DEFAULT_PORT
    cfg = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "num_machines": nodes.num_machines,
        "machine_rank": nodes.machine_rank,
        "num_processes": tc.num_gpus,  # all machines together (accelerate divides by num_machines)
        "main_training_function": "main",
        "mixed_precision": "no",  # the recipe's own bf16 autocast / bf16 weights
        "downcast_bf16": "no",
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": device == "cpu",
        "gpu_ids": "all",
        "main_process_port": port or nodes.main_process_port or free_port(),
    }
    if nodes.several:
        cfg["main_process_ip"] = nodes.main_process_ip
    strategy = strategy_of(tc)
    launcher = strategy.launcher
    if device == "cpu" or launcher.distributed_type == "MULTI_GPU":
        cfg["distributed_type"] = "MULTI_GPU"  # on CPU too: see the module docstring
    elif launcher.distributed_type == "FSDP":
        cfg["distributed_type"] = "FSDP"
        cfg["fsdp_config"] = fsdp_config(tc, model_type)
    elif launcher.distributed_type == "DEEPSPEED":  # zero1 / zero2 / zero3
        cfg["distributed_type"] = "DEEPSPEED"
        cfg["deepspeed_config"] = {
            "deepspeed_config_file": ds_config_file or DS_CONFIG_NAME,
            "zero3_init_flag": launcher.deepspeed_stage == 3,
        }
    else:
        raise ValueError(f"strategy {strategy.name} has no multi-process launcher (distributed_type "
                         f"{launcher.distributed_type}); valid: {', '.join(STRATEGIES)} on num_gpus > 1")
    return cfg


def _yaml(cfg: dict) -> str:
    try:
        import yaml

        return yaml.safe_dump(cfg, sort_keys=False)
    except ImportError:  # accelerate depends on PyYAML; keep a plain writer for flat values anyway
        lines = []
        for k, v in cfg.items():
            if isinstance(v, dict):
                lines.append(f"{k}:")
                lines += [f"  {kk}: {json.dumps(vv)}" for kk, vv in v.items()]
            else:
                lines.append(f"{k}: {json.dumps(v)}")
        return "\n".join(lines) + "\n"


def write_configs(out_dir: str | Path, tc: TrainConfig, *, device: str, model_type: str | None = None,
                  max_grad_norm: float = 1.0, nodes: Nodes = Nodes(), hidden_size: int | None = None) -> Path:
    """Write accelerate_config.yaml (and ds_config.json for ZeRO) into `out_dir`; returns the yaml's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds_file = None
    if device != "cpu" and strategy_of(tc).launcher.deepspeed_stage is not None:
        ds_file = out / DS_CONFIG_NAME
        ds_file.write_text(json.dumps(deepspeed_config(tc, max_grad_norm=max_grad_norm, hidden_size=hidden_size),
                                      indent=2) + "\n")
    cfg = accelerate_config(tc, device=device, model_type=model_type, ds_config_file=str(ds_file) if ds_file else None,
                            nodes=nodes)
    path = out / nodes.config_name()
    note = ""
    if cfg.get("distributed_type") == "FSDP":
        from planner.strategies.fsdp2 import mixed_precision_policy

        mp = mixed_precision_policy(tc)
        note = (f"# FSDP2 MixedPrecisionPolicy(param_dtype={mp['param_dtype']}, reduce_dtype={mp['reduce_dtype']}):"
                " handed to accelerate's FSDP plugin by trainer.dist (not a yaml key)\n")
    path.write_text("# written by `ftplan run` for this run's plan; `accelerate launch --config_file` reads it\n"
                    + note + _yaml(cfg))
    return path


def launch_command(config_path: str | Path, spec_path: str | Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path),
            "-m", "trainer.loop", "--spec", str(spec_path)]


def _launch(cmd: list[str], env: dict, out: Path | None = None) -> int:
    """Run the launcher under `trainer.supervise.run_child`: in its own session, SIGINT/SIGTERM passed on once, and
    stopped (parent-death signal) when this process dies; it inherits the output folder's lock, so the folder stays
    locked until the launcher and its workers are gone. Its standard output goes to standard error."""
    from . import files, supervise

    fd = files.held_lock_fd(out) if out is not None else None
    # the workers' standard output (libraries print there: DeepSpeed's accelerator notice) goes to this process's
    # standard error, so that `ftplan run --json` writes nothing but its JSON on standard output
    return supervise.run_child(cmd, env, pass_fds=(fd,) if fd is not None else (), stdout=2)


def launch_run(spec) -> dict:
    """Run `spec` (a `trainer.loop.RunSpec` with num_gpus > 1) through `accelerate launch`, relaunching with the next
    plan of the fallback chain after an out-of-memory. Returns the summary of rank 0."""
    from . import files, loop

    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    nodes = Nodes(**spec.nodes)
    model_config = json.loads((Path(spec.model_path) / "config.json").read_text())
    model_type = model_config.get("model_type")
    from planner.planfile import read_plan

    schedule = read_plan(spec.plan).schedule
    chain = [spec.train_config()] + spec.fallback_configs()
    echo = loop._echo_to(spec.quiet)
    attempts = []
    i = 0
    resume = spec.resume
    while True:
        tc = chain[i]
        child = dataclasses.replace(spec, train=tc.to_dict(), fallbacks=[], fallback=False, resume=resume,
                                    resume_as_given=i > 0)
        spec_path = out / (f"run_spec.node{nodes.machine_rank}.json" if nodes.several else loop.SPEC_NAME)
        files.write_text(spec_path, child.to_json() + "\n")
        cfg = write_configs(out, tc, device=spec.device, model_type=model_type, max_grad_norm=schedule.max_grad_norm,
                            nodes=nodes, hidden_size=model_config.get("hidden_size"))
        cmd = launch_command(cfg, spec_path)
        echo(f"launch {tc.num_gpus // nodes.num_machines} of {tc.num_gpus} processes"
             + (f" (machine {nodes.machine_rank} of {nodes.num_machines})" if nodes.several else "")
             + f": {' '.join(cmd[1:])}")
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // tc.num_gpus)))
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        started = time.time()
        rc = _launch(cmd, env, out)
        summary_path = out / loop.SUMMARY_NAME
        summary = None
        if summary_path.exists() and summary_path.stat().st_mtime >= started - 1:
            summary = json.loads(summary_path.read_text())
        if rc == 0 and summary is None and nodes.machine_rank > 0:  # machine 0 writes the results, maybe elsewhere
            return {"status": "completed", "machine_rank": nodes.machine_rank, "num_machines": nodes.num_machines,
                    "processes": tc.num_gpus // nodes.num_machines, "output_dir": str(out)}
        if rc == 0 and summary is not None and summary.get("status") == "completed":
            summary["attempts"] = attempts + summary.get("attempts", [])
            summary["fallback_used"] = bool(attempts)
            files.write_json(summary_path, summary)
            return summary
        status = summary.get("status") if summary else None
        if status == "interrupted" or rc in (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM):
            name = (summary or {}).get("signal")  # the workers' signal (the launcher itself exits 1)
            if name in signal.Signals.__members__:
                signum = int(signal.Signals[name])
            else:
                signum = abs(rc) - 128 if rc > 128 else abs(rc)
                name = str(signum)
            raise loop.Interrupted(f"stopped by {name}; continue with the same command and --resume",
                                   signum or signal.SIGINT, summary or {})
        if status == "oom":
            attempts.append({"config": tc.to_dict(), "describe": tc.describe(), "status": "oom",
                             "error": summary.get("error")})
            if not spec.fallback or i + 1 >= len(chain):
                raise loop.OutOfMemory(f"out of memory with {tc.describe()} on {tc.num_gpus} processes"
                                       + ("" if spec.fallback else " (--no-fallback)"))
            nxt = chain[i + 1]
            ck = loop.latest_checkpoint(out)
            if ck is not None and json.loads((ck / "state.json").read_text())["train"]["optimizer"] != nxt.optimizer:
                loop.checkpoint.remove_all(out)
            echo(f"OUT OF MEMORY with {tc.describe()}: relaunching with the next plan {nxt.describe()}")
            resume = True
            i += 1
            continue
        failed = "; ".join(f"rank {f['rank']} ({f.get('host', '?')}): {f['error']}" for f in loop.failures(out, started))
        if rc == 2:
            raise loop.RunUsageError("the launched run stopped on a usage error (exit 2)"
                                     + (f": {failed}" if failed else "; see its messages above"))
        raise loop.RunError(f"`accelerate launch` exited with code {rc}"
                            + (f": {failed}" if failed else f": {summary.get('error')}" if summary and summary.get("error")
                               else ""))


def node_commands(argv: list[str], nodes: Nodes, out: str | Path, num_processes: int) -> list[dict]:
    """What `ftplan run --print-launch` shows: for every machine, the `ftplan run` command to type there (this
    command with its own --machine-rank) and the accelerate launch that command starts."""
    out = Path(out)
    base, skip = [], False
    for a in argv:  # this command without --print-launch and --machine-rank
        if skip:
            skip = False
            continue
        if a == "--print-launch":
            continue
        if a == "--machine-rank":
            skip = True
            continue
        if a.startswith("--machine-rank="):
            continue
        base.append(a)
    rows = []
    for rank in range(nodes.num_machines):
        node = dataclasses.replace(nodes, machine_rank=rank)
        ftplan = ["ftplan", *base] + (["--machine-rank", str(rank)] if nodes.several else [])
        spec = out / (f"run_spec.node{rank}.json" if nodes.several else "run_spec.json")
        rows.append({"machine_rank": rank, "processes": num_processes // nodes.num_machines,
                     "ftplan": ftplan, "accelerate": ["python", *launch_command(out / node.config_name(), spec)[1:]]})
    return rows
