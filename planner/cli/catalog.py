"""`ftplan gpus list|show` and `ftplan models list|show`: the profiles ftplan plans with."""

from __future__ import annotations

import click

from ..profiles import ProfileError, list_gpus, list_models, load_gpu, prices_for
from ..units import fmt_gib
from .options import emit_json, json_option, resolve_model_or_fail
from .render import table

CTX = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=CTX)
def gpus():
    """GPU profiles: memory, dense bf16 peak, bandwidth (profiles/gpus/*.toml)."""


@gpus.command("list", context_settings=CTX)
@json_option
def gpus_list(as_json):
    """All GPUs with memory, bf16 TFLOP/s and the cheapest price.

    \b
    ftplan gpus list
    ftplan gpus list --json
    """
    items = list_gpus()
    if as_json:
        emit_json([dict(g.summary(), cheapest_usd_per_gpu_hour=_cheapest(g.name)) for g in items])
        return
    rows = []
    for g in sorted(items, key=lambda g: -g.memory_bytes):
        price = _cheapest(g.name)
        rows.append([g.name, ", ".join(g.aliases[:3]), fmt_gib(g.memory_bytes), f"{g.peak_tflops:g}",
                     f"{g.hbm_bandwidth_gb_per_s:g}", "yes" if g.supports_bf16 else "no",
                     f"${price:.2f}" if price is not None else "-"])
    click.echo(table(["gpu", "aliases", "memory", "bf16 TFLOP/s", "GB/s", "bf16", "from $/h"], rows, align="llrrrlr"))


def _cheapest(name):
    rows = prices_for(name)
    return rows[0].usd_per_gpu_hour if rows else None


@gpus.command("show", context_settings=CTX)
@click.argument("name")
@json_option
def gpus_show(name, as_json):
    """One GPU's profile and its prices.  ftplan gpus show a100-80"""
    try:
        g = load_gpu(name)
    except ProfileError as e:
        raise click.BadParameter(str(e), param_hint="NAME") from None
    prices = [p.__dict__ for p in prices_for(g.name)]
    if as_json:
        emit_json(dict(g.summary(), prices=prices))
        return
    s = g.summary()
    for k, v in s.items():
        click.echo(f"{k:24s} {v}")
    if prices:
        click.echo("")
        click.echo(table(["provider", "$/GPU-h", "as of", "note"],
                         [[p["provider"], f"{p['usd_per_gpu_hour']:.2f}", p["as_of"], p["note"][:60]] for p in prices],
                         align="lrll"))


@click.group(context_settings=CTX)
def models():
    """Model profiles (profiles/models/*.toml); any local config.json works the same."""


@models.command("list", context_settings=CTX)
@json_option
def models_list(as_json):
    """All catalog models with size, shape and aliases.

    \b
    ftplan models list
    """
    items = sorted(list_models(), key=lambda m: m.total_params)
    if as_json:
        emit_json([m.summary() | {"aliases": list(m.aliases)} for m in items])
        return
    rows = [[m.name, f"{m.total_params / 1e9:.2f}B", m.model_type, m.num_layers, m.hidden_size,
             f"{m.num_heads}/{m.num_kv_heads}", f"{m.vocab_size:,}", ", ".join(m.aliases[:3])] for m in items]
    click.echo(table(["model", "params", "family", "layers", "hidden", "heads/kv", "vocab", "aliases"], rows,
                     align="lrlrrrrl"))


@models.command("show", context_settings=CTX)
@click.argument("ref")
@json_option
def models_show(ref, as_json):
    """One model's shapes, resolved from a name, alias, hf id or config.json.  ftplan models show 70b"""
    from ..methods.lora import family_default_targets

    arch, how = resolve_model_or_fail(ref)
    d = arch.summary() | {"aliases": list(arch.aliases), "resolved": how, "source": arch.source,
                          "default_lora_targets": list(family_default_targets(arch)),
                          "layer_kinds": [f"{n}x {k.label}" for k, n in arch.kind_counts]}
    if as_json:
        emit_json(d)
        return
    if "->" in how:
        click.echo(f"alias {how}")
    for k, v in d.items():
        if k in ("resolved",):
            continue
        if k == "total_params":
            v = f"{v:,} ({v / 1e9:.2f}B)"
        click.echo(f"{k:24s} {v}")
