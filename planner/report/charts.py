"""Report charts: each draws one DataFrame from `planner.report.data` into a PNG.

matplotlib's object API only (`Figure`, no pyplot): nothing global changes, no display is needed. Sizes are
10-13 x 6-7 inches at 120 dpi; memory in GiB (2^30 bytes), time in hours, money in USD. Colours are colour-blind
safe: methods use the Okabe-Ito palette and keep their colour in every chart; memory categories use Paul Tol's
"bright" palette.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from ..fileio import atomic_path
from ..units import GIB
from . import data as D

DPI = 120

# Okabe & Ito (2008) colour-blind-safe palette; one colour per method in every chart.
METHOD_COLORS = {
    "full-mixed": "#0072B2",  # blue
    "full-bf16": "#56B4E9",  # sky blue
    "lora": "#009E73",  # bluish green
    "qlora": "#E69F00",  # orange
    "prefix": "#CC79A7",  # reddish purple
    "prompt": "#D55E00",  # vermillion
    "ia3": "#000000",  # black (Okabe-Ito's yellow is unreadable on white)
}
METHOD_MARKERS = {"full-mixed": "o", "full-bf16": "s", "lora": "^", "qlora": "D", "prefix": "v", "prompt": "P", "ia3": "X"}
# Paul Tol "bright" (colour-blind safe) for the stacked memory categories.
GROUP_COLORS = {
    "weights": "#4477AA",
    "gradients": "#EE6677",
    "optimizer_state": "#228833",
    "activations": "#CCBB44",
    "logits": "#66CCEE",
    "overheads": "#BBBBBB",
}
STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "figure.titlesize": 13,
    "legend.fontsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.axisbelow": True,
    "text.parse_math": False,  # "$" is a dollar, not mathtext
}


def _figure(width: float = 10, height: float = 6, **kw) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained", **kw)


def _panels(fig: Figure, n: int, *, sharey: bool = False, legend_width: float = 0.3):
    """`n` side-by-side axes plus a narrow axis on the right that only holds the legend (so a legend never
    covers data and the layout engine keeps it clear of the titles)."""
    gs = fig.add_gridspec(1, n + 1, width_ratios=[1] * n + [legend_width])
    axes = [fig.add_subplot(gs[0, 0])]
    for i in range(1, n):
        axes.append(fig.add_subplot(gs[0, i], sharey=axes[0] if sharey else None))
        if sharey:
            axes[-1].tick_params(labelleft=False)
    leg = fig.add_subplot(gs[0, n])
    leg.axis("off")
    return axes, leg


def _legend(ax, handles, title: str | None = None) -> None:
    ax.legend(handles=handles, loc="upper left", frameon=False, title=title, borderaxespad=0, alignment="left")


def _footnote(fig: Figure, text: str, width: int = 175) -> None:
    """Small grey text under everything (laid out by constrained layout, so it never overlaps the axes)."""
    import textwrap

    fig.supxlabel("\n".join(textwrap.wrap(text, width)), fontsize=8, color="#444444", ha="center")


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, keep_suffix=True) as tmp:  # never a half-written image under the final name
        fig.savefig(tmp, dpi=DPI, metadata={"Software": None})  # no version stamp: regenerated files diff cleanly
    return path


def gib(n) -> float:
    return n / GIB


def fmt_gib(n_bytes) -> str:
    v = n_bytes / GIB
    return f"{v:,.0f} GiB" if v >= 100 else f"{v:.1f} GiB"


def fmt_usd(v) -> str:
    return f"${v:,.0f}" if v >= 100 else f"${v:,.2f}"


def fmt_h(v) -> str:
    return f"{v:,.0f} h" if v >= 100 else f"{v:.1f} h"


def _method_name(key: str, rank=None) -> str:
    name = D.METHOD_NAMES.get(key, key)
    return f"{name} r{int(rank)}" if key in ("lora", "qlora") and rank is not None and not _isnan(rank) else name


def _isnan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _tint(color: str, amount: float) -> tuple:
    """`color` mixed with white (`amount` 0: white, 1: the colour)."""
    r, g, b = to_rgb(color)
    return (1 - amount * (1 - r), 1 - amount * (1 - g), 1 - amount * (1 - b))


# -- 1. memory by method --------------------------------------------------------------------------------------------


def memory_by_method_chart(frame, path, *, title: str, gpu_name: str, footnote: str = "") -> Path:
    """Stacked bars per method (categories of `data.GROUPS`, summing to the device memory), without (left) and
    with (right) gradient checkpointing; the GPU's memory dashed; each total above its bar, red when it does not
    fit. When a bar is over 3.5x the GPU the axis stops at 3x and taller bars are cut (their total marked ↑)."""
    gpu_bytes = int(frame["gpu_memory_bytes"].iloc[0])
    g_gib = gib(gpu_bytes)
    peak = gib(frame["device_bytes"].max())
    top = 3 * g_gib if peak > 3.5 * g_gib else max(peak, g_gib) * 1.12
    keys = [k for k in D.METHOD_KEYS if k in set(frame["method"])]
    cut = False
    with matplotlib.rc_context(STYLE):
        fig = _figure(13, 6.4)
        axes, leg = _panels(fig, 2, sharey=True, legend_width=0.36)
        for ax, ck in zip(axes, (False, True)):
            sub = frame[frame["grad_ckpt"] == ck].set_index("method")
            bottom = [0.0] * len(keys)
            for g in D.GROUPS:
                vals = [gib(sub.loc[k, f"{g}_bytes"]) if k in sub.index else 0.0 for k in keys]
                ax.bar(range(len(keys)), vals, 0.7, bottom=bottom, color=GROUP_COLORS[g], edgecolor="white",
                       linewidth=0.5, zorder=3)
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.axhline(g_gib, color="#222222", ls="--", lw=1.3, zorder=4)
            ax.set_ylim(0, top)
            for x, k in enumerate(keys):
                if k not in sub.index:
                    ax.text(x, g_gib * 0.04, "n/a:\npeft\nrefuses", ha="center", va="bottom", fontsize=8, color="#555555")
                    continue
                t, fits = sub.loc[k, "device_bytes"], bool(sub.loc[k, "fits"])
                clipped = gib(t) > top
                cut |= clipped
                color = "#222222" if fits else "#B2182B"
                if clipped:
                    ax.text(x, top * 0.99, "↑\n" + _short_gib(t), ha="center", va="top", fontsize=8.5, color=color,
                            zorder=6, bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.9))
                else:
                    ax.text(x, gib(t) + top * 0.008, _short_gib(t), ha="center", va="bottom", fontsize=8.5, color=color,
                            zorder=6, bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.75))
            ax.set_xticks(range(len(keys)), [_wrap_method(k) for k in keys])
            ax.grid(axis="x", visible=False)
            ax.set_title("with gradient checkpointing" if ck else "without gradient checkpointing")
        axes[0].set_ylabel("memory per GPU (GiB)")
        handles = [Patch(color=GROUP_COLORS[g], label=D.GROUP_NAMES[g]) for g in reversed(list(D.GROUPS))]
        handles.append(Line2D([], [], color="#222222", ls="--", label=f"GPU memory\n({gpu_name}, {fmt_gib(gpu_bytes)})"))
        _legend(leg, handles, "memory (GiB)")
        fig.suptitle(title)
        note = "Total GiB above each bar, in red where it does not fit" + ("; ↑: bar cut at the axis top." if cut else ".")
        _footnote(fig, note + (" " + footnote if footnote else ""))
        return _save(fig, path)


def _short_gib(n_bytes) -> str:
    v = gib(n_bytes)
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _wrap_method(key: str) -> str:
    return {"full-mixed": "Full FT\nmixed", "full-bf16": "Full FT\nbf16"}.get(key, D.METHOD_NAMES.get(key, key))


# -- 3. memory vs sequence length -----------------------------------------------------------------------------------


def memory_vs_seq_chart(frame, path, *, title: str, gpu_name: str) -> Path:
    """Device memory against sequence length (log-log), one line per method, labelled at its right end; left
    without, right with gradient checkpointing; the GPU's memory dashed, the region above it shaded."""
    gpu_bytes = int(frame["gpu_memory_bytes"].iloc[0])
    lo = min(gib(frame["device_bytes"].min()), gib(gpu_bytes)) / 1.3
    hi = max(gib(frame["device_bytes"].max()), gib(gpu_bytes)) * 1.3
    seqs = sorted(frame["seq_len"].unique())
    with matplotlib.rc_context(STYLE):
        fig = _figure(13, 6.2)
        axes, leg = _panels(fig, 2, sharey=True, legend_width=0.34)
        for ax, ck in zip(axes, (False, True)):
            sub = frame[frame["grad_ckpt"] == ck]
            ends = []
            for key in D.METHOD_KEYS:
                m = sub[sub["method"] == key].sort_values("seq_len")
                if m.empty:
                    continue
                ys = [gib(v) for v in m["device_bytes"]]
                ax.plot(m["seq_len"], ys, color=METHOD_COLORS[key], marker=METHOD_MARKERS[key], ms=5, lw=1.8,
                        zorder=3, alpha=0.9)
                ends.append((ys[-1], D.METHOD_NAMES[key].replace("Full FT, ", "Full "), METHOD_COLORS[key]))
            ax.axhline(gib(gpu_bytes), color="#222222", ls="--", lw=1.3, zorder=4)
            ax.axhspan(gib(gpu_bytes), hi, color="#B2182B", alpha=0.05, zorder=1)
            ax.set_xscale("log", base=2)
            octaves = math.log2(seqs[-1] / seqs[0]) + 0.32
            ax.set_xlim(seqs[0] / 1.25, seqs[-1] * 2 ** (0.45 * octaves + 0.1))  # the right ~30 %: end labels
            ax.xaxis.set_major_locator(FixedLocator(seqs))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1024:g}K" if v >= 1024 else f"{v:g}"))
            ax.set_xlabel("sequence length (tokens per sequence)")
            ax.set_title("with gradient checkpointing (not prefix: peft refuses)" if ck else "without gradient checkpointing")
            _log_gib_axis(ax, lo, hi)
            _end_labels(ax, seqs[-1] * 1.12, ends, lo, hi)
        axes[0].set_ylabel("memory per GPU (GiB, log scale)")
        handles = [Line2D([], [], color=METHOD_COLORS[k], marker=METHOD_MARKERS[k], lw=1.8, label=D.METHOD_NAMES[k])
                   for k in D.METHOD_KEYS if k in set(frame["method"])]
        handles.append(Line2D([], [], color="#222222", ls="--", label=f"GPU memory\n({gpu_name}, {fmt_gib(gpu_bytes)})"))
        handles.append(Patch(color="#B2182B", alpha=0.12, label="does not fit"))
        _legend(leg, handles, "method")
        fig.suptitle(title)
        return _save(fig, path)


