"""The measuring side of ftplan: run real (or traced) training steps, keep the records, validate and fit.

Needs the `train` extra (torch, transformers, peft). `planner` never imports this package."""
