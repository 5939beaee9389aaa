"""Read a user's own training config (TRL `SFTConfig` YAML, Axolotl YAML, LLaMA-Factory YAML) into ftplan options.

`load_config(path)` parses the YAML with `yaml.safe_load` (nothing in the file is executed), detects the framework
from its keys and maps every key that changes memory or speed to the ftplan option it means: the `TrainConfig`
fields (method, quant, precision, rank, targets, seq_len, batch_size, grad_accum, grad_ckpt, optimizer, strategy,
cpu_offload, modules_to_save) and the `Recipe` fields (attn_implementation, loss, packing, padding, activation_offload,
offload_checkpoints, kbit_preparation, adapter_dtype). Where the file is silent, the framework's own default is
applied and listed. The result (`ConfigMapping`) says which keys were read, which defaults were applied, which keys
were ignored as known not to change memory or speed, and which keys ftplan does not know.

The mapping produces plain option values only. Whether ftplan models each value is decided by `TrainConfig` and
`Recipe` validation (`build_train_config`), whose message is prefixed with the config key that set the value; a key
value that means nothing ftplan can name (an 8-bit base, FlashAttention 3, a DeepSpeed stage it cannot read) is a
`ConfigFileError` naming the key, the value and what is supported.

Sources read (key names, and the defaults applied where a file is silent):

- TRL 1.16.0 (the train extra's pin; the loss keys read there, installed): `trl/trainer/sft_config.py` `loss_type`
  "nll" by default, "chunked_nll" a deprecated alias of "nll" (`__post_init__`), "dft" the other choice;
  `trl/trainer/sft_trainer.py` (`__init__`: `add_fused_lm_head(..., outputs=("log_probs", "entropy", "is_top1"))`
  for every loss type, `use_liger_kernel` applies only Liger's layer kernels, `fused_linear_cross_entropy` forced
  False; `compute_loss`: the fused head's per-token log-probs, so "nll" is ftplan's `chunked`).
- TRL at f2cd57710ae345ea6428ae95363267fcf38a3dc8 (huggingface/trl), the other keys: `trl/scripts/sft.py` (`trl sft --config` parses
  `ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig` from one YAML), `trl/trainer/sft_config.py`
  (`max_length` 1024, `packing` False with `packing_strategy` "bfd", `padding_free` False, `activation_offloading`
  False), `trl/trainer/base_config.py`
  (`gradient_checkpointing` True, `bf16` True unless `fp16`), `trl/trainer/model_config.py` (`dtype` "float32",
  `attn_implementation` None, `use_peft` False, `lora_r` 16, `lora_alpha` 32, `lora_dropout` 0.05,
  `lora_target_modules` None, `load_in_4bit` False, `bnb_4bit_quant_type` "nf4"), `trl/trainer/sft_trainer.py`
  (padding-free when `packing` with strategy bfd/bfd_split; no `prepare_model_for_kbit_training`; peft's fp32
  adapters except `autocast_adapter_dtype=False` under ZeRO-3 on a 16-bit base). transformers 5.17
  `TrainingArguments` (installed): `per_device_train_batch_size` 8, `gradient_accumulation_steps` 1, `optim`
  "adamw_torch_fused" (torch >= 2.8), `gradient_checkpointing_kwargs` keys `every_n_layers` and `offload`
  (`modeling_utils.gradient_checkpointing_enable`: `save_on_cpu(pin_memory=True)` around each checkpoint).
- Axolotl at 067b021c8b87a9e5e380b9173c704cf7340e30f5 (axolotl-ai-cloud/axolotl): `src/axolotl/utils/schemas/
  config.py` (`sequence_len` 512, `bf16` "auto", `gradient_checkpointing` False | True | "offload" | "offload_disk",
  `activation_offloading` False | True | "legacy" | "disk" | "hidden_states", `sample_packing` None, legacy attention
  flags mapped to `attn_implementation` by `normalize_attn_implementation`, `attn_implementation` None = transformers'
  default sdpa), `schemas/training.py` (`micro_batch_size` 1, `gradient_accumulation_steps` 1, `optimizer`
  "adamw_torch_fused"), `schemas/peft.py` (`adapter` None = full fine-tuning, `lora_dropout` 0.0, `load_in_4bit`),
  `loaders/model.py` (`prepare_model_for_kbit_training` on a 4-bit base unless FSDP/ZeRO-3; the model loaded in
  `torch_dtype`), `integrations/cut_cross_entropy` and `integrations/liger` (`cut_cross_entropy`,
  `liger_fused_linear_cross_entropy`, active only with their plugin listed in `plugins`).
- LLaMA-Factory at ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30 (hiyouga/LLaMA-Factory): `src/llamafactory/hparams/
  finetuning_args.py` (`finetuning_type` "lora", `lora_rank` 8, `lora_alpha` None = 2 x rank, `lora_dropout` 0.0,
  `lora_target` "all", `pure_bf16` False), `hparams/model_args.py` (`flash_attn` "auto" = transformers' default,
  `disable_gradient_checkpointing` False, `use_reentrant_gc` True, `use_unsloth_gc` False,
  `enable_liger_kernel` False, `quantization_bit` None, `quantization_type` "nf4"), `hparams/data_args.py`
  (`cutoff_len` 2048, `packing` None, `neat_packing` False), `model/adapter.py` (trainable parameters cast to fp32
  unless `pure_bf16`), `model/model_utils/checkpointing.py` (Unsloth's offloaded checkpointing: the layer input
  moved to host memory), `model/model_utils/attention.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

FRAMEWORKS = ("trl", "axolotl", "llamafactory")
FRAMEWORK_NAMES = {"trl": "TRL SFTConfig", "axolotl": "Axolotl", "llamafactory": "LLaMA-Factory"}

# ftplan options a config may set that are not fields of TrainConfig/Recipe in every build, with the value that
# means "the reference step" (dropped when the field does not exist, refused otherwise)
NEUTRAL = {"adapter_dtype": "fp32", "offload_checkpoints": False, "kbit_preparation": True}


class ConfigFileError(ValueError):
    """A config file ftplan cannot read, or a key value it cannot map. `key`: the config key (or None)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class ConfigMapping:
    """What a config file means to ftplan.

    Args:
        framework: trl | axolotl | llamafactory.
        path: the file read.
        model: the model the file names (None: the file names none; pass --model).
        options: ftplan option -> value (TrainConfig and Recipe field names).
        source: ftplan option -> the config key (or "default: ...") it came from, for error messages.
        read: config key -> value, the keys mapped.
        defaults: ftplan option -> "value: why", the framework defaults applied where the file is silent.
        ignored: keys known not to change memory or speed (data, logging, schedule, hub...).
        unknown: keys ftplan does not know; listed, assumed not to change memory or speed.
        schedule: Schedule field -> value (learning rate, epochs...: `ftplan run` uses them).
        notes: how a value was read where that is not obvious.
    """

    framework: str
    path: str
    model: str | None
    options: dict
    source: dict
    read: dict
    defaults: dict
    ignored: tuple
    unknown: tuple
    schedule: dict = field(default_factory=dict)
    notes: tuple = ()

    def to_dict(self) -> dict:
        return {
            "framework": self.framework, "path": self.path, "model": self.model,
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()},
            "keys_read": {k: _plain(v) for k, v in self.read.items()}, "defaults_applied": dict(self.defaults),
            "keys_ignored": list(self.ignored), "keys_unknown": list(self.unknown), "schedule": dict(self.schedule),
            "notes": list(self.notes),
        }


