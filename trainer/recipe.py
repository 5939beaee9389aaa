"""The reference training recipe: one code path for `ftplan run`, `ftplan calibrate` and `ftplan estimate --trace`.

What `ftplan estimate` predicts is exactly what this module does (see README "Memory-model assumptions"):

- model built with `attn_implementation="sdpa"` (the transformers default) in the precision's dtype;
- QLoRA: 4-bit NF4 with double quantization, bf16 compute (`BitsAndBytesConfig`), then
  `peft.prepare_model_for_kbit_training` (non-quantized parameters cast to fp32), then LoRA;
- LoRA: `LoraConfig(r, lora_alpha=2r, lora_dropout=0.05, target_modules=...)`; prefix / prompt / IA3 with peft defaults;
- gradient checkpointing, where on: `gradient_checkpointing_enable(use_reentrant=False)`;
- the step (`trainer.step.TrainStep`, written once for all three): each micro-batch `outputs = model(**batch)`
  (`forward` here: bf16 autocast for `mixed`), `outputs.loss.backward()`; then `clip_grad_norm_(..., 1.0)`,
  `optimizer.step()`, `optimizer.zero_grad(set_to_none=True)`; the outputs (and so the logits) stay referenced until
  the next forward returns;
- activation offloading (`--activation-offload`): TRL's own context manager around each micro-batch's forward and
  backward (trainer/offload.py, `activation_offloading` below);
- optimizer: `torch.optim.AdamW` (foreach on CUDA), bitsandbytes `AdamW8bit` / `PagedAdamW8bit`, `torch.optim.SGD`,
  transformers `Adafactor` as the `Trainer` configures it;
- the shape of the data (`Recipe.packing`, `Recipe.padding`): calibration and trace batches carry the position ids
  or the attention mask the recipe names (`batch_shape_inputs`), as `trainer.data.collate` gives real data.

torch, transformers and peft are imported here, never by `planner`.
"""

from __future__ import annotations

import contextlib

import torch

from planner.config import TrainConfig

DEFAULT_LR = 1e-5


def torch_dtype(precision: str) -> torch.dtype:
    """Dtype the model is built in: bf16 for `bf16` (and QLoRA's non-quantized part before k-bit preparation), fp32
    for `mixed` and `fp16` (master weights) and `fp32`."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def hf_config(config: dict):
    """A transformers `PretrainedConfig` from config.json fields (every other field at its default)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version")}
    return AutoConfig.for_model(config["model_type"], **fields)


def quant_storage_kwargs(tc: TrainConfig) -> dict:
    """QLoRA sharded by FSDP or ZeRO-3 stores the packed 4-bit weights in a bf16 tensor
    (`bnb_4bit_quant_storage=torch.bfloat16`, as the peft and bitsandbytes FSDP-QLoRA guides say): the sharding
    engines flatten floating tensors only (accelerate 1.15's fsdp2_prepare_model leaves uint8 Params4bit out of
    sharding). Same bytes: 4 NF4 values per bf16 element."""
    from planner.strategies import WEIGHTS, strategy_of

    return {"bnb_4bit_quant_storage": torch.bfloat16} if WEIGHTS in strategy_of(tc).shards else {}


def build_model(config: dict | None, tc: TrainConfig, *, path: str | None = None, device: str | torch.device = "cpu"):
    """Build the base model: from `path` (a local checkpoint, real weights) or from `config` (random weights,
    built directly on `device`). QLoRA needs `path` (bitsandbytes quantizes while loading)."""
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(tc.precision)
    attn = tc.recipe.attn_implementation  # planner.recipe: what the planner and the trace assume
    if attn == "sdpa":
        # transformers' default (none requested): sdpa, or eager for a model class without an sdpa path (gpt-oss's
        # attention sinks, `_supports_sdpa = False`); what planner.attention.effective_implementation predicts
        attn = None
    if tc.base_quant.quantized:
        if path is None:
            raise ValueError(f"a {tc.quant} base needs a checkpoint path to load and quantize (save the bf16 model first)")
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            **quant_storage_kwargs(tc),
        )
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=bnb, dtype=torch.bfloat16, attn_implementation=attn, device_map={"": device}
        )
    if path is not None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn, device_map={"": device})
    with torch.device(device):
        return AutoModelForCausalLM.from_config(hf_config(config), dtype=dtype, attn_implementation=attn)


def peft_config(tc: TrainConfig, model_type: str | None = None):
    """The peft config of `tc.method`, from the method's own module (`planner.methods`); None for full fine-tuning."""
    return tc.spec.peft_config(tc, model_type)


