"""Training data files, without torch: read, detect the format, check every record, tokenize one record.

`ftplan run` (trainer/data.py, which builds tensors, packs and collates) and `ftplan estimate/recommend --data`
(planner/datastats.py, which counts tokens) read a file the same way, from this module.

Formats (detected from the first record's keys, or forced with `--format`):

    alpaca             {"instruction": ..., "input": ... (optional), "output": ...}
    chat               {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}
                       (ShareGPT's {"conversations": [{"from": "human" | "gpt", "value": ...}]} is read as chat,
                       and so is TRL's conversational prompt/completion {"prompt": [messages], "completion":
                       [messages]}: the completion's messages are trained)
    prompt_completion  {"prompt": ..., "completion": ...}
    text               {"text": ...}

Sources: a JSON-lines file (`.jsonl`, or `.json` holding one array), or a folder written by `datasets`'
`save_to_disk` (its `train` split, or its only split). A problem is a `DataError` naming `file:line` (up to 10 at
once). Tokenizing needs only a transformers tokenizer (passed in), never torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

FORMATS = ("alpaca", "chat", "prompt_completion", "text")
IGNORE_INDEX = -100
MAX_REPORTED_ERRORS = 10
CHAT_ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                   "tool": "tool", "function": "tool"}

# Alpaca's response template without the long preamble (the preamble costs ~30 tokens per example and teaches nothing).
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

FORMAT_KEYS = {
    "alpaca": "instruction, output (input optional)",
    "chat": "messages: [{role, content}, ...]",
    "prompt_completion": "prompt, completion",
    "text": "text",
}


class DataError(ValueError):
    """A dataset problem; the message names the file and line (`train.jsonl:17: ...`)."""


# -- reading -------------------------------------------------------------------------------------------------------


def read_records(path: str | Path) -> list[tuple[dict, str]]:
    """Every record with its location (`file:line`, or `folder[row]`). Malformed JSON is a DataError naming the
    lines (up to 10); a record that is not a JSON object too."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_dir():
        return _read_datasets_folder(p)
    errors, out = [], []
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); valid: JSON lines in UTF-8 "
                        "(convert it, e.g. iconv -f latin1 -t utf-8)") from None
    stripped = text.lstrip()
    if p.suffix == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}); valid: a JSON array of "
                            "objects, or one JSON object per line") from None
        for i, rec in enumerate(rows):
            where = f"{p}[{i}]"
            if not isinstance(rec, dict):
                errors.append(f"{where}: expected a JSON object, got {type(rec).__name__}")
            else:
                out.append((rec, where))
    else:
        for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{where}: invalid JSON ({e.msg}, column {e.colno}); valid: one JSON object per line")
                continue
            if not isinstance(rec, dict):
                errors.append(f"{where}: expected a JSON object, got {type(rec).__name__}")
                continue
            out.append((rec, where))
    _raise_errors(errors)
    if not out:
        raise DataError(f"{p}: no records (valid: one JSON object per line, e.g. {{\"text\": ...}})")
    return out


