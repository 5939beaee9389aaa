"""`ftplan recommend`: rank the plans that fit, say why the first wins, list what does not fit, save the choice."""

from __future__ import annotations

import dataclasses
import shlex
import sys

import click

from ..config import TrainConfig
from ..methods import ALIASES, METHOD_CHOICES, get_method, method_label
from ..recipe import Recipe
from ..cost import throughput_params
from ..plan import DEFAULT_MARGIN, Workload
from ..planfile import PlanFile, Schedule, write_plan
from ..recommend import OBJECTIVES, Request, sort_key, best_per_family, distinct_plans, explain, plan_row, quality_score, recommend as run_recommend
from ..units import fmt_count, fmt_gib, fmt_hours
from .options import (
    emit_json,
    json_option,
    model_option,
    parse_tokens_option,
    resolve_model_or_fail,
)
from .checks import check_positions, check_provider, given, os_error, writable_file
from .compare import parse_gpu_list, several_gpus
from .configopt import (config_dict, config_lines, config_option, load_config_or_fail, model_optional, model_or_fail,
                        train_config_from_file)
from .datainfo import check_data_args, data_facts, data_options, data_timer, print_data, read_data_or_fail
from .render import table

ALL_METHODS = ("full", "lora", "qlora", "ia3", "prefix", "prompt")  # the default; --methods takes any of METHOD_CHOICES


def _with_modules_to_save(recipe, value: str):
    """`recipe` with `--modules-to-save` (a usage error naming the valid modules)."""
    import dataclasses

    try:
        return dataclasses.replace(recipe, modules_to_save=value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--modules-to-save") from None


def _takes_modules_to_save(method: str) -> bool:
    """Whether peft's modules_to_save is modelled with `method` (a name of METHOD_CHOICES, aliases included)."""
    return get_method(ALIASES.get(method, (method,))[0]).supports_modules_to_save


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_option
@config_option
@click.option("--gpu", "gpu_refs", required=True, multiple=True, metavar="NAME[,NAME...]|all",
              help="GPU name or alias (a100-80, h100, 4090; `ftplan gpus list`); several (a comma list, or --gpu "
                   "repeated) or `all` rank every GPU type x count x plan by the job's cost.")
@click.option("--seq-len", type=int, default=2048, show_default=True, help="Tokens per sequence.")
@click.option("--dataset-tokens", default=None, metavar="N", help="Training tokens per epoch (50M, 1.5B) for hours and $.")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over the dataset.")
@data_options
@click.option("--effective-batch", type=int, default=16, show_default=True,
              help="Sequences per optimizer step over all GPUs (micro-batch x accumulation x GPUs).")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=None,
              help="quality: method tier, then time, then cost; time; cost.  [default: quality for one GPU, cost "
                   "for several]")
@click.option("--max-gpus", type=int, default=1, show_default=True, help="Allow up to this many GPUs (DDP/ZeRO/FSDP).")
@click.option("--methods", default=",".join(ALL_METHODS), show_default=True, help="Methods to consider (comma list).")
@click.option("--modules-to-save", "modules_to_save", default=None, metavar="MODULES",
              help="Comma list of modules peft trains a full copy of beside the adapters: embed_tokens, lm_head "
                   "(the methods that take it: lora, qlora, dora, qdora, ia3; one GPU).")
@click.option("--margin", type=float, default=DEFAULT_MARGIN, show_default=True,
              help="Fraction of GPU memory a plan must leave free (prediction error, fragmentation).")
@click.option("--provider", default=None, help="Use this provider's price (profiles/prices.toml).")
@click.option("--top", type=int, default=8, show_default=True, help="Plans to show.")
@click.option("--variants", is_flag=True, help="Show every configuration, not only the best one per method.")
@click.option("--save", "save_path", type=click.Path(dir_okay=False), default=None, help="Write the chosen plan (TOML).")
@click.option("--pick", type=int, default=1, show_default=True, help="Which ranked plan --save writes.")
@click.option("--verify", is_flag=True, help="Trace the top plans' real training step on fake tensors (train extra).")
@click.option("--chart", "chart_path", type=click.Path(dir_okay=False), default=None,
              help="Draw the ranked plans as a PNG (report extra).")
