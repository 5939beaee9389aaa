"""`ftplan estimate`: per-component memory, fit, speed and cost of one configuration."""

from __future__ import annotations

import functools

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
from .datainfo import check_data_args, data_lines, data_options, data_report, read_data_or_fail
from .configopt import (config_dict, config_lines, config_option, load_config_or_fail, model_optional, model_or_fail,
                        train_config_from_file)
from .render import plan_summary


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_option
@config_option
@train_options
@gpu_option()
@click.option("--dataset-tokens", default=None, metavar="N", help="Training tokens per epoch (50M, 1.5B) for time and cost.")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over the dataset.")
@functools.partial(data_options, packing=False)  # --packing is the recipe option of train_options
@click.option("--provider", default=None, help="Price rows of this provider only (`profiles/prices.toml`).")
@click.option("--host-ram", type=float, default=None, metavar="GIB",
              help="CPU memory of the machine in GiB: says whether offloaded tensors and state fit the host.")
@click.option("--trace", is_flag=True,
              help="Also run the real training step on fake tensors (needs the train extra; seconds to a minute).")
@json_option
def estimate(model_ref, config_path, gpu_ref, dataset_tokens, epochs, data_path, data_format, tokenizer_ref,
             trust_remote_code, provider, host_ram, trace, as_json, **kwargs):
    """Memory (by component), fit, tokens/s and cost of one configuration.

    \b
    ftplan estimate --model llama-2-7b --method qlora --rank 16 --target-modules all-linear \\
        --seq-len 2048 --batch-size 4 --grad-ckpt --gpu a100-80
    ftplan estimate --model ./my-model/config.json --method full --precision mixed --gpu h100-80 \\
        --num-gpus 8 --strategy zero3 --json
    ftplan estimate --model ./my-model --method lora --batch-size 4 --gpu l40s --data train.jsonl --epochs 3
    ftplan estimate --config axolotl.yaml --gpu a100-80 --batch-size 4
    """
    mapping = overrides = None
    if config_path is not None:
        mapping = load_config_or_fail(config_path)
        tc, overrides = train_config_from_file(mapping, {**kwargs, **pop_train_kwargs(kwargs)})
    else:
        tc = build_train_config(pop_train_kwargs(kwargs))
    model_ref = model_or_fail(model_ref, mapping)
    arch, how = resolve_model_or_fail(model_ref)
    targets_given = given("target_modules") or (mapping is not None and "target_modules" in mapping.options)
    tc = check_model(arch, tc, targets_given=targets_given)
    gpu = resolve_gpu_or_fail(gpu_ref)
    check_attention_gpu(tc, gpu)
    tokens = parse_tokens_option(dataset_tokens)
    if epochs <= 0:
        raise click.BadParameter(f"must be > 0, got {epochs:g}", param_hint="--epochs")
    check_provider(provider)
    packing = tc.recipe.packing  # the data are timed with the rows the recipe predicts
    check_data_args(data_path, dataset_tokens)
    data = None
    if data_path:
        from ..plan import DEFAULT_MARGIN

        stats = read_data_or_fail(data_path, data_format, tokenizer_ref, trust_remote_code, model_ref, arch, as_json)
        tokens = sum(stats.truncated(tc.seq_len))
        data = data_report(arch, tc, gpu, stats, epochs, packing, margin=DEFAULT_MARGIN)
    plan = make_plan(arch, tc, gpu, Workload(tokens, epochs), provider=provider, model_ref=model_ref)
    if data is not None and gpu is not None:
        _time_from_data(plan, data["hours"])
    d = plan.to_dict()
    if data is not None:
        d["data"] = data
    if arch.note:  # what is planned when it is not the whole checkpoint (a multimodal model's text tower)
        d["model_note"] = arch.note
    if host_ram is not None:
        if host_ram <= 0:
            raise click.BadParameter(f"must be > 0, got {host_ram:g}", param_hint="--host-ram")
        host_limit(d, tc, int(host_ram * 2**30))
    fit_line = None
    if plan.fits is False:
        fit_line = _fits_up_to(arch, tc, gpu, d)
    traced = None
    if trace:
        traced = _trace(arch, tc, gpu)
        d["trace"] = traced
    if mapping is not None:
        d["config_file"] = config_dict(mapping, overrides)
    if as_json:
        emit_json(d)
        return
    head = f"{arch.name}" + (f" ({how})" if "->" in how or "config.json" in how else "")
    click.echo(f"{head}: {arch.total_params / 1e9:.2f}B params, {arch.model_type}")
    if arch.note:
        click.echo(f"note: {arch.note}")
    click.echo(f"config: {tc.describe()}" + (f"  |  gpu: {gpu.display_name}" if gpu else ""))
    if mapping is not None:
        click.echo("\n".join(config_lines(mapping, overrides)))
    click.echo("")
    click.echo(plan_summary(d))
    if fit_line:
        click.echo(fit_line)
    if data is not None:
        from ..plan import DEFAULT_MARGIN

        click.echo("")
        click.echo("\n".join(data_lines(data, tc.seq_len, tc.batch_size, gpu.memory_bytes if gpu else None,
                                        DEFAULT_MARGIN)))
    if traced is not None:
        click.echo("")
        click.echo(_trace_summary(traced, d["peak_allocated_bytes"], d.get("host_bytes", 0)))


