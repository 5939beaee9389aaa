"""Checks of user input that need the model (position limit, method targets) or the file system (output paths),
shared by the commands. Each failure is a `click.BadParameter` (exit 2) naming the field and what is valid; a
`hint` function maps a TrainConfig field to what the user wrote (an option, or a plan-file field)."""

from __future__ import annotations

import click

from ..config import TrainConfig
from ..fileio import writable_dir_problem, writable_file_problem
from ..limits import position_error, position_warning


def option_hint(field: str) -> str:
    from .options import OPTION_OF

    return OPTION_OF.get(field, field)


def check_positions(arch, tc: TrainConfig, hint=option_hint, warn=True) -> None:
    """Sequence length and virtual tokens against the model's position limit (`planner.limits`): an error past the
    hard cap, a warning on stderr between the limit and the cap."""
    err = position_error(arch, tc)
    if err:
        raise click.BadParameter(err[1], param_hint=hint(err[0]))
    msg = position_warning(arch, tc) if warn else None
    if msg:
        click.echo(f"warning: {hint('seq_len')}: {msg}", err=True)


def check_ia3_targets(arch, tc: TrainConfig, targets_given: bool, hint=option_hint) -> None:
    """A method that picks its own modules (IA3: peft's table per family) would ignore an explicit --target-modules."""
    if tc.spec.uses_rank or not targets_given:
        return
    note = tc.spec.fixed_targets_note(arch)
    if note:
        raise click.BadParameter(f"{note}; --target-modules applies to lora, qlora and dora (leave it out with "
                                 f"{tc.method})", param_hint=hint("target_modules"))


def check_model(arch, tc: TrainConfig, *, targets_given: bool = False, hint=option_hint, warn=True) -> TrainConfig:
    """Every check of `tc` against `arch`: LoRA targets and rank, IA3 targets, positions. Returns `tc`, with the
    family's default LoRA targets when the user named none (Phi-3's fused `qkv_proj` instead of q_proj, v_proj)."""
    from ..methods import TargetError, lora_targets
    from ..methods.lora import DEFAULT_TARGETS, family_default_targets

    from ..moe import unsupported

    bad = unsupported(arch, tc)  # a MoE model with what ftplan does not model for MoE
    if bad:
        raise click.BadParameter(bad[1], param_hint=hint(bad[0]))
    if tc.spec.uses_rank and not targets_given and tuple(tc.target_modules) == DEFAULT_TARGETS:
        tc = tc.replace(target_modules=family_default_targets(arch))
    if tc.spec.uses_rank:
        try:
            lora_targets(arch, tc)
        except TargetError as e:
            field = ("rank" if str(e).startswith("rank") else
                     "lora_dropout" if "refuses lora_dropout" in str(e) else "target_modules")
            raise click.BadParameter(str(e), param_hint=hint(field)) from None
    check_ia3_targets(arch, tc, targets_given, hint)
    check_positions(arch, tc, hint, warn=warn)
    return tc


def given(name: str) -> bool:
    """Whether the current command's option `name` was typed on the command line (not a default)."""
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE


def check_provider(provider: str | None, hint: str = "--provider") -> None:
    if provider is None:
        return
    from ..profiles import providers

    known = providers()
    if provider.lower() not in {p.lower() for p in known}:
        raise click.BadParameter(f"unknown provider {provider!r}; valid: {', '.join(known)}", param_hint=hint)


def writable_file(path, hint: str) -> None:
    """A file can be written at `path` (else a usage error naming `hint`)."""
    if path is None:
        return
    problem = writable_file_problem(path)
    if problem:
        raise click.BadParameter(f"{problem} (valid: a writable file path)", param_hint=hint)


def writable_dir(path, hint: str) -> None:
    """A folder exists or can be created at `path`, and is writable (else a usage error naming `hint`)."""
    if path is None:
        return
    problem = writable_dir_problem(path)
    if problem:
        raise click.BadParameter(f"{problem} (valid: a writable folder)", param_hint=hint)


def os_error(e: OSError, hint: str) -> click.BadParameter:
    """An OSError while writing a user's file as a usage error naming the option."""
    where = f" {e.filename}" if e.filename else ""
    return click.BadParameter(f"cannot write{where}: {e.strerror or e} (valid: a writable path)", param_hint=hint)
