"""Executes plans: the reference training recipe shared by `ftplan run`, `ftplan calibrate` and the trace.

Needs the `train` extra (torch, transformers, peft, accelerate; bitsandbytes for QLoRA and 8-bit optimizers)."""