def _time_from_data(plan, hours: float) -> None:
    """Replace the full-rows time and cost by those of the dataset's real batches (planner.datastats)."""
    from ..cost import cost_usd

    plan.hours = hours
    if plan.price is not None:
        plan.cost_usd = cost_usd(hours, plan.train.num_gpus, plan.price.usd_per_gpu_hour)


def host_limit(d: dict, tc, host_ram_bytes: int) -> None:
    """Host memory of every GPU's share on one machine (`num_gpus` processes, each with its offloaded tensors and
    state) against `--host-ram`: adds host_ram_bytes, host_bytes_all_gpus and host_fits to `d`."""
    total = d["host_bytes"] * tc.num_gpus
    d.update(host_ram_bytes=host_ram_bytes, host_bytes_all_gpus=total, host_fits=total <= host_ram_bytes)


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


model_optional(estimate)


def _trace(arch, tc, gpu) -> dict:
    """Run the trace (lazily imported: torch, transformers, peft) and return its dict."""
    try:
        from calibrate.trace import trace_step
    except ModuleNotFoundError as e:
        raise click.ClickException(f"--trace needs {e.name}: pip install 'ftplan[train]'") from None
    from ..memory import cuda_workspace_bytes

    config = dict(arch.config)
    config.setdefault("model_type", arch.model_type)
    from ..attention import DEFAULT_CAPABILITY, parse_capability

    sm = parse_capability(gpu.compute_capability) if gpu is not None else DEFAULT_CAPABILITY
    workspace = cuda_workspace_bytes(gpu)
    if tc.num_gpus > 1:
        from calibrate.trace_multigpu import traceable

        if traceable(tc):  # one rank of the real sharded run, on a fake process group
            from calibrate.trace_multigpu import trace_sharded_step

            return trace_sharded_step(config, tc, cuda_workspace_bytes=workspace).to_dict()
        from calibrate import trace_zero

        zero_why = trace_zero.refusal(tc, arch.total_params)
        if zero_why is None:  # rank 0 of the real DeepSpeed engine, two CPU processes
            return trace_zero.trace_zero_step(config, tc, cuda_workspace_bytes=workspace).to_dict()
        one = tc.replace(num_gpus=1, strategy="ddp", cpu_offload=False)
        d = trace_step(config, one, cuda_workspace_bytes=workspace, capability=sm).to_dict()
        d["notes"].append(f"{tc.strategy} on {tc.num_gpus} GPUs is not traced ({traceable.__doc__.strip()}; "
                          f"{zero_why}); this is one GPU holding everything")
        return d
    return trace_step(config, tc, cuda_workspace_bytes=workspace, capability=sm).to_dict()


def _trace_summary(t: dict, analytic: int, analytic_host: int = 0) -> str:
    from ..units import fmt_gib

    diff = (analytic - t["peak_allocated_bytes"]) / t["peak_allocated_bytes"] * 100
    real = any(n.startswith("DeepSpeed ZeRO") for n in t.get("notes", ()))  # calibrate.trace_zero: real processes
    how = "the real DeepSpeed engine, 2 CPU processes" if real else "the real step on fake tensors"
    lines = [
        f"trace           {fmt_gib(t['peak_allocated_bytes']):>11}   {how}, at {t['peak_phase']} "
        f"({t['seconds']:.1f} s); analytic differs by {diff:+.2f}%",
    ]
    if t.get("host_bytes"):  # FSDP2 CPU offload: the host RAM the trace saw
        host_diff = (analytic_host - t["host_bytes"]) / t["host_bytes"] * 100
        lines.append(f"trace host      {fmt_gib(t['host_bytes']):>11}   per GPU, in CPU memory; analytic differs by "
                     f"{host_diff:+.2f}%")
    parts = ", ".join(f"{k.replace('_', ' ')} {fmt_gib(v)}" for k, v in t["peak_by_tag"].items())
    lines.append(f"                at the traced peak: {parts}")
    for n in t.get("notes", []):
        lines.append(f"                trace note: {n}")
    return "\n".join(lines)
