"""Options shared by estimate / recommend / calibrate / run, and their conversion to planner objects.

Every user error becomes a click usage error (exit code 2) that names the option and the valid choices."""

from __future__ import annotations

import json
import sys

import click

from ..arch import ArchError
from ..config import OPTIMIZERS, PRECISIONS, STRATEGIES, TrainConfig, parse_target_modules
from ..methods import METHOD_CHOICES, TargetError, lora_targets
from ..quant import QUANTS
from ..recipe import CHOICES as RECIPE_CHOICES, Recipe
from ..profiles import DEFAULT_REVISION, ProfileError, load_gpu, resolve_model
from ..units import parse_count

# TrainConfig field -> CLI option, for error messages
OPTION_OF = {
    "method": "--method", "quant": "--quant", "use_rslora": "--use-rslora", "precision": "--precision", "rank": "--rank", "lora_alpha": "--lora-alpha",
    "lora_dropout": "--lora-dropout", "target_modules": "--target-modules", "num_virtual_tokens": "--num-virtual-tokens",
    "seq_len": "--seq-len", "batch_size": "--batch-size", "grad_accum": "--grad-accum", "grad_ckpt": "--grad-ckpt",
    "optimizer": "--optimizer", "num_gpus": "--num-gpus", "strategy": "--strategy", "cpu_offload": "--cpu-offload",
    "recipe.loss": "--loss", "recipe.kbit_preparation": "--kbit-prep", "recipe.adapter_dtype": "--adapter-dtype",
}


_REVISION_KEY = "ftplan.revision"


def _store_revision(ctx, param, value):
    ctx.meta[_REVISION_KEY] = value
    return value


def model_option(f):
    """--model, and --revision for a Hugging Face id. The revision is kept in the click context (not passed to the
    command function), where `resolve_model_or_fail` reads it, so commands keep their signatures."""
    f = click.option(
        "--revision", default=DEFAULT_REVISION, show_default=True, metavar="REV", expose_value=False,
        callback=_store_revision,
        help="Branch, tag or commit hash of a Hugging Face id given to --model (its config.json is read from the "
             "HF cache, or downloaded alone; HF_HUB_OFFLINE and HF_TOKEN apply).",
    )(f)
    return click.option(
        "--model", "model_ref", required=True, metavar="NAME|PATH",
        help="Catalog name or alias (7b, 8b, 70b, llama-3.1-8b), any Hugging Face id (Org/Name; config.json only, "
             "from the HF cache or the hub), or a config.json (or its folder).",
    )(f)


def gpu_option(required: bool = False):
    def deco(f):
        return click.option("--gpu", "gpu_ref", required=required, metavar="NAME",
                            help="GPU name or alias (a100-80, h100, 4090, l4; `ftplan gpus list`).")(f)
    return deco


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output (integer bytes).")(f)


