"""`ftplan merge`: fold a run's adapter into its base model, or combine several LoRA adapters.

- One run: `PeftModel.from_pretrained(base, run).merge_and_unload()` with the base loaded in its original dtype
  (`dtype="auto"`: config.json's dtype) and unquantized, so a QLoRA adapter lands in the bf16/fp16/fp32 model that
  is deployed. LoRA and IA3 merge; prefix and prompt tuning add virtual tokens, not weights, and cannot.
- Several runs: each adapter loaded under its own name, `add_weighted_adapter` (linear, cat, svd, TIES, DARE,
  magnitude pruning, and their SVD variants), then merged into the base (or, with `adapter_only`, saved as an
  adapter).

The base model comes from `--base`, else the run's `plan.toml` (`[model] path`, written absolute by `ftplan run`),
else the adapter's `base_model_name_or_path` (a local folder, or a Hugging Face id in the local cache).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from planner.methods import METHODS

from . import files

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # see trainer/loop.py

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# peft types whose adapters add virtual tokens, not weights: the registered methods that say so
# (Method.supports_merge), and peft's other prompt-learning types, which ftplan does not train but may be handed
UNMERGEABLE = tuple(m.peft_type for m in METHODS.values() if m.peft_type and not m.supports_merge) + (
    "P_TUNING", "MULTITASK_PROMPT_TUNING")
MERGEABLE = ", ".join(m.name for m in METHODS.values() if m.peft_type and m.supports_merge)  # lora (and over nf4), dora, ia3
DENSITY_TYPES = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "magnitude_prune",
                 "magnitude_prune_svd")
SIGN_TYPES = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
ALIASES = {"dare": "dare_linear"}


class MergeError(ValueError):
    """A user error (the CLI exits 2 naming `param_hint`)."""

    def __init__(self, message: str, param_hint: str | None = None):
        super().__init__(message)
        self.param_hint = param_hint


def adapter_info(run_dir: str | Path) -> dict:
    """What a run folder holds: {peft_type, method, adapter_config, base_ref, rank}; MergeError for a full fine-tune
    or a folder that is no run."""
    d = Path(run_dir)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.exists():
        if (d / "config.json").exists():
            raise MergeError(f"{d} holds a full model (a full fine-tune), not an adapter: it is already deployable, "
                             "nothing to merge", "RUNS")
        raise MergeError(f"{d} holds no adapter (adapter_config.json) — is it an `ftplan run` output folder?", "RUNS")
    cfg = json.loads(cfg_path.read_text())
    return {"peft_type": cfg.get("peft_type"), "adapter_config": cfg, "base_ref": cfg.get("base_model_name_or_path"),
            "rank": cfg.get("r")}


def base_path(run_dir: str | Path, override: str | None = None) -> str:
    """The base model folder of a run (see the module docstring for the order)."""
    from planner.planfile import read_plan

    from .spec import RunUsageError, resolve_model_path

    d = Path(run_dir)
    if override:
        p = Path(override)
        if not (p / "config.json").exists():
            raise MergeError(f"{override} is not a model folder (no config.json)", "--base")
        return str(p.resolve())
    plan = d / "plan.toml"
    if plan.exists():
        try:
            return resolve_model_path(read_plan(plan), plan_dir=d)
        except (ValueError, RunUsageError):
            pass
    ref = adapter_info(d)["base_ref"]
    if ref:
        if Path(ref).is_dir():
            return str(Path(ref).resolve())
        if ref.count("/") == 1:
            try:
                from huggingface_hub import snapshot_download

                return snapshot_download(ref, local_files_only=True)
            except Exception:
                pass
    raise MergeError(f"cannot find the base model of {d} (plan.toml path and base_model_name_or_path {ref!r} are not "
                     "available locally): pass --base", "--base")


def _load_base(path: str, dtype: str):
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map={"": "cpu"})


def _save_tokenizer(sources: list[Path], base: str, out: Path) -> str | None:
    from transformers import AutoTokenizer

    for src in [*sources, Path(base)]:
        if (src / "tokenizer_config.json").exists() or (src / "tokenizer.json").exists():
            AutoTokenizer.from_pretrained(src).save_pretrained(out)
            return str(src)
    return None


def _temp_folder(out: Path) -> Path:
    """`<out>/.merge.tmp-<pid>`: the merged files are saved there, then each renamed into `out` (a kill leaves no
    half-written weight file; merge_info.json, written last, marks a complete merge)."""
    out.mkdir(parents=True, exist_ok=True)
    files.remove_temps(out)
    tmp = files.temp_dir_for(out / ".merge")
    tmp.mkdir()
    return tmp


def _dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


def merge_adapter(run_dir: str | Path, output: str | Path, *, base: str | None = None, dtype: str = "auto") -> dict:
    """Fold one run's adapter into its base model and save the model and tokenizer to `output`."""
    from peft import PeftModel

    info = adapter_info(run_dir)
    if info["peft_type"] in UNMERGEABLE:
        raise MergeError(f"{run_dir} is a {info['peft_type'].lower().replace('_', ' ')} adapter: it adds virtual "
                         "tokens, not weights, so it cannot be merged; deploy it with peft "
                         f"(PeftModel.from_pretrained) instead (mergeable: {MERGEABLE})", "RUNS")
    bpath = base_path(run_dir, base)
    t0 = time.time()
    model = PeftModel.from_pretrained(_load_base(bpath, dtype), str(run_dir))
    merged = model.merge_and_unload()
    out = Path(output)
    tmp = _temp_folder(out)
    merged.save_pretrained(tmp)
    tok_src = _save_tokenizer([Path(run_dir)], bpath, tmp)
    files.publish_files(tmp, out)
    summary = {
        "output": str(out), "runs": [str(run_dir)], "base": bpath, "peft_type": info["peft_type"],
        "description": f"{info['peft_type'].lower()} adapter of {run_dir} merged into {Path(bpath).name}",
        "dtype": _dtype_name(merged), "parameters": sum(p.numel() for p in merged.parameters()),
        "tokenizer_from": tok_src, "adapter_only": False, "seconds": round(time.time() - t0, 2),
    }
    files.write_json(out / "merge_info.json", summary)  # last: the merge is complete when it exists
    return summary


