"""`ftplan report`: comparison charts (PNG), their data (CSV) and a page that puts them together (HTML, Markdown).

pandas and matplotlib are imported inside the command (the `report` extra), so `--help` works without them.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click

from ..config import OPTIMIZERS, TrainConfig
from ..plan import DEFAULT_MARGIN
from ..profiles import providers
from ..recommend import OBJECTIVES
from .checks import check_positions, os_error, writable_dir
from .options import emit_json, json_option, parse_tokens_option, resolve_gpu_or_fail, resolve_model_or_fail

DEFAULTS = dict(seq_len=2048, batch_size=1, rank=16, optimizer="adamw", effective_batch=16, margin=DEFAULT_MARGIN,
                objective="quality", dataset_tokens="100M", epochs=1.0, max_gpus=8)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "--models", "model_refs", default=None, metavar="NAMES",
              help="Model(s), comma-separated: catalog names or aliases (7b, 8b, 70b), HF ids, config.json paths.")
@click.option("--gpu", "--gpus", "gpu_refs", default=None, metavar="NAMES",
              help="GPU(s), comma-separated (4090, l4, a100-80, h100-80; `ftplan gpus list`).")
@click.option("--accuracy", is_flag=True, help="Predicted vs measured for the calibration records.")
@click.option("--records", "record_paths", multiple=True, type=click.Path(), metavar="PATH",
              help="Record files or folders for --accuracy (repeatable)  [default: calibrate/results]")
@click.option("--seq-len", type=int, default=DEFAULTS["seq_len"], show_default=True, help="Tokens per sequence.")
@click.option("--batch-size", type=int, default=DEFAULTS["batch_size"], show_default=True,
              help="Micro-batch of the memory charts.")
@click.option("--rank", type=int, default=DEFAULTS["rank"], show_default=True,
              help="LoRA/QLoRA rank of the memory charts (higher: more memory).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=DEFAULTS["optimizer"], show_default=True,
              help="Optimizer of the memory charts.")
@click.option("--effective-batch", type=int, default=DEFAULTS["effective_batch"], show_default=True,
              help="Sequences per optimizer step for the recommended plans.")
@click.option("--margin", type=float, default=DEFAULTS["margin"], show_default=True,
              help="Fraction of GPU memory a recommended plan must leave free.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=DEFAULTS["objective"], show_default=True,
              help="How recommend ranks plans.")
@click.option("--dataset-tokens", default=DEFAULTS["dataset_tokens"], show_default=True, metavar="N",
              help="Training tokens per epoch (50M, 1.5B) for hours and $.")
@click.option("--epochs", type=float, default=DEFAULTS["epochs"], show_default=True, help="Passes over the dataset.")
@click.option("--provider", default=None, help="Price only this provider (profiles/prices.toml).")
@click.option("--max-gpus", type=int, default=DEFAULTS["max_gpus"], show_default=True,
              help="Time/cost chart: the fewest GPUs (1, 2, 4, ...) up to this that fit.")
@click.option("--compare-gpus", default=None, metavar="NAMES",
              help="GPUs of the time/cost chart, comma-separated  [default: every GPU with a price]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder to write  [default: reports/<model>--<gpu>, reports/fit-map, reports/accuracy]")
@json_option
def report(model_refs, gpu_refs, accuracy, record_paths, seq_len, batch_size, rank, optimizer, effective_batch, margin,
           objective, dataset_tokens, epochs, provider, max_gpus, compare_gpus, out_dir, as_json):
    """Charts and tables: memory by method, memory vs sequence length, fit map, time and cost, accuracy.

    Writes PNG charts, the CSV each was drawn from, index.html (opens offline) and report.md.

    \b
    ftplan report --model 8b --gpu a100-80                 # reports/llama-3.1-8b--a100-sxm-80gb/
    ftplan report --models 7b,13b,70b --gpus 4090,a100-80,h100-80 --out reports/fit-map
    ftplan report --accuracy                               # predicted vs measured, calibrate/results
    """
    try:
        from ..report import build
        from ..report.data import Conditions
    except ModuleNotFoundError as e:
        raise click.ClickException(f"`ftplan report` needs {e.name}: pip install 'ftplan[report]'") from None

    writable_dir(out_dir, "--out")
    if accuracy:
        if model_refs or gpu_refs:
            raise click.UsageError("--accuracy compares records; leave out --model/--gpu (or drop --accuracy)")
        result = _accuracy(build, record_paths, out_dir)
    else:
        if not model_refs or not gpu_refs:
            raise click.UsageError("give --model and --gpu (or --models/--gpus for a fit map), or --accuracy")
        if record_paths:
            raise click.BadParameter("only with --accuracy", param_hint="--records")
        for name, value in (("--seq-len", seq_len), ("--batch-size", batch_size), ("--rank", rank),
                            ("--effective-batch", effective_batch), ("--max-gpus", max_gpus)):
            if value <= 0:
                raise click.BadParameter(f"must be a positive integer, got {value}", param_hint=name)
        if epochs <= 0:
            raise click.BadParameter(f"must be > 0, got {epochs}", param_hint="--epochs")
        if not 0 <= margin < 1:
            raise click.BadParameter(f"must be in [0, 1), got {margin}", param_hint="--margin")
        if provider is not None and provider.lower() not in {p.lower() for p in providers()}:
            raise click.BadParameter(f"unknown provider {provider!r}; valid: {', '.join(providers())}",
                                     param_hint="--provider")
        models = [(ref, resolve_model_or_fail(ref)[0]) for ref in _split(model_refs, "--model")]
        for _, arch in models:
            check_positions(arch, TrainConfig(seq_len=seq_len))
        gpus = [resolve_gpu_or_fail(ref) for ref in _split(gpu_refs, "--gpu")]
        cond = Conditions(seq_len=seq_len, batch_size=batch_size, rank=rank, optimizer=optimizer,
                          effective_batch=effective_batch, margin=margin, objective=objective,
                          dataset_tokens=parse_tokens_option(dataset_tokens), epochs=epochs, provider=provider,
                          max_gpus=max_gpus)
        given = dict(seq_len=seq_len, batch_size=batch_size, rank=rank, optimizer=optimizer,
                     effective_batch=effective_batch, margin=margin, objective=objective, dataset_tokens=dataset_tokens,
                     epochs=epochs, provider=provider, max_gpus=max_gpus, compare_gpus=compare_gpus)
        if len(models) == 1 and len(gpus) == 1:
            (ref, arch), gpu = models[0], gpus[0]
            compare = [resolve_gpu_or_fail(g) for g in _split(compare_gpus, "--compare-gpus")] if compare_gpus else None
            out = Path(out_dir or f"reports/{_slug(arch.name)}--{gpu.name}")
            cmd = _command(["--model", ref, "--gpu", gpu_refs], given, out_dir)
            result = _write(build.model_gpu_report, arch, gpu, cond, out, command=cmd, compare_gpus=compare,
                            model_ref=ref)
        else:
            if compare_gpus:
                raise click.BadParameter("only with one --model and one --gpu", param_hint="--compare-gpus")
            out = Path(out_dir or "reports/fit-map")
            cmd = _command(["--models", model_refs, "--gpus", gpu_refs], given, out_dir)
            result = _write(build.fit_map_report, models, gpus, cond, out, command=cmd)
    if as_json:
        emit_json(result)
        return
    click.echo(f"wrote {result['out']}/ ({len(result['files'])} files); open {Path(result['out']) / 'index.html'}")
    for f in result["files"]:
        click.echo(f"  {f}")


def _accuracy(build, record_paths, out_dir) -> dict:
    from calibrate.record import RESULTS_DIR, RecordError, load_records

    skipped: list = []
    try:
        records = load_records(list(record_paths) or None, skipped=skipped)
    except RecordError as e:
        raise click.BadParameter(str(e), param_hint="--records") from None
    for path, reason in skipped:
        click.echo(f"skipped {path}: {reason.removeprefix(path + ': ')}", err=True)
    if not records:
        raise click.BadParameter(f"no records under {', '.join(record_paths) or str(RESULTS_DIR)}",
                                 param_hint="--records")
    out = Path(out_dir or "reports/accuracy")
    args = ["--accuracy"] + [a for p in record_paths for a in ("--records", p)]
    sources = list(record_paths) or [_relative(RESULTS_DIR)]
    return _write(build.accuracy_report, records, out, command=_command(args, {}, out_dir), sources=sources)


def _write(builder, *args, **kwargs) -> dict:
    """Run a report builder; a folder that cannot be written is a usage error naming --out."""
    try:
        return builder(*args, **kwargs)
    except OSError as e:
        raise os_error(e, "--out") from None


def _split(value: str | None, option: str) -> list[str]:
    items = [v.strip() for v in (value or "").split(",") if v.strip()]
    if not items:
        raise click.BadParameter("give at least one name", param_hint=option)
    return items


def _command(args: list[str], given: dict, out_dir) -> str:
    """The command that regenerates the report: the given names plus every option that differs from its default."""
    parts = ["ftplan", "report", *args]
    for key, value in given.items():
        default = DEFAULTS.get(key)
        if value is None or value == default:
            continue
        parts += [f"--{key.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    if out_dir:
        parts += ["--out", str(out_dir)]
    return " ".join(shlex.quote(p) for p in parts)


def _slug(name: str) -> str:
    """A folder name from a model name (a config.json path becomes its parent folder's name)."""
    if "/" in name or name.endswith(".json"):
        p = Path(name)
        name = p.parent.name if p.name == "config.json" else p.stem if p.suffix == ".json" else p.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
