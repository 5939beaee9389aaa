"""Training data for `ftplan run`: read, check, tokenize, truncate, pack, order and collate.

Formats (detected from the first record's keys, or forced with `--format`):

    alpaca             {"instruction": ..., "input": ... (optional), "output": ...}
    chat               {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}
                       (ShareGPT's {"conversations": [{"from": "human" | "gpt", "value": ...}]} is read as chat,
                       and so is TRL's conversational prompt/completion {"prompt": [messages], "completion":
                       [messages]}: the completion's messages are trained)
    prompt_completion  {"prompt": ..., "completion": ...}
    text               {"text": ...}

Sources: a JSON-lines file (`.jsonl`, or `.json` holding one array), or a folder written by `datasets`'
`save_to_disk` (its `train` split, or its only split). Every record is checked before anything is tokenized; a
problem is a `DataError` naming `file:line` (up to 10 at once), raised before the model is loaded.

Loss is on the response only by default (alpaca `output`, `completion`, assistant turns); `text` trains on every
token; `train_on_inputs=True` trains on everything. Chat turns are masked by character offsets: the rendered
conversation is tokenized with its offsets mapping and a token is trained when its characters overlap an assistant
turn (so a token that starts inside the generation prompt, e.g. after a trailing space, and ends in the answer is
trained); a template with `{% generation %}` blocks is masked by the tokenizer's own `return_assistant_tokens_mask`. Sequences longer than the plan's `seq_len` are truncated and
counted. With `packing`, examples are concatenated in order into blocks of at most `seq_len` tokens; each keeps its
own positions (`position_ids` restart at 0), from which transformers builds a block-diagonal attention mask (the
batch passes `use_cache=False`: with a KV cache transformers skips that detection), so packed examples never attend
to each other.

Order: one permutation of the examples per epoch (seeded), concatenated into an endless stream; optimizer step `s`
takes stream positions `[s*E, (s+1)*E)` with `E = batch_size * grad_accum * world_size`. The data position is thus a
function of the step alone, which makes resume exact, and a fallback plan with the same effective batch sees exactly
the same examples in each optimizer step.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

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


@dataclass
class Dataset:
    """Tokenized examples (each a dict of 1-D int64 tensors: input_ids, labels and, when packed, position_ids)."""

    examples: list
    format: str
    path: str
    records: int
    truncated: int = 0
    dropped: int = 0
    packed: bool = False
    tokens: int = 0
    trained_tokens: int = 0
    max_tokens: int = 0
    fingerprint: str = ""
    notes: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def summary(self) -> dict:
        return {
            "path": self.path,
            "format": self.format,
            "records": self.records,
            "examples": len(self.examples),
            "packed": self.packed,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "mean_tokens": round(self.tokens / max(1, len(self.examples)), 1),
            "max_tokens": self.max_tokens,
            "fingerprint": self.fingerprint,
        }


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


def _check(record: dict, fmt: str, train_on_inputs: bool) -> str | None:
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


def load_dataset(path: str | Path, tokenizer, seq_len: int, *, fmt: str = "auto", train_on_inputs: bool = False,
                 packing: bool = False) -> Dataset:
    """Read, check every record, tokenize, truncate to `seq_len`, optionally pack. DataError on any problem."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; valid: auto, {', '.join(FORMATS)}")
    rows = read_records(path)
    if fmt == "auto":
        fmt = detect_format(rows[0][0], rows[0][1])
    errors = []
    for rec, where in rows:
        problem = _check(rec, fmt, train_on_inputs)
        if problem:
            errors.append(f"{where}: {problem} ({fmt} format needs {FORMAT_KEYS[fmt]})")
    _raise_errors(errors)
    chat = fmt == "chat" or (fmt == "prompt_completion" and any(is_conversational(r) for r, _ in rows))
    if chat and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{path}: the chat format needs a tokenizer with a chat template, and this tokenizer has "
                        "none (add one to tokenizer_config.json, or use --format text)")
    if tokenizer.eos_token_id is None:
        notes = ["the tokenizer has no EOS token: sequences end without one"]
    else:
        notes = []

    examples, truncated, dropped = [], 0, 0
    for rec, where in rows:
        ids, labels = tokenize_record(tokenizer, rec, fmt, train_on_inputs)
        if len(ids) > seq_len:
            truncated += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
        if not any(x != IGNORE_INDEX for x in labels[1:]):  # labels[0] is never predicted (causal shift)
            dropped += 1
            continue
        examples.append({"input_ids": torch.tensor(ids, dtype=torch.long),
                         "labels": torch.tensor(labels, dtype=torch.long)})
    if not examples:
        raise DataError(f"{path}: no example has a response token left within seq_len {seq_len} "
                        f"({dropped} dropped); raise --seq-len")
    ds = Dataset(examples=examples, format=fmt, path=str(path), records=len(rows), truncated=truncated,
                 dropped=dropped, notes=notes)
    if packing:
        ds.examples = pack(examples, seq_len)
        ds.packed = True
    ds.tokens = sum(len(e["input_ids"]) for e in ds.examples)
    ds.trained_tokens = sum(int((e["labels"][1:] != IGNORE_INDEX).sum()) for e in ds.examples)
    ds.max_tokens = max(len(e["input_ids"]) for e in ds.examples)
    ds.fingerprint = fingerprint(ds.examples)
    return ds