def _end_labels(ax, x: float, ends: list, lo: float, hi: float) -> None:
    """Label line ends at `x`; lines ending within 8 % of each other share one label, and labels are pushed
    apart to at least ~1/22 of the (log) axis height so that none overlap."""
    ends = sorted(ends)
    groups: list[list] = []
    for e in ends:
        if groups and e[0] / groups[-1][-1][0] < 1.08:
            groups[-1].append(e)
        else:
            groups.append([e])
    span = math.log(hi / lo)
    gap = span / 22
    ys = [sum(math.log(e[0]) for e in g) / len(g) for g in groups]
    for i in range(1, len(ys)):  # push up
        ys[i] = max(ys[i], ys[i - 1] + gap)
    top = math.log(hi) - gap / 2
    if ys and ys[-1] > top:  # then down from the top
        ys[-1] = top
        for i in range(len(ys) - 2, -1, -1):
            ys[i] = min(ys[i], ys[i + 1] - gap)
    for g, y in zip(groups, ys):
        text = " / ".join(e[1] for e in g)
        color = g[0][2] if len(g) == 1 else "#333333"
        ax.text(x, math.exp(y), text, va="center", ha="left", fontsize=8.5, color=color, zorder=6,
                bbox=dict(boxstyle="round,pad=0.12", fc="white", ec="none", alpha=0.8))


