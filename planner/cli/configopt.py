"""`--config FILE` for estimate, recommend and run: the user's own TRL / Axolotl / LLaMA-Factory YAML
(`planner.configfile`) as the configuration, with the flags the user typed on top (click's `ParameterSource`: a
flag left at its default never overrides the file). Errors are usage errors (exit 2) naming `--config` and the
config key, or the flag when the offending value came from a flag."""

from __future__ import annotations

from dataclasses import fields

import click
from click.core import ParameterSource

from ..config import TrainConfig, parse_target_modules
from ..configfile import FRAMEWORK_NAMES, NEUTRAL, ConfigFileError, ConfigMapping, build_values, explain_error, load_config
from ..recipe import Recipe

# a command's parameter name -> the ftplan option it sets, where the two differ
PARAM_OPTION = {"attn": "attn_implementation", "kbit_prep": "kbit_preparation", "offload_ckpt": "offload_checkpoints"}


def config_option(f):
    return click.option(
        "--config", "config_path", default=None, metavar="FILE",
        help="Your own TRL SFTConfig, Axolotl or LLaMA-Factory YAML: its model, method, batch, checkpointing, "
             "attention, loss, packing and offloading, with that framework's defaults where it is silent. Flags "
             "you pass override the file.",
    )(f)


def model_optional(command: click.Command) -> click.Command:
    """--model stops being required by click (a --config file may name the model); `model_or_fail` checks it."""
    for p in command.params:
        if p.name == "model_ref":
            p.required = False
            p.help = (p.help or "") + " With --config: the file's model unless given."
    return command


def model_or_fail(model_ref: str | None, mapping: ConfigMapping | None) -> str:
    """The model: --model when typed, else the config file's, else a usage error."""
    ctx = click.get_current_context()
    if model_ref is not None and _passed(ctx, "model_ref"):
        return model_ref
    if mapping is not None and mapping.model:
        return mapping.model
    if mapping is not None:
        key = {"axolotl": "base_model"}.get(mapping.framework, "model_name_or_path")
        raise click.BadParameter(f"{mapping.path} names no model ({key}); pass --model (valid: a catalog name, a "
                                 "Hugging Face id or a config.json)", param_hint="--model")
    param = next(p for p in ctx.command.params if p.name == "model_ref")
    raise click.MissingParameter(ctx=ctx, param=param)


def load_config_or_fail(path: str) -> ConfigMapping:
    try:
        return load_config(path)
    except ConfigFileError as e:
        raise click.BadParameter(str(e), param_hint="--config") from None


def _passed(ctx: click.Context, name: str) -> bool:
    src = ctx.get_parameter_source(name)
    return src is not None and src not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _known_options() -> set:
    return ({f.name for f in fields(TrainConfig)} | {f.name for f in fields(Recipe)} | set(NEUTRAL)) - {"extra", "recipe"}


def overrides_passed(ctx: click.Context, values: dict) -> dict:
    """ftplan option -> value for each of `values` (a command's parameters) that the user typed."""
    known = _known_options()
    out = {}
    for name, value in values.items():
        option = PARAM_OPTION.get(name, name)
        if option in known and _passed(ctx, name):
            out[option] = value
    if "method" in out and "quant" not in out:
        out["quant"] = "none"  # `--method lora` on a QLoRA file means a 16-bit base; `qlora` sets nf4 again
    if isinstance(out.get("target_modules"), str):
        try:
            out["target_modules"] = parse_target_modules(out["target_modules"])
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--target-modules") from None
    return out