def train_options(f):
    """The TrainConfig flags. Defaults are what peft / the transformers Trainer use."""
    opts = [
        click.option("--method", type=click.Choice(METHOD_CHOICES), default="lora", show_default=True,
                     help="Fine-tuning method (qlora = lora --quant nf4)."),
        click.option("--quant", type=click.Choice(tuple(QUANTS)), default=None,
                     help="Base weights: none, or nf4 4-bit (bitsandbytes, QLoRA/QDoRA)  [default: none]"),
        click.option("--precision", type=click.Choice(PRECISIONS), default="bf16", show_default=True,
                     help="bf16 weights/grads/state, mixed (fp32 master + bf16 autocast), fp16 (fp32 master + fp16 autocast + GradScaler: T4, V100), or fp32."),
        click.option("--rank", type=int, default=16, show_default=True, help="LoRA/QLoRA rank (higher: more memory)."),
        click.option("--lora-alpha", type=int, default=None, help="LoRA alpha  [default: 2 x rank]"),
        click.option("--lora-dropout", type=float, default=0.05, show_default=True, help="LoRA dropout."),
        click.option("--use-rslora", is_flag=True, default=None, help="Rank-stabilized LoRA scaling alpha/sqrt(r)."),
        click.option("--target-modules", default="q_proj,v_proj", show_default=True,
                     help="Comma list of module names, or all-linear."),
        click.option("--num-virtual-tokens", type=int, default=20, show_default=True, help="Prefix/prompt tuning length."),
        click.option("--seq-len", type=int, default=2048, show_default=True, help="Tokens per sequence."),
        click.option("--batch-size", type=int, default=1, show_default=True, help="Sequences per GPU per micro-step."),
        click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-steps per optimizer step."),
        click.option("--grad-ckpt/--no-grad-ckpt", default=False, show_default=True,
                     help="Gradient checkpointing (less memory, ~30% slower)."),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True, help="Optimizer."),
        click.option("--num-gpus", type=int, default=1, show_default=True, help="Data-parallel GPUs."),
        click.option("--strategy", type=click.Choice(STRATEGIES), default="ddp", show_default=True,
                     help="Multi-GPU strategy (ZeRO/FSDP shard weights, grads and state)."),
        click.option("--cpu-offload", is_flag=True, help="Offload optimizer state (and ZeRO-3/FSDP params) to CPU."),
        # -- recipe options (planner.recipe.Recipe): how the step runs; RECIPE_OPTIONS maps them to fields
        click.option("--offload-ckpt/--no-offload-ckpt", "offload_ckpt", default=False,
                     help="With --grad-ckpt: each checkpointed layer input in pinned host memory (transformers' "
                          "offload=True, Unsloth/Axolotl offloaded checkpointing)."),
        click.option("--activation-offload/--no-activation-offload", "activation_offload", default=False,
                     help="TRL's activation offloading (SFTConfig/Axolotl activation_offloading): saved tensors of "
                          "1 KiB and more in pinned host memory, the few in flight on the GPU."),
        click.option("--attn", "attn_implementation", type=click.Choice(RECIPE_CHOICES["attn_implementation"]),
                     default="sdpa", show_default=True,
                     help="transformers attn_implementation: sdpa (the kernel torch picks for the GPU) or eager."),
        click.option("--loss", type=click.Choice(RECIPE_CHOICES["loss"]), default="plain", show_default=True,
                     help="plain (transformers), chunked (TRL 1.16's fused LM head: SFTTrainer's nll), "
                          "liger (Liger fused linear CE), cce (Cut Cross-Entropy, as Axolotl loads it)."),
        click.option("--kbit-prep/--no-kbit-prep", "kbit_preparation", default=True, show_default=True,
                     help="QLoRA: peft's prepare_model_for_kbit_training (fp32 embeddings, norms, lm_head; as Axolotl); "
                          "--no-kbit-prep keeps them bf16, as TRL and LLaMA-Factory do."),
        click.option("--adapter-dtype", type=click.Choice(RECIPE_CHOICES["adapter_dtype"]), default="fp32",
                     show_default=True, help="LoRA adapters in fp32 (peft) or bf16 (TRL casts them on a quantized model)."),
        click.option("--packing/--no-packing", "packing", default=False,
                     help="Padding-free packed rows (examples concatenated, position ids restarting per example; TRL "
                          "padding_free, Axolotl sample_packing): sdpa then builds a block-diagonal mask, "
                          "flash_attention_2 runs varlen (one row per micro-batch)."),
        click.option("--padding", type=click.Choice(RECIPE_CHOICES["padding"]), default="none", show_default=True,
                     help="longest: batches padded to their longest row, so an attention mask with zeros reaches the "
                          "model (TRL's default collator); the worst batch is predicted. none: full-length rows."),
        click.option("--modules-to-save", "modules_to_save", default=None, metavar="MODULES",
                     help="Comma list of modules peft trains a full copy of beside the adapters (modules_to_save): "
                          f"{', '.join(RECIPE_CHOICES['modules_to_save'])}. LoRA, QLoRA, DoRA, IA3.  [default: none]"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


TRAIN_KEYS = ("method", "quant", "use_rslora", "precision", "rank", "lora_alpha", "lora_dropout", "target_modules", "num_virtual_tokens",
              "seq_len", "batch_size", "grad_accum", "grad_ckpt", "optimizer", "num_gpus", "strategy", "cpu_offload",
              "offload_ckpt", "activation_offload", "attn_implementation", "loss", "kbit_preparation", "adapter_dtype",
              "packing", "padding", "modules_to_save")
# CLI parameter -> Recipe field (the options that set how the step runs, on top of a plan's or file's recipe)
RECIPE_OPTIONS = {"offload_ckpt": "offload_checkpoints", "activation_offload": "activation_offload",
                  "attn_implementation": "attn_implementation", "loss": "loss",
                  "kbit_preparation": "kbit_preparation", "adapter_dtype": "adapter_dtype", "packing": "packing",
                  "padding": "padding", "modules_to_save": "modules_to_save"}
OPTION_OF.update({"recipe.offload_checkpoints": "--offload-ckpt", "offload_checkpoints": "--offload-ckpt",
                  "recipe.attn_implementation": "--attn", "attn_implementation": "--attn",
                  "recipe.loss": "--loss", "recipe.kbit_preparation": "--kbit-prep",
                  "recipe.adapter_dtype": "--adapter-dtype", "adapter_dtype": "--adapter-dtype",
                  "recipe.activation_offload": "--activation-offload", "activation_offload": "--activation-offload",
                  "recipe.packing": "--packing", "recipe.padding": "--padding",
                  "recipe.modules_to_save": "--modules-to-save", "modules_to_save": "--modules-to-save"})


def pop_train_kwargs(kwargs: dict) -> dict:
    return {k: kwargs.pop(k) for k in TRAIN_KEYS + tuple(RECIPE_OPTIONS) if k in kwargs}


def _option_for(message: str) -> str | None:
    """The option a TrainConfig error is about: the field it starts with, else the first field it names."""
    for field, opt in OPTION_OF.items():
        if message.startswith(f"{field} ") or message.startswith(f"{field}:"):
            return opt
    for field, opt in OPTION_OF.items():
        if f"{field} " in message[:40]:
            return opt
    return None


def build_train_config(values: dict) -> TrainConfig:
    """TrainConfig from option values; ValueError -> click.BadParameter naming the option (exit 2)."""
    values = {k: v for k, v in values.items() if not (k in ("quant", "use_rslora") and v is None)}
    recipe = {RECIPE_OPTIONS[k]: v for k, v in ((k, values.pop(k)) for k in list(values) if k in RECIPE_OPTIONS)
              if v is not None}  # None: not given (the plan's or the reference recipe's value stands)
    if recipe:  # on top of the recipe the values carry (a plan file's), else the reference
        base = values.get("recipe") or Recipe.REFERENCE
        values["recipe"] = {**(base.to_dict() if isinstance(base, Recipe) else dict(base)), **recipe}
    try:
        if "target_modules" in values and isinstance(values["target_modules"], str):
            values["target_modules"] = parse_target_modules(values["target_modules"])
        return TrainConfig(**values)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=_option_for(str(e)) or "configuration") from None