def _log_gib_axis(ax, lo: float, hi: float) -> None:
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ticks = [m * 10**e for e in range(-2, 6) for m in (1, 2, 5) if lo <= m * 10**e <= hi]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))


# -- 2. fit map -----------------------------------------------------------------------------------------------------


def fit_map_chart(frame, path, *, title: str) -> Path:
    """Models (rows) x GPUs (columns): each cell is recommend's best plan on one GPU, coloured by method, with its
    batch, sequence length, memory and time/cost; or, where nothing fits, how many GPUs the cheapest method needs."""
    models = list(dict.fromkeys(frame["model"]))
    gpus = list(dict.fromkeys(frame["gpu"]))
    displays = dict(zip(frame["gpu"], frame["gpu_display"]))
    mem = dict(zip(frame["gpu"], frame["gpu_memory_bytes"]))
    with matplotlib.rc_context({**STYLE, "axes.grid": False}):
        fig = _figure(max(10, 2.5 * len(gpus) + 2.5), max(4.5, 1.3 * len(models) + 2))
        ax = fig.subplots()
        ax.set_xlim(-0.5, len(gpus) - 0.5)
        ax.set_ylim(len(models) - 0.5, -0.5)
        seen = []
        for _, r in frame.iterrows():
            i, j = models.index(r["model"]), gpus.index(r["gpu"])
            if r["status"] == "fits":
                face, hatch = _tint(METHOD_COLORS[r["method"]], 0.45), None
                seen.append(r["method"])
                lines = [
                    _method_name(r["method"], r["rank"]) + ("" if r["num_gpus"] == 1 else f" on {int(r['num_gpus'])} GPUs"),
                    f"micro-batch {int(r['batch_size'])} x {int(r['grad_accum'])}, seq {int(r['seq_len'])}"
                    + (", ckpt" if r["grad_ckpt"] else ""),
                    f"{r['optimizer']}, {gib(r['device_bytes']):.1f} of {gib(r['gpu_memory_bytes']):.1f} GiB",
                ]
                if not _isnan(r["hours"]):
                    lines.append(fmt_h(r["hours"]) + ("" if _isnan(r["cost_usd"]) else f", {fmt_usd(r['cost_usd'])}"))
            elif r["status"] == "needs":
                face, hatch = "#FFFFFF", "////"
                lines = [f"needs {int(r['needs_gpus'])} GPUs",
                         _method_name(r["method"], r["rank"]) + ", ZeRO-3, micro-batch 1",
                         f"{gib(r['needs_device_bytes']):.1f} GiB per GPU"]
            else:
                face, hatch = "#DDDDDD", None
                lines = ["does not fit", "even on 1024 GPUs"]
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=face, edgecolor="white",
                                                      lw=3, hatch=hatch))
            if hatch:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#CCCCCC",
                                                          lw=0, hatch=hatch))
            box = dict(boxstyle="round,pad=0.25", fc=face, ec="none", alpha=0.9) if hatch else None
            ax.text(j, i - 0.13, lines[0], ha="center", va="bottom", fontsize=10, fontweight="bold", bbox=box)
            ax.text(j, i - 0.09, "\n".join(lines[1:]), ha="center", va="top", fontsize=9, linespacing=1.35, bbox=box)
        params = dict(zip(frame["model"], frame["model_params"]))
        ax.set_xticks(range(len(gpus)), [f"{displays[g]}\n{gib(mem[g]):.1f} GiB" for g in gpus])
        ax.set_yticks(range(len(models)), [f"{m}\n{params[m] / 1e9:.1f}B params" for m in models])
        ax.xaxis.tick_top()
        ax.tick_params(length=0)
        for s in ax.spines.values():
            s.set_visible(False)
        handles = [Patch(color=_tint(METHOD_COLORS[k], 0.45), label=D.METHOD_NAMES[k]) for k in D.METHOD_KEYS if k in seen]
        handles.append(Patch(facecolor="white", edgecolor="#999999", hatch="////", label="needs more GPUs"))
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False,
                   title="best plan on one GPU (highest-quality method that fits, then fastest)")
        fig.suptitle(title)
        return _save(fig, path)


