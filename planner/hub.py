"""Any Hugging Face model id (`Org/Name`) resolved to its `config.json`, never its weights.

The config comes from the local Hugging Face cache when it is there (the hub's snapshot layout:
`<cache>/models--Org--Name/refs/<revision>` holds a commit hash, `snapshots/<hash>/config.json` the file), else it is
downloaded alone with `hf_hub_download(repo_id, "config.json", revision=...)` when `HF_HUB_OFFLINE` is not set.
`HF_TOKEN` (or `hf auth login`) is read by huggingface_hub itself; ftplan never reads, prints or writes it.

The cache folder and offline mode are read from the environment at call time, as huggingface_hub does at its
import (`huggingface_hub/constants.py`): `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else
`$XDG_CACHE_HOME/huggingface/hub` (default `~/.cache/huggingface/hub`); offline when `HF_HUB_OFFLINE` or
`TRANSFORMERS_OFFLINE` is 1/ON/YES/TRUE. Reading them here (not huggingface_hub's import-time constants) lets a
process change them between calls (tests do).

huggingface_hub is imported lazily inside `fetch_config`, so `import planner` and catalog models never load it.
Errors (huggingface_hub 1.33.0, `huggingface_hub/errors.py`): `GatedRepoError` (a subclass of
`RepositoryNotFoundError`), `RepositoryNotFoundError`, `RevisionNotFoundError`, `LocalEntryNotFoundError` (no
network and nothing cached; a subclass of `EntryNotFoundError`), `EntryNotFoundError` / `RemoteEntryNotFoundError`
(no config.json in the repo), `OfflineModeIsEnabled`, `HFValidationError` (a malformed id). Each becomes a
`HubError` whose message says what to do.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

_TRUE = {"1", "ON", "YES", "TRUE"}
# One namespace and one name, as huggingface_hub's REPO_ID_REGEX (utils/_validators.py) with the namespace required:
# a bare name ('llama-7') is looked up in the catalog only, so a typo gets 'did you mean', not a network call.
_HUB_ID = re.compile(r"^[\w\-.]{1,96}/[\w\-.]{1,96}$")


class HubError(ValueError):
    """A hub id whose config.json could not be had; the message says what to do."""


def looks_like_hub_id(text: str) -> bool:
    """`Org/Name` with characters a hub id may have (no `--`, no `..`, no leading/trailing `-` or `.`)."""
    return bool(_HUB_ID.match(text)) and "--" not in text and ".." not in text and not any(
        part[:1] in "-." or part[-1:] in "-." for part in text.split("/"))


def hub_cache_dir() -> Path:
    """The hub cache folder as huggingface_hub 1.33.0 `constants.py` computes it, from the environment now."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_offline() -> bool:
    """True when `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set to a true value."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def fetch_config(repo_id: str, revision: str = "main") -> tuple[dict, Path]:
    """(the parsed config.json of `repo_id` at `revision`, the file it was read from). HubError otherwise."""
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ModuleNotFoundError:
        raise HubError(f"{repo_id}: resolving a Hugging Face id needs huggingface_hub (pip install huggingface_hub), "
                       "or pass a local folder holding its config.json") from None
    cache = hub_cache_dir()
    at = f" at revision {revision!r}" if revision != "main" else ""
    try:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, "config.json", cache_dir=str(cache),
                                                        revision=revision)
    except (errors.HFValidationError, ValueError) as e:
        raise HubError(f"{repo_id!r} is not a valid Hugging Face id ({e}); check the id (Org/Name)") from None
    if isinstance(cached, str):
        return _read(Path(cached), repo_id), Path(cached)
    if hub_offline():
        if cached is not None:  # huggingface_hub's _CACHED_NO_EXIST: the repo is cached and has no config.json
            raise HubError(_no_config(repo_id, at))
        raise HubError(
            f"{repo_id}{at}: no cached config.json in {cache} and HF_HUB_OFFLINE is set; set HF_HOME (or "
            "HF_HUB_CACHE) to the cache that holds it, pass a local folder with its config.json, or unset "
            "HF_HUB_OFFLINE to download config.json alone"
        )
    try:
        path = huggingface_hub.hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=str(cache))
    except errors.GatedRepoError:
        raise HubError(
            f"{repo_id} is a gated repo: accept its terms at https://huggingface.co/{repo_id}, then log in "
            "(`hf auth login`) or set HF_TOKEN to a token of that account"
        ) from None
    except errors.RepositoryNotFoundError:
        raise HubError(
            f"no model repo {repo_id!r} on the Hugging Face hub; check the id (Org/Name, as in its URL). A private "
            "repo needs `hf auth login` or HF_TOKEN"
        ) from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision!r}; check --revision (a branch, tag or commit hash)") \
            from None
    except errors.LocalEntryNotFoundError:  # before EntryNotFoundError: it is a subclass
        raise HubError(
            f"{repo_id}{at}: the hub is unreachable and {cache} has no cached config.json; connect to the network, "
            "set HF_HOME (or HF_HUB_CACHE) to the cache that holds it, or pass a local folder with its config.json"
        ) from None
    except errors.EntryNotFoundError:
        raise HubError(_no_config(repo_id, at)) from None
    except errors.OfflineModeIsEnabled:
        raise HubError(f"{repo_id}{at}: offline mode is on and nothing is cached; unset HF_HUB_OFFLINE or pass a "
                       "local folder with its config.json") from None
    except errors.HFValidationError as e:
        raise HubError(f"{repo_id!r} is not a valid Hugging Face id ({e}); check the id (Org/Name)") from None
    except OSError as e:  # HfHubHTTPError (401, 5xx) and connection errors: the text, never a traceback
        raise HubError(f"{repo_id}{at}: could not download config.json ({type(e).__name__}: {str(e)[:200]}); "
                       "retry, or pass a local folder with its config.json") from None
    return _read(Path(path), repo_id), Path(path)


def _no_config(repo_id: str, at: str) -> str:
    return (f"{repo_id}{at} has no config.json: it is not a transformers model repo (a GGUF, adapter-only or "
            "dataset repo?); pass the id of the base model, or a local folder holding its config.json")


def _read(path: Path, repo_id: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HubError(f"{repo_id}: the cached {path} is not valid JSON ({e}); delete it to download it again") \
            from None
