"""Regenerate the README's generated blocks from the project's own commands and reports.

    python scripts/readme.py           # rewrite the blocks in README.md
    python scripts/readme.py --check   # exit 1 if README.md is out of date (tests/test_docs.py runs this)

A block is `<!-- generated: NAME -->` ... `<!-- end generated -->`; NAME is a key of BLOCKS below. Timings in
command output (which vary by machine) are compared loosely.
"""

from __future__ import annotations

import json
import re
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)
TIMING = re.compile(r"\b\d+(\.\d+)? s\b")


def _cli(args: str) -> str:
    from click.testing import CliRunner

    from planner.cli import cli

    r = CliRunner().invoke(cli, shlex.split(args), terminal_width=120)
    if r.exit_code != 0:
        raise SystemExit(f"`ftplan {args}` failed:\n{r.output}")
    return r.output.rstrip()


def command_block(args: str) -> str:
    return f"```console\n$ ftplan {args}\n{_cli(args)}\n```\n"


def accuracy_block() -> str:
    from calibrate.record import load_records
    from calibrate.validate import compare, summarize
    from planner.config import TrainConfig
    from planner.memory import estimate_memory
    from planner.profiles import load_model

    rows = [c for c in compare(load_records([ROOT / "calibrate" / "results"])) if c.error_allocated is not None]
    lines = ["| record | configuration | measured GiB | predicted GiB | error |", "|---|---|---:|---:|---:|"]
    for c in sorted(rows, key=lambda c: (c.gpu, c.model, c.method)):
        lines.append(f"| {c.gpu} {c.model} | {c.config} | {c.measured_allocated_bytes / 2**30:.2f} | "
                     f"{c.predicted_allocated_bytes / 2**30:.2f} | {100 * c.error_allocated:+.2f}% |")
    s = summarize(rows, by="gpu")
    alloc = [abs(c.error_allocated) for c in rows]
    tps = [abs(c.error_tokens_per_s) for c in rows if c.error_tokens_per_s is not None]
    res = [abs(c.error_reserved) for c in rows if c.error_reserved is not None]
    out = [
        f"Peak allocated (`torch.cuda.max_memory_allocated()`), {len(rows)} measured configurations "
        f"({', '.join(sorted(s))}): median error {100 * statistics.median(alloc):.2f}%, max {100 * max(alloc):.2f}%.",
        "",
        *lines,
        "",
    ]
    if res:
        import tomllib

        fit = tomllib.loads((ROOT / "profiles/calibration/h100-sxm-80gb.toml").read_text()).get("fit", {})
        loo = fit.get("tokens_per_s_error_leave_one_out", {})
        worst = max((c for c in rows if c.error_tokens_per_s is not None), key=lambda c: abs(c.error_tokens_per_s))
        out.append(f"Peak reserved (caching allocator, one fitted overhead per GPU): median {100 * statistics.median(res):.1f}%, "
                   f"max {100 * max(res):.1f}%. Tokens/s, after `ftplan calibrate fit` (four physical parameters per "
                   f"GPU architecture): median {100 * statistics.median(tps):.1f}% on the records it was fitted to"
                   + (f", {100 * loo['median']:.1f}% (max {100 * loo['max']:.0f}%) when each record is held out of the fit"
                      if loo else "")
                   + f". The largest miss is {worst.model} {worst.config} ({100 * worst.error_tokens_per_s:+.0f}%); "
                   "`reports/throughput-loo.md` (`python benchmarks/throughput_loo.py`) gives every record's held-out "
                   "error and what explains the outliers, and `calibrate/matrix.toml` measures them again.")
        out.append("")
    pts = [json.loads(line) for line in (ROOT / "calibrate/reference/trace-points.jsonl").read_text().splitlines() if line]
    errs = []
    for p in pts:
        e = estimate_memory(load_model(p["model"]), TrainConfig.from_dict(p["train"])).peak_allocated_bytes
        errs.append(abs(e - p["trace"]["peak_allocated_bytes"]) / p["trace"]["peak_allocated_bytes"])
    models = sorted({p["model"] for p in pts})
    out.append(
        f"Beyond the measured rows, against {len(pts)} configurations traced through the real recipe on fake tensors "
        f"(`calibrate/reference/trace-points.jsonl`: every method, precision and optimizer, checkpointing, "
        f"{min(p['train']['seq_len'] for p in pts)} to {max(p['train']['seq_len'] for p in pts)} tokens, "
        f"{len(models)} models from 0.5B to 70B): median error {100 * statistics.median(errs):.3f}%, "
        f"max {100 * max(errs):.2f}%, {sum(e > 0.02 for e in errs)} above 2%."
    )
    dora = [json.loads(line) for line in (ROOT / "calibrate/reference/trace-points-dora.jsonl").read_text().splitlines()
            if line]
    derr = [abs(estimate_memory(load_model(p["model"]), TrainConfig.from_dict(p["train"])).peak_allocated_bytes
                - p["trace"]["peak_allocated_bytes"]) / p["trace"]["peak_allocated_bytes"] for p in dora]
    out.append("")
    out.append(
        f"DoRA, QDoRA and rsLoRA (`planner/methods/dora.py`, one module), against {len(dora)} configurations of the real "
        f"peft DoRA code traced the same way (`calibrate/reference/trace-points-dora.jsonl`): median error "
        f"{100 * statistics.median(derr):.3f}%, max {100 * max(derr):.2f}%, {sum(e > 0.02 for e in derr)} above 2%; "
        f"no GPU measurement of DoRA yet (`calibrate/matrix.toml` has the points)."
    )
    from planner.arch import arch_from_config

    fam = [json.loads(line) for line in (ROOT / "calibrate/reference/trace-points-families.jsonl").read_text()
           .splitlines() if line]
    ferr = [abs(estimate_memory(arch_from_config(p["config"]) if "config" in p else load_model(p["model"]),
                                TrainConfig.from_dict(p["train"])).peak_allocated_bytes
                - p["trace"]["peak_allocated_bytes"]) / p["trace"]["peak_allocated_bytes"] for p in fam]
    full = sorted({p["model"] for p in fam if "config" not in p})
    out.append("")
    out.append(
        f"Qwen3, Gemma-3 (text and the multimodal config's text tower), OLMo-2, Phi-4 and Mistral-Small-3, against "
        f"{len(fam)} configurations traced the same way (`calibrate/reference/trace-points-families.jsonl`: small "
        f"configs of each family, and {', '.join(full)} at full size): median error "
        f"{100 * statistics.median(ferr):.3f}%, max {100 * max(ferr):.2f}%, {sum(e > 0.02 for e in ferr)} above 2%; "
        f"not measured on a GPU yet."
    )
    out += ["", *trace_grid_table()]
    return "\n".join(out) + "\n"


