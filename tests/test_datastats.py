"""`estimate/recommend --data` (planner/datastats.py, planner/cli/datainfo.py): token counts with the model's
tokenizer or the stated estimate, the length distribution, padding, the longest batch, and time and cost from the
dataset's real batches, checked against the batches `ftplan run` builds (trainer/data.py)."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
from click.testing import CliRunner

from planner.cli import cli
from planner.cost import throughput
from planner.datastats import CHARS_PER_TOKEN, batch_length_distribution, estimated_tokens, padded_length
from planner.profiles import load_gpu, load_model, prices_for

WORDS = ("the capital of Peru is Lima and one plus two is three so the answer is short and clear "
         "instruction input response opposite of hot cold word give").split()


def run(*args, code=0):
    r = CliRunner().invoke(cli, list(args))
    assert r.exit_code == code, r.output + (repr(r.exception) if r.exception and code == 0 else "")
    assert "Traceback" not in r.output
    return r


def _text_file(path, n=600, seed=0, longest_words=90):
    """`n` text records of 1 to `longest_words` words (a long tail: most are short, as real data is)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            k = max(1, min(longest_words, int(rng.expovariate(1 / 18))))
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(k))}) + "\n")
    return path


def test_batch_length_distribution_is_the_exact_law_of_a_random_batch():
    lengths = [5, 9, 9, 17, 30, 41, 64]
    for b in (1, 2, 3):
        dist = dict(batch_length_distribution(lengths, b, seq_len=40))
        combos = list(itertools.combinations(lengths, b))
        brute = {}
        for c in combos:
            L = padded_length(min(max(c), 40), 40)
            brute[L] = brute.get(L, 0) + 1 / len(combos)
        assert dist.keys() == brute.keys()
        for L in dist:
            assert dist[L] == pytest.approx(brute[L], rel=1e-9)


def _real_batches_seconds(arch, tc, gpu, examples, epochs, pad_id):
    """Sum over the optimizer steps `ftplan run` takes (trainer.data order and collate) of grad_accum micro-batches,
    each timed at its padded length, plus the per-step work: s(L, 2) - s(L, 1) per micro-batch, 2 s(S, 1) - s(S, 2)
    per step, s from planner.cost.throughput."""
    from trainer import data as D

    def s(L, a):
        return throughput(arch, tc.replace(seq_len=L, grad_accum=a), gpu).step_seconds

    order = D.ExampleOrder(len(examples), seed=0)
    steps = D.steps_for(len(examples), epochs=epochs, max_steps=0, per_step=tc.batch_size * tc.grad_accum)
    micro_cache, total = {}, 0.0
    for step in range(steps):
        for m in range(tc.grad_accum):
            idx = D.micro_batch_indices(order, step, m, batch_size=tc.batch_size, grad_accum=tc.grad_accum)
            L = D.collate([examples[i] for i in idx], pad_id, max_len=tc.seq_len)["input_ids"].shape[1]
            if L not in micro_cache:
                micro_cache[L] = s(L, 2) - s(L, 1)
            total += micro_cache[L]
        total += 2 * s(tc.seq_len, 1) - s(tc.seq_len, 2)
    return total, steps


@pytest.mark.parametrize("packing", [False, True])
def test_time_and_cost_from_data_match_the_sum_over_the_real_batches(tmp_path, tiny_tokenizer_dir, packing):
    from transformers import AutoTokenizer

    from planner.config import TrainConfig
    from trainer import data as D

    path = _text_file(tmp_path / "train.jsonl")
    seq, batch, accum, epochs = 128, 4, 2, 3
    args = ["estimate", "--model", "8b", "--method", "lora", "--gpu", "h100", "--seq-len", str(seq), "--batch-size",
            str(batch), "--grad-accum", str(accum), "--epochs", str(epochs), "--data", str(path), "--tokenizer",
            str(tiny_tokenizer_dir), "--json"] + (["--packing"] if packing else [])
    d = json.loads(run(*args).output)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    full = D.load_dataset(path, tok, 10**6)
    assert d["data"]["tokens"] == full.tokens and d["data"]["records"] == 600 and not d["data"]["estimated"]
    ds = D.load_dataset(path, tok, seq, packing=packing)
    assert ds.truncated > 0 and d["data"]["tokens_after_truncation"] == sum(
        min(len(e["input_ids"]), seq) for e in full.examples)
    arch, gpu = load_model("8b"), load_gpu("h100")
    tc = TrainConfig(method="lora", seq_len=seq, batch_size=batch, grad_accum=accum)
    seconds, steps = _real_batches_seconds(arch, tc, gpu, ds.examples, epochs, tok.pad_token_id)
    assert d["data"]["steps"] == steps
    assert d["hours"] * 3600 == pytest.approx(seconds, rel=0.02)
    price = prices_for("h100-sxm-80gb")[0]
    assert d["cost_usd"] == pytest.approx(d["hours"] * price.usd_per_gpu_hour, abs=0.006)  # JSON rounds to cents
    if not packing:
        assert d["data"]["padding_waste"] > d["data"]["padding_waste_packed"]


