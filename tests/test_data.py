"""trainer/data.py: formats, response-only labels, malformed lines, truncation, packing, order (no training here)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from planner.cli import cli
from trainer import data as D

from conftest import EXAMPLES_DIR


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _trained_text(tok, ex) -> str:
    ids = [i for i, lab in zip(ex["input_ids"].tolist(), ex["labels"].tolist()) if lab != D.IGNORE_INDEX]
    return tok.decode(ids)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name,fmt", [("alpaca", "alpaca"), ("chat", "chat"),
                                      ("prompt_completion", "prompt_completion"), ("text", "text")])
def test_example_files_are_detected_and_tokenized(tok, name, fmt):
    path = os.path.join(EXAMPLES_DIR, f"{name}.jsonl")
    n_lines = sum(1 for line in open(path) if line.strip())
    assert 40 <= n_lines <= 200
    ds = D.load_dataset(path, tok, 128)
    assert ds.format == fmt and ds.records == n_lines == len(ds)
    assert ds.truncated == 0 and ds.dropped == 0
    for ex in ds.examples:
        assert ex["input_ids"].shape == ex["labels"].shape and ex["input_ids"].dtype == torch.long
        assert (ex["labels"][1:] != D.IGNORE_INDEX).any()
    if fmt == "text":
        assert ds.trained_tokens == ds.tokens - len(ds)  # every token but the first (nothing predicts it)
    else:
        assert ds.trained_tokens < ds.tokens / 2  # the prompts are not trained


def test_alpaca_and_prompt_completion_train_on_the_response_only(tok):
    rec = {"instruction": "Give the opposite of the word.", "input": "hot", "output": "The opposite of hot is cold."}
    ids, labels = D.tokenize_record(tok, rec, "alpaca")
    assert tok.decode(ids).startswith("<s>### Instruction:\nGive the opposite")
    assert "### Input:\nhot" in tok.decode(ids)
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != D.IGNORE_INDEX])
    assert trained == "The opposite of hot is cold.</s>"
    ids, labels = D.tokenize_record(tok, {"prompt": "Question: hi?\nAnswer:", "completion": " yes."}, "prompt_completion")
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != D.IGNORE_INDEX]) == " yes.</s>"
    ids, labels = D.tokenize_record(tok, {"prompt": "Question: hi?\nAnswer:", "completion": " yes."},
                                    "prompt_completion", train_on_inputs=True)
    assert labels == ids


def test_chat_labels_are_the_assistant_turns_with_their_end_tokens(tok):
    rec = {"messages": [{"role": "system", "content": "Be short."},
                        {"role": "user", "content": "What is one plus two?"},
                        {"role": "assistant", "content": "One plus two is three."},
                        {"role": "user", "content": "And the capital of Peru?"},
                        {"role": "assistant", "content": "The capital of Peru is Lima."}]}
    ids, labels = D.tokenize_record(tok, rec, "chat")
    full = tok.decode(ids)
    assert full == tok.apply_chat_template(rec["messages"], tokenize=False)
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != D.IGNORE_INDEX])
    assert trained == "One plus two is three.</s>\nThe capital of Peru is Lima.</s>\n"
    # ShareGPT conversations read as chat
    share = {"conversations": [{"from": "human", "value": "What is one plus two?"},
                               {"from": "gpt", "value": "One plus two is three."}]}
    assert D.detect_format(share) == "chat"
    ids, labels = D.tokenize_record(tok, share, "chat")
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != D.IGNORE_INDEX]) == "One plus two is three.</s>\n"


# a template whose generation prompt ends with a space: the answer's first word merges with it into one token
SPACE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}"
    "{% else %}User: {{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)
# the same with {% generation %} blocks (the tokenizer's return_assistant_tokens_mask marks the assistant tokens)
GENERATION_TEMPLATE = SPACE_TEMPLATE.replace("Assistant: {{ m['content'] }}{{ eos_token }}",
                                             "Assistant: {% generation %}{{ m['content'] }}{{ eos_token }}"
                                             "{% endgeneration %}")


@pytest.fixture
def space_tok(tok):
    t = tok.__class__.from_pretrained(tok.name_or_path)
    t.chat_template = SPACE_TEMPLATE
    return t


def _one_token_word(tok) -> str:
    for w in ("the", "is", "of", "three", "Lima"):
        if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1:
            return w
    raise AssertionError("no one-token word in the tiny vocabulary")


def _trained(tok, ids, labels) -> list[str]:
    return [tok.decode([i]) for i, lab in zip(ids, labels) if lab != D.IGNORE_INDEX]


def test_a_one_token_answer_after_a_generation_prompt_ending_in_a_space_is_trained(space_tok):
    word = _one_token_word(space_tok)
    msgs = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": word}]
    prompt = space_tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("Assistant: ")
    ids, labels = D.tokenize_record(space_tok, {"messages": msgs}, "chat")
    assert space_tok.decode(ids) == space_tok.apply_chat_template(msgs, tokenize=False)
    # the answer's token starts inside the generation prompt (its space) and is trained, with the end of turn
    assert _trained(space_tok, ids, labels) == [" " + word, "</s>"]
    first = labels.index(next(lab for lab in labels if lab != D.IGNORE_INDEX))
    assert space_tok.decode(ids[:first]) == prompt[:-1]  # everything before it is prompt, untrained
    # two turns: both answers, nothing of the user's
    msgs += [{"role": "user", "content": "And now?"}, {"role": "assistant", "content": "The capital of Peru is Lima."}]
    ids, labels = D.tokenize_record(space_tok, {"messages": msgs}, "chat")
    assert "".join(_trained(space_tok, ids, labels)) == f" {word}</s> The capital of Peru is Lima.</s>"


def test_generation_blocks_use_the_tokenizers_assistant_mask(space_tok):
    """`{% generation %}` templates are masked by transformers' return_assistant_tokens_mask, and agree with the
    offsets method on the same conversation."""
    word = _one_token_word(space_tok)
    rec = {"messages": [{"role": "system", "content": "Be short."}, {"role": "user", "content": "What is it?"},
                        {"role": "assistant", "content": word}, {"role": "user", "content": "And?"},
                        {"role": "assistant", "content": "One plus two is three."}]}
    by_offsets = D.tokenize_record(space_tok, rec, "chat")
    space_tok.chat_template = GENERATION_TEMPLATE
    assert D._has_generation_blocks(space_tok)
    calls = []
    real = space_tok.apply_chat_template

    def spy(*a, **kw):
        calls.append(kw.get("return_assistant_tokens_mask", False))
        return real(*a, **kw)

    space_tok.apply_chat_template = spy
    by_mask = D.tokenize_record(space_tok, rec, "chat")
    assert True in calls
    assert by_mask == by_offsets
    trained = "".join(_trained(space_tok, *by_mask))
    assert trained.startswith(f" {word}</s>") and trained.endswith("One plus two is three.</s>")
    assert "And" not in trained and "What" not in trained and "short" not in trained


def test_trl_conversational_prompt_completion_trains_the_completion(tok, space_tok, tmp_path):
    prompt = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "What is one plus two?"}]
    completion = [{"role": "assistant", "content": "One plus two is three."}]
    rec = {"prompt": prompt, "completion": completion}
    assert D.detect_format(rec) == "chat"
    ids, labels = D.tokenize_record(tok, rec, "chat")
    assert (ids, labels) == D.tokenize_record(tok, {"messages": prompt + completion}, "chat")
    assert "".join(_trained(tok, ids, labels)) == "One plus two is three.</s>\n"
    assert D.tokenize_record(tok, rec, "prompt_completion") == (ids, labels)  # a forced format reads it too
    word = _one_token_word(space_tok)
    ids, labels = D.tokenize_record(space_tok, {"prompt": prompt[1:], "completion": [dict(completion[0], content=word)]},
                                    "chat")
    assert _trained(space_tok, ids, labels) == [" " + word, "</s>"]
    # from a file, auto-detected, next to plain chat records
    path = _write(tmp_path / "conv.jsonl", [rec, {"messages": prompt + completion}])
    ds = D.load_dataset(path, tok, 128)
    assert ds.format == "chat" and len(ds) == 2
    assert ds.examples[0]["labels"].tolist() == ds.examples[1]["labels"].tolist()
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": prompt, "completion": "One plus two is three."}])
    with pytest.raises(D.DataError, match=r"bad.jsonl:1: 'completion' must be a non-empty list of \{role, content\}"):
        D.load_dataset(bad, tok, 128)


def test_chat_needs_a_chat_template(tok, tmp_path):
    no_template = tok.__class__.from_pretrained(tok.name_or_path)
    no_template.chat_template = None
    with pytest.raises(D.DataError, match="chat template"):
        D.load_dataset(os.path.join(EXAMPLES_DIR, "chat.jsonl"), no_template, 64)


def test_malformed_lines_are_reported_with_file_and_line(tok, tmp_path):
    good = {"instruction": "a", "input": "", "output": "b"}
    path = _write(tmp_path / "bad.jsonl", [good, good, '{"instruction": "x", "output": ', "", good,
                                           {"instruction": "y"}, '["not", "an", "object"]',
                                           {"instruction": "z", "output": 3}])
    with pytest.raises(D.DataError) as e:
        D.load_dataset(path, tok, 64)
    msg = str(e.value)
    assert f"{path}:3: invalid JSON" in msg
    assert f"{path}:7: expected a JSON object" in msg
    # JSON errors come first; fix them and the field errors are reported by line too
    path = _write(tmp_path / "bad2.jsonl", [good, {"instruction": "y"}, "", {"instruction": "z", "output": 3}])
    with pytest.raises(D.DataError) as e:
        D.load_dataset(path, tok, 64)
    msg = str(e.value)
    assert f"{path}:2: missing 'output'" in msg and f"{path}:4: 'output' must be a string" in msg
    assert "alpaca format needs instruction, output" in msg


def test_unknown_keys_and_forced_format(tok, tmp_path):
    path = _write(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(D.DataError, match=r"odd.jsonl:1: cannot tell the format .* valid formats: alpaca"):
        D.load_dataset(path, tok, 64)
    with pytest.raises(D.DataError, match=r"chat.jsonl:1: missing 'instruction'"):
        D.load_dataset(os.path.join(EXAMPLES_DIR, "chat.jsonl"), tok, 64, fmt="alpaca")
    # any format can be read as plain text when it has a text field
    ds = D.load_dataset(os.path.join(EXAMPLES_DIR, "text.jsonl"), tok, 64, fmt="text")
    assert ds.format == "text"


def test_truncation_is_counted_and_empty_responses_dropped(tok, tmp_path):
    rows = [{"prompt": "Question: " + "what is this " * 20, "completion": " short."},  # response cut off entirely
            {"prompt": "Q:", "completion": " " + "one two three " * 20},  # long response: truncated, kept
            {"prompt": "Q:", "completion": " yes."}]
    path = _write(tmp_path / "long.jsonl", rows)
    ds = D.load_dataset(path, tok, 24)
    assert ds.truncated == 2 and ds.dropped == 1 and len(ds) == 2
    assert max(len(e["input_ids"]) for e in ds.examples) == 24
    with pytest.raises(D.DataError, match="no example has a response token left within seq_len 2"):
        D.load_dataset(path, tok, 2)


def test_packing_keeps_examples_apart(tok, tiny_model_dir):
    """Packed blocks: positions restart per example, and the model's loss on a block equals the token-weighted loss
    of its examples run one by one (transformers builds a block-diagonal mask from the position_ids)."""
    from transformers import AutoModelForCausalLM

    path = os.path.join(EXAMPLES_DIR, "prompt_completion.jsonl")
    plain = D.load_dataset(path, tok, 128)
    packed = D.load_dataset(path, tok, 128, packing=True)
    assert packed.packed and len(packed) <= len(plain) / 3
    assert packed.tokens == plain.tokens
    assert all(len(b["input_ids"]) <= 128 for b in packed.examples)
    block = packed.examples[0]
    starts = (block["position_ids"] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 2 and all(block["labels"][s] == D.IGNORE_INDEX for s in starts)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        batch = D.collate([block], tok.pad_token_id)
        assert "attention_mask" not in batch and batch["use_cache"] is False
        packed_logits = model(**batch).logits[0]
        ends = starts[1:] + [len(block["input_ids"])]
        for s, e in zip(starts, ends):
            alone = model(input_ids=block["input_ids"][s:e][None]).logits[0]
            torch.testing.assert_close(packed_logits[s:e], alone, atol=1e-5, rtol=1e-4)


def test_datasets_folder_reads_like_the_jsonl(tok, tmp_path):
    datasets = pytest.importorskip("datasets", reason="reading a datasets folder needs the `datasets` package")

    path = os.path.join(EXAMPLES_DIR, "alpaca.jsonl")
    rows = [json.loads(line) for line in open(path)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    a = D.load_dataset(path, tok, 64)
    b = D.load_dataset(tmp_path / "ds", tok, 64)
    assert b.format == "alpaca" and b.fingerprint == a.fingerprint
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="save_to_disk"):
        D.load_dataset(tmp_path / "empty", tok, 64)


def test_collate_pads_right_with_ignored_labels(tok):
    exs = [{"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, 5, 6])},
           {"input_ids": torch.tensor([1, 7, 8, 9, 10]), "labels": torch.tensor([-100, -100, 8, 9, 10])}]
    b = D.collate(exs, pad_id=0, pad_to_multiple_of=8, max_len=6)
    assert b["input_ids"].shape == (2, 6)  # the longest (5) rounded up to 8, capped at max_len
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert b["labels"][0].tolist() == [-100, 5, 6, -100, -100, -100]
    assert D.batch_tokens(exs) == 8


def test_order_is_a_seeded_permutation_per_epoch_and_split_over_ranks():
    order = D.ExampleOrder(10, seed=3)
    assert sorted(order.perm(0)) == list(range(10)) and order.perm(0) != order.perm(1)
    assert D.ExampleOrder(10, seed=3).take(7, 6) == order.perm(0)[7:] + order.perm(1)[:3]
    assert order.position(23) == (2, 3)
    # two ranks, batch 2, accumulation 2: one optimizer step covers 8 consecutive stream positions, no overlap
    step = [D.micro_batch_indices(order, 1, m, batch_size=2, grad_accum=2, world_size=2, rank=r)
            for m in range(2) for r in range(2)]
    assert sum(step, []) == order.take(8, 8)
    # a fallback plan with the same effective batch sees the same examples in each optimizer step
    same = [D.micro_batch_indices(order, 1, m, batch_size=1, grad_accum=8) for m in range(8)]
    assert sum(same, []) == sum(step, [])
    assert D.steps_for(60, epochs=1.0, max_steps=0, per_step=8) == 8
    assert D.steps_for(60, epochs=2.5, max_steps=0, per_step=8) == 19
    assert D.steps_for(60, epochs=1.0, max_steps=5, per_step=8) == 5


def test_cli_reports_a_malformed_line_before_loading_the_model(tiny_plan, tmp_path):
    bad = _write(tmp_path / "train.jsonl", [{"text": "The capital of Peru is Lima."}, "{oops"])
    res = CliRunner().invoke(cli, ["run", str(tiny_plan()), "--data", str(bad), "--output-dir",
                                   str(tmp_path / "out"), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert f"{bad}:2: invalid JSON" in res.output and "--data" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out" / "run_summary.json").exists()
    assert not list((tmp_path / "out").glob("checkpoint-*"))