@json_option
def recommend(model_ref, config_path, gpu_refs, seq_len, dataset_tokens, epochs, data_path, data_format, tokenizer_ref,
              trust_remote_code, packing, effective_batch, objective, max_gpus, methods, modules_to_save,
              margin, provider, top, variants, save_path, pick, verify, chart_path, as_json):
    """Rank the fine-tuning plans that fit a GPU: peak memory, tokens/s, hours and dollars.

    \b
    ftplan recommend --model 70b --gpu a100-80
    ftplan recommend --model meta-llama/Llama-3.1-8B --gpu rtx-4090 --seq-len 4096 \\
        --dataset-tokens 50M --epochs 3 --save plan.toml
    ftplan recommend --model 70b --gpu a100-80 --max-gpus 16 --methods full
    ftplan recommend --model 70b --gpu all --max-gpus 8 --dataset-tokens 50M --epochs 3
    ftplan recommend --config axolotl.yaml --gpu rtx-4090

    With --config, the file's model, sequence length, effective batch (micro-batch x accumulation), method and
    recipe (attention, loss, packing, offloading) are kept, unless --model, --seq-len, --effective-batch or
    --methods are passed; micro-batch, checkpointing, optimizer and GPUs are what is searched.
    """
    mapping = overrides = None
    recipe = None
    if config_path is not None:
        mapping = load_config_or_fail(config_path)
        tc_file, overrides = train_config_from_file(mapping, {"seq_len": seq_len})
        recipe = tc_file.recipe
        seq_len = tc_file.seq_len
        if not given("effective_batch"):
            effective_batch = tc_file.batch_size * tc_file.grad_accum * tc_file.num_gpus
        if not given("methods"):
            methods = tc_file.method_name
    if modules_to_save is not None:  # on top of the file's recipe, else the reference
        recipe = _with_modules_to_save(recipe or Recipe.REFERENCE, modules_to_save)
        if recipe.modules_to_save and not given("methods"):
            methods = ",".join(m for m in ALL_METHODS if _takes_modules_to_save(m))
    if recipe is not None and recipe.modules_to_save and max_gpus > 1:
        raise click.BadParameter("modules_to_save is modelled on one GPU (valid with it: --max-gpus 1)",
                                 param_hint="--max-gpus")
    model_ref = model_or_fail(model_ref, mapping)
    arch, how = resolve_model_or_fail(model_ref)
    gpus = parse_gpu_list(gpu_refs)
    several = len(gpus) > 1 or any("," in r or r.strip().lower() == "all" for r in gpu_refs)
    objective = objective or ("cost" if several else "quality")
    gpu = gpus[0]
    for name, value in (("--seq-len", seq_len), ("--effective-batch", effective_batch), ("--max-gpus", max_gpus),
                        ("--top", top), ("--pick", pick)):
        if value <= 0:
            raise click.BadParameter(f"must be a positive integer, got {value}", param_hint=name)
    if not 0 <= margin < 1:
        raise click.BadParameter(f"must be in [0, 1), got {margin}", param_hint="--margin")
    if epochs <= 0:
        raise click.BadParameter(f"must be > 0, got {epochs:g}", param_hint="--epochs")
    check_positions(arch, TrainConfig(seq_len=seq_len))
    check_provider(provider)
    writable_file(save_path, "--save")
    writable_file(chart_path, "--chart")
    wanted = tuple(m.strip() for m in methods.split(",") if m.strip())
    bad = [m for m in wanted if m not in METHOD_CHOICES]
    if bad or not wanted:
        raise click.BadParameter(f"unknown method(s) {', '.join(bad) or '(none)'}; valid: {', '.join(METHOD_CHOICES)}",
                                 param_hint="--methods")
    if packing:  # packed rows: priced by every plan (the recipe's mask) and used to time --data
        recipe = dataclasses.replace(recipe or Recipe.REFERENCE, packing=True, padding="none")
        if not given("methods") and config_path is None:  # prefix/prompt tuning cannot pack (peft ignores positions)
            wanted = tuple(m for m in wanted if get_method(ALIASES.get(m, (m,))[0]).supports_packing)
    packing = recipe is not None and recipe.packing
    check_data_args(data_path, dataset_tokens)
    workload = Workload(parse_tokens_option(dataset_tokens), epochs)
    timer = stats = None
    if data_path:
        stats = read_data_or_fail(data_path, data_format, tokenizer_ref, trust_remote_code, model_ref, arch, as_json)
        workload = Workload(sum(stats.truncated(seq_len)), epochs)
        timer = data_timer(arch, stats, epochs, packing)
    if several:
        for flag, value in (("--verify", verify), ("--chart", chart_path)):
            if value:
                raise click.BadParameter("works with one GPU type; valid: a single --gpu NAME", param_hint=flag)
    extra = {}
    if recipe is not None:
        for m in wanted:  # a recipe a method cannot run (packing with prefix tuning...) is a usage error, not a crash
            try:
                TrainConfig(method=m, seq_len=seq_len, grad_ckpt=recipe.offload_checkpoints, recipe=recipe)
            except ValueError as e:
                raise click.BadParameter(f"{m} with the recipe of {config_path or '--packing'}: {e}",
                                         param_hint="--methods") from None
        extra["recipe"] = recipe
    req = Request(arch=arch, gpu=gpu, seq_len=seq_len, workload=workload, effective_batch=effective_batch,
                  objective=objective, margin=margin, max_gpus=max_gpus, methods=wanted, provider=provider,
                  model_ref=model_ref, **extra)
    if several:
        return several_gpus(req, gpus, how, top, variants, save_path, pick, as_json, timer, stats, packing,
                            save=_save)
    res = run_recommend(req)
    if timer is not None:
        res.ranked = [timer(p) for p in res.ranked]
        res.ranked.sort(key=sort_key(objective))
    verified = _verify(res, min(3, top)) if verify else {}
    # --pick numbers the plans as the table lists them (best per method, or every variant), at most --top
    listed = (distinct_plans(res.ranked) if variants else best_per_family(res.ranked))[:top]
    if listed and pick > len(listed):
        raise click.BadParameter(f"{pick}: valid: 1 to {len(listed)} (the plans listed; --top and --variants list "
                                 "more)", param_hint="--pick")
    chosen = listed[pick - 1] if listed else None
    if save_path and chosen is not None:
        try:
            _save(chosen, res, save_path)
        except OSError as e:
            raise os_error(e, "--save") from None
    if chart_path:
        try:
            _chart(res, chart_path)
        except OSError as e:
            raise os_error(e, "--chart") from None
    data = data_facts(res.request, chosen, stats, epochs, packing)
    if as_json:
        out = _as_json(res, top, verified, save_path if chosen else None)
        if data is not None:
            out["data"] = data
        if mapping is not None:
            out["config_file"] = config_dict(mapping, overrides)
        emit_json(out)
        return
    if mapping is not None:
        click.echo("\n".join(config_lines(mapping, overrides)))
        click.echo("")
    _print(res, how, top, verified, variants)
    print_data(data, res.request, chosen, pick)
    if save_path:
        if chosen is None:
            raise click.ClickException("nothing fits, so no plan was saved")
        click.echo(f"\nsaved plan #{pick} to {save_path}  (run it: ftplan run {save_path} --data train.jsonl --output-dir runs/x)")
    if chart_path:
        click.echo(f"chart: {chart_path}")