def _plain(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return str(v)


# -- reading ---------------------------------------------------------------------------------------------------------
def load_config(path: str | Path) -> ConfigMapping:
    """Parse `path` (YAML, `yaml.safe_load`) and map it (`map_config`). ConfigFileError on anything unreadable."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise ConfigFileError(f"{path} is a folder (valid: a YAML file)") from None
    except UnicodeDecodeError as e:
        raise ConfigFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigFileError(f"{path}: {e.strerror or e}") from None
    try:
        import yaml
    except ModuleNotFoundError:
        raise ConfigFileError("reading a config file needs PyYAML: pip install pyyaml (or 'ftplan[train]')") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigFileError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    return map_config(data, str(p))


_TRL_KEYS = {"max_length", "use_peft", "lora_r", "lora_target_modules", "loss_type", "padding_free", "packing_strategy",
             "per_device_train_batch_size", "dataset_name", "activation_offloading", "use_liger_kernel", "output_dir",
             "gradient_checkpointing", "load_in_4bit", "lora_alpha", "dataset_text_field", "assistant_only_loss"}
_LF_KEYS = {"finetuning_type", "stage", "template", "cutoff_len", "lora_rank", "lora_target", "quantization_bit",
            "flash_attn", "enable_liger_kernel", "neat_packing", "dataset_dir", "pure_bf16", "use_unsloth_gc",
            "disable_gradient_checkpointing", "additional_target", "do_train"}


def detect_framework(data: dict) -> str:
    """trl | axolotl | llamafactory, from the keys; ConfigFileError for a file of none of the three shapes.

    Axolotl names the model `base_model`; LLaMA-Factory and TRL both say `model_name_or_path`, and LLaMA-Factory's
    own keys (finetuning_type, stage, template, cutoff_len, lora_rank, lora_target...) tell them apart."""
    if not isinstance(data, dict) or not data:
        got = "an empty file" if not data else f"a YAML {type(data).__name__}"
        raise ConfigFileError(f"a config file must be a YAML mapping of keys; got {got} (valid: a TRL SFTConfig, "
                              "Axolotl or LLaMA-Factory YAML)")
    keys = {str(k) for k in data}
    if "base_model" in keys:
        return "axolotl"
    if keys & _LF_KEYS:
        return "llamafactory"
    if "model_name_or_path" in keys or keys & _TRL_KEYS:
        return "trl"
    raise ConfigFileError(
        "not a config ftplan can read: it has none of base_model (Axolotl), model_name_or_path with finetuning_type/"
        "cutoff_len/lora_rank (LLaMA-Factory), or model_name_or_path/max_length/use_peft/per_device_train_batch_size "
        f"(TRL SFTConfig); keys: {', '.join(sorted(keys)[:12])}"
        + (" ..." if len(keys) > 12 else "") + " (valid: a TRL SFTConfig, Axolotl or LLaMA-Factory YAML)")


def map_config(data, path: str = "") -> ConfigMapping:
    """Map parsed YAML `data` to ftplan options (see the module docstring)."""
    framework = detect_framework(data)
    r = _Reader(data, path, framework)
    model = {"trl": _map_trl, "axolotl": _map_axolotl, "llamafactory": _map_llamafactory}[framework](r)
    return r.result(model)


class _Reader:
    """Tracks which keys were read, which defaults were applied, and what each option came from."""

    def __init__(self, data: dict, path: str, framework: str):
        self.data = {str(k): v for k, v in data.items()}
        self.path, self.framework = path, framework
        self.options, self.source, self.read, self.defaults = {}, {}, {}, {}
        self.schedule, self.notes, self.seen = {}, [], set()

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str, default=None):
        self.seen.add(key)
        if key in self.data and self.data[key] is not None:
            self.read[key] = self.data[key]
            return self.data[key]
        return default

    def bool(self, key: str, default=None):
        v = self.raw(key)
        if v is None:
            return default
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        if not isinstance(v, bool):
            raise ConfigFileError(f"{key}: {v!r} is not true or false (valid: true, false)", key)
        return v

    def int(self, key: str, default=None, minimum: int = 1):
        v = self.raw(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ConfigFileError(f"{key}: {v!r} is not an integer >= {minimum} (valid: an integer >= {minimum})", key)
        return v

    def float(self, key: str, default=None):
        v = self.raw(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            if isinstance(v, str):
                try:
                    return float(v)
                except ValueError:
                    pass
            raise ConfigFileError(f"{key}: {v!r} is not a number", key)
        return v

    def choice(self, key: str, value, table: dict, what: str = ""):
        """table[value], or a ConfigFileError naming the key, the value and the supported values."""
        k = value.lower() if isinstance(value, str) else value
        if k not in table:
            valid = ", ".join(str(x) for x in table)
            raise ConfigFileError(f"{key}: {value!r} {what or 'is not one ftplan models'} (valid: {valid})", key)
        return table[k]

    def set(self, option: str, value, key: str) -> None:
        """`option` = `value`, read from config key `key`."""
        self.options[option] = value
        self.source[option] = key

    def default(self, option: str, value, why: str) -> None:
        """`option` = `value` because the file is silent: the framework's default, `why`."""
        self.options[option] = value
        self.source[option] = f"default ({why})"
        shown = ",".join(value) if isinstance(value, tuple) else value
        self.defaults[option] = f"{shown}: {why}"

    def note(self, text: str) -> None:
        self.notes.append(text)

    def sched(self, field_name: str, key: str, kind: str = "float") -> None:
        if field_name == "max_steps" and self.data.get(key) == -1:  # transformers' "unset"
            self.seen.add(key)
            return
        v = self.float(key) if kind == "float" else self.int(key, minimum=0)
        if v is not None:
            self.schedule[field_name] = v

    def result(self, model) -> ConfigMapping:
        ignore = IGNORED_COMMON | IGNORED[self.framework]
        ignored, unknown = [], []
        for k in self.data:
            if k in self.read:
                continue
            # set to null (the default applies), looked at but without effect here (lora_r without use_peft), or
            # known not to change memory or speed
            known = k in self.seen or k in ignore or k.startswith(IGNORED_PREFIXES)
            (ignored if known else unknown).append(k)
        return ConfigMapping(framework=self.framework, path=self.path, model=model, options=dict(self.options),
                             source=dict(self.source), read=dict(self.read), defaults=dict(self.defaults),
                             ignored=tuple(ignored), unknown=tuple(unknown), schedule=dict(self.schedule),
                             notes=tuple(self.notes))


# -- shared value tables ---------------------------------------------------------------------------------------------
# transformers `OptimizerNames` (and Axolotl's) -> ftplan optimizer; any other name is an error listing these
OPTIMIZERS = {
    "adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
    "adamw_apex_fused": "adamw", "adam": "adamw",
    "adamw_bnb_8bit": "adamw8bit", "adamw_8bit": "adamw8bit", "adam8bit": "adamw8bit",
    "paged_adamw_8bit": "paged_adamw8bit",
    "sgd": "sgd", "adafactor": "adafactor",
}
ATTENTION = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "flash_attention_2"}


