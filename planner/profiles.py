"""Profiles: GPUs, models and prices read from `profiles/*.toml` on first use (never at import).

The folder is found in this order: `$FTPLAN_PROFILES`, the `profiles/` folder of a source checkout (next to
this package), the copy shipped inside the wheel (`planner/profiles`). Adding a GPU or a model is a new TOML file.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .arch import ArchError, ModelArch, arch_from_config, arch_from_path
from .units import MIB


DEFAULT_REVISION = "main"


class ProfileError(ValueError):
    """A name that resolves to no profile, or a profile file that is malformed. The message lists valid choices."""


def profiles_dir() -> Path:
    return _profiles_dir(os.environ.get("FTPLAN_PROFILES"))


@functools.cache
def _profiles_dir(env: str | None) -> Path:
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "profiles", here / "profiles"):
        if (candidate / "gpus").is_dir():
            return candidate
    raise ProfileError(f"no profiles folder found (looked in {here.parent / 'profiles'} and {here / 'profiles'})")


# -- GPUs -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPUProfile:
    """One GPU model. Memory in bytes as NVML reports the total; compute in dense TFLOP/s (10^12)."""

    name: str
    display_name: str
    aliases: tuple[str, ...]
    nvml_names: tuple[str, ...]
    memory_bytes: int
    bf16_dense_tflops: float
    fp16_dense_tflops: float
    fp32_tflops: float
    hbm_bandwidth_gb_per_s: float
    interconnect_gb_per_s: float
    supports_bf16: bool
    compute_capability: str
    source: str
    memory_source: str = ""
    architecture: str = ""  # hopper, ada, ampere, turing, volta: GPUs of one architecture share throughput fits
    sm_count: int = 0  # streaming multiprocessors (GEMM waves are counted over them)
    sm_count_source: str = ""

    @property
    def sm_major(self) -> int:
        return int(self.compute_capability.split(".")[0])

    @property
    def peak_tflops(self) -> float:
        """Dense tensor-core peak in the dtype the recipe computes in (bf16, or fp16 where bf16 is missing)."""
        return self.bf16_dense_tflops if self.supports_bf16 and self.bf16_dense_tflops else self.fp16_dense_tflops

    @property
    def cublas_workspace_bytes(self) -> int:
        """cuBLAS workspace per handle that torch allocates through the caching allocator: 32 MiB on Hopper (sm90),
        4096 KiB x 2 + 16 KiB x 8 elsewhere (torch `CublasHandlePool.cpp`, default CUBLAS_WORKSPACE_CONFIG)."""
        return 32 * MIB if self.sm_major == 9 else 4096 * 1024 * 2 + 16 * 1024 * 8

    def summary(self) -> dict:
        return {
            "name": self.name,
            "display_name": self.display_name,
            "aliases": list(self.aliases),
            "memory_bytes": self.memory_bytes,
            "memory_gib": round(self.memory_bytes / 2**30, 2),
            "bf16_dense_tflops": self.bf16_dense_tflops,
            "fp16_dense_tflops": self.fp16_dense_tflops,
            "hbm_bandwidth_gb_per_s": self.hbm_bandwidth_gb_per_s,
            "interconnect_gb_per_s": self.interconnect_gb_per_s,
            "supports_bf16": self.supports_bf16,
            "compute_capability": self.compute_capability,
            "source": self.source,
        }


_GPU_KEYS = {
    "name": str, "display_name": str, "aliases": list, "nvml_names": list, "memory_bytes": int,
    "bf16_dense_tflops": (int, float), "fp16_dense_tflops": (int, float), "fp32_tflops": (int, float),
    "hbm_bandwidth_gb_per_s": (int, float), "interconnect_gb_per_s": (int, float), "supports_bf16": bool,
    "compute_capability": str, "source": str, "architecture": str, "sm_count": int, "sm_count_source": str,
}
ARCHITECTURES = ("hopper", "ada", "ampere", "turing", "volta")


def _load_toml(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: invalid TOML ({e})") from None


def _gpu_from_toml(path: Path) -> GPUProfile:
    d = _load_toml(path)
    for key, typ in _GPU_KEYS.items():
        if key not in d:
            raise ProfileError(f"{path}: missing key '{key}'")
        if not isinstance(d[key], typ) or (typ is int and isinstance(d[key], bool)):
            raise ProfileError(f"{path}: '{key}' has type {type(d[key]).__name__}")
    if d["name"] != path.stem:
        raise ProfileError(f"{path}: name {d['name']!r} must equal the file stem {path.stem!r}")
    if d["architecture"] not in ARCHITECTURES:
        raise ProfileError(f"{path}: architecture {d['architecture']!r} is not one of {', '.join(ARCHITECTURES)}")
    if d["sm_count"] <= 0:
        raise ProfileError(f"{path}: sm_count must be positive, got {d['sm_count']}")
    return GPUProfile(
        name=d["name"],
        display_name=d["display_name"],
        aliases=tuple(a.lower() for a in d["aliases"]),
        nvml_names=tuple(d["nvml_names"]),
        memory_bytes=d["memory_bytes"],
        bf16_dense_tflops=float(d["bf16_dense_tflops"]),
        fp16_dense_tflops=float(d["fp16_dense_tflops"]),
        fp32_tflops=float(d["fp32_tflops"]),
        hbm_bandwidth_gb_per_s=float(d["hbm_bandwidth_gb_per_s"]),
        interconnect_gb_per_s=float(d["interconnect_gb_per_s"]),
        supports_bf16=d["supports_bf16"],
        compute_capability=d["compute_capability"],
        source=d["source"],
        memory_source=d.get("memory_source", ""),
        architecture=d["architecture"],
        sm_count=d["sm_count"],
        sm_count_source=d["sm_count_source"],
    )


@functools.cache
def _gpus(folder: str) -> dict[str, GPUProfile]:
    out = {}
    for path in sorted(Path(folder, "gpus").glob("*.toml")):
        g = _gpu_from_toml(path)
        out[g.name] = g
    return out


def list_gpus() -> list[GPUProfile]:
    return list(_gpus(str(profiles_dir())).values())


def _index(items, names_of) -> dict[str, str]:
    idx = {}
    for item in items:
        for n in names_of(item):
            idx[n.lower()] = item.name
    return idx


def load_gpu(name: str) -> GPUProfile:
    """A GPU by name or alias (`a100-80`, `h100`, `4090`). ProfileError lists close matches."""
    gpus = _gpus(str(profiles_dir()))
    idx = _index(gpus.values(), lambda g: (g.name, *g.aliases))
    key = name.strip().lower()
    if key in idx:
        return gpus[idx[key]]
    raise ProfileError(_unknown("GPU", name, idx, "ftplan gpus list"))


def gpu_from_nvml_name(device_name: str) -> GPUProfile | None:
    """The profile whose `nvml_names` match `device_name`: an exact match first, else the longest pattern that
    is a substring (so 'NVIDIA L40S' never resolves to the L4). None when nothing matches (no guess)."""
    dn = device_name.strip().lower()
    best, best_len = None, -1
    for g in list_gpus():
        for pat in g.nvml_names:
            p = pat.lower()
            if p == dn:
                return g
            if p in dn and len(p) > best_len:
                best, best_len = g, len(p)
    return best


# -- models -----------------------------------------------------------------------------------------------------------


@functools.cache
def _model_tomls(folder: str) -> dict[str, dict]:
    out = {}
    for path in sorted(Path(folder, "models").glob("*.toml")):
        d = _load_toml(path)
        if d.get("name") != path.stem:
            raise ProfileError(f"{path}: name {d.get('name')!r} must equal the file stem {path.stem!r}")
        if "config" not in d:
            raise ProfileError(f"{path}: missing [config] table")
        for key in d.get("null_keys", ()):
            d["config"][key] = None  # TOML has no null
        d["_path"] = str(path)
        out[d["name"]] = d
    return out


@functools.cache
def _model_arch(folder: str, name: str) -> ModelArch:
    d = _model_tomls(folder)[name]
    try:
        return arch_from_config(d["config"], name=name, hf_id=d.get("hf_id"), aliases=d.get("aliases", ()), source=d["_path"])
    except ArchError as e:
        raise ProfileError(f"{d['_path']}: {e}") from None


def list_models() -> list[ModelArch]:
    folder = str(profiles_dir())
    return [_model_arch(folder, n) for n in _model_tomls(folder)]


def _model_index(folder: str) -> dict[str, str]:
    idx = {}
    for name, d in _model_tomls(folder).items():
        idx[name.lower()] = name
        for a in d.get("aliases", ()):
            idx[a.lower()] = name
        if d.get("hf_id"):
            idx[d["hf_id"].lower()] = name
            idx[d["hf_id"].split("/")[-1].lower()] = name
    return idx


def load_model(ref: str, revision: str = DEFAULT_REVISION) -> ModelArch:
    """A model by catalog name, alias (`8b`, `70b`), Hugging Face id (`meta-llama/Llama-3.1-8B`, or any `Org/Name`
    on the hub: `planner.hub`), or a path to a `config.json` or a folder holding one. ProfileError (or ArchError)
    says what went wrong and lists close matches."""
    return resolve_model(ref, revision)[0]


def resolve_model(ref: str, revision: str = DEFAULT_REVISION) -> tuple[ModelArch, str]:
    """Like `load_model`, also saying how `ref` was resolved (for 'alias 70b -> llama-3.1-70b' messages).

    Order: a local path; a catalog name, alias or catalog hf_id (no network; at the default revision only, since
    a profile describes `main`); any other `Org/Name` through the Hugging Face cache or hub (`planner.hub`).
    `revision` (a branch, tag or commit hash) applies to hub ids only."""
    text = ref.strip()
    revision = (revision or DEFAULT_REVISION).strip()
    p = Path(text).expanduser()
    if text.endswith(".json") or os.sep in text and p.exists() or p.is_dir():
        _revision_only_for_hub(revision, text)
        if p.exists():
            return arch_from_path(p), f"config.json at {p}"
        raise ProfileError(f"no such file or folder: {text}")
    folder = str(profiles_dir())
    idx = _model_index(folder)
    key = text.lower()
    from . import hub  # light: huggingface_hub itself is imported only inside hub.fetch_config

    is_hub_id = hub.looks_like_hub_id(text)
    if key in idx and (revision == DEFAULT_REVISION or not is_hub_id):
        _revision_only_for_hub(revision, text)
        name = idx[key]
        how = name if key == name else f"{text} -> {name}"
        return _model_arch(folder, name), how
    if is_hub_id:
        return _hub_model(text, revision)
    _revision_only_for_hub(revision, text)
    raise ProfileError(_unknown("model", text, idx, "ftplan models list",
                                extra="a Hugging Face id (Org/Name) or a path to a config.json"))


def _revision_only_for_hub(revision: str, text: str) -> None:
    if revision != DEFAULT_REVISION:
        raise ProfileError(f"--revision {revision!r} applies to a Hugging Face id (Org/Name); {text!r} is a catalog "
                           "name or a local path: drop --revision, or pass the Org/Name id")


def _hub_model(repo_id: str, revision: str) -> tuple[ModelArch, str]:
    """A hub id through its config.json (cache, else download of that file alone). HubError/ArchError: ProfileError."""
    from . import hub

    if not re.fullmatch(r"[\w\-./]{1,200}", revision) or ".." in revision or revision.startswith("/"):
        raise ProfileError(f"--revision {revision!r} is not a branch, tag or commit hash")
    try:
        config, path = hub.fetch_config(repo_id, revision)
        arch = arch_from_config(config, name=repo_id, hf_id=repo_id, source=str(path))
    except (hub.HubError, ArchError) as e:
        msg = str(e)
        raise ProfileError(msg if repo_id in msg else f"{repo_id}: {msg}") from None
    at = f"@{revision}" if revision != DEFAULT_REVISION else ""
    return arch, f"{repo_id}{at} -> hub config.json at {path}"


def _unknown(kind: str, name: str, idx: dict, hint: str, extra: str = "") -> str:
    close = difflib.get_close_matches(name.lower(), list(idx), n=4, cutoff=0.5)
    msg = f"unknown {kind} {name!r}"
    if close:
        msg += f"; did you mean {', '.join(close)}?"
    msg += f" (`{hint}` shows all{', ' + extra if extra else ''})"
    return msg


# -- prices -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Price:
    gpu: str
    provider: str
    usd_per_gpu_hour: float
    as_of: str
    source: str
    note: str = ""


@functools.cache
def _prices(folder: str) -> tuple[Price, ...]:
    path = Path(folder, "prices.toml")
    if not path.exists():
        return ()
    rows = _load_toml(path).get("price", [])
    out = []
    for i, r in enumerate(rows):
        try:
            out.append(Price(r["gpu"], r["provider"], float(r["usd_per_gpu_hour"]), str(r["as_of"]), r["source"], r.get("note", "")))
        except KeyError as e:
            raise ProfileError(f"{path}: price row {i + 1} lacks {e}") from None
    return tuple(out)


def prices_for(gpu: str, provider: str | None = None) -> list[Price]:
    """Rows for `gpu` (a GPU name), cheapest first; `provider` filters case-insensitively."""
    rows = [p for p in _prices(str(profiles_dir())) if p.gpu == gpu]
    if provider:
        rows = [p for p in rows if p.provider.lower() == provider.lower()]
    return sorted(rows, key=lambda p: p.usd_per_gpu_hour)


def all_prices() -> list[Price]:
    return list(_prices(str(profiles_dir())))


def providers() -> list[str]:
    return sorted({p.provider for p in all_prices()})
