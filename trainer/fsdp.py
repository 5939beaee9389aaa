"""FSDP2 across CPU processes: `fully_shard` applied the way accelerate applies it, for the runs accelerate will not start.

On CUDA, `ftplan run --strategy fsdp` launches accelerate's FSDP plugin (`trainer.launch.accelerate_config`,
`fsdp_version: 2`) and accelerate shards the model in `Accelerator.prepare`. On CPU, accelerate 1.15 cannot: its
`PartialState._prepare_backend` (accelerate/state.py) makes every CPU launch `MULTI_CPU`, and the FSDP plugin is only
honoured for the GPU-like distributed types (state.py, `AcceleratorState.__init__`, the branch that sets
`DistributedType.FSDP`), so an FSDP config silently trains as DDP. Several CPU processes over gloo are how ftplan's
tests run multi-process code, so here the same wrapping is done directly, following accelerate 1.15's
`fsdp2_prepare_model` (accelerate/utils/fsdp_utils.py):

1. every module of a class in the model's `_no_split_modules` (the decoder layers), bottom-up, gets `fully_shard`;
2. the input embedding gets its own group when it is not tied to the output embedding;
3. the final norm and the output embedding (with the input embedding when tied) form one group with
   `reshard_after_forward=False` (they are used again at the start of backward);
4. the root gets `fully_shard` with torch's default `reshard_after_forward` (False for the root).

The mixed-precision policy is the one the plan launches with on CUDA (`planner.strategies.fsdp2.mixed_precision_policy`:
fp32 gathers for fp32 plans, every CPU run in the tests; bf16 gathers and fp32 reduction otherwise). Sharded checkpoints use torch.distributed.checkpoint
(`save_state` / `load_state`), the final weights are gathered with `full_state`.
"""

from __future__ import annotations

from pathlib import Path

import torch


def decoder_layer_classes(model) -> set[type]:
    """The classes named in `_no_split_modules` of the (innermost) transformers model: what accelerate's
    TRANSFORMER_BASED_WRAP wraps when the config names no class (accelerate `fsdp2_prepare_auto_wrap_policy`)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def _bottom_up(model) -> list:
    """Children before parents, the root last (accelerate `get_module_children_bottom_up`'s order)."""
    order, stack = [], [model]
    while stack:
        m = stack.pop()
        stack.extend(m.children())
        order.append(m)
    return order[::-1]


def _final_norm(model):
    """The last direct child of the base transformer whose class name has "Norm" (accelerate `_find_final_norm`)."""
    inner = model
    while hasattr(inner, "get_base_model") and inner.get_base_model() is not inner:  # peft wrappers
        inner = inner.get_base_model()
    base = getattr(inner, getattr(inner, "base_model_prefix", ""), None) or inner
    norm = None
    for _, child in base.named_children():
        if "Norm" in type(child).__name__:
            norm = child
    return norm


def mp_policy(policy: dict | None):
    """FSDP2 `MixedPrecisionPolicy` from dtype names (`planner.strategies.fsdp2.mixed_precision_policy`: the policy
    `ftplan run` launches with; None: torch's default, no casting)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(**{k: getattr(torch, v) for k, v in (policy or {}).items()})


def shard(model, policy: dict | None = None):
    """Apply FSDP2 to `model` in place as accelerate does (module docstring) with the mixed-precision `policy`;
    returns the model."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    kwargs = {"reshard_after_forward": True, "mp_policy": mp_policy(policy)}
    layers = decoder_layer_classes(model)
    if not layers:
        raise ValueError("FSDP: the model names no decoder layer class (_no_split_modules); cannot shard it per layer")
    for m in _bottom_up(model)[:-1]:
        if isinstance(m, tuple(layers)) and not isinstance(m, FSDPModule):
            fully_shard(m, **kwargs)
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    tied = out is not None and getattr(inp, "weight", None) is getattr(out, "weight", object())
    if not tied and inp is not None and not isinstance(inp, FSDPModule):
        fully_shard(inp, **kwargs)
    tail = [m for m in ((_final_norm(model), inp, out) if tied else (_final_norm(model), out))
            if m is not None and not isinstance(m, FSDPModule)]
    if tail:
        fully_shard(tail, **{**kwargs, "reshard_after_forward": False})
    if not isinstance(model, FSDPModule):
        fully_shard(model, mp_policy=kwargs["mp_policy"])
    return model


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