def _model_name(r: _Reader, key: str):
    v = r.raw(key)
    if v is not None and not isinstance(v, str):
        raise ConfigFileError(f"{key}: {v!r} is not a model name or path", key)
    return v


def _optimizer(r: _Reader, key: str, default: str, why: str) -> None:
    v = r.raw(key)
    if v is None:
        r.default("optimizer", OPTIMIZERS[default], f"{why} ({default})")
        return
    r.set("optimizer", r.choice(key, str(v), OPTIMIZERS, "is not an optimizer ftplan models"), key)


def _targets(r: _Reader, key: str, value) -> None:
    """A list or comma string of module names; 'all-linear' / 'all' -> all-linear."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise ConfigFileError(f"{key}: {value!r} is not a list of module names (valid: a list, or all-linear)", key)
    items = tuple(v for v in items if v)
    if items in (("all",), ("all-linear",), ("all_linear",)):
        items = ("all-linear",)
    r.set("target_modules", items, key)


def _modules_to_save(r: _Reader, key: str) -> None:
    v = r.raw(key)
    if v is None:
        return
    items = [x.strip() for x in v.split(",")] if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
        raise ConfigFileError(f"{key}: {v!r} is not a list of module names (valid: e.g. embed_tokens, lm_head)", key)
    r.set("modules_to_save", tuple(x for x in items if x), key)


def _deepspeed(r: _Reader, key: str) -> None:
    """`deepspeed`: a dict or a path to a DeepSpeed JSON. Its zero_optimization.stage -> strategy zero1/2/3 (0: ddp);
    offload_optimizer/offload_param to cpu or nvme -> cpu_offload. A path that cannot be read: the stage from the file
    name (Axolotl's deepspeed_configs/zero3_bf16.json, LLaMA-Factory's ds_z3_config.json), said in a note."""
    v = r.raw(key)
    if v is None:
        return
    cfg = None
    if isinstance(v, dict):
        cfg = v
    elif isinstance(v, str):
        base = Path(r.path).parent if r.path else Path(".")
        for cand in (base / v, Path(v)):
            if cand.is_file():
                try:
                    cfg = json.loads(cand.read_text(encoding="utf-8"))
                except (OSError, ValueError) as e:
                    raise ConfigFileError(f"{key}: {v}: not a readable DeepSpeed JSON ({e})", key) from None
                break
    else:
        raise ConfigFileError(f"{key}: {v!r} is not a DeepSpeed config (valid: a path to its JSON, or a mapping)", key)
    if cfg is not None:
        zero = cfg.get("zero_optimization") or {}
        if not isinstance(zero, dict):
            raise ConfigFileError(f"{key}: zero_optimization is not a mapping", key)
        stage = zero.get("stage", 0)
        offload = any(isinstance(zero.get(o), dict) and zero[o].get("device", "none") in ("cpu", "nvme")
                      for o in ("offload_optimizer", "offload_param"))
    else:
        import re

        name = Path(v).name.lower()
        m = re.search(r"(?:zero|_z)_?([0-3])", name)
        if not m:
            raise ConfigFileError(f"{key}: {v}: no such file, and its name says no ZeRO stage (valid: a readable "
                                  "DeepSpeed JSON, or a mapping with zero_optimization.stage)", key)
        stage, offload = int(m.group(1)), "offload" in name
        r.note(f"{key}: {v} not found here; ZeRO stage {stage}{' with CPU offload' if offload else ''} taken from "
               "its name")
    strategy = r.choice(f"{key} zero_optimization.stage", stage, {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"})
    r.set("strategy", strategy, key)
    if offload:
        r.set("cpu_offload", True, key)


def _fsdp(r: _Reader, key: str, config_key: str | None) -> None:
    """transformers' `fsdp` ("full_shard auto_wrap", "full_shard offload auto_wrap", or a list) -> strategy fsdp; its
    `offload` (or fsdp_config offload_params / fsdp_offload_params) -> cpu_offload. Other sharding: an error."""
    v = r.raw(key)
    cfg = r.raw(config_key) if config_key else None
    if not v and not cfg:
        return
    words = set()
    if isinstance(v, str):
        words = set(v.split())
    elif isinstance(v, (list, tuple)):
        words = {str(x) for x in v}
    elif v not in (None, False, True):
        raise ConfigFileError(f"{key}: {v!r} is not an FSDP option list (valid: full_shard [offload] [auto_wrap])", key)
    sharding = words & {"full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard"}
    if sharding - {"full_shard"}:
        raise ConfigFileError(f"{key}: {' '.join(sorted(sharding))} is not modelled (valid: full_shard, offload, "
                              "auto_wrap)", key)
    r.set("strategy", "fsdp", key if v else config_key)
    offload = "offload" in words
    if isinstance(cfg, dict):
        offload = offload or bool(cfg.get("offload_params") or cfg.get("fsdp_offload_params") or cfg.get("cpu_offload"))
    if offload:
        r.set("cpu_offload", True, key if "offload" in words else config_key)


def _gpus_note(r: _Reader) -> None:
    if "strategy" in r.options and r.options["strategy"] != "ddp":
        r.note(f"{r.source['strategy']}: {r.options['strategy']} shards over several GPUs; the number of GPUs comes "
               "from the launcher (accelerate, torchrun, deepspeed), not the file: pass --num-gpus")


# -- TRL ---------------------------------------------------------------------------------------------------------------
def _map_trl(r: _Reader):
    """TRL `trl sft --config FILE` (ScriptArguments + SFTConfig + ModelConfig in one YAML)."""
    model = _model_name(r, "model_name_or_path")
    # method and base
    peft = r.bool("use_peft", False)
    dora = r.bool("use_dora", False)
    if r.bool("load_in_8bit", False):
        raise ConfigFileError("load_in_8bit: True (an 8-bit base) is not modelled (valid: false; load_in_4bit: true "
                              "for QLoRA)", "load_in_8bit")
    four = r.bool("load_in_4bit", False)
    if four:
        qt = r.raw("bnb_4bit_quant_type", "nf4")
        r.choice("bnb_4bit_quant_type", qt, {"nf4": "nf4"}, "is not a 4-bit type ftplan models")
        if not peft:
            raise ConfigFileError("load_in_4bit: True without use_peft: true trains a 4-bit base in full, which "
                                  "SFTTrainer refuses (valid: use_peft: true with load_in_4bit)", "load_in_4bit")
    method = ("dora" if dora else "lora") if peft else "full"
    if r.has("use_peft"):
        r.set("method", method, "use_peft" + (", use_dora" if dora else ""))
    else:
        r.default("method", method, "TRL ModelConfig use_peft defaults to false: every parameter trains")
    if four:
        r.set("quant", "nf4", "load_in_4bit")
    if peft:
        rank = r.int("lora_r")
        r.set("rank", rank, "lora_r") if rank else r.default("rank", 16, "TRL ModelConfig lora_r")
        alpha = r.int("lora_alpha")
        r.set("lora_alpha", alpha, "lora_alpha") if alpha else r.default("lora_alpha", 32, "TRL ModelConfig lora_alpha")
        drop = r.float("lora_dropout")
        r.set("lora_dropout", drop, "lora_dropout") if drop is not None else r.default(
            "lora_dropout", 0.05, "TRL ModelConfig lora_dropout")
        if r.bool("use_rslora", False):
            r.set("use_rslora", True, "use_rslora")
        t = r.raw("lora_target_modules")
        if t is not None:
            _targets(r, "lora_target_modules", t)
        else:
            r.note("lora_target_modules unset: peft's default targets for the model family")
        _modules_to_save(r, "lora_modules_to_save")
        r.raw("lora_task_type")
    else:
        r.seen.update({"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_rslora",
                       "lora_modules_to_save", "lora_task_type"})
    # precision: ModelConfig.dtype loads the weights, TrainingArguments bf16/fp16 autocast
    dtype = str(r.raw("dtype", r.raw("torch_dtype", "float32"))).lower()
    fp16 = r.bool("fp16", False)
    bf16 = r.bool("bf16", not fp16)
    if bf16 and fp16:
        raise ConfigFileError("bf16 and fp16 are both true (valid: one of them)", "fp16")
    autocast = "bf16" if bf16 else "fp16" if fp16 else None
    r.choice("dtype", dtype, {"auto": 0, "bfloat16": 0, "float16": 0, "float32": 0}, "is not a dtype")
    if four:
        precision = "bf16" if autocast == "bf16" else "fp16" if autocast == "fp16" else "fp32"
        if dtype == "float32" and autocast == "bf16":
            r.note("dtype float32 on a 4-bit base: the quantized layers compute in bf16 under autocast; the "
                   "non-quantized parts are modelled as ftplan's 4-bit recipe keeps them")
    elif autocast is None:
        precision = "fp32" if dtype == "float32" else "bf16"
    elif dtype == "float32":
        precision = "mixed" if autocast == "bf16" else "fp16"
    elif dtype == "float16":
        precision = "fp16"
    else:
        precision = "bf16"
        if dtype == "auto":
            r.note("dtype auto: the checkpoint's own dtype, taken as bf16 (pass --precision if it is not)")
    src = "dtype" if r.has("dtype") or r.has("torch_dtype") else None
    if src is None and not (r.has("bf16") or r.has("fp16")):
        r.default("precision", precision, "TRL loads in float32 (ModelConfig dtype) and sets bf16 autocast "
                                          "(SFTConfig bf16 defaults to true)")
    else:
        r.set("precision", precision, ", ".join(k for k in ("dtype", "bf16", "fp16") if r.has(k)) or "dtype")
    # adapters: peft keeps them in fp32 (autocast_adapter_dtype=True), except SFTTrainer under ZeRO-3 on a 16-bit base
    # attention, loss, data shape, offloading
    attn = r.raw("attn_implementation")
    if attn is None:
        r.default("attn_implementation", "sdpa", "ModelConfig attn_implementation None: transformers' default")
    else:
        r.set("attn_implementation", r.choice("attn_implementation", attn, ATTENTION), "attn_implementation")
    if r.bool("use_liger_kernel", False):
        raise ConfigFileError("use_liger_kernel: true (TRL 1.16 keeps its fused LM head and applies only Liger's layer "
                              "kernels, which ftplan does not model; valid: false)", "use_liger_kernel")
    loss_type = r.raw("loss_type")
    if loss_type is None:
        r.default("loss", "chunked", "SFTConfig loss_type 'nll': TRL 1.16's fused LM head (chunked)")
    else:
        r.set("loss", r.choice("loss_type", loss_type, {"nll": "chunked", "chunked_nll": "chunked"},
                               "is not one ftplan models (dft weights each token by its probability)"), "loss_type")
    seq = r.raw("max_length", 1024)
    if not r.has("max_length"):
        r.default("seq_len", 1024, "SFTConfig max_length")
    elif isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ConfigFileError(f"max_length: {seq!r} is not a positive integer (valid: tokens per sequence)",
                              "max_length")
    else:
        r.set("seq_len", seq, "max_length")
    if "max_length" in r.data and r.data["max_length"] is None:
        r.options.pop("seq_len", None)
        r.defaults.pop("seq_len", None)
        r.note("max_length: null (no truncation): the longest row sets the memory; pass --seq-len")
    packing = r.bool("packing", False)
    strategy = r.raw("packing_strategy", "bfd")
    padding_free = r.bool("padding_free", False)
    if packing:
        r.choice("packing_strategy", strategy, {"bfd": 0, "bfd_split": 0, "wrapped": 0}, "is not a packing strategy")
    pf = padding_free or (packing and str(strategy).lower() in ("bfd", "bfd_split"))
    if packing or padding_free or r.has("packing"):
        r.set("packing", pf, "padding_free" if padding_free else "packing, packing_strategy")
        if packing and not pf:
            r.note("packing_strategy wrapped: full-length rows of concatenated text (ftplan's own row shape)")
    else:
        r.default("packing", False, "SFTConfig packing and padding_free default to false (rows padded to the longest)")
    offload = r.bool("activation_offloading", False)
    if r.has("activation_offloading"):
        r.set("activation_offload", offload, "activation_offloading")
    # batch and checkpointing
    _batch(r, "per_device_train_batch_size", 8, "transformers TrainingArguments per_device_train_batch_size")
    _trl_padding(r)
    _accum(r, "gradient_accumulation_steps")
    _checkpointing(r, "gradient_checkpointing", True, "TRL SFTConfig gradient_checkpointing defaults to true")
    _optimizer(r, "optim", "adamw_torch_fused", "transformers TrainingArguments optim")
    _deepspeed(r, "deepspeed")
    _fsdp(r, "fsdp", "fsdp_config")
    _gpus_note(r)
    if peft and four:
        r.default("kbit_preparation", False, "SFTTrainer does not call prepare_model_for_kbit_training")
    if peft and r.options.get("strategy") == "zero3" and not four:
        r.default("adapter_dtype", "bf16", "SFTTrainer passes autocast_adapter_dtype=False under ZeRO-3")
    _torch_compile(r, "torch_compile")
    _trainer_schedule(r)
    return model


def _trl_padding(r: _Reader) -> None:
    """TRL's collator without padding_free (`DataCollatorForLanguageModeling`, trl f2cd577 sft_trainer.py) pads
    each batch to its longest row (`pad_to_multiple_of` None unless set) and passes the attention mask: with more
    than one row per batch, or a `pad_to_multiple_of`, the batch is padded (`Recipe.padding="longest"`, the worst
    batch predicted; flash_attention_2 then unpads). Packing wrapped gives full-length rows (none)."""
    if r.options.get("packing") or (r.bool("packing", False) and not r.options.get("packing")):
        return  # padding-free rows, or wrapped full-length rows
    padded = r.options.get("batch_size", 1) > 1 or r.raw("pad_to_multiple_of") is not None
    if not padded:
        r.default("padding", "none", "one row per batch: TRL's collator pads nothing")
    else:
        r.default("padding", "longest", "TRL's collator pads each batch to its longest row (no packing, no "
                  "padding_free)")


def _batch(r: _Reader, key: str, default: int, why: str) -> None:
    b = r.int(key)
    r.set("batch_size", b, key) if b else r.default("batch_size", default, why)


def _accum(r: _Reader, key: str) -> None:
    a = r.int(key)
    r.set("grad_accum", a, key) if a else r.default("grad_accum", 1, f"{key} defaults to 1")


def _checkpointing(r: _Reader, key: str, default: bool, why: str) -> None:
    """`gradient_checkpointing` and transformers' `gradient_checkpointing_kwargs` (every_n_layers, offload,
    use_reentrant; `TrainingArguments` docstring and `Trainer._inner_training_loop`, transformers 5.17)."""
    on = r.bool(key)
    if on is None:
        r.default("grad_ckpt", default, why)
        on = default
    else:
        r.set("grad_ckpt", on, key)
    if on and r.has("gradient_checkpointing_kwargs"):
        _checkpointing_kw(r)


def _torch_compile(r: _Reader, key: str) -> None:
    v = r.raw(key)
    if v not in (None, False, "false", "False"):
        raise ConfigFileError(f"{key}: {v!r}: a compiled step is not modelled (valid: false)", key)


def _trainer_schedule(r: _Reader, epochs_key: str = "num_train_epochs",
                      scheduler_key: str = "lr_scheduler_type") -> None:
    """The schedule keys `ftplan run` uses (no effect on memory or speed): transformers TrainingArguments' names, which
    TRL and LLaMA-Factory keep; Axolotl renames two (`num_epochs`, `lr_scheduler`)."""
    r.sched("learning_rate", "learning_rate")
    r.sched("epochs", epochs_key)
    r.sched("max_steps", "max_steps", "int")
    r.sched("warmup_ratio", "warmup_ratio")
    r.sched("max_grad_norm", "max_grad_norm")
    r.sched("save_steps", "save_steps", "int")
    r.sched("logging_steps", "logging_steps", "int")
    r.sched("seed", "seed", "int")
    v = r.raw(scheduler_key)
    if v is not None:
        r.schedule["lr_scheduler"] = str(v)


# -- Axolotl -----------------------------------------------------------------------------------------------------------
AXOLOTL_LEGACY_ATTENTION = (  # schemas/config.py LEGACY_ATTN_FLAG_TO_IMPL order: specific backends first
    ("xformers_attention", "xformers"), ("sage_attention", "sage"), ("flex_attention", "flex_attention"),
    ("flash_attention", "flash_attention_2"), ("sdp_attention", "sdpa"), ("eager_attention", "eager"),
)
CCE_PLUGIN = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"


def _map_axolotl(r: _Reader):
    model = _model_name(r, "base_model")
    adapter = r.raw("adapter")
    if r.bool("load_in_8bit", False):
        raise ConfigFileError("load_in_8bit: True (an 8-bit base) is not modelled (valid: false; load_in_4bit: true "
                              "with adapter: qlora)", "load_in_8bit")
    four = r.bool("load_in_4bit", False)
    if adapter is None:
        if four:
            raise ConfigFileError("load_in_4bit: True without an adapter (valid: adapter: qlora)", "load_in_4bit")
        r.default("method", "full", "Axolotl trains every parameter when adapter is unset")
    else:
        base = r.choice("adapter", adapter, {"lora": "lora", "qlora": "qlora"})
        dora = r.bool("peft_use_dora", False)
        if base == "qlora" and not four:
            raise ConfigFileError("adapter: qlora needs load_in_4bit: true (valid: load_in_4bit: true)", "adapter")
        r.set("method", "dora" if dora else "lora", "adapter" + (", peft_use_dora" if dora else ""))
        if four:
            r.set("quant", "nf4", "load_in_4bit")
            qt = r.raw("bnb_4bit_quant_type", "nf4")
            r.choice("bnb_4bit_quant_type", qt, {"nf4": "nf4"}, "is not a 4-bit type ftplan models")
        rank = r.int("lora_r")
        r.set("rank", rank, "lora_r") if rank else r.default("rank", 8, "peft LoraConfig r (Axolotl lora_r unset)")
        alpha = r.int("lora_alpha")
        r.set("lora_alpha", alpha, "lora_alpha") if alpha else r.default("lora_alpha", 8, "peft LoraConfig lora_alpha")
        drop = r.float("lora_dropout")
        r.set("lora_dropout", drop, "lora_dropout") if drop is not None else r.default(
            "lora_dropout", 0.0, "Axolotl lora_dropout")
        if r.bool("peft_use_rslora", False):
            r.set("use_rslora", True, "peft_use_rslora")
        if r.bool("lora_target_linear", False):
            r.set("target_modules", ("all-linear",), "lora_target_linear")
            r.raw("lora_target_modules")
        elif r.has("lora_target_modules"):
            _targets(r, "lora_target_modules", r.raw("lora_target_modules"))
        else:
            r.note("lora_target_modules unset: peft's default targets for the model family")
        _modules_to_save(r, "lora_modules_to_save")
        if r.bool("peft_autocast_adapter_dtype", True) is False:
            r.set("adapter_dtype", "bf16", "peft_autocast_adapter_dtype")
    # precision: Axolotl loads the weights in torch_dtype (bf16 when bf16 is on) and autocasts to it
    fp16 = r.bool("fp16", False)
    bf16 = r.raw("bf16", "auto")
    if str(bf16).lower() == "auto":
        bf16 = not fp16
        if not r.has("bf16"):
            pass
        else:
            r.note("bf16: auto, taken as bf16 (the GPUs ftplan models for it support bf16; pass --precision)")
    elif not isinstance(bf16, bool):
        raise ConfigFileError(f"bf16: {bf16!r} (valid: true, false, auto)", "bf16")
    if r.bool("bfloat16", False):
        bf16 = True
    if r.bool("float16", False):
        fp16 = True
    if bf16 and fp16 and r.has("bf16") and r.data.get("bf16") is True:
        raise ConfigFileError("bf16 and fp16 are both true (valid: one of them)", "fp16")
    precision = "fp16" if fp16 else "bf16" if bf16 else "fp32"
    if r.has("bf16") or r.has("fp16") or r.has("bfloat16") or r.has("float16"):
        r.set("precision", precision, ", ".join(k for k in ("bf16", "fp16", "bfloat16", "float16") if r.has(k)))
    else:
        r.default("precision", precision, "Axolotl bf16 defaults to auto: weights loaded and computed in bf16")
    r.raw("tf32")
    # attention: attn_implementation, or a legacy flag
    attn = r.raw("attn_implementation")
    flags = [(f, impl) for f, impl in AXOLOTL_LEGACY_ATTENTION if r.bool(f, False)]
    if attn is None and flags:
        attn_key, attn = flags[0]
    else:
        attn_key = "attn_implementation"
    if attn is None:
        r.default("attn_implementation", "sdpa", "Axolotl passes none: transformers' default")
    else:
        r.set("attn_implementation", r.choice(attn_key, attn, ATTENTION), attn_key)
    # loss: a plugin must be listed for its option to act
    plugins = r.raw("plugins") or []
    if not isinstance(plugins, list):
        raise ConfigFileError(f"plugins: {plugins!r} is not a list of plugin classes", "plugins")
    cce = r.bool("cut_cross_entropy", False) and CCE_PLUGIN in plugins
    liger = r.bool("liger_fused_linear_cross_entropy", False) and LIGER_PLUGIN in plugins
    for k in ("liger_rope", "liger_rms_norm", "liger_glu_activation", "liger_layer_norm", "liger_cross_entropy"):
        r.raw(k)
    if r.bool("chunked_cross_entropy", False):
        raise ConfigFileError("chunked_cross_entropy: True (Axolotl's own chunked loss) is not modelled (valid: false; "
                              "the Cut Cross-Entropy or Liger plugin)", "chunked_cross_entropy")
    if cce and liger:
        raise ConfigFileError("cut_cross_entropy and liger_fused_linear_cross_entropy are both on (valid: one)",
                              "cut_cross_entropy")
    if cce or liger:
        r.set("loss", "cce" if cce else "liger", "plugins, " + ("cut_cross_entropy" if cce else
                                                               "liger_fused_linear_cross_entropy"))
    else:
        r.default("loss", "plain", "no loss plugin: transformers' ForCausalLMLoss")
        if r.has("cut_cross_entropy") or r.has("liger_fused_linear_cross_entropy"):
            r.note("a loss option is set but its plugin is not in plugins: Axolotl ignores it")
    # data shape
    seq = r.int("sequence_len")
    r.set("seq_len", seq, "sequence_len") if seq else r.default("seq_len", 512, "Axolotl sequence_len")
    pack = r.bool("sample_packing", False)
    r.set("packing", pack, "sample_packing") if r.has("sample_packing") else r.default(
        "packing", False, "Axolotl sample_packing unset")
    if r.bool("pad_to_sequence_len", False) and not pack:
        r.set("padding", "longest", "pad_to_sequence_len")
    elif not pack:
        # axolotl core/builders (03ad838) `_prepare_data_collator_kwargs`: DataCollatorForSeq2Seq with
        # padding=True and pad_to_multiple_of 64 (64 * ceil(sequence_len / 64) with pad_to_sequence_len)
        r.default("padding", "longest", "Axolotl pads each batch to its longest row, rounded up to 64")
    # batch, checkpointing, offloading
    _batch(r, "micro_batch_size", 1, "Axolotl micro_batch_size")
    _accum(r, "gradient_accumulation_steps")
    gc = r.raw("gradient_checkpointing")
    gc_value = r.choice("gradient_checkpointing", gc if gc is not None else False,
                        {False: False, True: True, "offload": "offload", "true": True, "false": False},
                        "is not modelled") if gc is not None else None
    if gc is None:
        r.default("grad_ckpt", False, "Axolotl gradient_checkpointing defaults to false")
    else:
        r.set("grad_ckpt", bool(gc_value), "gradient_checkpointing")
        if gc_value == "offload":
            r.set("offload_checkpoints", True, "gradient_checkpointing")
        if gc_value and r.has("gradient_checkpointing_kwargs"):
            _checkpointing_kw(r)
    ao = r.raw("activation_offloading")
    if ao is not None:
        v = r.choice("activation_offloading", ao, {False: "off", True: "on", "legacy": "on", "hidden_states": "ckpt",
                                                   "true": "on", "false": "off"}, "is not modelled")
        if v == "on":
            r.set("activation_offload", True, "activation_offloading")
        elif v == "ckpt":
            r.set("offload_checkpoints", True, "activation_offloading")
            if not r.options.get("grad_ckpt"):
                raise ConfigFileError("activation_offloading: hidden_states offloads checkpointed layer inputs and "
                                      "needs gradient_checkpointing: true", "activation_offloading")
    _optimizer(r, "optimizer", "adamw_torch_fused", "Axolotl optimizer")
    _deepspeed(r, "deepspeed")
    _fsdp(r, "fsdp", "fsdp_config")
    if r.has("fsdp_version"):
        r.raw("fsdp_version")
    _gpus_note(r)
    if four:
        skip = r.options.get("strategy") in ("zero3", "fsdp")
        r.default("kbit_preparation", not skip,
                  "Axolotl skips prepare_model_for_kbit_training under FSDP/ZeRO-3" if skip
                  else "Axolotl calls prepare_model_for_kbit_training on a 4-bit base")
    _torch_compile(r, "torch_compile")
    _trainer_schedule(r, epochs_key="num_epochs", scheduler_key="lr_scheduler")
    return model


def _checkpointing_kw(r: _Reader) -> None:
    """transformers' `gradient_checkpointing_kwargs` (`TrainingArguments` docstring and
    `Trainer._inner_training_loop`, transformers 5.17): every_n_layers, offload, and the rest passed to
    `torch.utils.checkpoint.checkpoint`."""
    key = "gradient_checkpointing_kwargs"
    kw = r.raw(key)
    if isinstance(kw, str):
        try:
            kw = json.loads(kw)
        except ValueError:
            pass
    if not isinstance(kw, dict):
        raise ConfigFileError(f"{key}: {kw!r} is not a mapping (valid: use_reentrant, offload, every_n_layers)", key)
    unknown = sorted(set(kw) - {"every_n_layers", "offload", "use_reentrant", "preserve_rng_state",
                                "determinism_check", "debug"})
    if unknown:
        raise ConfigFileError(f"{key}: {', '.join(unknown)} not modelled (valid: use_reentrant, offload, "
                              "every_n_layers, preserve_rng_state)", key)
    if kw.get("every_n_layers", 1) != 1:
        raise ConfigFileError(f"gradient_checkpointing_kwargs: every_n_layers {kw['every_n_layers']!r} is not "
                              "modelled (valid: 1)", "gradient_checkpointing_kwargs")
    if kw.get("offload"):
        r.set("offload_checkpoints", True, "gradient_checkpointing_kwargs.offload")
    if kw.get("use_reentrant"):
        r.note("gradient_checkpointing_kwargs use_reentrant: reentrant checkpointing keeps the same tensors (each "
               "layer's input) as the non-reentrant kind ftplan models")


# -- LLaMA-Factory -------------------------------------------------------------------------------------------------------
LF_ATTENTION = {"auto": "sdpa", "sdpa": "sdpa", "disabled": "eager", "fa2": "flash_attention_2"}


def _map_llamafactory(r: _Reader):
    model = _model_name(r, "model_name_or_path")
    stage = r.raw("stage", "sft")
    r.choice("stage", stage, {"sft": 0, "pt": 0}, "is not a training stage ftplan models")
    ft = r.raw("finetuning_type")
    finetuning = r.choice("finetuning_type", ft if ft is not None else "lora", {"lora": "lora", "full": "full"})
    bits = r.raw("quantization_bit")
    if bits is not None:
        r.choice("quantization_bit", bits, {4: 4}, "is not a quantization ftplan models")
        r.choice("quantization_method", r.raw("quantization_method", "bnb"), {"bnb": 0, "bitsandbytes": 0},
                 "is not a quantization method ftplan models")
        r.choice("quantization_type", r.raw("quantization_type", "nf4"), {"nf4": 0}, "is not a 4-bit type ftplan models")
        r.raw("double_quantization")
        if finetuning != "lora":
            raise ConfigFileError("quantization_bit: 4 needs finetuning_type: lora (LLaMA-Factory refuses full "
                                  "training of a quantized model)", "quantization_bit")
    dora = finetuning == "lora" and r.bool("use_dora", False)
    if ft is None:
        r.default("method", "dora" if dora else "lora", "LLaMA-Factory finetuning_type defaults to lora")
    else:
        r.set("method", "dora" if dora else finetuning, "finetuning_type" + (", use_dora" if dora else ""))
    if bits is not None:
        r.set("quant", "nf4", "quantization_bit")
    pure = r.bool("pure_bf16", False)
    if finetuning == "lora":
        rank = r.int("lora_rank")
        r.set("rank", rank, "lora_rank") if rank else r.default("rank", 8, "LLaMA-Factory lora_rank")
        alpha = r.int("lora_alpha")
        r.set("lora_alpha", alpha, "lora_alpha") if alpha else r.default(
            "lora_alpha", 2 * r.options["rank"], "LLaMA-Factory lora_alpha unset: 2 x lora_rank")
        drop = r.float("lora_dropout")
        r.set("lora_dropout", drop, "lora_dropout") if drop is not None else r.default(
            "lora_dropout", 0.0, "LLaMA-Factory lora_dropout")
        if r.bool("use_rslora", False):
            r.set("use_rslora", True, "use_rslora")
        t = r.raw("lora_target")
        if t is None:
            r.default("target_modules", ("all-linear",), "LLaMA-Factory lora_target defaults to all")
        else:
            _targets(r, "lora_target", t)
        _modules_to_save(r, "additional_target")
        if pure:
            r.set("adapter_dtype", "bf16", "pure_bf16")
    # precision: weights loaded in the compute dtype (bf16/fp16); trainable parameters cast to fp32 unless pure_bf16
    fp16, bf16 = r.bool("fp16", False), r.bool("bf16", False)
    if fp16 and bf16:
        raise ConfigFileError("bf16 and fp16 are both true (valid: one of them)", "fp16")
    if bits is not None:
        precision = "fp16" if fp16 else "bf16"
    elif finetuning == "full":
        precision = "bf16" if pure else ("mixed" if bf16 else "fp16" if fp16 else "fp32")
    else:
        precision = "bf16" if bf16 or pure else "fp16" if fp16 else "fp32"
    keys = [k for k in ("bf16", "fp16", "pure_bf16") if r.has(k)]
    r.set("precision", precision, ", ".join(keys)) if keys else r.default(
        "precision", precision, "transformers TrainingArguments bf16/fp16 default to false")
    attn = r.raw("flash_attn")
    if attn is None:
        r.default("attn_implementation", "sdpa", "LLaMA-Factory flash_attn auto: transformers' default")
    else:
        r.set("attn_implementation", r.choice("flash_attn", attn, LF_ATTENTION), "flash_attn")
    if r.bool("enable_liger_kernel", False):
        r.set("loss", "liger", "enable_liger_kernel")
    else:
        r.default("loss", "plain", "LLaMA-Factory enable_liger_kernel defaults to false")
    if r.bool("use_unsloth", False):
        raise ConfigFileError("use_unsloth: True (Unsloth's patched model) is not modelled (valid: false)",
                              "use_unsloth")
    seq = r.int("cutoff_len")
    r.set("seq_len", seq, "cutoff_len") if seq else r.default("seq_len", 2048, "LLaMA-Factory cutoff_len")
    neat = r.bool("neat_packing", False)
    packing = r.bool("packing", stage == "pt")
    if neat:
        r.set("packing", True, "neat_packing")
    elif r.has("packing"):
        r.set("packing", False, "packing")
        if packing:
            r.note("packing without neat_packing: full-length rows of concatenated examples (ftplan's own row shape)")
    else:
        r.default("packing", False, "LLaMA-Factory packs only in pre-training (stage pt), and neat_packing is off")
    if not neat and not packing:
        # llamafactory/train/sft/workflow.py: SFTDataCollatorWith4DAttentionMask(pad_to_multiple_of=8 when
        # training), a DataCollatorForSeq2Seq padding to the longest row and passing the 2D attention mask
        r.default("padding", "longest", "LLaMA-Factory pads each batch to its longest row, rounded up to 8")
    _batch(r, "per_device_train_batch_size", 8, "transformers TrainingArguments per_device_train_batch_size")
    _accum(r, "gradient_accumulation_steps")
    off = r.bool("disable_gradient_checkpointing", False)
    if r.has("disable_gradient_checkpointing"):
        r.set("grad_ckpt", not off, "disable_gradient_checkpointing")
    else:
        r.default("grad_ckpt", True, "LLaMA-Factory checkpoints unless disable_gradient_checkpointing")
    if not off:
        if r.bool("use_unsloth_gc", False):
            r.set("offload_checkpoints", True, "use_unsloth_gc")
            r.note("use_unsloth_gc: modelled as transformers' offloaded checkpointing (the layer input in pinned host "
                   "memory); Unsloth's function keeps the input it brings back through the layer's whole backward, "
                   "about one layer input more at a backward peak")
        if r.bool("use_reentrant_gc", True):
            r.note("use_reentrant_gc (default true): reentrant checkpointing keeps the same tensors (each layer's "
                   "input) as the non-reentrant kind ftplan models")
    for k in ("upcast_layernorm", "upcast_lmhead_output", "shift_attn"):
        if r.bool(k, False):
            raise ConfigFileError(f"{k}: True is not modelled (valid: false)", k)
    _optimizer(r, "optim", "adamw_torch_fused", "transformers TrainingArguments optim")
    for k in ("use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon"):
        if r.bool(k, False):
            raise ConfigFileError(f"{k}: True (a different optimizer) is not modelled (valid: false; optim)", k)
    _deepspeed(r, "deepspeed")
    _fsdp(r, "fsdp", "fsdp_config")
    _gpus_note(r)
    if bits is not None:
        r.default("kbit_preparation", False, "LLaMA-Factory does not call prepare_model_for_kbit_training")
    _torch_compile(r, "torch_compile")
    _trainer_schedule(r)
    return model


# keys known not to change memory or speed: data, logging, saving, evaluation, hub, the schedule's values
IGNORED_COMMON = {
    "output_dir", "overwrite_output_dir", "logging_dir", "logging_steps", "logging_strategy", "logging_first_step",
    "save_steps", "save_strategy", "save_total_limit", "save_only_model", "save_safetensors", "report_to", "run_name",
    "seed", "data_seed", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "num_train_epochs", "max_steps",
    "eval_strategy", "evaluation_strategy", "eval_steps", "per_device_eval_batch_size", "do_eval", "do_train",
    "do_predict", "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_token", "resume_from_checkpoint",
    "dataloader_num_workers", "dataloader_pin_memory", "remove_unused_columns", "trust_remote_code", "env",
    "ddp_timeout", "ddp_find_unused_parameters", "plot_loss", "overwrite_cache", "preprocessing_num_workers",
    "val_size", "load_best_model_at_end", "metric_for_best_model", "include_num_input_tokens_seen", "tokenizer",
    "model_revision", "revision", "label_smoothing_factor", "disable_tqdm", "log_level", "logging_nan_inf_filter",
}
IGNORED_PREFIXES = ("wandb_", "hub_", "mlflow_", "comet_", "dataset", "eval_", "push_", "save_", "logging_", "special_tokens")
IGNORED = {
    "trl": {"dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split", "dataset_streaming",
            "dataset_text_field", "dataset_kwargs", "dataset_num_proc", "completion_only_loss", "assistant_only_loss",
            "chat_template_path", "eos_token", "pad_token", "truncation_mode", "shuffle_dataset", "eval_packing",
            "pad_to_multiple_of", "model_init_kwargs", "datasets", "use_bnb_nested_quant", "bnb_4bit_quant_storage",
            "lora_target_parameters"},
    "axolotl": {"base_model_config", "model_type", "tokenizer_type", "tokenizer_config", "datasets", "dataset_prepared_path",
                "val_set_size", "output_dir", "chat_template", "special_tokens", "tokens", "strict", "shuffle_merged_datasets",
                "train_on_inputs", "group_by_length", "num_epochs", "lr_scheduler", "loss_watchdog_threshold",
                "loss_watchdog_patience", "early_stopping_patience", "evals_per_epoch", "saves_per_epoch", "debug",
                "wandb_project", "wandb_entity", "wandb_watch", "wandb_name", "wandb_log_model", "hub_model_id",
                "resume_from_checkpoint", "local_rank", "logging_steps", "warmup_steps",
                "weight_decay", "lora_model_dir", "lora_fan_in_fan_out", "is_llama_derived_model", "is_mistral_derived_model",
                "is_qwen_derived_model", "eval_sample_packing", "sample_packing_group_size", "sample_packing_bin_size",
                "flash_attn_cross_entropy", "flash_attn_rms_norm", "auto_resume_from_checkpoints", "max_packed_sequence_len"},
    "llamafactory": {"dataset", "dataset_dir", "template", "cutoff_len", "max_samples", "overwrite_cache",
                     "preprocessing_num_workers", "val_size", "eval_dataset", "plot_loss", "train_on_prompt",
                     "mask_history", "default_system", "enable_thinking", "tokenized_path", "streaming", "buffer_size",
                     "mix_strategy", "interleave_probs", "image_max_pixels", "video_max_pixels", "ddp_timeout",
                     "double_quantization", "quantization_device_map", "loraplus_lr_ratio", "create_new_adapter",
                     "adapter_name_or_path", "cache_dir", "resize_vocab", "split_special_tokens", "new_special_tokens",
                     "low_cpu_mem_usage", "infer_backend", "export_dir", "media_dir"},
}


# -- building --------------------------------------------------------------------------------------------------------
def build_values(mapping: ConfigMapping, overrides: dict | None = None) -> tuple[dict, dict]:
    """(TrainConfig values, Recipe values) from the mapping, with `overrides` (ftplan option -> value, what the user
    passed on the command line) on top. An option this build of ftplan has no field for is dropped when it names the
    reference step (`NEUTRAL`), else a ConfigFileError naming its config key."""
    from dataclasses import fields

    from .config import TrainConfig
    from .recipe import Recipe

    train_fields = {f.name for f in fields(TrainConfig)} - {"recipe", "extra"}
    recipe_fields = {f.name for f in fields(Recipe)}
    values = dict(mapping.options)
    values.update(overrides or {})
    from .methods import ALIASES  # qlora, qdora: a method over a quantized base

    if values.get("quant", "none") == "none" and values.get("method") not in ALIASES:
        values.pop("kbit_preparation", None)  # it means something over a quantized base only
    train, recipe = {}, {}
    for k, v in values.items():
        if k in train_fields:
            train[k] = v
        elif k in recipe_fields:
            recipe[k] = v
        elif NEUTRAL.get(k, object()) == v:
            continue
        else:
            src = mapping.source.get(k, k)
            raise ConfigFileError(f"{src}: {k} = {v!r} is not modelled by this ftplan (modelled: "
                                  f"{NEUTRAL.get(k, 'nothing')!r})", src)
    return train, recipe


def explain_error(mapping: ConfigMapping, message: str) -> str:
    """Prefix a TrainConfig/Recipe validation message with the config key its field came from."""
    for option, src in mapping.source.items():
        if message.startswith((f"{option} ", f"{option}:", f"recipe.{option} ", f"recipe.{option}:")) or f" {option} " in message[:60]:
            return f"{mapping.path or 'config'}: {src} -> {message}"
    return f"{mapping.path or 'config'}: {message}"