# -- 4. time and cost -----------------------------------------------------------------------------------------------


def time_cost_chart(frame, path, *, title: str) -> Path:
    """One row per GPU (fastest on top): training hours of the plan (left) and its dollars at each provider's
    on-demand price (right; every provider a dot, the cheapest labelled)."""
    fits = frame[frame["status"] == "fits"]
    order = (fits.groupby("gpu", sort=False)["hours"].first().sort_values().index.tolist()
             + [g for g in dict.fromkeys(frame["gpu"]) if g not in set(fits["gpu"])])
    first = frame.groupby("gpu", sort=False).first()
    n = len(order)
    with matplotlib.rc_context(STYLE):
        fig = _figure(14, max(4.5, 0.48 * n + 2.2))
        ax_h, ax_c = fig.subplots(1, 2, sharey=True, width_ratios=[1.3, 1])
        hmax = fits["hours"].max() if len(fits) else 1.0
        cmax = fits["cost_usd"].max() if fits["cost_usd"].notna().any() else 1.0
        labels, seen = [], []
        for y, g in enumerate(order):
            r = first.loc[g]
            ngpu = "" if r["status"] != "fits" or r["num_gpus"] == 1 else f" x{int(r['num_gpus'])}"
            labels.append(f"{r['gpu_display']}{ngpu}")
            if r["status"] != "fits":
                need = (f"{_method_name(r['method'], r['rank'])} needs {int(r['needs_gpus'])} GPUs with ZeRO-3"
                        if not _isnan(r["needs_gpus"]) else "does not fit even on 1024 GPUs")
                ax_h.text(0, y, f"  {need} (more than {int(r['max_gpus'])})", va="center", fontsize=8.5, color="#B2182B")
                continue
            color = METHOD_COLORS[r["method"]]
            ax_h.barh(y, r["hours"], 0.62, color=_tint(color, 0.8), edgecolor=color, zorder=3)
            plan = (f"{_method_name(r['method'], r['rank'])}, b{int(r['batch_size'])}x{int(r['grad_accum'])}"
                    + (", ckpt" if r["grad_ckpt"] else "") + f", {r['optimizer']}"
                    + (f", {int(r['num_gpus'])} GPUs {r['strategy']}" if r["num_gpus"] > 1 else "")
                    + ("+offload" if r["cpu_offload"] else ""))
            seen.append(r["method"])
            ax_h.text(r["hours"] + hmax * 0.015, y, f"{fmt_h(r['hours'])}  {plan}", va="center", fontsize=8.5)
            rows = fits[fits["gpu"] == g].dropna(subset=["cost_usd"])
            if rows.empty:
                ax_c.text(0, y, "  no price on file", va="center", fontsize=8.5, color="#666666")
                continue
            ax_c.plot([rows["cost_usd"].min(), rows["cost_usd"].max()], [y, y], color="#BBBBBB", lw=2, zorder=2)
            ax_c.scatter(rows["cost_usd"], [y] * len(rows), s=28, color="#777777", zorder=3)
            cheap = rows.loc[rows["cost_usd"].idxmin()]
            ax_c.scatter([cheap["cost_usd"]], [y], s=50, color=color, edgecolor="black", lw=0.6, zorder=4)
            tail = f"  {fmt_usd(cheap['cost_usd'])} {cheap['provider']}"
            if len(rows) > 1:
                dear = rows.loc[rows["cost_usd"].idxmax()]
                tail += f"  (up to {fmt_usd(dear['cost_usd'])} {dear['provider']})"
            ax_c.text(rows["cost_usd"].max() + cmax * 0.015, y, tail, va="center", fontsize=8.5)
        ax_h.set_yticks(range(n), labels)
        ax_h.set_ylim(n - 0.5, -0.6)
        ax_h.set_xlim(0, hmax * 2.3)
        ax_c.set_xlim(0, cmax * 2.5)
        ax_h.set_xlabel("training time (hours)")
        ax_c.set_xlabel("cost (USD, on-demand)")
        ax_h.set_title("time = tokens / predicted tokens per second")
        ax_c.set_title("cost at each provider (cheapest in colour)")
        for ax in (ax_h, ax_c):
            ax.grid(axis="y", visible=False)
        ax_c.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"${v:,.0f}"))
        handles = [Patch(facecolor=_tint(METHOD_COLORS[k], 0.8), edgecolor=METHOD_COLORS[k], label=D.METHOD_NAMES[k])
                   for k in D.METHOD_KEYS if k in seen]
        handles.append(Line2D([], [], ls="", marker="o", color="#777777", label="another provider's price"))
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
        fig.suptitle(title)
        return _save(fig, path)


