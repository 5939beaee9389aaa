"""Generate trace reference points: `python -m calibrate.trace_grid --out calibrate/reference/trace-points.jsonl`
(and `--grid dora --out calibrate/reference/trace-points-dora.jsonl`,
`--grid recipe --out calibrate/reference/trace-points-recipe.jsonl`).

Each point runs `calibrate.trace.trace_step` (the real recipe on fake tensors) for one (model, configuration)
and writes one JSON line. The analytic model is tested against these points (tests/test_trace_reference.py),
so they cover what the eight measured rows do not: every method and optimizer, checkpointing, fp32, long
sequences, 7B to 70B. The grid is deterministic (fixed seed); regenerate after changing the recipe or the
library versions, and commit the file with the versions it records.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from planner.config import TrainConfig
from planner.methods import ALIASES, get_method

CUDA_WORKSPACE_H100 = 2 * 32 * 2**20  # two cuBLAS handles (forward thread, autograd thread) x 32 MiB on sm90

# (catalog model, weight in the random sample)
MODELS = {
    "qwen2.5-0.5b": 3,
    "llama-3.2-1b": 3,
    "llama-3.2-3b": 1,
    "llama-2-7b": 2,
    "llama-3.1-8b": 2,
    "qwen2.5-7b": 1,
    "mistral-7b": 1,
    "llama-2-13b": 1,
    "gemma-2-2b": 1,
    "phi-3-mini": 1,
}


def structured_points() -> list[tuple[str, dict]]:
    """Hand-picked points: each mechanism in isolation on a small Llama and a 7B, plus 70B adapters."""
    pts = []
    for model in ("llama-3.2-1b", "llama-2-7b"):
        for ckpt in (False, True):
            pts += [
                (model, dict(method="full", precision="bf16", seq_len=1024, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="full", precision="mixed", seq_len=1024, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="full", precision="fp32", seq_len=512, batch_size=1, grad_ckpt=ckpt)),
                (model, dict(method="lora", rank=16, target_modules=("q_proj", "v_proj"), seq_len=2048, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="lora", rank=64, target_modules=("all-linear",), seq_len=2048, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="lora", rank=16, target_modules=("all-linear",), lora_dropout=0.0, seq_len=2048, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="lora", rank=16, target_modules=("all-linear",), precision="mixed", seq_len=1024, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="qlora", rank=16, target_modules=("all-linear",), seq_len=2048, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="qlora", rank=8, target_modules=("q_proj", "v_proj"), seq_len=1024, batch_size=1, grad_ckpt=ckpt)),
                (model, dict(method="prefix", num_virtual_tokens=32, seq_len=1024, batch_size=2 + ckpt)),
                (model, dict(method="prompt", num_virtual_tokens=20, seq_len=1024, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="ia3", seq_len=1024, batch_size=2, grad_ckpt=ckpt)),
            ]
        for opt in ("adamw8bit", "paged_adamw8bit", "sgd", "adafactor"):
            pts.append((model, dict(method="full", precision="bf16", seq_len=512, batch_size=1, optimizer=opt)))
            pts.append((model, dict(method="lora", rank=16, target_modules=("all-linear",), seq_len=1024, batch_size=1, optimizer=opt)))
    for seq in (4096, 16384):
        pts.append(("llama-3.2-1b", dict(method="lora", rank=16, target_modules=("all-linear",), seq_len=seq, batch_size=1, grad_ckpt=True)))
        pts.append(("qwen2.5-0.5b", dict(method="full", precision="bf16", seq_len=seq, batch_size=1, grad_ckpt=True)))
    pts += [
        ("llama-3.1-70b", dict(method="qlora", rank=16, target_modules=("all-linear",), seq_len=2048, batch_size=1, grad_ckpt=True)),
        ("llama-3.1-70b", dict(method="lora", rank=16, target_modules=("q_proj", "v_proj"), seq_len=1024, batch_size=1, grad_ckpt=True)),
        ("llama-2-13b", dict(method="full", precision="bf16", seq_len=512, batch_size=1, grad_ckpt=True)),
    ]
    return pts


def dora_points() -> list[tuple[str, dict]]:
    """DoRA and rsLoRA (issue: a method added as one module): every precision, a 4-bit base (QDoRA), with and
    without dropout (DoRA's second base matmul), checkpointing, a GQA and a non-GQA family, biases (Qwen2),
    fused projections (Phi-3), and the optimizers whose state follows the trainable tensors."""
    all_lin = ("all-linear",)
    pts = []
    for model in ("llama-3.2-1b", "qwen2.5-0.5b"):
        for ckpt in (False, True):
            pts += [
                (model, dict(method="dora", rank=16, target_modules=all_lin, seq_len=1024, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="dora", rank=8, target_modules=("q_proj", "v_proj"), lora_dropout=0.0, seq_len=1024,
                             batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="dora", rank=16, target_modules=all_lin, precision="mixed", seq_len=512, batch_size=1,
                             grad_ckpt=ckpt)),
                (model, dict(method="dora", quant="nf4", rank=16, target_modules=all_lin, seq_len=1024, batch_size=2,
                             grad_ckpt=ckpt)),
            ]
    pts += [
        ("llama-2-7b", dict(method="dora", rank=16, target_modules=("q_proj", "v_proj"), seq_len=1024, batch_size=1)),
        ("llama-2-7b", dict(method="dora", rank=16, target_modules=all_lin, seq_len=512, batch_size=1)),
        ("llama-2-7b", dict(method="dora", rank=16, target_modules=all_lin, seq_len=1024, batch_size=2, grad_ckpt=True)),
        ("llama-2-7b", dict(method="dora", rank=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                            precision="mixed", lora_dropout=0.0, seq_len=512, batch_size=1)),
        ("llama-2-7b", dict(method="dora", quant="nf4", rank=64, target_modules=all_lin, seq_len=2048, batch_size=1,
                            grad_ckpt=True)),
        ("phi-3-mini", dict(method="dora", rank=8, target_modules=all_lin, seq_len=512, batch_size=1)),
        ("qwen2.5-0.5b", dict(method="dora", rank=32, target_modules=all_lin, precision="fp32", seq_len=512, batch_size=1)),
        ("qwen2.5-0.5b", dict(method="dora", rank=16, target_modules=all_lin, seq_len=512, batch_size=2, optimizer="adafactor")),
        ("llama-3.2-1b", dict(method="dora", rank=16, target_modules=all_lin, seq_len=512, batch_size=2, optimizer="sgd")),
        ("llama-3.2-1b", dict(method="lora", use_rslora=True, rank=16, target_modules=all_lin, seq_len=1024, batch_size=2)),
    ]
    return pts


# tiny families built from config.json fields (no catalog entry): a GQA Llama and a non-GQA Qwen2 (q/k/v biases)
TINY_FAMILIES = {
    "tiny-llama-gqa": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=512,
                           intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                           vocab_size=32000, max_position_embeddings=4096),
    "tiny-qwen2-mha": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=512,
                           intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                           vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
}


def recipe_points() -> list[tuple[str, dict]]:
    """Issue 11: every loss x precision x method (full, lora, qlora) x checkpointing on a GQA and a non-GQA tiny
    family (calibrate/reference/trace-points-recipe.jsonl; seconds per point)."""
    combos = [("full", "bf16"), ("full", "mixed"), ("lora", "bf16"), ("lora", "mixed"), ("qlora", "bf16")]
    pts = []
    for model in TINY_FAMILIES:
        for loss in ("plain", "chunked", "liger", "cce"):
            for i, (method, precision) in enumerate(combos):
                for ckpt in (False, True):
                    d = dict(method=method, seq_len=512, batch_size=1 + (i + ckpt) % 2, grad_ckpt=ckpt,
                             recipe={"loss": loss})
                    name, quant = ALIASES.get(method, (method, "none"))
                    if quant == "none":
                        d["precision"] = precision
                    if get_method(name).uses_rank:
                        d.update(rank=16, target_modules=("all-linear",))
                    pts.append((model, d))
    return pts


def model_arch(model: str):
    """The ModelArch of a catalog name or a tiny family."""
    from planner.arch import arch_from_config
    from planner.profiles import load_model

    return arch_from_config(TINY_FAMILIES[model]) if model in TINY_FAMILIES else load_model(model)


GRIDS = {"reference": lambda args: structured_points() + random_points(args.random, args.seed),
         "dora": lambda args: dora_points(),
         "recipe": lambda args: recipe_points()}


def random_points(n: int, seed: int = 0) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    models = [m for m, w in MODELS.items() for _ in range(w)]
    pts = []
    for _ in range(n):
        method = rng.choice(["full", "full", "lora", "lora", "qlora", "qlora", "prefix", "prompt", "ia3"])
        d = dict(
            method=method,
            seq_len=rng.choice([256, 512, 1024, 2048, 4096, 8192]),
            batch_size=rng.choice([1, 1, 2, 4, 8]),
            grad_ckpt=rng.random() < 0.5,
            optimizer=rng.choice(["adamw"] * 4 + ["adamw8bit", "paged_adamw8bit", "sgd", "adafactor"]),
        )
        if d["seq_len"] * d["batch_size"] > 16384:
            d["batch_size"] = max(1, 16384 // d["seq_len"])
        name, quant = ALIASES.get(method, (method, "none"))
        spec = get_method(name)
        if quant == "none":
            d["precision"] = rng.choice(["bf16", "bf16", "mixed"] + (["fp32"] if spec.trains_base else []))
        if spec.uses_rank:
            d["rank"] = rng.choice([4, 8, 16, 32, 64, 128])
            d["target_modules"] = rng.choice([("q_proj", "v_proj"), ("all-linear",), ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")])
            d["lora_dropout"] = rng.choice([0.05, 0.05, 0.1, 0.0])
        if spec.uses_virtual_tokens:
            d["num_virtual_tokens"] = rng.choice([8, 20, 64])
        if not spec.supports_grad_ckpt:
            d["grad_ckpt"] = False  # peft refuses prefix tuning with gradient checkpointing
        pts.append((rng.choice(models), d))
    return pts


def _fix_targets(model: str, d: dict, arch) -> dict:
    if arch.fused_qkv and d.get("target_modules") and d["target_modules"] != ("all-linear",):
        names = set(arch.linear_names)
        mapped = tuple(dict.fromkeys(n if n in names else ("qkv_proj" if n in ("q_proj", "k_proj", "v_proj") else "gate_up_proj") for n in d["target_modules"]))
        d = dict(d, target_modules=mapped)
    return d


def main(argv=None) -> int:
    from .trace import trace_step

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="calibrate/reference/trace-points.jsonl")
    ap.add_argument("--random", type=int, default=150, help="random points on top of the structured ones")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="stop after this many points (0 = all)")
    ap.add_argument("--grid", choices=tuple(GRIDS), default="reference",
                    help="reference: the main grid; dora: DoRA/rsLoRA points (calibrate/reference/trace-points-dora.jsonl); "
                         "recipe: losses x precisions x methods (calibrate/reference/trace-points-recipe.jsonl)")
    args = ap.parse_args(argv)

    import torch
    import transformers
    import peft

    points = GRIDS[args.grid](args)
    if args.limit:
        points = points[: args.limit]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    t0 = time.time()
    with out.open("w") as f:
        for i, (model, d) in enumerate(points):
            arch = model_arch(model)
            d = _fix_targets(model, d, arch)
            tc = TrainConfig(**d)
            config = dict(arch.config, max_position_embeddings=max(16384, tc.seq_len + tc.num_virtual_tokens))
            config.pop("rope_scaling", None)
            r = trace_step(config, tc, cuda_workspace_bytes=CUDA_WORKSPACE_H100)
            rec = {"id": f"t{i:03d}", "model": model, "train": tc.to_dict(), "trace": r.to_dict(), "versions": versions}
            f.write(json.dumps(rec) + "\n")
            f.flush()
            el = time.time() - t0
            print(f"[{i + 1}/{len(points)}] {model} {tc.describe()}: {r.peak_allocated_bytes / 2**30:.2f} GiB "
                  f"at {r.peak_phase} ({r.seconds:.1f}s, eta {el / (i + 1) * (len(points) - i - 1):.0f}s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
