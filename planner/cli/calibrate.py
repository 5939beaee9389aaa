"""`ftplan calibrate` (measure real steps and record them), `ftplan calibrate fit` (learn the per-GPU throughput and
allocator parameters from the records) and `ftplan validate` (predicted vs measured for every record).

The measuring code lives in the `calibrate` package and is imported only when a command runs; `validate` and
`calibrate fit` need no torch."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from ..units import GIB
from .options import (
    TRAIN_KEYS,
    build_train_config,
    emit_json,
    json_option,
    pop_train_kwargs,
    positive,
    resolve_model_or_fail,
    train_options,
)
from .checks import check_model, given as option_given, writable_dir
from .render import table

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
METRICS = ("allocated", "reserved", "tokens_per_s")




def _load(results: tuple[str, ...], skipped: list | None = None):
    """The records of --results; a file that is no readable record is skipped and named on stderr (a truncated
    record must not hide all the others)."""
    from calibrate.record import RecordError, load_records

    skipped = [] if skipped is None else skipped
    try:
        records = load_records(list(results) or None, skipped=skipped)
    except RecordError as e:
        raise click.BadParameter(str(e), param_hint="--results") from None
    for path, reason in skipped:
        click.echo(f"skipped {path}: {reason.removeprefix(path + ': ')}", err=True)
    return records


def _gpu_name_or_fail(ref: str) -> str:
    from ..profiles import ProfileError, load_gpu

    try:
        return load_gpu(ref).name
    except ProfileError as e:
        raise click.BadParameter(str(e), param_hint="--gpu") from None


# -- ftplan calibrate ---------------------------------------------------------------------------------------------


@click.group(invoke_without_command=True, context_settings=CTX)
@click.option("--model", "model_ref", default=None, metavar="NAME|PATH",
              help="Catalog name or alias, Hugging Face id, a config.json (random weights), or a folder with weights "
                   "(real weights). Same as `ftplan estimate --model`.")
@train_options
@click.option("--matrix", "matrix", default=None, metavar="FILE",
              help="A sweep file (calibrate/matrix.toml shows the format) instead of --model and the training flags.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="cuda: allocator and NVML peaks on GPU 0; cpu: times and the process's peak memory (tiny models, CI).")
@click.option("--steps", type=int, default=6, show_default=True, callback=positive,
              help="Training steps per configuration, warm-up included (tokens/s = median of steps 3..N).")
@click.option("--out", "out_dir", default=None, metavar="DIR",
              help="Write records under DIR/<gpu>/ instead of calibrate/results/<gpu>/.")
@click.option("--force", is_flag=True, help="Measure even when the GPU already has memory in use (numbers will be off).")
@click.option("--busy-threshold", type=float, default=1.0, show_default=True, metavar="GIB",
              help="Device memory in use (NVML) above which the GPU counts as busy.")
@click.option("--timeout", type=float, default=1800.0, show_default=True, metavar="SECONDS",
              help="Per configuration; a child that runs longer is killed and recorded as an error.")
@click.option("--gpu", "gpu_ref", default=None, metavar="NAME",
              help="GPU profile to file and predict the records under when the detected NVML name matches none.")
@json_option
@click.pass_context
def calibrate(ctx, model_ref, matrix, device, steps, out_dir, force, busy_threshold, timeout, gpu_ref, as_json, **kwargs):
    """Measure real training steps (one fresh process per configuration) and record them.

    Each configuration runs the reference recipe (`ftplan run`'s code) on a model built from its config: warm-up
    plus measured steps; the record (one new JSON file, never edited) holds the allocator and NVML peaks, the
    CUDA context, step times and tokens/s, the GPU, the library versions and the planner's prediction. An
    out-of-memory configuration is recorded as `"status": "oom"` and the sweep goes on. A busy GPU is refused
    unless --force.

    \b
    ftplan calibrate --model llama-3.2-1b --method lora --rank 16 --seq-len 2048 --batch-size 2
    ftplan calibrate --matrix calibrate/matrix.toml
    ftplan calibrate --model ./tiny/config.json --method full --device cpu --steps 4 --out /tmp/r
    ftplan calibrate fit --gpu h100-sxm-80gb      (learn throughput/allocator parameters from the records)
    """
    if ctx.invoked_subcommand is not None:
        given = [p.opts[0] for p in ctx.command.params
                 if ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"{', '.join(given)}: options of `ftplan calibrate`, not of "
                                   f"`ftplan calibrate {ctx.invoked_subcommand}`")
        return
    if matrix and model_ref:
        raise click.UsageError("--model and --matrix: give one (a single configuration, or a sweep file)")
    if not matrix and not model_ref:
        raise click.UsageError("give --model (one configuration) or --matrix FILE (a sweep), or `ftplan calibrate fit`")
    if timeout <= 0:
        raise click.BadParameter(f"must be > 0, got {timeout:g}", param_hint="--timeout")
    if busy_threshold < 0:
        raise click.BadParameter(f"must be >= 0, got {busy_threshold:g}", param_hint="--busy-threshold")
    writable_dir(out_dir, "--out")
    if importlib.util.find_spec("torch") is None:
        raise click.ClickException("`ftplan calibrate` needs torch, transformers and peft: pip install 'ftplan[train]'")
    from calibrate import harness

    if gpu_ref:
        gpu_ref = _gpu_name_or_fail(gpu_ref)
    steps_given = ctx.get_parameter_source("steps") == ParameterSource.COMMANDLINE
    if matrix:
        flags = [f"--{k.replace('_', '-')}" for k in TRAIN_KEYS
                 if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE]
        if flags:
            raise click.UsageError(f"{', '.join(flags)}: with --matrix, set training options in the matrix file")
        try:
            points = harness.load_matrix(matrix, steps=steps if steps_given else None)
        except harness.MatrixError as e:
            raise click.BadParameter(str(e), param_hint="--matrix") from None
    else:
        tc = build_train_config(pop_train_kwargs(kwargs))
        if tc.num_gpus != 1:
            raise click.BadParameter(f"calibrate measures one device; got {tc.num_gpus} (valid: 1)", param_hint="--num-gpus")
        arch, _ = resolve_model_or_fail(model_ref)
        tc = check_model(arch, tc, targets_given=option_given("target_modules"))
        points = [harness.point_from_arch(arch, tc, model_ref=model_ref, steps=steps)]
    if device == "cuda":
        _require_cuda()
    from trainer import files  # no torch

    try:  # one calibrate per results folder: records of two runs must not interleave (the kernel frees it on death)
        ctx.with_resource(files.OutputLock(Path(out_dir) if out_dir else harness.RESULTS_DIR, "ftplan calibrate", "--out"))
    except files.LockedError as e:
        raise click.BadParameter(str(e), param_hint="--out") from None
    try:
        outcomes = harness.run_points(points, device=device, out_dir=out_dir, force=force,
                                      busy_threshold_bytes=int(busy_threshold * GIB), timeout_s=timeout,
                                      gpu_override=gpu_ref, progress=len(points) > 1)
    except harness.GpuBusyError as e:
        raise click.ClickException(str(e)) from None
    except harness.Interrupted as e:
        click.echo(f"ftplan calibrate: {e}; the measuring process was killed and the configuration it measured "
                   "is not recorded", err=True)
        ctx.exit(128 + e.signum)
    counts = {s: sum(1 for o in outcomes if o.status == s) for s in ("ok", "oom", "error")}
    if as_json:
        emit_json({"records": [{"path": str(o.path), "status": o.status, "label": o.point.label,
                                "seconds": round(o.seconds, 2), "record": o.record} for o in outcomes],
                   "counts": counts})
    else:
        folder = sorted({str(o.path.parent) for o in outcomes})
        click.echo(f"{len(outcomes)} record(s) written under {', '.join(folder)}: "
                   + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
        for o in outcomes:
            click.echo(f"  {o.path}")
        if counts["ok"]:
            click.echo("compare with the planner: ftplan validate" + (f" --results {out_dir}" if out_dir else ""))
    if counts["error"]:
        ctx.exit(1)


def _require_cuda() -> None:
    from calibrate.nvml import device_info

    if device_info(0) is not None:
        return
    import torch

    if not torch.cuda.is_available():
        raise click.BadParameter("no CUDA GPU is visible (NVML and torch see none); valid here: cpu",
                                 param_hint="--device")


# -- ftplan calibrate fit -----------------------------------------------------------------------------------------


@calibrate.command("fit", context_settings=CTX)
@click.option("--results", multiple=True, metavar="DIR|FILE",
              help="Record folders or files (repeatable; default calibrate/results).")
@click.option("--gpu", "gpu_ref", default=None, metavar="NAME", help="Fit this GPU only (default: every GPU with records).")
@click.option("--write/--dry-run", default=True, show_default=True,
              help="Write profiles/calibration/<gpu>.toml, or only print the fit.")
@json_option
def fit(results, gpu_ref, write, as_json):
    """Learn the per-GPU throughput and allocator parameters from the records; print the error before and after.

    Fitted, per GPU architecture (every GPU of it then uses them): the GEMM efficiency, the bandwidth efficiency,
    the host time per kernel and the fp32 GEMM efficiency; per GPU: the allocator overhead (median
    reserved/allocated - 1) and the CUDA context (NVML records). Few, named, physical parameters: never a factor
    per configuration. Also printed: the leave-one-out error, what to expect on configurations not measured. The file it writes is what `estimate` and
    `recommend` use (they name it); review it before committing.

    \b
    ftplan calibrate fit --gpu h100-sxm-80gb
    ftplan calibrate fit --results /tmp/r --dry-run --json
    """
    from calibrate.fit import error_table, fit_gpu, gpus_in, render_toml, write_toml

    records = _load(results)
    dirs = list(results) or ["calibrate/results"]
    if gpu_ref:
        gpus = [_gpu_name_or_fail(gpu_ref)]
        have = gpus_in(records)
        if gpus[0] not in have:
            raise click.BadParameter(f"no CUDA records of {gpus[0]} in {', '.join(dirs)}; GPUs with records: "
                                     f"{', '.join(have) or 'none'}", param_hint="--gpu")
    else:
        gpus = gpus_in(records)
        if not gpus:
            raise click.BadParameter(f"no CUDA records in {', '.join(dirs)} (CPU records have nothing to fit)",
                                     param_hint="--results")
    out = []
    for g in gpus:
        res = fit_gpu(records, g)
        command = "ftplan calibrate fit --gpu " + g + "".join(f" --results {d}" for d in results)
        path = write_toml(res, command, dirs) if write else None
        out.append((res, path, render_toml(res, command, dirs)))
    if as_json:
        emit_json([dict(r.to_dict(), written=str(p) if p else None) for r, p, _ in out])
        return
    for res, path, _text in out:
        click.echo(f"{res.gpu_display} ({res.gpu}): {len(res.record_ids)} records")
        rows = [[q.name, _fmt_param(q.value), q.how, q.note] for q in res.parameters]
        click.echo(table(["parameter", "value", "how", "from"], rows, align="lrll"))
        click.echo("")
        click.echo("|predicted - measured| / measured:")
        click.echo("\n".join(error_table(res.errors)))
        click.echo("")
        rows = []
        for r in res.rows:
            if r["measured_tokens_per_s"] is None:
                continue
            loo = r["error_leave_one_out"]
            rows.append([r["model"], r["config"][:50], f"{r['measured_tokens_per_s']:,.0f}",
                         f"{r['before_tokens_per_s']:,.0f}", _pct(r["error_before"]),
                         f"{r['after_tokens_per_s']:,.0f}", _pct(r["error_after"]), _pct(loo)])
        click.echo(table(["model", "config", "tokens/s", "before", "err", "after", "err", "held out"], rows,
                         align="llrrrrrr"))
        for ex in res.excluded:
            click.echo(f"excluded: {ex}")
        if path:
            click.echo(f"\nwrote {path} (review and commit it; estimate and recommend use it from now on)")
        else:
            click.echo("\n(dry run: nothing written)")
        click.echo("")


def _fmt_param(v) -> str:
    if isinstance(v, int) and v > 10_000:
        return f"{v / GIB:.3f} GiB"
    return f"{v:.4g}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:+.1f}%"


# -- ftplan validate ----------------------------------------------------------------------------------------------


@click.command(context_settings=CTX)
@click.option("--results", multiple=True, metavar="DIR|FILE",
              help="Record folders or files (repeatable; default calibrate/results, the shipped measurements included); "
                   "a measurements .jsonl named after its GPU (h100-sxm-80gb.jsonl) is read as records.")
@click.option("--max-error", type=float, default=0.05, show_default=True, metavar="FRACTION",
              help="Exit non-zero when the --metric error of any record is above this.")
@click.option("--metric", type=click.Choice(METRICS), default="allocated", show_default=True,
              help="Which error decides the exit code (all three are printed).")
@click.option("--gpu", "gpu_ref", default=None, metavar="NAME", help="Only records of this GPU.")
@json_option
def validate(results, max_error, metric, gpu_ref, as_json):
    """Predicted vs measured for every record: peak allocated, peak reserved, tokens/s.

    Prints each record's errors ((predicted - measured) / measured), the median and maximum absolute error per GPU
    and per method, and exits 1 when a --metric error is above --max-error. Predictions use the current planner
    and calibration, not the prediction stored at measurement time.

    \b
    ftplan validate
    ftplan validate --results DIR --json
    ftplan validate --metric tokens_per_s --max-error 0.10
    """
    from calibrate.validate import compare, report

    if max_error <= 0:
        raise click.BadParameter(f"must be > 0, got {max_error}", param_hint="--max-error")
    skipped: list = []
    records = _load(results, skipped)
    if gpu_ref:
        name = _gpu_name_or_fail(gpu_ref)
        records = [r for r in records if r["meta_info"].get("gpu_profile") == name]
    rows = compare(records)
    rep = report(rows, metric, max_error)
    rep["skipped"] = [{"path": path, "reason": reason} for path, reason in skipped]
    if as_json:
        emit_json(rep)
    else:
        _print_validation(rows, rep, metric, max_error)
    if not rep["ok"]:
        sys.exit(1)


def _gib(v) -> str:
    return "-" if v is None else f"{v / GIB:.2f}"


def _tps(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _print_validation(rows, rep: dict, metric: str, max_error: float) -> None:
    if not rows:
        click.echo("no records")
        return
    body = []
    for c in rows:
        body.append([c.model, c.config[:44], c.gpu, c.kind, c.status,
                     _gib(c.measured_allocated_bytes), _gib(c.predicted_allocated_bytes), _pct(c.error_allocated),
                     _gib(c.measured_reserved_bytes), _gib(c.predicted_reserved_bytes), _pct(c.error_reserved),
                     _tps(c.measured_tokens_per_s), _tps(c.predicted_tokens_per_s), _pct(c.error_tokens_per_s)])
    click.echo(table(["model", "config", "gpu", "kind", "status", "alloc GiB", "pred", "err", "reserved", "pred", "err",
                      "tokens/s", "pred", "err"], body, align="lllllrrrrrrrrr"))
    notes = [c for c in rows if c.note]
    for c in notes:
        click.echo(f"note: {c.id}: {c.note}")
    for by, title in (("by_gpu", "GPU"), ("by_method", "method")):
        click.echo("")
        srows = []
        for key, e in rep[by].items():
            srows.append([key, e["n"]] + [x for m in METRICS for x in (_abs(e[m]["median"]), _abs(e[m]["max"]))])
        click.echo(table([title, "records", "alloc median", "max", "reserved median", "max", "tokens/s median", "max"],
                         srows, align="lrrrrrrr"))
    click.echo("")
    n = rep["compared"][metric]
    if not n:
        click.echo(f"{metric}: no record has a comparable figure")
    elif rep["ok"]:
        worst = max(abs(getattr(c, f"error_{metric}")) for c in rows if getattr(c, f"error_{metric}") is not None)
        click.echo(f"{metric}: all {n} compared records within {100 * max_error:g}% (max {100 * worst:.2f}%)")
    else:
        click.echo(f"{metric}: {len(rep['exceeding'])} of {n} records above {100 * max_error:g}%: "
                   + ", ".join(rep["exceeding"]))
    if rep["oom_but_predicted_fits"]:
        click.echo(f"out of memory although the planner says it fits: {', '.join(rep['oom_but_predicted_fits'])}")


def _abs(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"