def pack(examples: list[dict], seq_len: int) -> list[dict]:
    """Concatenate examples, in order, into blocks of at most `seq_len` tokens (an example is never split). Each
    example's positions restart at 0 and its first label is ignored, so nothing crosses an example boundary."""
    blocks, cur = [], []
    used = 0
    for e in examples:
        n = len(e["input_ids"])
        if cur and used + n > seq_len:
            blocks.append(_concat(cur))
            cur, used = [], 0
        cur.append(e)
        used += n
    if cur:
        blocks.append(_concat(cur))
    return blocks


def _concat(parts: list[dict]) -> dict:
    labels = []
    for e in parts:
        lab = e["labels"].clone()
        lab[0] = IGNORE_INDEX
        labels.append(lab)
    return {
        "input_ids": torch.cat([e["input_ids"] for e in parts]),
        "labels": torch.cat(labels),
        "position_ids": torch.cat([torch.arange(len(e["input_ids"])) for e in parts]),
    }


def fingerprint(examples: list[dict]) -> str:
    """sha256 of the token ids and labels, in order: resume checks that the data did not change."""
    h = hashlib.sha256()
    for e in examples:
        h.update(e["input_ids"].numpy().tobytes())
        h.update(e["labels"].numpy().tobytes())
    return h.hexdigest()[:16]


# -- batches ---------------------------------------------------------------------------------------------------------


def collate(examples: list[dict], pad_id: int, *, pad_to_multiple_of: int = 8, max_len: int | None = None) -> dict:
    """Right-pad to the longest example (rounded up to `pad_to_multiple_of`, at most `max_len`). Unpacked batches
    get an attention mask; packed ones get position_ids instead (the padding forms its own block), labels -100 on
    padding. Packed batches also carry `use_cache=False` (see below)."""
    longest = max(len(e["input_ids"]) for e in examples)
    n = -(-longest // pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of > 1 else longest
    if max_len is not None:
        n = max(longest, min(n, max_len))
    b = len(examples)
    input_ids = torch.full((b, n), pad_id, dtype=torch.long)
    labels = torch.full((b, n), IGNORE_INDEX, dtype=torch.long)
    packed = "position_ids" in examples[0]
    if packed:
        position_ids = torch.arange(n, dtype=torch.long).repeat(b, 1)
    else:
        attention_mask = torch.zeros((b, n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[i, :k] = e["input_ids"]
        labels[i, :k] = e["labels"]
        if packed:
            position_ids[i, :k] = e["position_ids"]
            position_ids[i, k:] = torch.arange(n - k)
        else:
            attention_mask[i, :k] = 1
    batch = {"input_ids": input_ids, "labels": labels}
    if packed:
        batch["position_ids"] = position_ids
        # transformers derives the block-diagonal mask from position_ids only without a KV cache, and a training
        # forward builds one when config.use_cache is true
        batch["use_cache"] = False
    else:
        batch["attention_mask"] = attention_mask
    return batch


def batch_tokens(examples: list[dict]) -> int:
    """Real (unpadded) tokens of a micro-batch: what tokens/s counts."""
    return sum(len(e["input_ids"]) for e in examples)


class ExampleOrder:
    """The endless example stream: epoch `k` is a permutation of range(n) seeded by (seed, k)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        if n <= 0:
            raise ValueError("no examples")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._epoch, self._perm = None, None

    def perm(self, epoch: int) -> list[int]:
        if self._epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.n, generator=g).tolist()
            else:
                self._perm = list(range(self.n))
            self._epoch = epoch
        return self._perm

    def position(self, stream_index: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of a stream position."""
        return divmod(stream_index, self.n)

    def take(self, start: int, count: int) -> list[int]:
        out = []
        while count > 0:
            epoch, i = self.position(start)
            chunk = self.perm(epoch)[i: i + count]
            out += chunk
            start += len(chunk)
            count -= len(chunk)
        return out


def micro_batch_indices(order: ExampleOrder, step: int, micro: int, *, batch_size: int, grad_accum: int,
                        world_size: int = 1, rank: int = 0) -> list[int]:
    """Example indices of micro-step `micro` (0-based) of optimizer step `step` (0-based) on `rank`."""
    per_step = batch_size * grad_accum * world_size
    start = step * per_step + (micro * world_size + rank) * batch_size
    return order.take(start, batch_size)


def steps_for(n_examples: int, *, epochs: float, max_steps: int, per_step: int) -> int:
    """Optimizer steps of a run: `max_steps` when set, else ceil(epochs x examples / examples per step)."""
    if max_steps and max_steps > 0:
        return int(max_steps)
    return max(1, math.ceil(epochs * n_examples / per_step))