def apply_method(model, tc: TrainConfig):
    """Apply the method through peft (and k-bit preparation for QLoRA) and gradient checkpointing."""
    import peft

    gc_kwargs = {"use_reentrant": False}
    # offloaded checkpoints: transformers 5.17 `gradient_checkpointing_enable(offload=True)` runs each checkpoint
    # under `save_on_cpu(pin_memory=True)`, so the layer input it keeps goes to pinned host memory
    offload = tc.recipe.offload_checkpoints
    if tc.base_quant.quantized and tc.recipe.kbit_preparation:
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=tc.grad_ckpt, gradient_checkpointing_kwargs=gc_kwargs
        )
        if tc.grad_ckpt and offload:  # peft enabled checkpointing without the offload; enable it again with it
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs, offload=True)
    elif tc.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs, offload=offload)
    pc = peft_config(tc, getattr(getattr(model, "config", None), "model_type", None))
    if pc is not None:
        model = peft.get_peft_model(model, pc)
        if tc.recipe.adapter_dtype == "bf16":  # TRL (sft_trainer.py): trainable parameters cast to bf16
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
    from . import losses

    losses.install(model, tc.recipe.loss)  # the recipe's loss (trainer/losses.py); plain: transformers' own
    model.train()
    return model


def trainable_parameters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params, tc: TrainConfig, lr: float = DEFAULT_LR, *, foreach: bool | None = None):
    """The optimizer of `tc.optimizer`, configured as the transformers `Trainer` does.

    `foreach=None` keeps torch's default (foreach on CUDA); the trace passes True to behave as on CUDA."""
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, foreach=foreach)
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, foreach=foreach)
    if tc.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    import bitsandbytes as bnb

    if tc.optimizer == "adamw8bit":
        return bnb.optim.AdamW8bit(params, lr=lr)
    if tc.optimizer == "paged_adamw8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=lr)
    raise ValueError(f"unknown optimizer {tc.optimizer!r}")


def autocast_context(tc: TrainConfig, device_type: str):
    """bf16 autocast for `mixed`, fp16 autocast for `fp16` (its GradScaler: trainer.step); nothing otherwise."""
    if tc.precision == "mixed":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if tc.precision == "fp16":
        return torch.autocast(device_type, dtype=torch.float16)
    return contextlib.nullcontext()


def forward(model, batch: dict, tc: TrainConfig, device_type: str):
    """The forward pass of one micro-batch (bf16 autocast for `mixed`). The caller keeps the returned outputs, so
    the logits stay alive through backward and the optimizer step until the next forward returns, exactly as in a
    plain `out = model(**batch); out.loss.backward(); opt.step()` loop; the estimate counts them there."""
    with autocast_context(tc, device_type):
        return model(**batch)


def activation_offloading(model, tc: TrainConfig):
    """TRL's activation-offloading context manager for `model` (trainer/offload.py); the trace substitutes CUDA's
    device around the same call."""
    from . import offload

    return offload.context(model)


def batch_shape_inputs(tc: TrainConfig, device="cpu") -> dict:
    """The inputs that give a synthetic batch the recipe's shape of data (`planner.recipe.Recipe`), as
    `trainer.data.collate` gives them to real data:

    - packing: `position_ids` (B, S) restarting at 0 at each of `PACKED_EXAMPLES_PER_ROW` examples per row
      (`planner.layers`), and `use_cache=False`;
    - padding "longest": an `attention_mask` (B, S) of ones with the last position of the last row padded (0):
      the worst batch of rows of at most `seq_len` tokens that still has a padding token, so transformers builds
      the padding mask;
    - otherwise nothing (every row one full-length sequence)."""
    from planner.layers import PACKED_EXAMPLES_PER_ROW

    b, s = tc.batch_size, tc.seq_len
    if tc.recipe.packing:
        cut = [s * i // PACKED_EXAMPLES_PER_ROW for i in range(PACKED_EXAMPLES_PER_ROW + 1)]
        row = torch.cat([torch.arange(cut[i + 1] - cut[i]) for i in range(PACKED_EXAMPLES_PER_ROW)])
        return {"position_ids": row.repeat(b, 1).to(device), "use_cache": False}
    if tc.recipe.padding == "longest":
        mask = torch.ones(b, s, dtype=torch.long)
        mask[-1, -1] = 0
        return {"attention_mask": mask.to(device)}
    return {}


def synthetic_batch(vocab_size: int, tc: TrainConfig, device, generator: torch.Generator | None = None) -> dict:
    """Random token ids, every sequence full length, labels = input_ids (the calibration workload), with the
    recipe's shape of data (`batch_shape_inputs`)."""
    ids = torch.randint(0, vocab_size, (tc.batch_size, tc.seq_len), device=device, generator=generator)
    return {"input_ids": ids, "labels": ids, **batch_shape_inputs(tc, device)}