# -- 5. accuracy ----------------------------------------------------------------------------------------------------


def accuracy_chart(frame, path, *, title: str) -> Path:
    """Predicted vs measured peak allocated memory (GiB) and tokens/s, one dot per record, coloured by method;
    the y = x line and a +-5 % band; the median and max |error| in each panel's title."""
    kinds = {"import": "o", "calibrate": "s", "run": "^"}
    with matplotlib.rc_context(STYLE):
        fig = _figure(13, 6.2)
        axes, leg = _panels(fig, 2, legend_width=0.3)
        panels = [
            ("measured_allocated_bytes", "predicted_allocated_bytes", "error_allocated", GIB,
             "peak allocated memory (GiB)", "memory"),
            ("measured_tokens_per_s", "predicted_tokens_per_s", "error_tokens_per_s", 1000.0,
             "throughput (thousand tokens/s)", "tokens/s"),
        ]
        seen = []
        for ax, (mcol, pcol, ecol, scale, unit, name) in zip(axes, panels):
            sub = frame.dropna(subset=[mcol, pcol]) if len(frame) else frame
            top = max([*(sub[mcol] / scale), *(sub[pcol] / scale), 1e-9]) * 1.1
            xs = [0, top]
            ax.fill_between(xs, [0, top * 0.95], [0, top * 1.05], color="#999999", alpha=0.25, lw=0, zorder=1,
                            label="±5 %")
            ax.plot(xs, xs, color="#222222", lw=1, zorder=2, label="y = x")
            for _, r in sub.iterrows():
                key = r["method_key"]
                seen.append(key)
                ax.scatter(r[mcol] / scale, r[pcol] / scale, s=55, color=METHOD_COLORS.get(key, "#777777"),
                           marker=kinds.get(r["kind"], "o"), edgecolor="white", lw=0.6, zorder=3)
            ax.set_xlim(0, top)
            ax.set_ylim(0, top)
            ax.set_aspect("equal")
            ax.set_xlabel(f"measured {unit}")
            ax.set_ylabel(f"predicted {unit}")
            s = D.error_stats(sub, ecol)
            if s["n"]:
                ax.set_title(f"{name}: median |error| {_pct(s['median'])}, max {_pct(s['max'])} (n = {s['n']})")
            else:
                ax.set_title(f"{name}: no measurements")
        handles = [Line2D([], [], ls="", marker="o", ms=7, color=METHOD_COLORS[k], label=D.METHOD_NAMES[k])
                   for k in D.METHOD_KEYS if k in seen]
        kinds_seen = [k for k in kinds if len(frame) and k in set(frame["kind"])]
        if len(kinds_seen) > 1:
            handles += [Line2D([], [], ls="", marker=kinds[k], ms=7, color="#555555", label=f"{k} records") for k in kinds_seen]
        handles += [Patch(color="#999999", alpha=0.25, label="±5 % of measured"),
                    Line2D([], [], color="#222222", lw=1, label="predicted = measured")]
        _legend(leg, handles, "method")
        fig.suptitle(title)
        return _save(fig, path)


