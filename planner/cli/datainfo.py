"""`--data FILE` for `estimate` and `recommend`: the options, reading the file with the model's tokenizer, and the
dataset's section of the output (planner/datastats.py does the counting and the timing)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..dataset import FORMATS
from ..units import fmt_count, fmt_gib, fmt_hours

PROGRESS_MIN_RECORDS = 2000  # a progress bar on stderr from this many records (not with --json)
SHOWN_LINES = 10  # example locations listed in the text output (all of them in --json)


def data_options(f, packing: bool = True):
    """The --data options; `packing=False` where --packing is the recipe option of `train_options` (estimate),
    which the data's timing then follows."""
    opts = [
        click.option("--data", "data_path", default=None, metavar="FILE",
                     help="Your training data (the formats and auto-detection of `ftplan run`): real token counts, "
                          "padding, the longest batch, and time and cost from its real batches."),
        click.option("--data-format", "--format", "data_format", type=click.Choice(("auto",) + FORMATS),
                     default="auto", show_default=True, help="Format of --data (as `ftplan run --format`)."),
        click.option("--tokenizer", "tokenizer_ref", default=None, metavar="PATH|ID",
                     help="Tokenizer for --data (a folder, or a Hugging Face id in the HF cache)  [default: the "
                          "model's, when local or cached; else ~4 characters per token]"),
        click.option("--trust-remote-code", is_flag=True, help="Let the tokenizer run its repository's code."),
    ]
    if packing:
        opts.append(click.option("--packing", is_flag=True,
                                 help="Packed rows (ftplan run --packing): every plan prices them (the recipe's "
                                      "mask) and --data is timed with them; the padding of both is shown."))
    for o in reversed(opts):
        f = o(f)
    return f


def check_data_args(data_path, dataset_tokens) -> None:
    """--data and --dataset-tokens exclude each other. (Packing is a recipe option: `TrainConfig` refuses it with
    the methods that cannot pack.)"""
    if data_path and dataset_tokens:
        raise click.BadParameter("give --data or --dataset-tokens, not both (--data counts the tokens)",
                                 param_hint="--data")


def _tokenizer_source(model_ref: str, arch) -> str | None:
    """The model's own tokenizer: its folder when --model is a path, else its Hugging Face id."""
    if Path(model_ref).exists():
        return model_ref
    if "/" in model_ref:
        return model_ref
    return arch.hf_id or None


def read_data_or_fail(data_path, data_format, tokenizer_ref, trust_remote_code, model_ref, arch, quiet: bool):
    """DataStats for --data, or a usage error (exit 2) naming the file and line, or the tokenizer."""
    from ..datastats import DataError, TokenizerError, load_tokenizer, read_stats

    ctx = click.get_current_context(silent=True)
    revision = (ctx.meta.get("ftplan.revision") if ctx is not None else None) or "main"
    try:
        if tokenizer_ref:
            tok, how = load_tokenizer(tokenizer_ref, explicit=True, trust_remote_code=trust_remote_code)
        else:
            tok, how = load_tokenizer(_tokenizer_source(model_ref, arch), revision=revision,
                                      trust_remote_code=trust_remote_code)
            if tok is None:
                how = ""
    except TokenizerError as e:
        raise click.BadParameter(str(e), param_hint="--tokenizer") from None

    def progress(rows):
        if quiet or len(rows) < PROGRESS_MIN_RECORDS:
            yield from rows
            return
        with click.progressbar(rows, label=f"tokenizing {Path(data_path).name}", file=sys.stderr) as bar:
            yield from bar

    try:
        return read_stats(data_path, tok, how, fmt=data_format, progress=progress)
    except DataError as e:
        raise click.BadParameter(str(e), param_hint="--data") from None
    except Exception as e:  # noqa: BLE001  (a tokenizer failing on a record: name it, no traceback)
        raise click.BadParameter(f"{data_path}: the tokenizer failed ({type(e).__name__}: {e})",
                                 param_hint="--tokenizer") from None