def _read_datasets_folder(p: Path) -> list[tuple[dict, str]]:
    if not any((p / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(f"{p}: a folder must be a Hugging Face `datasets` folder (save_to_disk); "
                        "no dataset_dict.json / state.json found")
    try:
        import datasets
    except ModuleNotFoundError:
        raise DataError(f"{p}: reading a datasets folder needs the `datasets` package (pip install datasets)") from None
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(f"{p}: a DatasetDict needs a 'train' split (has {', '.join(ds)})")
    return [(dict(rec), f"{p}[{i}]") for i, rec in enumerate(ds)]


def _raise_errors(errors: list[str]) -> None:
    if not errors:
        return
    shown = errors[:MAX_REPORTED_ERRORS]
    more = len(errors) - len(shown)
    raise DataError("\n".join(shown) + (f"\n... and {more} more" if more > 0 else ""))


# -- formats ---------------------------------------------------------------------------------------------------------


def read_checked(path: str | Path, fmt: str = "auto", train_on_inputs: bool = False) -> tuple[list, str, bool]:
    """Every record of `path`, checked (a DataError names each bad `file:line`, up to 10): (rows, the format, whether
    the records are chat messages). `fmt` "auto" detects the format from the first record."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; valid: auto, {', '.join(FORMATS)}")
    rows = read_records(path)
    if fmt == "auto":
        fmt = detect_format(rows[0][0], rows[0][1])
    errors = []
    for rec, where in rows:
        problem = check_record(rec, fmt, train_on_inputs)
        if problem:
            errors.append(f"{where}: {problem} ({fmt} format needs {FORMAT_KEYS[fmt]})")
    _raise_errors(errors)
    chat = fmt == "chat" or (fmt == "prompt_completion" and any(is_conversational(r) for r, _ in rows))
    return rows, fmt, chat


def is_conversational(record: dict) -> bool:
    """TRL's conversational prompt/completion: `prompt` and `completion` hold lists of messages."""
    return "prompt" in record and "completion" in record and (
        isinstance(record["prompt"], list) or isinstance(record["completion"], list))


def detect_format(record: dict, where: str = "record") -> str:
    keys = set(record)
    if "messages" in keys or "conversations" in keys or is_conversational(record):
        return "chat"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    valid = "; ".join(f"{k} ({v})" for k, v in FORMAT_KEYS.items())
    raise DataError(f"{where}: cannot tell the format from the keys {sorted(keys)}; valid formats: {valid}")


def check_record(record: dict, fmt: str, train_on_inputs: bool = False) -> str | None:
    """None when `record` is a valid `fmt` record, else what is wrong."""

    def string(key, required=True):
        if key not in record:
            return f"missing '{key}'" if required else None
        if not isinstance(record[key], str):
            return f"'{key}' must be a string, got {type(record[key]).__name__}"
        return None

    if fmt == "alpaca":
        return string("instruction") or string("output") or string("input", required=False) or (
            "'output' is empty" if not record["output"] else None)
    if fmt == "prompt_completion" and is_conversational(record):
        fmt = "chat"
    if fmt == "prompt_completion":
        return string("prompt") or string("completion") or ("'completion' is empty" if not record["completion"] else None)
    if fmt == "text":
        return string("text") or ("'text' is empty" if not record["text"].strip() else None)
    # chat
    try:
        msgs, trained = chat_turns(record)
    except ValueError as e:
        return str(e)
    if not train_on_inputs and not trained:
        return "no assistant message to train on"
    return None


def chat_turns(record: dict) -> tuple[list[dict], list[int]]:
    """The conversation as [{role, content}] and the indices of the messages to train: the assistant turns, or for
    TRL's conversational prompt/completion every message of `completion` (as TRL's SFTTrainer does)."""
    if "messages" not in record and "conversations" not in record and "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, list) or not value:
                raise ValueError(f"'{key}' must be a non-empty list of {{role, content}} messages (TRL's "
                                 "conversational prompt/completion), or both 'prompt' and 'completion' strings")
        msgs = _messages(prompt, "prompt") + _messages(completion, "completion")
        return msgs, list(range(len(prompt), len(msgs)))
    msgs = chat_messages(record)
    return msgs, [i for i, m in enumerate(msgs) if m["role"] == "assistant"]


def chat_messages(record: dict) -> list[dict]:
    """`messages` (or ShareGPT `conversations`) as [{role, content}]; ValueError says what is wrong."""
    if "messages" in record:
        msgs, key = record["messages"], "messages"
    elif "conversations" in record:
        msgs, key = record["conversations"], "conversations"
    else:
        raise ValueError("missing 'messages'")
    return _messages(msgs, key)


def _messages(msgs, key: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"'{key}' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"{key}[{i}] must be an object with role and content")
        if "role" in m:
            role, content = m.get("role"), m.get("content")
        else:
            role, content = _SHAREGPT_ROLES.get(m.get("from")), m.get("value")
            if role is None:
                raise ValueError(f"{key}[{i}] has no 'role' (or ShareGPT 'from': human|gpt|system)")
        if role not in CHAT_ROLES:
            raise ValueError(f"{key}[{i}].role {role!r} is not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{key}[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


# -- tokenizing -----------------------------------------------------------------------------------------------------


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"] if text else []


def _prompt_response(tokenizer, prompt: str, response: str, train_on_inputs: bool) -> tuple[list[int], list[int]]:
    p = _ids(tokenizer, prompt, True)
    r = _ids(tokenizer, response, False)
    if tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    ids = p + r
    labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(p) + r
    return ids, labels


def _text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    ids = _ids(tokenizer, text, True)
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids, list(ids)


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _has_generation_blocks(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and bool(_GENERATION_BLOCK.search(template))


def _chat(tokenizer, messages: list[dict], train_on_inputs: bool,
          trained: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Tokenize the conversation rendered by the tokenizer's chat template; label the tokens of the messages in
    `trained` (default: the assistant turns).

    A template with `{% generation %}` blocks marks the assistant tokens itself (`return_assistant_tokens_mask`).
    Otherwise each trained message's characters are found as the difference between the conversation rendered up to
    it (with the generation prompt for an assistant turn) and rendered through it, so the template's end-of-turn
    tokens are trained too; a template that rewrites earlier turns falls back to finding the content. A token is
    trained when its characters (offsets mapping) overlap such a span: one that begins in the generation prompt
    (a trailing space merged into the first word of the answer) is the answer's first token and is trained."""
    if trained is None:
        trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on_inputs:
        ids = list(tokenizer(_render(tokenizer, messages), add_special_tokens=False)["input_ids"])
        return ids, list(ids)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if trained == assistant and _has_generation_blocks(tokenizer):
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = list(enc["input_ids"])
        mask = list(enc["assistant_masks"])
        if any(mask):
            return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    full = _render(tokenizer, messages)
    spans = []
    cursor = 0
    for i in trained:
        m = messages[i]
        before = _render(tokenizer, messages[:i], add_generation_prompt=m["role"] == "assistant") if i else ""
        through = _render(tokenizer, messages[: i + 1])
        if full.startswith(through) and through.startswith(before) and len(before) < len(through):
            spans.append((len(before), len(through)))
            cursor = len(through)
        else:  # a template that rewrites earlier turns: fall back to finding the content
            at = full.find(m["content"], cursor)
            if at >= 0 and m["content"]:
                spans.append((at, at + len(m["content"])))
                cursor = at + len(m["content"])
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [tok if _overlaps(start, end, spans) else IGNORE_INDEX
              for tok, (start, end) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def _overlaps(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """Whether the characters [start, end) of a token overlap a span (a zero-width token: lies inside one)."""
    if end <= start:
        return any(s <= start < e for s, e in spans)
    return any(start < e and end > s for s, e in spans)


def tokenize_record(tokenizer, record: dict, fmt: str, train_on_inputs: bool = False) -> tuple[list[int], list[int]]:
    if fmt == "alpaca":
        inp = record.get("input") or ""
        tmpl = ALPACA_PROMPT_WITH_INPUT if inp.strip() else ALPACA_PROMPT
        return _prompt_response(tokenizer, tmpl.format(instruction=record["instruction"], input=inp),
                                record["output"], train_on_inputs)
    if fmt == "prompt_completion" and is_conversational(record):
        fmt = "chat"
    if fmt == "prompt_completion":
        return _prompt_response(tokenizer, record["prompt"], record["completion"], train_on_inputs)
    if fmt == "text":
        return _text(tokenizer, record["text"])
    if fmt == "chat":
        messages, trained = chat_turns(record)
        return _chat(tokenizer, messages, train_on_inputs, trained)
    raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