def _pct(frac: float) -> str:
    v = 100 * frac
    return f"{v:.2f} %" if v < 1 else f"{v:.1f} %"


# -- ranked plans (ftplan recommend --chart) ------------------------------------------------------------------------


def ranked_plans_chart(frame, path, *, title: str, gpu_name: str) -> Path:
    """recommend's plans, one row each (best on top): memory per GPU against the GPU's memory (left); hours and
    dollars, or tokens/s without a workload (right). Rows marked ✗ do not fit on one GPU: their bar is the
    standard recipe's memory (cut at the axis end) and the right side says how many GPUs they need."""
    frame = frame.reset_index(drop=True)
    n = len(frame)
    gpu_bytes = int(frame["gpu_memory_bytes"].iloc[0])
    limit = int(frame["limit_bytes"].iloc[0])
    fitting = frame[frame["status"] == "fits"]
    has_hours = fitting["hours"].notna().any()
    xmax = gib(gpu_bytes) * 1.45
    tmax = (fitting["hours"].max() if has_hours else fitting["tokens_per_s"].max()) if len(fitting) else 1.0
    with matplotlib.rc_context(STYLE):
        fig = _figure(13, max(4.5, 0.4 * n + 2.4))
        ax_m, ax_t = fig.subplots(1, 2, sharey=True, width_ratios=[1.1, 1])
        labels, seen = [], []
        for y, r in frame.iterrows():
            color = METHOD_COLORS.get(r["method"], "#777777")
            fits = r["status"] == "fits"
            seen.append(r["method"])
            labels.append((f"#{int(r['position'])}  " if fits else "✗  ") + _plan_text(r, fits))
            v = gib(r["device_bytes"])
            ax_m.barh(y, min(v, xmax), 0.64, color=_tint(color, 0.8 if fits else 0.35), edgecolor=color,
                      hatch=None if fits else "///", zorder=3)
            inside = v > xmax * 0.6
            ax_m.text(min(v, xmax) + (-1 if inside else 1) * xmax * 0.01, y, ("→ " if v > xmax else "") + fmt_gib(r["device_bytes"]),
                      va="center", ha="right" if inside else "left", fontsize=8.5, zorder=6,
                      bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.85))
            if not fits:
                need = (f"needs {int(r['needs_gpus'])} GPUs (ZeRO-3, micro-batch 1, "
                        f"{fmt_gib(r['needs_device_bytes'])} each)" if not _isnan(r["needs_gpus"])
                        else "does not fit on 1024 GPUs")
                ax_t.text(0, y, " " + need, va="center", fontsize=8.5, color="#B2182B")
                continue
            value = r["hours"] if has_hours else r["tokens_per_s"]
            ax_t.barh(y, value, 0.64, color=_tint(color, 0.8), edgecolor=color, zorder=3)
            if has_hours:
                cost = "" if _isnan(r["cost_usd"]) else f", {fmt_usd(r['cost_usd'])} ({r['provider']})"
                text = f" {fmt_h(r['hours'])}{cost}"
            else:
                text = f" {r['tokens_per_s']:,.0f} tokens/s"
            ax_t.text(value, y, text, va="center", fontsize=8.5)
        ax_m.axvline(gib(gpu_bytes), color="#222222", ls="--", lw=1.3, zorder=4)
        ax_m.axvline(gib(limit), color="#222222", ls=":", lw=1.2, zorder=4)
        ax_m.set_xlim(0, xmax)
        ax_m.set_yticks(range(n), labels)
        ax_m.set_ylim(n - 0.5, -0.6)
        ax_m.set_xlabel("memory per GPU (GiB)")
        ax_m.set_title("memory per GPU")
        ax_t.set_xlim(0, tmax * 1.9)
        if fitting.empty:
            ax_t.set_title("what each method would need")
            ax_t.xaxis.set_visible(False)
            ax_t.spines["bottom"].set_visible(False)
        elif has_hours:
            ax_t.set_xlabel("training time (hours); cost in USD at the cheapest provider")
            ax_t.set_title("time and cost")
        else:
            ax_t.set_xlabel("predicted tokens/s")
            ax_t.set_title("throughput (give a dataset size for hours and $)")
        for ax in (ax_m, ax_t):
            ax.grid(axis="y", visible=False)
        handles = [Patch(facecolor=_tint(METHOD_COLORS[k], 0.8), edgecolor=METHOD_COLORS[k], label=D.METHOD_NAMES[k])
                   for k in D.METHOD_KEYS if k in seen]
        handles += [Line2D([], [], color="#222222", ls="--", label=f"{gpu_name} ({fmt_gib(gpu_bytes)})"),
                    Line2D([], [], color="#222222", ls=":", label=f"limit with margin ({fmt_gib(limit)})")]
        if (frame["status"] != "fits").any():
            handles.append(Patch(facecolor="white", edgecolor="#777777", hatch="///", label="✗ does not fit on one GPU"))
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), frameon=False)
        fig.suptitle(title)
        return _save(fig, path)