def combine_adapters(run_dirs: list, output: str | Path, *, combination: str, weights: list[float] | None = None,
                     density: float = 0.5, majority_sign_method: str = "total", base: str | None = None,
                     dtype: str = "auto", adapter_only: bool = False, seed: int = 0) -> dict:
    """Combine several LoRA adapters of the same base with peft's `add_weighted_adapter`, then merge the result
    into the base model (or save it as an adapter)."""
    from peft import PeftModel

    combination = ALIASES.get(combination, combination)
    infos = [adapter_info(r) for r in run_dirs]
    for r, info in zip(run_dirs, infos):
        if info["peft_type"] != "LORA":
            raise MergeError(f"{r} is a {info['peft_type']} adapter; only LoRA/QLoRA adapters can be combined", "RUNS")
    bases = [base_path(r, base) for r in run_dirs]
    if len(set(bases)) > 1:
        raise MergeError("the adapters were trained on different base models: "
                         + ", ".join(f"{r} -> {b}" for r, b in zip(run_dirs, bases)), "RUNS")
    ranks = [i["rank"] for i in infos]
    if combination in ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune") and len(set(ranks)) > 1:
        raise MergeError(f"combination {combination} needs adapters of the same rank, got {ranks}; use cat or an "
                         "*_svd combination for different ranks", "--combination")
    n = len(run_dirs)
    if weights is None:
        weights = [1.0 / n] * n if combination in ("linear", "cat", "svd") else [1.0] * n
    bpath = bases[0]
    t0 = time.time()
    names = [f"run{i}" for i in range(n)]
    model = PeftModel.from_pretrained(_load_base(bpath, dtype), str(run_dirs[0]), adapter_name=names[0])
    for name, r in zip(names[1:], run_dirs[1:]):
        model.load_adapter(str(r), adapter_name=name)
    kw = {}
    if combination in DENSITY_TYPES:
        kw["density"] = density
    if combination in SIGN_TYPES:
        kw["majority_sign_method"] = majority_sign_method
    torch.manual_seed(seed)  # DARE drops at random
    try:
        model.add_weighted_adapter(adapters=names, weights=list(weights), adapter_name="default",
                                   combination_type=combination, **kw)
    except ValueError as e:
        raise MergeError(f"peft cannot combine these adapters with {combination}: {e}", "--combination") from None
    model.set_adapter("default")
    for name in names:
        model.delete_adapter(name)
    out = Path(output)
    tmp = _temp_folder(out)
    if adapter_only:
        model.save_pretrained(tmp)
        final = model
    else:
        final = model.merge_and_unload()
        final.save_pretrained(tmp)
    tok_src = _save_tokenizer([Path(r) for r in run_dirs], bpath, tmp)
    files.publish_files(tmp, out)
    summary = {
        "output": str(out), "runs": [str(r) for r in run_dirs], "base": bpath, "combination": combination,
        "weights": list(weights), "density": kw.get("density"), "majority_sign_method": kw.get("majority_sign_method"),
        "seed": seed, "adapter_only": adapter_only,
        "description": f"{n} LoRA adapters combined with {combination} (weights {', '.join(f'{w:g}' for w in weights)})"
                       + ("" if adapter_only else f", merged into {Path(bpath).name}"),
        "dtype": _dtype_name(final), "parameters": sum(p.numel() for p in final.parameters()),
        "tokenizer_from": tok_src, "seconds": round(time.time() - t0, 2),
    }
    files.write_json(out / "merge_info.json", summary)
    return summary