# the trace grids beyond the reference, dora and families ones: (file, what it crosses)
GRIDS = [
    ("trace-points-recipe.jsonl", "losses (plain, TRL chunked, Liger, CCE) x full/LoRA/QLoRA x precision x checkpointing"),
    ("trace-points-attn.jsonl", "attention: sdpa kernels as torch dispatches them, eager, flash_attention_2; H100, T4, L4"),
    ("trace-points-fp16.jsonl", "fp16 autocast with GradScaler on a T4 and an A100"),
    ("trace-points-shape.jsonl", "packing (block-diagonal mask, varlen) and padding to the longest row"),
    ("trace-points-actoffload.jsonl", "TRL's activation offloading, with and without (offloaded) checkpointing"),
    ("trace-points-mts.jsonl", "peft modules_to_save: trained embed_tokens / lm_head copies, tied and untied"),
    ("trace-points-cross.jsonl", "every recipe option drawn at once (48 random configurations)"),
    ("trace-points-moe.jsonl", "MoE: Mixtral, Qwen2/3-MoE, gpt-oss; LoRA on experts; router aux loss; QLoRA; mixed, fp32"),
    ("trace-points-deepseek.jsonl", "DeepSeek-V3: MLA attention, group-limited routing, shared experts; QLoRA; mixed; all-linear"),
    ("trace-points-multigpu.jsonl", "FSDP2 on a fake process group, per GPU: full, LoRA, QLoRA, CPU offload; N = 2 to 64"),
    ("trace-points-zero.jsonl", "DeepSpeed ZeRO-2/3 (bf16 mode), the real engine on 2 CPU processes, rank 0: full, LoRA"),
]


def trace_grid_table() -> list[str]:
    """One row per trace grid: the analytic peak against the traced one (per GPU), as the grids' tests read it
    (`calibrate.trace_grid.planned_error`)."""
    from calibrate.trace_grid import planned_error, read_points

    lines = ["Every other trace grid, each held by its test (`tests/`) within 2% per point:", "",
             "| grid | what it crosses | points | median error | max error | above 2% |", "|---|---|---:|---:|---:|---:|"]
    for name, what in GRIDS:
        errs = [abs(planned_error(p)[2]) for p in read_points(name)]
        lines.append(f"| `{name}` | {what} | {len(errs)} | {100 * statistics.median(errs):.3f}% | "
                     f"{100 * max(errs):.2f}% | {sum(e > 0.02 for e in errs)} |")
    return lines


BLOCKS = {
    "validate": lambda: command_block("validate"),
    "recommend-70b": lambda: command_block("recommend --model 70b --gpu a100-80"),
    "estimate-qlora": lambda: command_block(
        "estimate --model llama-2-7b --method qlora --rank 16 --target-modules all-linear --seq-len 2048 "
        "--batch-size 4 --grad-ckpt --gpu a100-80"),
    "recommend-4090": lambda: command_block(
        "recommend --model meta-llama/Llama-3.1-8B --gpu rtx-4090 --seq-len 4096 --dataset-tokens 50M --epochs 3 --top 5"),
    "recommend-all": lambda: command_block(
        "recommend --model 70b --gpu all --methods lora,qlora --max-gpus 4 --dataset-tokens 50M --epochs 3 --top 6"),
    "accuracy": accuracy_block,
}


def render(text: str) -> str:
    def sub(m):
        name = m.group("name")
        if name not in BLOCKS:
            raise SystemExit(f"README block {name!r} has no generator (known: {', '.join(BLOCKS)})")
        return m.group(1) + BLOCKS[name]() + m.group(4)

    return BLOCK.sub(sub, text)


def _loose(text: str) -> str:
    return TIMING.sub("<t> s", text)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    current = README.read_text()
    new = render(current)
    if "--check" in argv:
        if _loose(new) != _loose(current):
            print("README.md is out of date: run `python scripts/readme.py`", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