def _plan_text(r, fits: bool = True) -> str:
    if not fits:
        return _method_name(r["method"], r["rank"])
    s = f"{_method_name(r['method'], r['rank'])}, b{int(r['batch_size'])}x{int(r['grad_accum'])}"
    if r["grad_ckpt"]:
        s += ", ckpt"
    s += f", {r['optimizer']}"
    if r["num_gpus"] and r["num_gpus"] > 1:
        s += f", {int(r['num_gpus'])}x {r['strategy']}" + ("+offload" if r["cpu_offload"] else "")
    return s


def recommendation_chart(res, path, top: int = 5):
    """`ftplan recommend --chart PATH`: recommend's `top` plans, the best plan of every other method that fits,
    and the methods that do not fit, as a PNG. Returns the DataFrame it drew."""
    frame = D.ranked_plans(res, top=top)
    r = res.request
    work = ", " + D.workload_text(r.workload.dataset_tokens, r.workload.epochs) if r.workload.total_tokens else ""
    gpus = f", up to {r.max_gpus} GPUs" if r.max_gpus > 1 else ""
    head = (f"the plans recommend ranks (by {r.objective}), best first" if res.ranked
            else "nothing fits" + (" on one GPU" if r.max_gpus == 1 else f" on up to {r.max_gpus} GPUs"))
    title = (f"{r.arch.name} on {r.gpu.display_name}: {head}\n"
             f"seq {r.seq_len}, {r.effective_batch} sequences per optimizer step{work}{gpus}, "
             f"{100 * r.margin:g} % of memory kept free")
    if frame.empty:
        raise ValueError("recommend returned no plans to draw")
    ranked_plans_chart(frame, path, title=title, gpu_name=r.gpu.display_name)
    return frame
