"""FSDP2 as `ftplan run` applies it: accelerate's own `fsdp2_prepare_model`, on CUDA and on CPU processes alike.

On CUDA, `ftplan run --strategy fsdp` launches accelerate's FSDP plugin (`trainer.launch.accelerate_config`,
`fsdp_version: 2`) and accelerate shards the model in `Accelerator.prepare`. On CPU, accelerate 1.15 cannot: its
`PartialState._prepare_backend` (accelerate/state.py) makes every CPU launch `MULTI_CPU`, and the FSDP plugin is only
honoured for the GPU-like distributed types (state.py, `AcceleratorState.__init__`, the branch that sets
`DistributedType.FSDP`), so an FSDP config silently trains as DDP. Several CPU processes over gloo are how ftplan's
tests run multi-process code, so there `shard` calls accelerate 1.15's `fsdp2_prepare_model`
(accelerate/utils/fsdp_utils.py) itself, with the plugin built from the fields `trainer.launch` writes
(`fsdp_plugin`): each decoder layer, then the untied input embedding, then the tail [final norm, lm_head (+ the tied
embedding)] with reshard_after_forward=False, then the root. The multi-GPU trace (`calibrate.trace_multigpu`) shards
with the same function, so the trace checks the run's own wrapping.

The mixed-precision policy is the one the plan launches with on CUDA (`planner.strategies.fsdp2.mixed_precision_policy`:
fp32 gathers for fp32 plans, every CPU run in the tests; bf16 gathers and fp32 reduction otherwise). Sharded
checkpoints use torch.distributed.checkpoint (`save_state` / `load_state`), the final weights are gathered with
`full_state`."""

from __future__ import annotations

from pathlib import Path

import torch


def fsdp_plugin(tc, model_type: str | None):
    """accelerate's FSDP plugin with the fields `trainer.launch.accelerate_config` writes, and the mixed-precision
    policy `trainer.dist` hands accelerate (`planner.strategies.fsdp2.mixed_precision_policy`)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from planner.strategies.fsdp2 import mixed_precision_policy

    from .launch import fsdp_config

    cfg = fsdp_config(tc, model_type)
    policy = {k: getattr(torch, v) for k, v in mixed_precision_policy(tc).items()}
    return FullyShardedDataParallelPlugin(
        fsdp_version=cfg["fsdp_version"],
        reshard_after_forward=cfg["fsdp_reshard_after_forward"],
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[cfg["fsdp_transformer_layer_cls_to_wrap"]]
        if "fsdp_transformer_layer_cls_to_wrap" in cfg else None,
        cpu_offload=cfg["fsdp_offload_params"],
        state_dict_type=cfg["fsdp_state_dict_type"],
        activation_checkpointing=cfg["fsdp_activation_checkpointing"],
        # the meta-device load path only changes how weights arrive, not the steady state
        cpu_ram_efficient_loading=False,
        mixed_precision_policy=MixedPrecisionPolicy(**policy),
    )


def shard(model, tc, model_type: str | None):
    """Apply FSDP2 to `model` with accelerate's own `fsdp2_prepare_model` (mixed_precision "no", as
    accelerate_config.yaml says: the recipe keeps its own dtypes and the plugin's policy casts); returns the model."""
    from types import SimpleNamespace

    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    acc = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=fsdp_plugin(tc, model_type)), mixed_precision="no",
                          is_main_process=False, torch_device_mesh=None, device=torch.device("cpu"))
    return fsdp2_prepare_model(acc, model)


def no_sync(model, sync: bool):
    """Gradient accumulation without reduce-scatter until the last micro-batch (FSDP2's
    `FSDPModule.set_requires_gradient_sync`, which accelerate's `no_sync` calls for FSDP2)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return ctx()


def save_state(folder: Path, model, optimizer) -> None:
    """Every process writes its shards of the trainable parameters and the optimizer state (torch.distributed.checkpoint
    with `get_state_dict`; frozen base weights are not saved: they come from the model folder)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model_sd = {k: v for k, v in model_sd.items() if k in trainable}
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder))


def load_state(folder: Path, model, optimizer) -> None:
    """Restore what `save_state` wrote into the sharded model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model_sd = {k: v for k, v in model_sd.items() if k in trainable}
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))


def full_state(model) -> dict:
    """The whole model's state dict, gathered onto the CPU of the main process (every process must call this)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