def test_recommend_with_data_times_each_plan_on_the_real_batches(tmp_path, tiny_tokenizer_dir):
    path = _text_file(tmp_path / "train.jsonl", n=300)
    common = ["--model", "8b", "--seq-len", "128", "--epochs", "2", "--data", str(path), "--tokenizer",
              str(tiny_tokenizer_dir), "--json"]
    r = json.loads(run("recommend", "--gpu", "h100,a100-80", "--methods", "lora", *common).output)
    assert r["data"]["records"] == 300 and r["plans"]
    costs = [p["job_cost_usd"] for p in r["plans"]]
    assert costs == sorted(costs)
    top = r["plans"][0]
    c = top["config"]
    e = json.loads(run("estimate", "--gpu", top["gpu"], "--method", "lora", "--rank", str(c["rank"]),
                       "--target-modules", ",".join(c["target_modules"]), "--batch-size", str(c["batch_size"]),
                       "--grad-accum", str(c["grad_accum"]), "--optimizer", c["optimizer"],
                       "--precision", c["precision"], *(["--grad-ckpt"] if c["grad_ckpt"] else []), *common).output)
    assert top["hours"] == pytest.approx(e["hours"], rel=0.02)  # 16 length buckets vs every length


def test_model_folder_tokenizer_is_found_and_without_one_the_estimate_is_stated(tmp_path, tiny_tokenizer_dir):
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_tokenizer_dir, model)
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 400,
        "max_position_embeddings": 256}))
    data = tmp_path / "a.jsonl"
    rows = [{"instruction": "Give the opposite of the word.", "input": "hot", "output": "cold"},
            {"instruction": "What is one plus two?", "output": "three"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = json.loads(run("estimate", "--model", str(model), "--gpu", "l4", "--seq-len", "256", "--data", str(data),
                       "--json").output)["data"]
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    from planner.dataset import tokenize_record

    assert "(local)" in d["tokenized_by"] and not d["estimated"]
    assert d["tokens"] == sum(len(tokenize_record(tok, r, "alpaca")[0]) for r in rows)
    # the catalog's 8B is not in the (empty, offline) HF cache: characters per token, said so
    out = run("estimate", "--model", "8b", "--gpu", "l4", "--data", str(data)).output
    assert f"estimate: {CHARS_PER_TOKEN:g} characters per token (OpenAI" in out
    d = json.loads(run("estimate", "--model", "8b", "--gpu", "l4", "--data", str(data), "--json").output)["data"]
    assert d["estimated"] and d["tokens"] == sum(estimated_tokens(r, "alpaca") for r in rows)
    assert d["tokens"] == sum(math.ceil(len(t) / 4) + 2 for t in (
        "### Instruction:\nGive the opposite of the word.\n\n### Input:\nhot\n\n### Response:\ncold",
        "### Instruction:\nWhat is one plus two?\n\n### Response:\nthree"))


def test_long_examples_are_named_by_line_and_the_longest_batch_is_checked(tmp_path):
    path = tmp_path / "long.jsonl"
    rows = [{"text": "word " * 50}] * 3 + [{"text": "x" * 120_000}, {"text": "word " * 30}, {"text": "y" * 40_000}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = json.loads(run("estimate", "--model", "8b", "--gpu", "l4", "--method", "lora", "--seq-len", "16384",
                       "--data", str(path), "--json").output)["data"]
    assert [x["where"] for x in d["longer_than_seq_len"]] == [f"{path}:4"]
    assert d["longest_batch_tokens"] == 16384 and not d["longest_batch_fits"]
    ok = d["fits_up_to_tokens"]
    assert 0 < ok < 10_000
    assert [x["where"] for x in d["would_not_fit"]] == [f"{path}:4", f"{path}:6"]
    out = run("estimate", "--model", "8b", "--gpu", "l4", "--method", "lora", "--seq-len", "16384",
              "--data", str(path)).output
    assert f"would not fit   longer than {ok:,} tokens: {path}:4 (30,002), {path}:6 (10,002)" in out
    assert f"truncated       1 longer than --seq-len 16,384: {path}:4" in out


def test_progress_bar_on_stderr_for_long_files_not_with_json(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i} is short"}) + "\n" for i in range(2500)))
    r = CliRunner().invoke(cli, ["estimate", "--model", "8b", "--gpu", "l4", "--data", str(path)])
    assert r.exit_code == 0 and "tokenizing many.jsonl" in r.stderr and "tokenizing" not in r.stdout
    r = CliRunner().invoke(cli, ["estimate", "--model", "8b", "--gpu", "l4", "--data", str(path), "--json"])
    assert r.exit_code == 0 and "tokenizing" not in r.stderr
    assert json.loads(r.stdout)["data"]["records"] == 2500


def test_bad_data_and_tokenizers_exit_2_with_the_line(tmp_path, tiny_tokenizer_dir):
    base = ["estimate", "--model", "8b", "--gpu", "l4", "--data"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no records" in run(*base, str(empty), code=2).output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n')
    assert f"{bad}:3: invalid JSON" in run(*base, str(bad), code=2).output
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "a", "answer": "b"}\n')
    assert "cannot tell the format" in run(*base, str(odd), code=2).output
    assert f"{odd}:1: missing 'instruction'" in run(*base, str(odd), "--data-format", "alpaca", code=2).output
    assert "Invalid value for '--data-format'" in run(*base, str(odd), "--data-format", "csv", code=2).output
    assert "--tokenizer" in run(*base, str(odd), "--tokenizer", str(tmp_path / "nope"), code=2).output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text("{}")
    out = run(*base, str(empty), "--tokenizer", str(broken), code=2).output
    assert "cannot load the tokenizer" in out
    assert "not both" in run(*base, str(empty), "--dataset-tokens", "1M", code=2).output
    assert "not in the HF cache" in run(*base, str(empty), "--tokenizer", "Org/not-cached", code=2).output


def test_a_hub_models_tokenizer_is_read_from_the_hf_cache_offline(tmp_path, monkeypatch, tiny_tokenizer_dir):
    """The hub's cache layout (refs/main -> snapshots/<hash>/...), as tests/test_hub.py builds it: --model Org/Name
    finds config.json and the tokenizer there with HF_HUB_OFFLINE set; another revision has no tokenizer."""
    import shutil

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    repo = home / "hub" / "models--Org--Tiny"
    sha = "c" * 40
    snap = repo / "snapshots" / sha
    shutil.copytree(tiny_tokenizer_dir, snap)
    (snap / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 400, "max_position_embeddings": 256}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "The capital of Peru is Lima."}\n')
    d = json.loads(run("estimate", "--model", "Org/Tiny", "--gpu", "l4", "--seq-len", "128", "--data", str(data),
                       "--json").output)["data"]
    assert d["tokenized_by"].endswith("(HF cache)") and sha in d["tokenized_by"] and not d["estimated"]
    from transformers import AutoTokenizer

    assert d["tokens"] == len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir)("The capital of Peru is Lima.")
                             ["input_ids"]) + 1  # + the EOS trainer/data.py appends


