"""`ftplan recommend` over several GPU types (`--gpu all`, a comma list, or `--gpu` repeated): parse the list, run
planner.compare, render the ranked table, the GPUs that cannot run the model and the prices with source and date."""

from __future__ import annotations

import click

from ..cost import throughput_params
from ..methods import method_label
from ..recommend import distinct_plans, plan_row, quality_score
from ..units import fmt_count, fmt_hours
from .checks import os_error
from .datainfo import data_facts, print_data
from .options import emit_json
from .render import table


def parse_gpu_list(refs: tuple) -> list:
    """GPU profiles from --gpu values: names or aliases, comma lists, `all` (every profile); duplicates dropped.
    An unknown name is a usage error naming it and the valid ones."""
    from ..profiles import ProfileError, list_gpus, load_gpu

    out = []
    for ref in refs:
        for name in (n.strip() for n in ref.split(",")):
            if not name:
                continue
            if name.lower() == "all":
                found = list_gpus()
            else:
                try:
                    found = [load_gpu(name)]
                except ProfileError as e:
                    valid = ", ".join(g.name for g in list_gpus())
                    raise click.BadParameter(f"{e}; valid: all, {valid}", param_hint="--gpu") from None
            out += [g for g in found if g not in out]
    if not out:
        raise click.BadParameter(f"no GPU named; valid: all, {', '.join(g.name for g in list_gpus())}",
                                 param_hint="--gpu")
    return out


def several_gpus(req, gpus, how, top, variants, save_path, pick, as_json, timer=None, stats=None, packing=False, *,
                 save):
    """`recommend` over several GPU types (planner.compare): one ranked table, prices with their source and date,
    and the GPUs that cannot run the model at all, with why."""
    from ..compare import best_per_gpu, compare

    comp = compare(req, gpus, data_time=timer)
    listed = (distinct_plans(comp.ranked) if variants else best_per_gpu(comp.ranked))[:top]
    if listed and pick > len(listed):
        raise click.BadParameter(f"{pick}: valid: 1 to {len(listed)} (the plans listed)", param_hint="--pick")
    chosen = listed[pick - 1] if listed else None
    if save_path and chosen is not None:
        try:
            save(chosen, comp.verdict(chosen.gpu.name).result, save_path)
        except OSError as e:
            raise os_error(e, "--save") from None
    data = data_facts(req, chosen, stats, req.workload.epochs, packing)
    if as_json:
        out = _several_json(comp, listed, save_path if chosen else None)
        if data is not None:
            out["data"] = data
        emit_json(out)
        return
    _print_several(comp, listed, how, variants)
    print_data(data, req, chosen, pick)
    if save_path:
        if chosen is None:
            raise click.ClickException("nothing fits, so no plan was saved")
        click.echo(f"\nsaved plan #{pick} to {save_path}  (run it: ftplan run {save_path} --data train.jsonl --output-dir runs/x)")


def _money(x) -> str:
    return "-" if x is None else (f"${x:,.0f}" if x >= 100 else f"${x:,.2f}")


