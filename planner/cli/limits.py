"""`ftplan limits`: the longest sequence, the largest micro-batch and the largest LoRA/DoRA rank that fit a GPU
(`planner.fitlimits`), each with the rest of the configuration as given."""

from __future__ import annotations

import click

from ..fitlimits import fit_limits
from ..plan import DEFAULT_MARGIN
from ..units import fmt_gib
from .checks import check_model, given
from .options import (
    build_train_config,
    emit_json,
    gpu_option,
    json_option,
    model_option,
    pop_train_kwargs,
    check_attention_gpu,
    resolve_gpu_or_fail,
    resolve_model_or_fail,
    train_options,
)
from .render import table


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_option
@train_options
@gpu_option(required=True)
@json_option
def limits(model_ref, gpu_ref, as_json, **kwargs):
    """The longest sequence, largest micro-batch and largest LoRA/DoRA rank that fit, each with the other
    options held as given (exact: the answer fits, one more does not; 5% of the GPU kept free, as recommend).

    \b
    ftplan limits --model 70b --method qlora --target-modules all-linear --grad-ckpt --gpu a100-80
    ftplan limits --model llama-2-7b --method lora --seq-len 4096 --gpu 4090 --json
    """
    tc = build_train_config(pop_train_kwargs(kwargs))
    arch, _ = resolve_model_or_fail(model_ref)
    tc = check_model(arch, tc, targets_given=given("target_modules"))
    gpu = resolve_gpu_or_fail(gpu_ref)
    check_attention_gpu(tc, gpu)
    res = fit_limits(arch, tc, gpu, DEFAULT_MARGIN)
    if as_json:
        emit_json(dict(model=arch.name, model_ref=model_ref, gpu=gpu.name, gpu_memory_bytes=gpu.memory_bytes,
                       config=tc.to_dict(), **res.to_dict()))
        return
    click.echo(f"{arch.name} on {gpu.display_name}: {tc.describe()}")
    click.echo(f"fits: device memory <= {fmt_gib(res.limit_bytes)} ({fmt_gib(gpu.memory_bytes)} less "
               f"{res.margin:.0%} kept free)")
    click.echo("")
    held = {"seq_len": f"batch {tc.batch_size}" + (f", rank {tc.rank}" if tc.spec.uses_rank else ""),
            "batch_size": f"seq {tc.seq_len}" + (f", rank {tc.rank}" if tc.spec.uses_rank else ""),
            "rank": f"seq {tc.seq_len}, batch {tc.batch_size}"}
    rows = []
    for label, unit, lim in (("sequence length", "tokens", res.seq_len), ("micro-batch", "sequences", res.batch_size),
                             ("rank (LoRA/DoRA)", "", res.rank)):
        if lim.value is None:
            rows.append([label, "n/a", "", "", lim.note])
            continue
        at = fmt_gib(lim.device_bytes, 3) if lim.device_bytes is not None else ""
        nxt = fmt_gib(lim.next_device_bytes, 3) if lim.next_device_bytes is not None else "-"
        if lim.value == 0:
            why = f"1 does not fit ({held[lim.name]})"
        elif lim.at_bound:
            why = f"{lim.bound_reason}, not memory ({held[lim.name]})"
        else:
            why = f"memory ({held[lim.name]})"
        rows.append([label, f"{lim.value:,}" + (f" {unit}" if unit else ""), at, nxt, why])
    click.echo(table(["limit", "largest that fits", "device at it", "at +1", "limited by"], rows, align="lrrrl"))
