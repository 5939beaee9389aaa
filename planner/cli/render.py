"""Plain-text rendering: aligned tables and the per-term breakdown. No third-party dependency."""

from __future__ import annotations

from ..memory import TERMS
from ..units import GIB, fmt_bytes, fmt_count, fmt_gib, fmt_hours


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """An aligned text table. `align`: one char per column, 'l' or 'r' (default: numbers right)."""
    cells = [[str(c) for c in headers]] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if align is None:
        align = "".join("r" if rows and _numeric(rows[0][i]) else "l" for i in range(len(headers)))
    out = []
    for j, r in enumerate(cells):
        parts = [(c.rjust(w) if a == "r" else c.ljust(w)) for c, w, a in zip(r, widths, align)]
        out.append("  ".join(parts).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _numeric(v) -> bool:
    if isinstance(v, (int, float)):
        return True
    s = str(v).replace(",", "").replace("$", "").replace("%", "").split(" ")[0]
    try:
        float(s)
        return True
    except ValueError:
        return False


def breakdown_lines(breakdown: dict, total: int) -> list[str]:
    rows = []
    for k, v in breakdown.items():
        share = f"{100 * v / total:4.1f}%" if total else ""
        rows.append([k.replace("_", " "), fmt_gib(v), share, TERMS.get(k, "")])
    return table(["term", "GiB", "share", "what"], rows, align="lrrl").splitlines()


def plan_summary(d: dict) -> str:
    """Human summary of a plan dict (`Plan.to_dict()`)."""
    lines = []
    pa, pr, dev = d["peak_allocated_bytes"], d["peak_reserved_bytes"], d["device_bytes"]
    lines.append(f"peak allocated  {fmt_gib(pa):>11}   torch.cuda.max_memory_allocated(), at: {d['peak_event']}")
    lines.append(f"peak reserved   {fmt_gib(pr):>11}   caching allocator footprint")
    if "gpu" in d:
        verdict = "fits" if d["fits"] else "DOES NOT FIT"
        head = d["headroom_bytes"]
        gap = f"{fmt_gib(head)} free" if head >= 0 else f"short by {fmt_gib(-head)}"
        lines.append(f"on the device   {fmt_gib(dev):>11}   of {fmt_gib(d['gpu_memory_bytes'])} ({d['gpu']}): {verdict}, {gap}")
    else:
        lines.append(f"on the device   {fmt_gib(dev):>11}   reserved + CUDA context")
    if d.get("paged_bytes"):
        lines.append(f"paged state     {fmt_gib(d['paged_bytes']):>11}   bitsandbytes paged optimizer (managed memory, included on the device)")
    if d.get("cpu_offload_bytes"):
        lines.append(f"host (offload)  {fmt_gib(d['cpu_offload_bytes']):>11}   per GPU, in CPU memory")
    if d.get("host_pinned_bytes"):
        lines.append(f"host (pinned)   {fmt_gib(d['host_pinned_bytes']):>11}   per GPU, offloaded activations or checkpoints in pinned "
                     "(page-locked) CPU memory")
    if "host_ram_bytes" in d:
        verdict = "fits" if d["host_fits"] else "DOES NOT FIT: the host is the limit"
        lines.append(f"host memory     {fmt_gib(d['host_bytes_all_gpus']):>11}   of {fmt_gib(d['host_ram_bytes'])} "
                     f"(--host-ram, all {d['config']['num_gpus']} GPU(s) of the machine): {verdict}")
    lines.append("")
    lines += breakdown_lines(d["breakdown"], pa)
    lines.append("")
    tp, total = d["trainable_params"], d["total_params"]
    lines.append(f"trainable       {tp:,} of {total:,} parameters ({100 * tp / total:.3g}%)")
    if "tokens_per_s" in d:
        lines.append(
            f"throughput      {d['tokens_per_s']:,.0f} tokens/s ({fmt_count(d['tokens_per_step'])} tokens per step, "
            f"{d['step_seconds']:.3g} s/step, MFU {100 * d['mfu']:.0f}%)  [{d['calibration']}]"
        )
    if "hours" in d:
        cost = f", ${d['cost_usd']:,.2f} at ${d['usd_per_gpu_hour']}/GPU-h ({d['provider']}, {d['price_as_of']})" if "cost_usd" in d else ""
        lines.append(f"time            {fmt_hours(d['hours'])}{cost}")
    for n in d.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


__all__ = ["table", "breakdown_lines", "plan_summary", "fmt_bytes", "fmt_count", "fmt_gib", "fmt_hours", "GIB"]
