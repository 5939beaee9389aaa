"""One device: nothing sharded, no buffers, nothing sent. The implicit strategy of num_gpus == 1 (the stored
`TrainConfig.strategy` stays "ddp" there, as plan files and records have it)."""

from __future__ import annotations

from .base import Strategy
from .registry import register

SINGLE = register(Strategy(name="single", label="single GPU", multi_gpu=False, recommend_offload=()))
