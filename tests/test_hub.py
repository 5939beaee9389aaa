"""Any Hugging Face id through a hub cache the test writes (never the network: conftest sets HF_HUB_OFFLINE=1 and
HF_HOME to a temporary folder), and the required keys of every config.json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from planner.arch import REQUIRED_KEYS, ArchError, arch_from_config
from planner.cli import cli
from planner.profiles import ProfileError, resolve_model

# Qwen2.5-7B-Instruct's config.json (the fields ftplan reads), and a smaller variant for another revision.
QWEN_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 32768, "tie_word_embeddings": False,
}
SMALL = dict(QWEN_7B, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
MAIN_SHA = "a" * 40
OLD_SHA = "b" * 40


def cache_repo(hf_home, repo_id: str, snapshots: dict[str, dict | None], refs: dict[str, str]) -> None:
    """The hub's cache layout (huggingface_hub 1.33.0 file_download.py, `_cache_commit_hash_for_specific_revision`
    and `try_to_load_from_cache`): <HF_HOME>/hub/models--Org--Name/refs/<rev> holds the commit hash,
    snapshots/<hash>/config.json the file; a None config is cached as missing (.no_exist/<hash>/config.json)."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    for sha, config in snapshots.items():
        if config is None:
            (repo / ".no_exist" / sha).mkdir(parents=True, exist_ok=True)
            (repo / ".no_exist" / sha / "config.json").write_text("")
            (repo / "snapshots" / sha).mkdir(parents=True, exist_ok=True)
        else:
            (repo / "snapshots" / sha).mkdir(parents=True, exist_ok=True)
            (repo / "snapshots" / sha / "config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref, sha in refs.items():
        (repo / "refs" / ref).write_text(sha)


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache_repo(home, "Org/Name", {MAIN_SHA: QWEN_7B, OLD_SHA: SMALL}, {"main": MAIN_SHA, "v1": OLD_SHA})
    return home


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_cached_id_resolves_to_its_own_config(hf_home):
    arch, how = resolve_model("Org/Name")
    assert (arch.name, arch.hf_id, arch.model_type) == ("Org/Name", "Org/Name", "qwen2")
    assert (arch.hidden_size, arch.num_layers, arch.vocab_size) == (3584, 28, 152064)
    assert 7.5e9 < arch.total_params < 7.7e9  # Qwen2.5-7B: 7.62B
    assert MAIN_SHA in how and "hub config.json" in how


def test_estimate_with_a_cached_id(hf_home):
    r = run("estimate", "--model", "Org/Name", "--gpu", "a100-80", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["model"] == "Org/Name"
    r = run("estimate", "--model", "Org/Name", "--gpu", "a100-80")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("Org/Name (Org/Name -> hub config.json at ")


def test_revision_picks_another_snapshot(hf_home):
    main = json.loads(run("estimate", "--model", "Org/Name", "--json").output)
    for rev in ("v1", OLD_SHA):
        r = run("estimate", "--model", "Org/Name", "--revision", rev, "--json")
        assert r.exit_code == 0, r.output
        old = json.loads(r.output)
        assert old["trainable_params"] < main["trainable_params"]
    arch, how = resolve_model("Org/Name", "v1")
    assert arch.hidden_size == 896 and "Org/Name@v1" in how


def test_recommend_takes_a_cached_id_and_revision(hf_home):
    r = run("recommend", "--model", "Org/Name", "--revision", "v1", "--gpu", "4090", "--json")
    assert r.exit_code == 0, r.output


def test_uncached_id_offline_says_what_to_do(hf_home):
    r = run("estimate", "--model", "Org/Missing", "--gpu", "a100-80")
    assert r.exit_code == 2
    assert "Traceback" not in r.output
    assert "--model" in r.output and "Org/Missing" in r.output
    assert "HF_HUB_OFFLINE" in r.output and "HF_HOME" in r.output and "local folder" in r.output


def test_unknown_revision_offline(hf_home):
    r = run("estimate", "--model", "Org/Name", "--revision", "v9")
    assert r.exit_code == 2
    assert "revision 'v9'" in r.output and "HF_HUB_OFFLINE" in r.output


def test_repo_without_config_json(hf_home):
    cache_repo(hf_home, "Org/Gguf", {MAIN_SHA: None}, {"main": MAIN_SHA})
    r = run("estimate", "--model", "Org/Gguf")
    assert r.exit_code == 2
    assert "Org/Gguf has no config.json" in r.output


def test_unsupported_model_type_names_it(hf_home):
    cache_repo(hf_home, "Org/Moe", {MAIN_SHA: dict(QWEN_7B, model_type="qwen7_moe",
                                                    architectures=["Qwen7MoeForCausalLM"])}, {"main": MAIN_SHA})
    with pytest.raises(ProfileError, match=r"Org/Moe: model_type 'qwen7_moe' is not a supported"):
        resolve_model("Org/Moe")
    r = run("estimate", "--model", "Org/Moe")
    assert r.exit_code == 2 and "qwen7_moe" in r.output and "llama" in r.output


def test_catalog_hf_id_and_aliases_need_no_hub(hf_home):
    arch, how = resolve_model("meta-llama/Llama-3.1-8B")  # the catalog profile, no hub lookup (nothing is cached)
    assert arch.name == "llama-3.1-8b" and arch.source.endswith("llama-3.1-8b.toml")
    assert resolve_model("8b")[0].name == "llama-3.1-8b"
    # an Instruct variant is not the base profile: it goes to the hub (here: not cached, offline)
    with pytest.raises(ProfileError, match="Llama-3.1-8B-Instruct.*HF_HUB_OFFLINE"):
        resolve_model("meta-llama/Llama-3.1-8B-Instruct")


def test_revision_only_for_hub_ids(hf_home):
    r = run("estimate", "--model", "8b", "--revision", "v1")
    assert r.exit_code == 2 and "--revision 'v1' applies to a Hugging Face id" in r.output
    with pytest.raises(ProfileError, match="not a branch, tag or commit"):
        resolve_model("Org/Name", "../../etc")


def test_bare_typo_still_gets_did_you_mean(hf_home):
    r = run("estimate", "--model", "llama-2-7")
    assert r.exit_code == 2 and "did you mean" in r.output


def test_hf_hub_cache_overrides_hf_home(hf_home, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ProfileError, match="no cached config.json"):
        resolve_model("Org/Name")
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    assert resolve_model("Org/Name")[0].hidden_size == 3584


def test_catalog_estimate_does_not_import_huggingface_hub():
    code = ("from click.testing import CliRunner\nfrom planner.cli import cli\n"
            "r = CliRunner().invoke(cli, ['estimate', '--model', '8b', '--gpu', 'a100-80', '--json'])\n"
            "assert r.exit_code == 0, r.output\nimport sys\nprint('huggingface_hub' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- required keys of every config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_missing_required_key_is_named(key):
    config = {k: v for k, v in QWEN_7B.items() if k != key}
    with pytest.raises(ArchError, match=f"missing required key '{key}'"):
        arch_from_config(config, name="x")


def test_mostly_empty_config_is_rejected_not_planned_with_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    r = run("estimate", "--model", str(tmp_path / "config.json"))
    assert r.exit_code == 2
    assert "missing required keys 'hidden_size', 'num_hidden_layers'" in r.output


@pytest.mark.parametrize("key,value", [("hidden_size", "4096"), ("vocab_size", 0), ("num_hidden_layers", True),
                                       ("num_key_value_heads", 2.0), ("head_dim", -1)])
def test_mistyped_key_is_named(key, value):
    with pytest.raises(ArchError, match=f"'{key}' must be a positive integer"):
        arch_from_config(dict(QWEN_7B, **{key: value}), name="x")


def test_cached_config_missing_a_key_names_the_id_and_the_key(hf_home):
    # a cached id whose config.json lacks a required key: the ArchError names the id and the key
    cache_repo(hf_home, "Org/Broken", {MAIN_SHA: {"model_type": "qwen2"}}, {"main": MAIN_SHA})
    r = run("estimate", "--model", "Org/Broken")
    assert r.exit_code == 2 and "Org/Broken: missing required keys 'hidden_size'" in r.output


# -- the download path, against a fake hub served in-process (httpx.MockTransport: no socket is opened) ----------


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """huggingface_hub's own client (its request hook, redirects) on a transport that answers as huggingface.co
    does for `resolve/<rev>/config.json` (HEAD for the metadata, then GET), with the X-Error-Code headers its
    `hf_raise_for_status` (huggingface_hub 1.33.0 utils/_http.py) turns into GatedRepoError, RepositoryNotFoundError,
    RevisionNotFoundError and RemoteEntryNotFoundError. Returns the list of requested URLs."""
    httpx = pytest.importorskip("httpx")
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read at its import, when conftest had set it
    # huggingface_hub's own best-effort agent-registry fetch (utils/_detect_agent.py) caches into this import-time path
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    # an unreachable hub is retried 5 times with 1-8 s waits (`http_backoff`, utils/_http.py): skip the waits only
    import time
    import types

    no_wait = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    no_wait.sleep = lambda seconds: None
    monkeypatch.setattr(_http, "time", no_wait)
    body = json.dumps(QWEN_7B).encode()
    seen = []

    def answer(request):
        url = str(request.url)
        seen.append(url)
        if "/resolve/" not in url:  # huggingface_hub's own /api/agent-harnesses registry (see above)
            return httpx.Response(404, request=request)
        repo = url.split("huggingface.co/")[1].split("/resolve/")[0]
        errors = {"Org/Gated": (401, "GatedRepo"), "Org/Missing": (401, "RepoNotFound"),
                  "Org/NoConfig": (404, "EntryNotFound")}
        if repo == "Org/Down":
            raise httpx.ConnectError("unreachable", request=request)
        if repo in errors or "/resolve/v9/" in url:
            status, code = errors.get(repo, (404, "RevisionNotFound"))
            return httpx.Response(status, headers={"X-Error-Code": code}, request=request)
        headers = {"X-Repo-Commit": MAIN_SHA, "ETag": '"abc"', "Content-Length": str(len(body))}
        return httpx.Response(200, headers=headers, content=b"" if request.method == "HEAD" else body,
                              request=request)

    transport = httpx.MockTransport(answer)
    _http.set_client_factory(lambda: httpx.Client(transport=transport, event_hooks={
        "request": [_http.hf_request_event_hook]}, follow_redirects=True))
    yield seen
    _http.set_client_factory(_http.default_client_factory)


def test_download_fetches_config_json_alone_then_uses_the_cache(fake_hub, tmp_path):
    arch, how = resolve_model("Org/Fresh")
    assert arch.hidden_size == 3584 and "hub config.json" in how
    files = [u for u in fake_hub if "/resolve/" in u]
    assert files and all(u.endswith("/Org/Fresh/resolve/main/config.json") for u in files)  # never the weights
    cached = tmp_path / "hf" / "hub" / "models--Org--Fresh" / "snapshots" / MAIN_SHA / "config.json"
    assert json.loads(cached.read_text()) == QWEN_7B
    n = len(fake_hub)
    assert resolve_model("Org/Fresh")[0].hidden_size == 3584
    assert len(fake_hub) == n  # the second time from the cache, no request


@pytest.mark.parametrize("repo,revision,says", [
    ("Org/Gated", "main", ["gated repo", "hf auth login", "HF_TOKEN", "https://huggingface.co/Org/Gated"]),
    ("Org/Missing", "main", ["no model repo 'Org/Missing'", "check the id"]),
    ("Org/Fresh", "v9", ["has no revision 'v9'", "--revision"]),
    ("Org/NoConfig", "main", ["Org/NoConfig has no config.json"]),
    ("Org/Down", "main", ["hub is unreachable", "HF_HOME", "local folder"]),
])
def test_hub_errors_say_what_to_do(fake_hub, repo, revision, says):
    r = run("estimate", "--model", repo, "--revision", revision)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "--model" in r.output
    for text in says:
        assert text in r.output, (text, r.output)
