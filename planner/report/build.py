"""The three reports `ftplan report` writes: one model on one GPU, a fit map, and the accuracy of the planner.

Each function computes its frames (`data`), draws them (`charts`), writes every frame as CSV beside its PNG,
writes the page (`html`), and returns a summary dict (paths written and the headline numbers) for `--json`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..arch import ModelArch
from ..fileio import atomic_path
from ..profiles import GPUProfile
from ..recommend import recommend
from . import charts as C
from . import data as D
from . import html as H


def _write_csv(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def _conditions(cond: D.Conditions, *, memory: bool = True, plans: bool = True) -> list[tuple[str, str]]:
    out = []
    if memory:
        out.append(("memory charts", f"micro-batch {cond.batch_size} x {cond.seq_len} tokens (the sequence chart varies "
                                     f"the length), {cond.optimizer}, LoRA/QLoRA rank {cond.rank} all-linear, "
                                     f"{cond.num_virtual_tokens} virtual tokens; full FT mixed = fp32 master weights "
                                     "+ bf16 autocast, bf16 = everything bf16"))
    if plans:
        out += [
            ("plans", f"recommend over full FT, LoRA (r8/16/64), QLoRA (r16/64), IA3, prefix, prompt; micro-batch x "
                      f"accumulation = {cond.effective_batch} sequences per optimizer step of {cond.seq_len} tokens; "
                      f"ranked by {cond.objective}"),
            ("effective batch", f"{cond.effective_batch} sequences per optimizer step (over all GPUs)"),
            ("margin", f"a plan must leave {100 * cond.margin:g} % of GPU memory free"),
            ("workload", D.workload_text(cond.dataset_tokens, cond.epochs, exact=True)),
            ("prices", "on-demand USD per GPU-hour from profiles/prices.toml"
                       + (f", provider {cond.provider} only" if cond.provider else ", every provider (cheapest first)")),
        ]
    return out


def _plan_table(frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, r in frame.iterrows():
        fits = r["status"] == "fits"
        rows.append({
            "#": "" if pd.isna(r.get("position")) else int(r["position"]),
            "plan": r["config"] if fits else r["label"],
            "GiB per GPU": H.gib(r["device_bytes"]),
            "GPUs": "" if pd.isna(r["num_gpus"]) else int(r["num_gpus"]),
            "tokens/s": "" if not fits else f"{r['tokens_per_s']:,.0f}",
            "hours": H.hours(r["hours"]) if fits else "",
            "USD": H.usd(r["cost_usd"]) if fits else "",
            "provider": (r["provider"] or "") if fits else "",
            "needs": "" if fits else (f"{int(r['needs_gpus'])} GPUs, ZeRO-3" if pd.notna(r["needs_gpus"]) else "no fit"),
        })
    return pd.DataFrame(rows)


# -- one model on one GPU -------------------------------------------------------------------------------------------


def model_gpu_report(arch: ModelArch, gpu: GPUProfile, cond: D.Conditions, out_dir, *, command: str,
                     compare_gpus: list[GPUProfile] | None = None, model_ref: str = "") -> dict:
    """Memory by method, memory vs sequence length, the ranked plans on `gpu`, and time and cost of the chosen
    method across `compare_gpus` (default: every GPU with a price) and providers."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, sections = [], []
    head = f"{arch.name} on {gpu.display_name}"

    mem = D.memory_by_method(arch, gpu, cond)
    C.memory_by_method_chart(
        mem, out / "memory-by-method.png", gpu_name=gpu.display_name,
        title=f"{head}: memory per GPU by method\nmicro-batch {cond.batch_size} x {cond.seq_len} tokens, "
              f"{cond.optimizer}, LoRA/QLoRA r{cond.rank} all-linear, prefix/prompt {cond.num_virtual_tokens} tokens",
        footnote="Categories: " + D.GROUPING_NOTE + ".")
    files += [out / "memory-by-method.png", _write_csv(mem, out / "memory-by-method.csv")]
    sections.append(H.Section(
        "Memory by method", "memory-by-method.png", "memory-by-method.csv",
        "Peak memory per GPU of one training step for each method, without and with gradient checkpointing, "
        "split into categories that sum to what must fit on the GPU (dashed line). Grouping of the planner's terms: "
        + D.GROUPING_NOTE + ".",
        _memory_table(mem)))

    seq = D.memory_vs_seq(arch, gpu, cond)
    C.memory_vs_seq_chart(
        seq, out / "memory-vs-seq.png", gpu_name=gpu.display_name,
        title=f"{head}: memory per GPU vs sequence length (micro-batch {cond.batch_size}, {cond.optimizer})")
    files += [out / "memory-vs-seq.png", _write_csv(seq, out / "memory-vs-seq.csv")]
    sections.append(H.Section(
        "Memory vs sequence length", "memory-vs-seq.png", "memory-vs-seq.csv",
        "Memory per GPU against tokens per sequence (both axes logarithmic) for each method, without and with "
        f"gradient checkpointing, up to the model's context length ({arch.max_position_embeddings:,} tokens). "
        "Lines above the dashed GPU line do not fit.",
        _seq_table(seq)))

    res = recommend(D.request_for(arch, gpu, cond, model_ref=model_ref))
    ranked = C.recommendation_chart(res, out / "ranked-plans.png")
    files += [out / "ranked-plans.png", _write_csv(ranked, out / "ranked-plans.csv")]
    sections.append(H.Section(
        "Ranked plans", "ranked-plans.png", "ranked-plans.csv",
        f"What `ftplan recommend --model {model_ref or arch.name} --gpu {gpu.name}` ranks, best first: its top "
        "5 plans, then the best plan of every other method that fits (with its position in the full ranking), "
        "then the methods that do not fit on one GPU and how many GPUs they would need (ZeRO-3, micro-batch 1, "
        "checkpointing).",
        _plan_table(ranked)))

    method = D.chosen_method(arch, gpu, cond)
    gpus = list(compare_gpus or D.priced_gpus())
    if gpu.name not in {g.name for g in gpus}:
        gpus.append(gpu)
    tc = D.time_cost(arch, gpus, cond, method, model_ref=model_ref)
    name = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA", "ia3": "IA3", "prefix": "prefix tuning",
            "prompt": "prompt tuning"}[method]
    C.time_cost_chart(
        tc, out / "time-cost.png",
        title=f"{arch.name}, {name}: training time and cost per GPU type and provider\n"
              f"{D.workload_text(cond.dataset_tokens, cond.epochs)}, seq {cond.seq_len}, "
              f"{cond.effective_batch} sequences per step; fewest GPUs (up to {cond.max_gpus}) that fit")
    files += [out / "time-cost.png", _write_csv(tc, out / "time-cost.csv")]
    sections.append(H.Section(
        "Time and cost", "time-cost.png", "time-cost.csv",
        f"Hours and dollars to train {D.workload_text(cond.dataset_tokens, cond.epochs, exact=True)} with {name} (the method "
        f"recommended on the {gpu.display_name}) on each GPU type: recommend's best {name} plan with the fewest "
        f"GPUs (1, 2, 4, ... up to {cond.max_gpus}) that fit, priced at every provider's on-demand rate. Time = "
        "tokens / predicted tokens per second; cost = hours x GPUs x USD per GPU-hour.",
        _time_cost_table(tc)))

    by_source: dict[str, list[str]] = {}
    for g in sorted(gpus, key=lambda g: g.name):
        src = _calibration(g)
        for how in ("transferred", "extrapolated"):  # another GPU's fitted values: list those GPUs together
            if f", {how} to " in src:
                src = src.split(f", {how} to ")[0] + f" ({how}: no calibration of their own)"
        by_source.setdefault(src, []).append(g.name)
    calib = [f"{src} for every GPU" if len(by_source) == 1 else f"{src}: {', '.join(names)}"
             for src, names in sorted(by_source.items(), key=lambda kv: "no calibration" in kv[0])]
    conditions = [("model", f"{arch.name} ({arch.total_params / 1e9:.2f}B parameters, {arch.model_type})"),
                  ("GPU", f"{gpu.display_name} ({gpu.memory_bytes / 2**30:.1f} GiB)")] + _conditions(cond)
    conditions.append(("throughput model", "; ".join(calib)))
    page = H.write_report(out, title=f"ftplan report: {head}", command=command, conditions=conditions,
                          sections=sections)
    best = res.best
    return {
        "kind": "model-gpu",
        "model": arch.name,
        "gpu": gpu.name,
        "out": str(out),
        "files": [str(p) for p in [*files, page["html"], page["markdown"]]],
        "conditions": cond.to_dict(),
        "summary": {
            "memory_by_method": [
                {k: _py(r[k]) for k in ("method", "grad_ckpt", "device_bytes", "peak_allocated_bytes", "fits")}
                for _, r in mem.iterrows()
            ],
            "best_plan": best.to_dict() if best is not None else None,
            "time_cost_method": method,
            "time_cost": [
                {k: _py(r[k]) for k in ("gpu", "provider", "num_gpus", "hours", "cost_usd", "status")}
                for _, r in tc.iterrows()
            ],
        },
    }


