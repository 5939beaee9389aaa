"""DeepSpeed ZeRO-1/2/3 across CPU processes: the DeepSpeed engine driven directly, for the runs accelerate will not start.

On CUDA, `ftplan run --strategy zero2|zero3` launches accelerate's DeepSpeed plugin with the `ds_config.json` that
`trainer.launch.deepspeed_config` writes. On CPU accelerate 1.15 does not start DeepSpeed (every CPU launch is
`MULTI_CPU`: accelerate/state.py `PartialState._prepare_backend`), while DeepSpeed itself runs on CPU: its CPU
accelerator (deepspeed/accelerator/cpu_accelerator.py, 0.19.8) communicates over gloo when oneCCL is absent. Here
the processes call `deepspeed.initialize` with the same config, and each micro-step does what accelerate's
`DeepSpeedEngineWrapper.backward` does (accelerate/utils/deepspeed.py): mark the accumulation boundary, `engine.backward`
(which scales the loss by 1 / gradient_accumulation_steps), and at the boundary `engine.step()` (clipping, optimizer
step, zero_grad). The optimizer the training step sees is a no-op (accelerate's `DeepSpeedOptimizerWrapper`),
so the shared `trainer.step.TrainStep` runs unchanged.

DeepSpeed is an optional extra (`pip install 'ftplan[deepspeed]'`); its first start on a machine JIT-compiles its
shared-memory communication op (torch cpp_extension, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

from pathlib import Path


def available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


class NoOpOptimizer:
    """What the training step calls `step` / `zero_grad` on: the engine has already done both at the boundary."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True):
        return None

    def state_dict(self):
        return self.optimizer.state_dict()


def initialize(model, optimizer, config: dict):
    """`deepspeed.initialize` over the already-started process group (gloo on CPU); returns (engine, optimizer)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, NoOpOptimizer(ds_optimizer)


def backward(engine, loss, boundary: bool) -> None:
    engine.set_gradient_accumulation_boundary(boundary)
    engine.backward(loss)
    if boundary:
        engine.step()


def save_state(folder: Path, engine) -> None:
    """Every process writes its partition of the model and optimizer state (DeepSpeed's own checkpoint layout)."""
    engine.save_checkpoint(str(folder), tag="state", save_latest=False)


def load_state(folder: Path, engine) -> None:
    path, _ = engine.load_checkpoint(str(folder), tag="state", load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint (tag 'state')")


def full_state(engine) -> dict | None:
    """The whole model's weights for saving: ZeRO-3 gathers its partitions (every process calls this; rank 0 gets
    them), ZeRO-1/2 keep whole weights on every process."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()
