"""Training data for `ftplan run`: read, check, tokenize, truncate, pack, order and collate.

The formats (alpaca, chat, prompt_completion, text), detected from the first record's keys or forced with
`--format`, are listed in `planner.dataset`, where reading, checks and per-record tokenizing live (no torch, shared
with `ftplan estimate --data`). Sources: a JSON-lines file (`.jsonl`, or `.json` holding one array), or a folder written by `datasets`'
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
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

# reading, format detection, record checks and per-record tokenizing are torch-free and shared with `ftplan
# estimate --data` (planner/dataset.py); the names stay importable from here
from planner.dataset import (  # noqa: F401
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    CHAT_ROLES,
    FORMAT_KEYS,
    FORMATS,
    IGNORE_INDEX,
    MAX_REPORTED_ERRORS,
    DataError,
    _has_generation_blocks,
    _raise_errors,
    chat_messages,
    chat_turns,
    check_record,
    detect_format,
    is_conversational,
    read_checked,
    read_records,
    tokenize_record,
)

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


def load_dataset(path: str | Path, tokenizer, seq_len: int, *, fmt: str = "auto", train_on_inputs: bool = False,
                 packing: bool = False) -> Dataset:
    """Read, check every record, tokenize, truncate to `seq_len`, optionally pack. DataError on any problem."""
    rows, fmt, chat = read_checked(path, fmt, train_on_inputs)
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