def _calibration(g: GPUProfile) -> str:
    from ..cost import throughput_params

    return throughput_params(g.name).source


def _memory_table(mem: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, r in mem.iterrows():
        row = {"method": r["label"], "ckpt": "yes" if r["grad_ckpt"] else "no"}
        for g in D.GROUPS:
            row[D.GROUP_NAMES[g]] = H.gib(r[f"{g}_bytes"], 2)
        row["total GiB"] = H.gib(r["device_bytes"], 2)
        row["fits"] = "yes" if r["fits"] else "no"
        row["peak at"] = r["peak_event"]
        rows.append(row)
    return pd.DataFrame(rows)


def _seq_table(seq: pd.DataFrame) -> pd.DataFrame:
    """Methods x sequence lengths, GiB, one table (rows: method and checkpointing)."""
    t = seq.assign(gib=seq["device_bytes"] / 2**30, row=seq["label"] + seq["grad_ckpt"].map({True: ", ckpt", False: ""}))
    order = list(dict.fromkeys(t["row"]))
    wide = t.pivot(index="row", columns="seq_len", values="gib").reindex(order)
    wide = wide.map(lambda v: "" if pd.isna(v) else f"{v:,.1f}")
    wide.columns = [f"{c:,}" for c in wide.columns]
    return wide.reset_index().rename(columns={"row": "GiB per GPU at seq ->"})


def _time_cost_table(tc: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, r in tc.sort_values(["hours", "cost_usd"], na_position="last").iterrows():
        fits = r["status"] == "fits"
        rows.append({
            "GPU": r["gpu_display"],
            "GPUs": int(r["num_gpus"]) if fits else "",
            "plan": r["config"] if fits else (f"needs {int(r['needs_gpus'])} GPUs" if pd.notna(r["needs_gpus"]) else "no fit"),
            "tokens/s": f"{r['tokens_per_s']:,.0f}" if fits else "",
            "hours": H.hours(r["hours"]) if fits else "",
            "provider": r["provider"] or "",
            "USD/GPU-h": "" if pd.isna(r["usd_per_gpu_hour"]) else f"{r['usd_per_gpu_hour']:.2f}",
            "USD": H.usd(r["cost_usd"]) if fits else "",
            "price as of": r["price_as_of"] or "",
        })
    return pd.DataFrame(rows)


# -- fit map --------------------------------------------------------------------------------------------------------


def fit_map_report(models: list[tuple[str, ModelArch]], gpus: list[GPUProfile], cond: D.Conditions, out_dir, *,
                   command: str) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fm = D.fit_map(models, gpus, cond)
    C.fit_map_chart(
        fm, out / "fit-map.png",
        title=f"Best fine-tuning plan on one GPU, per model and GPU\nseq {cond.seq_len}, {cond.effective_batch} "
              f"sequences per optimizer step, {D.workload_text(cond.dataset_tokens, cond.epochs)}, "
              f"{100 * cond.margin:g} % of memory kept free; cost at the cheapest provider")
    files = [out / "fit-map.png", _write_csv(fm, out / "fit-map.csv")]
    rows = []
    for _, r in fm.iterrows():
        fits = r["status"] == "fits"
        rows.append({
            "model": r["model"], "GPU": r["gpu_display"],
            "best plan": r["config"] if fits else (f"needs {int(r['needs_gpus'])} GPUs: {r['needs_label']}, ZeRO-3"
                                                   if r["status"] == "needs" else "no fit on 1024 GPUs"),
            "GiB per GPU": H.gib(r["device_bytes"] if fits else r["needs_device_bytes"]),
            "of GiB": H.gib(r["gpu_memory_bytes"]),
            "tokens/s": f"{r['tokens_per_s']:,.0f}" if fits else "",
            "hours": H.hours(r["hours"]) if fits else "",
            "USD": H.usd(r["cost_usd"]) if fits else "",
            "provider": (r["provider"] or "") if fits else "",
        })
    section = H.Section(
        "Fit map", "fit-map.png", "fit-map.csv",
        "For each model and GPU: the plan `ftplan recommend` ranks first on one GPU (the highest-quality method that "
        "fits, then the fastest configuration of it), with its micro-batch x gradient accumulation, sequence length, "
        "memory, and time and cost for the workload. Where nothing fits on one GPU: the fewest GPUs of that type any "
        "method needs with ZeRO-3 (micro-batch 1, checkpointing), and which method.",
        pd.DataFrame(rows))
    conditions = [("models", ", ".join(a.name for _, a in models)), ("GPUs", ", ".join(g.name for g in gpus))]
    page = H.write_report(out, title="ftplan report: fit map", command=command,
                          conditions=conditions + _conditions(cond, memory=False), sections=[section])
    return {
        "kind": "fit-map",
        "out": str(out),
        "files": [str(p) for p in [*files, page["html"], page["markdown"]]],
        "conditions": cond.to_dict(),
        "summary": {"cells": [
            {k: _py(r[k]) for k in ("model", "gpu", "status", "method", "config", "device_bytes", "hours", "cost_usd",
                                    "needs_gpus", "needs_label")}
            for _, r in fm.iterrows()
        ]},
    }


# -- accuracy -------------------------------------------------------------------------------------------------------


def accuracy_report(records: list[dict], out_dir, *, command: str, sources: list[str]) -> dict:
    from calibrate.validate import compare, summarize

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = D.accuracy(records)
    mem, tps = D.error_stats(acc, "error_allocated"), D.error_stats(acc, "error_tokens_per_s")
    gpus = sorted({g for g in acc["gpu"]}) if len(acc) else []
    C.accuracy_chart(acc, out / "accuracy.png",
                     title=f"Predicted (current planner) vs measured: {len(acc)} records on {', '.join(gpus) or 'no GPU'}")
    files = [out / "accuracy.png", _write_csv(acc, out / "accuracy.csv")]
    rows = []
    for _, r in acc.iterrows():
        rows.append({
            "record": r["id"], "kind": r["kind"], "status": r["status"], "GPU": r["gpu"], "model": r["model"],
            "config": r["config"],
            "measured GiB": H.gib(r["measured_allocated_bytes"], 2), "predicted GiB": H.gib(r["predicted_allocated_bytes"], 2),
            "error": H.pct(r["error_allocated"]),
            "reserved error": H.pct(r["error_reserved"]),
            "measured tokens/s": "" if pd.isna(r["measured_tokens_per_s"]) else f"{r['measured_tokens_per_s']:,.0f}",
            "predicted tokens/s": "" if pd.isna(r["predicted_tokens_per_s"]) else f"{r['predicted_tokens_per_s']:,.0f}",
            "tokens/s error": H.pct(r["error_tokens_per_s"]),
        })
    comps = compare(records)
    extra = [(f"By {by}", _summary_table(summarize(comps, by=by), by)) for by in ("gpu", "method")]
    section = H.Section(
        "Accuracy", "accuracy.png", "accuracy.csv",
        "Each record's configuration predicted by the current planner (not the prediction stored when it was "
        "measured) against what was measured: peak allocated memory (torch.cuda.max_memory_allocated) and "
        "tokens/s. Error = (predicted - measured) / measured; the grey band is +-5 % of measured.",
        pd.DataFrame(rows), extra_tables=extra)
    conditions = [
        ("records", f"{len(records)} from {', '.join(sources)}"),
        ("measured with", "; ".join(sorted(_versions(records))) or "unknown"),
        ("measurement conditions", "CONDITIONS.md in each GPU folder of the records (model load plus 6 steps; "
                                   "tokens/s = median of steps 3-6)"),
        ("memory error", _stat_text(mem)),
        ("tokens/s error", _stat_text(tps)),
    ]
    page = H.write_report(out, title="ftplan report: accuracy of the planner", command=command, conditions=conditions,
                          sections=[section])
    return {
        "kind": "accuracy",
        "out": str(out),
        "files": [str(p) for p in [*files, page["html"], page["markdown"]]],
        "summary": {"records": len(records), "allocated": mem, "tokens_per_s": tps,
                    "reserved": D.error_stats(acc, "error_reserved")},
    }


def _stat_text(s: dict) -> str:
    if not s["n"]:
        return "no comparable records"
    return f"median |error| {100 * s['median']:.2f} %, max {100 * s['max']:.2f} % over {s['n']} records"


def _versions(records) -> set[str]:
    out = set()
    for r in records:
        v = r.get("meta_info", {}).get("versions") or {}
        if v:
            out.add(", ".join(f"{k} {val}" for k, val in v.items()))
    return out


def _summary_table(summary: dict, by: str) -> pd.DataFrame:
    rows = []
    for key, e in summary.items():
        row = {by: key, "records": e["n"]}
        for metric, name in (("allocated", "memory"), ("reserved", "reserved"), ("tokens_per_s", "tokens/s")):
            m = e[metric]
            row[f"{name} median |error|"] = "" if m["median"] is None else f"{100 * m['median']:.2f} %"
            row[f"{name} max |error|"] = "" if m["max"] is None else f"{100 * m['max']:.2f} %"
        rows.append(row)
    return pd.DataFrame(rows)


def _py(v):
    """numpy / pandas scalars -> plain Python for JSON (NaN -> None)."""
    if v is None:
        return None
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    return v