def data_report(arch, tc, gpu, stats, epochs: float, packing: bool, *, margin: float) -> dict:
    """The dataset's facts for one configuration (JSON; `data_lines` renders it): tokens, distribution, padding
    with and without packing, the longest batch's memory, the examples that would not fit, time of the real batches."""
    from ..datastats import data_time, padding_waste
    from ..plan import make_plan

    seq = tc.seq_len
    longest = data_time(arch, tc, gpu, stats, epochs, packing=packing) if gpu else None
    d = {
        "path": stats.path,
        "format": stats.format,
        "records": stats.records,
        "tokenized_by": stats.tokenized_by,
        "estimated": stats.estimated,
        "tokens": stats.tokens,
        "tokens_after_truncation": sum(stats.truncated(seq)),
        "p50_tokens": stats.percentile(50),
        "p95_tokens": stats.percentile(95),
        "max_tokens": max(stats.lengths),
        "longer_than_seq_len": [{"where": w, "tokens": n} for w, n in stats.longer_than(seq)],
        "padding_waste": round(padding_waste(stats, tc.batch_size, seq, False), 4),
        "padding_waste_packed": round(padding_waste(stats, tc.batch_size, seq, True), 4),
        "packing": packing,
        "notes": list(stats.notes),
    }
    if gpu is None:
        return d
    from ..datastats import pack_lengths, padded_length

    units = pack_lengths(stats.truncated(seq), seq) if packing else stats.truncated(seq)
    L = padded_length(max(units), seq)
    peak = make_plan(arch, tc.replace(seq_len=L), gpu)
    d.update(longest_batch_tokens=L, longest_batch_device_bytes=peak.device_bytes,
             longest_batch_fits=peak.device_bytes <= gpu.memory_bytes * (1 - margin))
    if not d["longest_batch_fits"]:
        from ..fitlimits import max_seq_len

        ok = max_seq_len(arch, tc, gpu, margin).value or 0
        d["fits_up_to_tokens"] = ok
        d["would_not_fit"] = [{"where": w, "tokens": n} for w, n in stats.longer_than(ok)]
    d.update(steps=longest.steps, step_seconds=round(longest.step_seconds, 6), hours=round(longest.hours, 6),
             real_tokens_per_epoch=longest.real_tokens, padded_tokens_per_epoch=round(longest.padded_tokens))
    return d


def _where(items: list[dict]) -> str:
    shown = ", ".join(f"{i['where']} ({i['tokens']:,})" for i in items[:SHOWN_LINES])
    return shown + (f", and {len(items) - SHOWN_LINES} more" if len(items) > SHOWN_LINES else "")


def data_lines(d: dict, seq_len: int, batch: int, gpu_memory_bytes: int | None, margin: float) -> list[str]:
    lines = [f"data            {d['path']}: {d['records']:,} records ({d['format']}); tokens by {d['tokenized_by']}"]
    lines.append(f"tokens          {d['tokens']:,} (per example p50 {d['p50_tokens']:,}, p95 {d['p95_tokens']:,}, "
                 f"max {d['max_tokens']:,})" + (f"; {d['tokens_after_truncation']:,} after truncation to {seq_len:,}"
                                                if d["longer_than_seq_len"] else ""))
    if d["longer_than_seq_len"]:
        lines.append(f"truncated       {len(d['longer_than_seq_len'])} longer than --seq-len {seq_len:,}: "
                     + _where(d["longer_than_seq_len"]))
    lines.append(f"padding         batch {batch}: {100 * d['padding_waste']:.1f}% of the padded tokens without "
                 f"packing, {100 * d['padding_waste_packed']:.1f}% with packing"
                 + (" (timed: packed)" if d["packing"] else ""))
    if "longest_batch_tokens" in d:
        verdict = "fits" if d["longest_batch_fits"] else "DOES NOT FIT"
        lines.append(f"longest batch   {batch} x {d['longest_batch_tokens']:,} tokens: {fmt_gib(d['longest_batch_device_bytes'])} "
                     f"of {fmt_gib(gpu_memory_bytes)}, {verdict} (keeping {margin:.0%} free)")
        if not d["longest_batch_fits"]:
            lines.append(f"would not fit   longer than {d['fits_up_to_tokens']:,} tokens: " + (_where(d["would_not_fit"]) or "none"))
        lines.append(f"data time       {d['steps']:,} steps x {d['step_seconds']:.3g} s = {fmt_hours(d['hours'])} "
                     f"({fmt_count(d['real_tokens_per_epoch'])} real tokens per epoch, the batches padded to their "
                     f"longest row{', packed' if d['packing'] else ''})")
    for n in d["notes"]:
        lines.append(f"note: {n}")
    return lines


def data_timer(arch, stats, epochs, packing):
    """plan -> plan with the hours and cost of the dataset's real batches (planner.datastats; 16 length buckets)."""
    from ..cost import cost_usd
    from ..datastats import data_time

    def timer(p):
        packed = packing and p.train.spec.supports_packing  # prefix/prompt tuning run unpacked (ftplan run refuses)
        p.hours = data_time(arch, p.train, p.gpu, stats, epochs, packing=packed, buckets=16).hours
        if p.price is not None:
            p.cost_usd = cost_usd(p.hours, p.train.num_gpus, p.price.usd_per_gpu_hour)
        return p

    return timer


def data_facts(req, chosen, stats, epochs, packing):
    """The dataset section for the chosen plan (or, when nothing fits, without a GPU)."""
    if stats is None:
        return None
    from ..config import TrainConfig as TC

    if chosen is not None:
        packed = packing and chosen.train.spec.supports_packing
        return data_report(req.arch, chosen.train, chosen.gpu, stats, epochs, packed, margin=req.margin)
    return data_report(req.arch, TC(seq_len=req.seq_len), None, stats, epochs, packing, margin=req.margin)


def print_data(data, req, chosen, pick=1):
    if data is None:
        return
    click.echo("")
    batch = chosen.train.batch_size if chosen else 1
    gpu_bytes = chosen.gpu.memory_bytes if chosen else None
    click.echo(f"data, for plan #{pick}:" if chosen else "data:")
    click.echo("\n".join("  " + line for line in data_lines(data, req.seq_len, batch, gpu_bytes, req.margin)))