model_optional(recommend)


def _print(res, how, top, verified, variants=False):
    r = res.request
    g = r.gpu
    click.echo(f"model  {r.arch.name} ({r.arch.total_params / 1e9:.2f}B params)" + (f"  [{how}]" if "->" in how else ""))
    if r.arch.note:
        click.echo(f"note   {r.arch.note}")
    click.echo(f"gpu    {g.display_name}, {fmt_gib(g.memory_bytes)}" + (f", up to {r.max_gpus}" if r.max_gpus > 1 else ""))
    work = f"seq {r.seq_len}, {r.effective_batch} sequences per optimizer step"
    if r.workload.total_tokens:
        work += f", {fmt_count(r.workload.dataset_tokens)} tokens x {r.workload.epochs:g} epochs"
    click.echo(f"work   {work}")
    click.echo(f"rank   by {r.objective}" + (" (method tier, then time, then cost)" if r.objective == "quality" else "")
               + f"; a plan must leave {100 * r.margin:g}% of GPU memory free; {res.evaluated} candidates in {res.seconds:.2f} s")
    click.echo(f"speed  tokens/s from {throughput_params(g.name).source}")
    click.echo("")
    if res.ranked:
        rows = []
        shown = distinct_plans(res.ranked) if variants else best_per_family(res.ranked)
        for i, p in enumerate(shown[:top], 1):
            d = plan_row(p)
            v = verified.get(id(p))
            rows.append([
                i, method_label(p.train), d["precision"], d["batch"], d["gpus"], "yes" if d["grad_ckpt"] else "no",
                d["optimizer"], f"{d['peak_gib']:.1f} / {d['gpu_gib']:.0f}", f"{d['tokens_per_s']:,.0f}",
                fmt_hours(d["hours"]) if d["hours"] is not None else "-",
                f"${d['cost_usd']:,.0f}" if d["cost_usd"] is not None else "-",
            ] + ([f"{v / 2**30:.1f}" if v else "-"] if verified else []))
        headers = ["#", "method", "precision", "batch", "gpus", "ckpt", "optimizer", "peak GiB / GPU", "tokens/s", "time", "cost"]
        if verified:
            headers.append("traced GiB")
        click.echo(table(headers, rows, align="rllllllrrrr" + ("r" if verified else "")))
        click.echo("")
        click.echo(explain(res))
        hidden = len(distinct_plans(res.ranked)) - len(shown)
        notes = []
        if not variants and hidden > 0:
            notes.append(f"best configuration per method shown; --variants lists all {len(distinct_plans(res.ranked))}")
        if not res.request.workload.total_tokens:
            notes.append("--dataset-tokens and --epochs add time and cost")
        if notes:
            click.echo("(" + "; ".join(notes) + ")")
    else:
        click.echo("Nothing fits on one " + g.name + (f" (or up to {r.max_gpus})" if r.max_gpus > 1 else "") + ".")
    if res.not_fitting:
        click.echo("")
        click.echo("does not fit:")
        for nf in res.not_fitting:
            p = nf.best
            line = f"  {nf.label}: about {_size(p.device_bytes)} > {fmt_gib(r.gpu.memory_bytes)}"
            if nf.needs_gpus:
                per = nf.needs_plan.device_bytes
                off = " + CPU offload" if nf.needs_plan.train.cpu_offload else ""
                line += f"; needs {nf.needs_gpus} x {g.name} with ZeRO-3{off} ({fmt_gib(per)} each)"
            else:
                line += "; does not fit even on 1024 GPUs with ZeRO-3 + offload (activations alone exceed the GPU)"
            click.echo(line)
    if r.arch.moe is not None:
        from ..moe import expert_bytes_note

        note = expert_bytes_note(r.arch, 2, g.memory_bytes)
        if note:
            click.echo("")
            click.echo(f"note: {note}")