def train_config_from_file(mapping: ConfigMapping, values: dict) -> tuple[TrainConfig, dict]:
    """(TrainConfig of the file with the typed flags on top, the overrides). A value the planner refuses: a usage
    error naming the flag when the user typed it, else --config with the key that set it."""
    from .options import OPTION_OF

    ctx = click.get_current_context()
    over = overrides_passed(ctx, values)
    if "seq_len" not in mapping.options and "seq_len" not in over:
        raise click.BadParameter(f"{mapping.path}: max_length is null (no truncation), so the file gives no sequence "
                                 "length; pass --seq-len", param_hint="--config")
    if over.get("method") and "target_modules" not in over and not _uses_rank(over["method"]):
        mapping = _without(mapping, ("target_modules", "rank", "lora_alpha", "lora_dropout", "use_rslora"))
    try:
        train, recipe = build_values(mapping, over)
    except ConfigFileError as e:
        raise click.BadParameter(str(e), param_hint="--config") from None
    try:
        return TrainConfig(**train, recipe=recipe), over
    except ValueError as e:
        msg = str(e)
        for option in over:
            if msg.startswith((f"{option} ", f"{option}:", f"recipe.{option} ", f"recipe.{option}:")):
                raise click.BadParameter(msg, param_hint=OPTION_OF.get(option, f"--{option.replace('_', '-')}")) from None
        raise click.BadParameter(explain_error(mapping, msg), param_hint="--config") from None


def _uses_rank(method: str) -> bool:
    from ..methods import ALIASES, get_method

    return get_method(ALIASES.get(method, (method,))[0]).uses_rank


def _without(mapping: ConfigMapping, options: tuple) -> ConfigMapping:
    from dataclasses import replace

    return replace(mapping, options={k: v for k, v in mapping.options.items() if k not in options})


def config_dict(mapping: ConfigMapping, overrides: dict) -> dict:
    """The `config_file` object of --json output."""
    d = mapping.to_dict()
    d["overridden_by_flags"] = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    return d


def config_lines(mapping: ConfigMapping, overrides: dict) -> list[str]:
    """What the file said, for the text output: keys read, defaults applied, keys ignored and unknown, overrides."""

    def val(v):
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, (list, tuple)):
            return ",".join(str(x) for x in v) if all(not isinstance(x, dict) for x in v) else f"[{len(v)} items]"
        if isinstance(v, dict):
            return "{...}"
        return str(v)

    lines = [f"config file     {mapping.path} ({FRAMEWORK_NAMES[mapping.framework]})"]
    lines.append("  keys read     " + (", ".join(f"{k}={val(v)}" for k, v in mapping.read.items()) or "none"))
    if mapping.defaults:
        lines.append("  defaults      " + "; ".join(f"{k} {v}" for k, v in mapping.defaults.items()))
    if mapping.ignored:
        lines.append("  ignored       " + ", ".join(mapping.ignored) + "  (no effect on memory or speed)")
    if mapping.unknown:
        lines.append("  unknown       " + ", ".join(mapping.unknown) + "  (not known to ftplan: assumed to have no "
                     "effect on memory or speed)")
    if overrides:
        lines.append("  overridden    " + ", ".join(f"{k}={val(v)}" for k, v in overrides.items()
                                                    if not (k == "quant" and "method" in overrides)) + "  (flags)")
    for n in mapping.notes:
        lines.append(f"  note          {n}")
    return lines


def plan_from_config(mapping: ConfigMapping, values: dict):
    """A `PlanFile` of the config file (model, training configuration, and its schedule: learning rate, epochs,
    warm-up...), for `ftplan run --config`; the typed flags on top."""
    from ..planfile import PlanFile, Schedule

    tc, _ = train_config_from_file(mapping, values)
    if not mapping.model:
        key = {"axolotl": "base_model"}.get(mapping.framework, "model_name_or_path")
        raise click.BadParameter(f"{mapping.path} names no model ({key}); valid: a model folder or Hugging Face id "
                                 "there (or --model-path)", param_hint="--config")
    try:
        schedule = Schedule(**mapping.schedule)
    except (TypeError, ValueError) as e:
        raise click.BadParameter(f"{mapping.path}: {e}", param_hint="--config") from None
    return PlanFile(model=mapping.model, train=tc, schedule=schedule)