def resolve_model_or_fail(ref: str, revision: str | None = None):
    """(ModelArch, how it was resolved) or a usage error listing close matches. `revision` defaults to the
    command's --revision (`model_option`), else "main"."""
    if not ref.strip():
        raise click.BadParameter("empty; valid: a catalog name or alias (ftplan models list), a Hugging Face id, or "
                                 "a config.json path", param_hint="--model")
    if revision is None:
        ctx = click.get_current_context(silent=True)
        revision = (ctx.meta.get(_REVISION_KEY) if ctx is not None else None) or DEFAULT_REVISION
    try:
        return resolve_model(ref, revision)
    except (ProfileError, ArchError) as e:
        raise click.BadParameter(str(e), param_hint="--model") from None
    except UnicodeDecodeError as e:
        raise click.BadParameter(f"{ref}: not UTF-8 text ({e.reason} at byte {e.start}); valid: a config.json in "
                                 "UTF-8", param_hint="--model") from None


def resolve_gpu_or_fail(ref: str | None):
    if ref is None:
        return None
    try:
        return load_gpu(ref)
    except ProfileError as e:
        raise click.BadParameter(str(e), param_hint="--gpu") from None


def check_attention_gpu(tc: TrainConfig, gpu) -> None:
    """An attention implementation the GPU cannot run (flash_attention_2 below sm80): a usage error on --attn."""
    from ..attention import implementation_error, parse_capability

    if gpu is None:
        return
    err = implementation_error(tc.recipe.attn_implementation, gpu.name, parse_capability(gpu.compute_capability))
    if err:
        raise click.BadParameter(err, param_hint="--attn")


def check_targets(arch, tc: TrainConfig) -> None:
    """Target modules that the model lacks, or a rank larger than a layer: usage errors."""
    if tc.spec.uses_rank:
        try:
            lora_targets(arch, tc)
        except TargetError as e:
            hint = "--rank" if str(e).startswith("rank") else "--target-modules"
            raise click.BadParameter(str(e), param_hint=hint) from None


def parse_tokens_option(value: str | None, name: str = "--dataset-tokens") -> int | None:
    if value is None:
        return None
    try:
        n = parse_count(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=name) from None
    if n <= 0:
        raise click.BadParameter("must be positive", param_hint=name)
    return n


def emit_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def positive(ctx, param, value):
    """click callback: a positive number, else a usage error naming the option."""
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be > 0, got {value}")
    return value
