"""Re-trace some points of a precomputed trace grid in place: the points of `--grid` whose record's training
configuration has `--where KEY=VALUE` (a recipe field, e.g. loss=chunked) are traced again as `trace_grid` traces
them (`trace_point`: the same id and record format) and their lines rewritten; every other line is kept byte for
byte. For a change that moves only some points (a library's new version of one loss)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from planner.fileio import write_text

from .trace_grid import GRIDS, trace_point

OUT = {"recipe": "trace-points-recipe.jsonl", "cross": "trace-points-cross.jsonl", "fp16": "trace-points-fp16.jsonl",
       "actoffload": "trace-points-actoffload.jsonl", "multigpu": "trace-points-multigpu.jsonl"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=tuple(OUT), required=True)
    ap.add_argument("--where", required=True, help="KEY=VALUE of the record's train.recipe, e.g. loss=chunked")
    args = ap.parse_args(argv)
    key, value = args.where.split("=", 1)
    import peft
    import torch
    import transformers
    import trl

    path = Path("calibrate/reference") / OUT[args.grid]
    lines = path.read_text().splitlines()
    points = GRIDS[args.grid](argparse.Namespace(random=150, seed=0))
    for n, line in enumerate(lines):
        rec = json.loads(line)
        if str(rec["train"].get("recipe", {}).get(key)) != value:
            continue
        i = int(rec["id"][1:])
        versions = dict(rec.get("versions") or {}, torch=torch.__version__, transformers=transformers.__version__,
                        peft=peft.__version__, trl=trl.__version__)
        new, r = trace_point(i, points[i], versions)
        train = json.loads(json.dumps(new["train"]))
        train["recipe"] = {k: train["recipe"][k] for k in rec["train"].get("recipe", {})}  # older records: fewer fields
        if [new["model"], train] != [rec["model"], rec["train"]]:
            raise SystemExit(f"{rec['id']}: the grid's point is not the recorded one")
        new["train"] = rec["train"]  # the record as it was written
        old = rec["trace"]["peak_allocated_bytes"]
        print(f"{rec['id']} {rec['model']}: {old} -> {r.peak_allocated_bytes} "
              f"({(r.peak_allocated_bytes / old - 1) * 100:+.2f}%)", file=sys.stderr, flush=True)
        lines[n] = json.dumps(new)
        write_text(path, "\n".join(lines) + "\n")  # after each point: an interrupted run keeps what it traced
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