def _print_several(comp, listed, how, variants):
    from ..compare import job_cost, job_time

    r = comp.request
    job = bool(r.workload.total_tokens)
    click.echo(f"model  {r.arch.name} ({r.arch.total_params / 1e9:.2f}B params)" + (f"  [{how}]" if "->" in how else ""))
    click.echo(f"gpus   {len(comp.gpus)} types, up to {r.max_gpus} of a type: {', '.join(g.name for g in comp.gpus)}")
    work = f"seq {r.seq_len}, {r.effective_batch} sequences per optimizer step"
    if job:
        work += f", {fmt_count(r.workload.dataset_tokens)} tokens x {r.workload.epochs:g} epochs"
    click.echo(f"work   {work}")
    unit = "the job's" if job else "per million tokens:"
    order = {"cost": f"{unit} $, then time", "time": f"{unit} time, then $",
             "quality": "method tier, then time, then $"}[r.objective]
    click.echo(f"rank   by {r.objective} ({order}); a plan must leave {100 * r.margin:g}% of GPU memory free; "
               f"{comp.evaluated} candidates in {comp.seconds:.2f} s")
    click.echo("")
    if listed:
        rows = []
        for i, p in enumerate(listed, 1):
            d = plan_row(p)
            t = job_time(p)
            rows.append([i, p.gpu.name, d["gpus"], method_label(p.train), d["precision"], d["batch"],
                         "yes" if d["grad_ckpt"] else "no", d["optimizer"],
                         f"{d['peak_gib']:.1f} / {d['gpu_gib']:.0f}", f"{d['tokens_per_s']:,.0f}",
                         fmt_hours(t) if job else fmt_hours(t / 3600), _money(job_cost(p, comp.verdict(p.gpu.name).price))])
        headers = ["#", "gpu", "n", "method", "precision", "batch", "ckpt", "optimizer", "peak GiB / GPU", "tokens/s",
                   "time" if job else "time / 1M tok", "cost" if job else "$ / 1M tok"]
        click.echo(table(headers, rows, align="rlllllllrrrr"))
        click.echo("")
        b = comp.best
        click.echo(f"{b.train.num_gpus} x {b.gpu.name}, {method_label(b.train)}, ranks first by {r.objective} of the "
                   f"{len(comp.ranked)} plans that fit on {sum(1 for v in comp.verdicts if not v.reason)} GPU types.")
        notes = []
        hidden = len(distinct_plans(comp.ranked)) - len(listed)
        if hidden > 0:
            notes.append(("the best plan of each GPU type shown" if not variants else "")
                         + f"; --top and --variants list up to {len(distinct_plans(comp.ranked))}")
        if not job:
            notes.append("--dataset-tokens and --epochs give the job's time and cost")
        if notes:
            click.echo("(" + "; ".join(n.lstrip("; ") for n in notes) + ")")
    else:
        click.echo(f"Nothing fits on any of these GPU types (up to {r.max_gpus} of a type).")
    bad = [v for v in comp.verdicts if v.reason]
    if bad:
        click.echo("")
        click.echo("cannot run the model at all:")
        for v in bad:
            click.echo(f"  {v.gpu.name}: {v.reason}")
    click.echo("")
    click.echo("prices (cheapest row per GPU" + (f", {r.provider}" if r.provider else "") + "; tokens/s calibration):")
    for v in comp.verdicts:
        p = v.price
        speed = throughput_params(v.gpu.name).source
        if p is None:
            click.echo(f"  {v.gpu.name}: no price" + (f" from {r.provider}" if r.provider else "") + f"; {speed}")
        else:
            click.echo(f"  {v.gpu.name}: ${p.usd_per_gpu_hour:g}/GPU-h {p.provider}, as of {p.as_of}, {p.source}; {speed}")


def _per_job(comp, p, job: bool) -> dict:
    """A plan's cost and time for the job (None without a workload), per million tokens, as ranked."""
    from ..compare import job_cost, seconds_per_million_tokens, usd_per_million_tokens

    price = comp.verdict(p.gpu.name).price
    cost = job_cost(p, price) if job else None
    per_m = usd_per_million_tokens(p, price)
    return {"job_cost_usd": None if cost is None else round(cost, 4),
            "usd_per_million_tokens": None if per_m is None else round(per_m, 4),
            "seconds_per_million_tokens": round(seconds_per_million_tokens(p), 3)}


def _several_json(comp, listed, saved):
    r = comp.request
    job = bool(r.workload.total_tokens)

    def price(p):
        return None if p is None else {"provider": p.provider, "usd_per_gpu_hour": p.usd_per_gpu_hour,
                                        "as_of": p.as_of, "source": p.source, "note": p.note}

    return {
        "model": r.arch.name,
        "gpus": [g.name for g in comp.gpus],
        "objective": r.objective,
        "margin": r.margin,
        "max_gpus": r.max_gpus,
        "evaluated": comp.evaluated,
        "seconds": round(comp.seconds, 4),
        "plans": [dict(p.to_dict(), quality=quality_score(p.train), rank_in_list=i, **_per_job(comp, p, job))
                  for i, p in enumerate(listed, 1)],
        "gpu_verdicts": [
            {"gpu": v.gpu.name, "runs": v.reason is None, "fitting_plans": len(v.result.ranked), "reason": v.reason,
             "needs_gpus": v.needs_gpus, "price": price(v.price),
             "calibration": throughput_params(v.gpu.name).source}
            for v in comp.verdicts
        ],
        "saved": saved,
    }
