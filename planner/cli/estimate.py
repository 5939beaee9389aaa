"""`ftplan estimate`: per-component memory, fit, speed and cost of one configuration."""

from __future__ import annotations

import click

from ..plan import Workload, make_plan
from .options import (
    build_train_config,
    emit_json,
    gpu_option,
    json_option,
    model_option,
    parse_tokens_option,
    pop_train_kwargs,
    check_attention_gpu,
    resolve_gpu_or_fail,
    resolve_model_or_fail,
    train_options,
)
from .checks import check_model, check_provider, given
from .render import plan_summary


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_option
@train_options
@gpu_option()
@click.option("--dataset-tokens", default=None, metavar="N", help="Training tokens per epoch (50M, 1.5B) for time and cost.")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over the dataset.")
@click.option("--provider", default=None, help="Price rows of this provider only (`profiles/prices.toml`).")
@click.option("--trace", is_flag=True,
              help="Also run the real training step on fake tensors (needs the train extra; seconds to a minute).")
@json_option
def estimate(model_ref, gpu_ref, dataset_tokens, epochs, provider, trace, as_json, **kwargs):
    """Memory (by component), fit, tokens/s and cost of one configuration.

    \b
    ftplan estimate --model llama-2-7b --method qlora --rank 16 --target-modules all-linear \\
        --seq-len 2048 --batch-size 4 --grad-ckpt --gpu a100-80
    ftplan estimate --model ./my-model/config.json --method full --precision mixed --gpu h100-80 \\
        --num-gpus 8 --strategy zero3 --json
    """
    tc = build_train_config(pop_train_kwargs(kwargs))
    arch, how = resolve_model_or_fail(model_ref)
    tc = check_model(arch, tc, targets_given=given("target_modules"))
    gpu = resolve_gpu_or_fail(gpu_ref)
    check_attention_gpu(tc, gpu)
    tokens = parse_tokens_option(dataset_tokens)
    if epochs <= 0:
        raise click.BadParameter(f"must be > 0, got {epochs:g}", param_hint="--epochs")
    check_provider(provider)
    plan = make_plan(arch, tc, gpu, Workload(tokens, epochs), provider=provider, model_ref=model_ref)
    d = plan.to_dict()
    fit_line = None
    if plan.fits is False:
        fit_line = _fits_up_to(arch, tc, gpu, d)
    traced = None
    if trace:
        traced = _trace(arch, tc, gpu)
        d["trace"] = traced
    if as_json:
        emit_json(d)
        return
    head = f"{arch.name}" + (f" ({how})" if "->" in how or "config.json" in how else "")
    click.echo(f"{head}: {arch.total_params / 1e9:.2f}B params, {arch.model_type}")
    click.echo(f"config: {tc.describe()}" + (f"  |  gpu: {gpu.display_name}" if gpu else ""))
    click.echo("")
    click.echo(plan_summary(d))
    if fit_line:
        click.echo(fit_line)
    if traced is not None:
        click.echo("")
        click.echo(_trace_summary(traced, d["peak_allocated_bytes"]))


def _fits_up_to(arch, tc, gpu, d: dict) -> str:
    """For a configuration that does not fit: the longest sequence at its batch and the largest batch at its
    sequence length that do (`planner.fitlimits`, at recommend's margin); adds `max_seq_len_that_fits` and
    `max_batch_that_fits` to `d` and returns the human line."""
    from ..fitlimits import max_batch, max_seq_len
    from ..plan import DEFAULT_MARGIN

    seq = max_seq_len(arch, tc, gpu, DEFAULT_MARGIN).value
    batch = max_batch(arch, tc, gpu, DEFAULT_MARGIN).value
    d["max_seq_len_that_fits"] = seq
    d["max_batch_that_fits"] = batch
    keep = f"keeping {DEFAULT_MARGIN:.0%} of the GPU free"
    if not seq and not batch:
        return f"fits at no sequence length at this batch, nor with one sequence at this length ({keep})"
    first = (f"fits up to {seq:,} tokens per sequence at this batch" if seq
             else "fits at no sequence length at this batch")
    second = f"up to {batch:,} sequences at this length" if batch else "not with one sequence at this length"
    return f"{first} (and {second}), {keep}; `ftplan limits` says more"


def _trace(arch, tc, gpu) -> dict:
    """Run the trace (lazily imported: torch, transformers, peft) and return its dict."""
    try:
        from calibrate.trace import trace_step
    except ModuleNotFoundError as e:
        raise click.ClickException(f"--trace needs {e.name}: pip install 'ftplan[train]'") from None
    from ..memory import cuda_workspace_bytes

    if tc.num_gpus > 1:
        tc = tc.replace(num_gpus=1, strategy="ddp", cpu_offload=False)
    config = dict(arch.config)
    config.setdefault("model_type", arch.model_type)
    from ..attention import DEFAULT_CAPABILITY, parse_capability

    sm = parse_capability(gpu.compute_capability) if gpu is not None else DEFAULT_CAPABILITY
    return trace_step(config, tc, cuda_workspace_bytes=cuda_workspace_bytes(gpu), capability=sm).to_dict()


def _trace_summary(t: dict, analytic: int) -> str:
    from ..units import fmt_gib

    diff = (analytic - t["peak_allocated_bytes"]) / t["peak_allocated_bytes"] * 100
    lines = [
        f"trace           {fmt_gib(t['peak_allocated_bytes']):>11}   the real step on fake tensors, at {t['peak_phase']} "
        f"({t['seconds']:.1f} s); analytic differs by {diff:+.2f}%",
    ]
    parts = ", ".join(f"{k.replace('_', ' ')} {fmt_gib(v)}" for k, v in t["peak_by_tag"].items())
    lines.append(f"                at the traced peak: {parts}")
    for n in t.get("notes", []):
        lines.append(f"                trace note: {n}")
    return "\n".join(lines)
