"""How a usage error reaches the user: click's text on stderr, or with `--json` a JSON object on stdout,
`{"error": ..., "field": ..., "valid": ...}`, with the same exit code (2 for bad input, 1 for a failed run).

`field` is the option, argument or plan-file field the error is about; `valid` the valid choices (a list) or range
(a string), from the parameter's `click.Choice`, or from the message's "valid: ..." / "must be ..." / "at most N"
wording that every ftplan error uses; None when the error has neither."""

from __future__ import annotations

import re

import click

_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
_VALID = [
    re.compile(r"\bvalid(?: [^:;()\n]{0,40})?: (.+?)(?: \(|\)|;|$)"),
    re.compile(r"\bmust (?:be|equal) (.+?)(?:,? got | \((?![\d-])|; |$)"),
    re.compile(r"\b(at most [\d,]+)"),
    re.compile(r"is not a valid (\w+)"),
]


def complete(e: click.ClickException) -> click.ClickException:
    """Add the valid names to click's own 'no such option / command' errors (click suggests only close matches)."""
    ctx = getattr(e, "ctx", None)
    if isinstance(e, click.NoSuchOption) and ctx is not None and not e.possibilities:
        e.possibilities = sorted({o for p in ctx.command.get_params(ctx) for o in p.opts if o.startswith("--")})
    elif (isinstance(e, click.UsageError) and e.message.startswith("No such command") and ctx is not None
          and isinstance(ctx.command, click.Group) and "valid:" not in e.message):
        e.message = f"{e.message} valid: {', '.join(ctx.command.list_commands(ctx))}"
    return e


def _param_name(e: click.ClickException) -> str | None:
    hint = getattr(e, "param_hint", None)
    if hint is not None:
        return " / ".join(hint) if isinstance(hint, (list, tuple)) else str(hint)
    param = getattr(e, "param", None)
    if param is not None:
        return " / ".join(param.opts) if param.opts else (param.human_readable_name or param.name)
    return None


def error_fields(e: click.ClickException) -> tuple[str | None, object]:
    """(field, valid) of an error (see the module docstring)."""
    message = e.format_message()
    field, valid = None, getattr(e, "valid", None)
    if isinstance(e, click.NoSuchOption):
        field = e.option_name
        valid = valid or sorted(e.possibilities or [])
    elif isinstance(e, click.BadParameter):
        field = _param_name(e)
        param = e.param
        if valid is None and param is not None and isinstance(param.type, click.Choice):
            valid = [str(c) for c in param.type.choices]
        if valid is None and isinstance(e, click.MissingParameter):
            valid = "required"
    elif message.startswith("No such command"):
        m = re.search(r"No such command '([^']+)'", message)
        field = m.group(1) if m else None
    else:
        m = _OPTION.search(message)
        field = m.group(1) if m else None
    if valid is None:
        for pattern in _VALID:
            m = pattern.search(message)
            if m:
                valid = m.group(1).strip().rstrip(".")
                break
    return field, valid


def payload(e: click.ClickException) -> dict:
    """The JSON object of an error (plus what the command attached as `extra`, e.g. a failed run's summary)."""
    field, valid = error_fields(e)
    return {"error": e.format_message(), "field": field, "valid": valid, **getattr(e, "extra", {})}


def wants_json(args: list[str]) -> bool:
    """`--json` among the arguments (before a `--` that ends the options)."""
    if "--" in args:
        args = args[: args.index("--")]
    return "--json" in args