def test_packing_is_a_recipe_option_and_needs_a_method_that_packs(tmp_path):
    """--packing prices packed rows with or without --data (the recipe's mask, planner.recipe); prefix tuning
    cannot pack (peft ignores position_ids)."""
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "The capital of Peru is Lima."}\n')
    packed = json.loads(run("estimate", "--model", "8b", "--gpu", "l4", "--packing", "--json").output)
    plain = json.loads(run("estimate", "--model", "8b", "--gpu", "l4", "--json").output)
    assert packed["config"]["recipe"]["packing"] is True and "recipe" not in plain["config"]
    assert packed["peak_allocated_bytes"] > plain["peak_allocated_bytes"]
    out = run("estimate", "--model", "8b", "--gpu", "l4", "--method", "prefix", "--data", str(data), "--packing",
              code=2).output
    assert "--packing" in out and "valid with packing: full, lora, qlora, dora, ia3" in out
    # --format is ftplan run's name for --data-format
    assert json.loads(run("estimate", "--model", "8b", "--data", str(data), "--format", "text", "--json").output)[
        "data"]["format"] == "text"


def test_data_without_a_tokenizer_stays_light(tmp_path):
    """The character estimate path imports neither torch nor transformers (tests/test_imports.py's rule)."""
    import subprocess
    import sys

    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "The capital of Peru is Lima."}\n')
    code = ("import sys\nfrom click.testing import CliRunner\nfrom planner.cli import cli\n"
            f"r = CliRunner().invoke(cli, ['estimate', '--model', '8b', '--gpu', 'l4', '--data', {str(data)!r}])\n"
            "assert r.exit_code == 0, r.output\nprint(sorted({m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}).stdout
    assert "'torch'" not in out and "'transformers'" not in out