def _size(n: int) -> str:
    return f"{n / 2**40:.2f} TiB" if n >= 2**40 else fmt_gib(n)


def _fallbacks(chosen, res) -> list[dict]:
    """Next plans in recommendation order with the same method and GPUs but less memory (smaller micro-batch
    with more accumulation, checkpointing on, 8-bit state): what `ftplan run` retries on out-of-memory."""
    out = []
    tc = chosen.train
    for p in res.ranked:
        o = p.train
        if (o.method, o.quant, o.precision, o.rank, o.num_gpus, o.strategy, o.cpu_offload) != (
            tc.method, tc.quant, tc.precision, tc.rank, tc.num_gpus, tc.strategy, tc.cpu_offload
        ) or p.device_bytes >= chosen.device_bytes:
            continue
        diff = {k: getattr(o, k) for k in ("batch_size", "grad_accum", "grad_ckpt", "optimizer") if getattr(o, k) != getattr(tc, k)}
        if diff and diff not in out:
            out.append(diff)
        if len(out) == 3:
            break
    return out


def _save(chosen, res, path):
    d = chosen.to_dict()
    pred = {k: d[k] for k in ("peak_allocated_bytes", "peak_reserved_bytes", "device_bytes", "tokens_per_s", "step_seconds")}
    for k in ("hours", "cost_usd", "provider"):
        if k in d:
            pred[k] = d[k]
    lr = chosen.train.spec.default_lr
    sched = Schedule(learning_rate=lr, epochs=res.request.workload.epochs)
    pf = PlanFile(model=res.request.model_ref or chosen.model.name, train=chosen.train, gpu=chosen.gpu.name,
                  schedule=sched, prediction=pred, fallback=_fallbacks(chosen, res),
                  command="ftplan " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    write_plan(pf, path)


def _verify(res, n: int) -> dict:
    try:
        from calibrate.trace import trace_step
    except ModuleNotFoundError as e:
        raise click.ClickException(f"--verify needs {e.name}: pip install 'ftplan[train]'") from None
    from ..attention import parse_capability
    from ..memory import cuda_workspace_bytes

    out = {}
    for p in distinct_plans(res.ranked)[:n]:
        if p.train.num_gpus > 1:
            continue
        config = dict(p.model.config)
        config.setdefault("model_type", p.model.model_type)
        t = trace_step(config, p.train, cuda_workspace_bytes=cuda_workspace_bytes(p.gpu),
                       capability=parse_capability(p.gpu.compute_capability))
        reserved_ratio = p.peak_reserved_bytes / p.peak_allocated_bytes
        out[id(p)] = int(t.peak_allocated_bytes * reserved_ratio) + p.params.cuda_context_bytes + p.memory.paged_bytes
    return out


def _chart(res, path):
    try:
        from ..report.charts import recommendation_chart
    except ModuleNotFoundError as e:
        raise click.ClickException(f"--chart needs {e.name}: pip install 'ftplan[report]'") from None
    recommendation_chart(res, path)


def _as_json(res, top, verified, saved):
    r = res.request
    return {
        "model": r.arch.name,
        "gpu": r.gpu.name,
        "objective": r.objective,
        "margin": r.margin,
        "evaluated": res.evaluated,
        "seconds": round(res.seconds, 4),
        "why": explain(res),
        "plans": [
            dict(p.to_dict(), quality=quality_score(p.train), rank_in_list=i,
                 **({"traced_device_bytes": verified[id(p)]} if id(p) in verified else {}))
            for i, p in enumerate(distinct_plans(res.ranked)[:top], 1)
        ],
        "not_fitting": [
            {"label": nf.label, "device_bytes": nf.best.device_bytes, "needs_gpus": nf.needs_gpus,
             "needs_strategy": (nf.needs_plan.train.strategy + ("+offload" if nf.needs_plan.train.cpu_offload else "")) if nf.needs_plan else None,
             "needs_device_bytes_per_gpu": nf.needs_plan.device_bytes if nf.needs_plan else None}
            for nf in res.not_fitting
        ],
        "saved": saved,
    }
