"""What a real dataset costs: its token counts, length distribution, padding, longest batch, and the time of its
real batches (`ftplan estimate/recommend --data`). No torch: files are read by `planner.dataset`, as `ftplan run`
reads them, and tokenized with the model's own tokenizer when it is on disk (a local folder, or the HF cache;
never the network), else estimated at `CHARS_PER_TOKEN`.

The batches `ftplan run` builds (trainer/data.py): examples truncated to `seq_len`; each epoch a fresh random
permutation, cut into micro-batches of `batch_size`; each micro-batch right-padded to its longest row rounded up to
`PAD_MULTIPLE` (at most `seq_len`); with packing, examples are first concatenated in file order into blocks of at
most `seq_len` tokens (an example is never split) and the blocks are batched the same way.

The time of a run is the sum over its optimizer steps, each `grad_accum` micro-batches plus the per-step work
(optimizer, communication). A micro-batch of padded length L takes t(L) = s(L, 2) - s(L, 1) and the per-step work
is s(S, 1) - t(S), where s(L, a) is `planner.cost.throughput`'s step time at seq_len L and grad_accum a (so
whatever the throughput model, the split is its own). The order of a run is random, so the time is its expectation:
a micro-batch of the shuffled stream is a uniformly random `batch_size`-subset of the examples, whose longest row is
the k-th shortest of n with probability C(k-1, b-1) / C(n, b) (`batch_length_distribution`). Not modelled: with
several GPUs each device's step is timed at the mean micro-batch, while the devices wait for the slowest at the
gradient all-reduce (an underestimate that grows with the spread of lengths and the GPU count); the partial last
micro-batch of an epoch is timed as a full one (the stream runs on into the next epoch, as trainer.data's does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .dataset import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, DataError, chat_turns, is_conversational, read_checked, \
    tokenize_record

# "A helpful rule of thumb is that one token generally corresponds to ~4 characters of text for common English
# text" (OpenAI, "What are tokens and how to count them", help.openai.com/en/articles/4936856). Code, non-English
# text and numbers take more tokens per character: the estimate is a stated guess, the tokenizer is the answer.
CHARS_PER_TOKEN = 4.0
CHARS_PER_TOKEN_SOURCE = "OpenAI, 'What are tokens and how to count them': ~4 characters per token of English text"
# a chat message's role markers and separators: "every message follows <|start|>{role/name}\n{content}<|end|>\n",
# 3 tokens per message plus the role's (openai-cookbook, examples/How_to_count_tokens_with_tiktoken.ipynb)
TOKENS_PER_MESSAGE = 4
SPECIAL_TOKENS = 2  # BOS (added by Llama-style tokenizers) and the EOS trainer/data.py appends
PAD_MULTIPLE = 8  # trainer.data.collate pads a batch's longest row up to a multiple of 8 (at most seq_len)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class TokenizerError(ValueError):
    """A tokenizer that was asked for (or found) and cannot be loaded."""


# -- tokenizer ------------------------------------------------------------------------------------------------------


def load_tokenizer(source: str | None, *, explicit: bool = False, revision: str = "main",
                   trust_remote_code: bool = False):
    """(tokenizer, how) from a local folder / file's folder or a Hugging Face id already in the HF cache
    (`local_files_only=True`: never the network); (None, why) when there is none and it was not `explicit`ly
    asked for. A tokenizer that exists and fails to load, or an explicit one that is missing: TokenizerError.
    transformers is imported here only, and only once a tokenizer is found: transformers 5.17 imports torch with
    its tokenizer classes (tokenization_utils_base -> modeling_gguf_pytorch_utils), seconds of start-up that a
    plain `estimate` / `recommend` never pays. Remote code runs only with `trust_remote_code`."""
    if not source:
        return None, "no tokenizer source"
    p = Path(source)
    if p.exists():
        folder = p if p.is_dir() else p.parent
        if not any((folder / n).exists() for n in TOKENIZER_FILES):
            if explicit:
                raise TokenizerError(f"{folder}: no tokenizer files (valid: a folder with one of "
                                     f"{', '.join(TOKENIZER_FILES)})")
            return None, f"no tokenizer files next to {p}"
        target, where = str(folder), "local"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ModuleNotFoundError:
            if explicit:
                raise TokenizerError(f"{source}: reading the HF cache needs huggingface_hub") from None
            return None, "huggingface_hub is not installed"
        from .hub import hub_cache_dir

        cache = hub_cache_dir()  # from the environment now, as planner.hub reads config.json
        try:
            found = [f for n in TOKENIZER_FILES
                     if isinstance(f := try_to_load_from_cache(source, n, cache_dir=str(cache), revision=revision), str)]
        except ValueError:  # not a valid repo id
            found = []
        if not found:
            if explicit:
                raise TokenizerError(f"{source}: not a folder, and not in the HF cache {cache} at revision {revision} "
                                     "(ftplan never downloads it: `hf download` it first, or give a folder)")
            return None, f"{source} is not in the HF cache"
        target, where = str(Path(found[0]).parent), "HF cache"  # the snapshot folder of that revision
    try:
        from transformers import AutoTokenizer
    except ModuleNotFoundError:
        if explicit:
            raise TokenizerError(f"{source}: loading a tokenizer needs transformers (pip install transformers)") from None
        return None, "transformers is not installed"
    try:
        tok = AutoTokenizer.from_pretrained(target, local_files_only=True, revision=revision,
                                            trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001  (any loader failure is the user's file: say which and why)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if trust_remote_code or "trust_remote_code" not in str(e) else " (it needs --trust-remote-code)"
        raise TokenizerError(f"{source}: cannot load the tokenizer ({type(e).__name__}: {first[:200]}){hint}") from None
    return tok, f"{type(tok).__name__} from {target} ({where})"


def estimated_tokens(record: dict, fmt: str) -> int:
    """Tokens of one record without a tokenizer: ceil(characters / CHARS_PER_TOKEN) of the text the trainer
    renders (alpaca's prompt template included), + TOKENS_PER_MESSAGE per chat message, + SPECIAL_TOKENS."""
    messages = 0
    if fmt == "prompt_completion" and is_conversational(record):
        fmt = "chat"
    if fmt == "alpaca":
        inp = record.get("input") or ""
        tmpl = ALPACA_PROMPT_WITH_INPUT if inp.strip() else ALPACA_PROMPT
        chars = len(tmpl.format(instruction=record["instruction"], input=inp)) + len(record["output"])
    elif fmt == "prompt_completion":
        chars = len(record["prompt"]) + len(record["completion"])
    elif fmt == "text":
        chars = len(record["text"])
    else:
        msgs, _ = chat_turns(record)
        chars = sum(len(m["content"]) for m in msgs)
        messages = len(msgs)
    return math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * messages + SPECIAL_TOKENS


# -- reading and counting -------------------------------------------------------------------------------------------


@dataclass
class DataStats:
    """Token lengths of every example (untruncated, in file order) and where each comes from (`file:line`)."""

    path: str
    format: str
    lengths: list
    where: list
    tokenized_by: str  # the tokenizer, or the estimate and its source
    estimated: bool
    notes: list = field(default_factory=list)
    _dist: dict = field(default_factory=dict, repr=False)

    def distribution(self, batch_size: int, seq_len: int, packing: bool) -> tuple[list, list]:
        """(units, batch_length_distribution) for this batch, length and packing; cached (recommend asks often)."""
        key = (batch_size, seq_len, packing)
        if key not in self._dist:
            lengths = self.truncated(seq_len)
            units = pack_lengths(lengths, seq_len) if packing else lengths
            self._dist[key] = (units, batch_length_distribution(units, batch_size, seq_len))
        return self._dist[key]

    @property
    def records(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def percentile(self, q: float) -> int:
        """The nearest-rank q-th percentile of the example lengths (q in 0..100)."""
        s = sorted(self.lengths)
        return s[max(0, math.ceil(q / 100 * len(s)) - 1)]

    def truncated(self, seq_len: int) -> list[int]:
        return [min(n, seq_len) for n in self.lengths]

    def longer_than(self, n: int) -> list[tuple[str, int]]:
        """(where, length) of the examples longer than `n` tokens, in file order."""
        return [(w, k) for w, k in zip(self.where, self.lengths) if k > n]


def read_stats(path: str, tokenizer=None, tokenized_by: str = "", *, fmt: str = "auto",
               train_on_inputs: bool = False, progress=None) -> DataStats:
    """Read and check every record as `ftplan run` does (DataError names file:line), then count each one's tokens
    with `tokenizer` (or estimate them). `progress(iterable) -> iterable` wraps the tokenizing loop."""
    rows, fmt, chat = read_checked(path, fmt, train_on_inputs)
    notes = []
    if tokenizer is not None and chat and not getattr(tokenizer, "chat_template", None):
        notes.append("the tokenizer has no chat template: chat records are estimated by characters")
        tokenizer = None
        tokenized_by = f"estimate: {CHARS_PER_TOKEN:g} characters per token ({CHARS_PER_TOKEN_SOURCE})"
    it = progress(rows) if progress else rows
    lengths = []
    for rec, _ in it:
        if tokenizer is None:
            lengths.append(estimated_tokens(rec, fmt))
        else:
            lengths.append(len(tokenize_record(tokenizer, rec, fmt, train_on_inputs)[0]))
    if tokenizer is None and not tokenized_by:
        tokenized_by = f"estimate: {CHARS_PER_TOKEN:g} characters per token ({CHARS_PER_TOKEN_SOURCE})"
    return DataStats(path=str(path), format=fmt, lengths=lengths, where=[w for _, w in rows],
                     tokenized_by=tokenized_by, estimated=tokenizer is None, notes=notes)


# -- batches --------------------------------------------------------------------------------------------------------


def padded_length(longest: int, seq_len: int, multiple: int = PAD_MULTIPLE) -> int:
    """A micro-batch's length as trainer.data.collate pads it: the longest row rounded up to `multiple`, at most
    `seq_len` (and never below the longest row)."""
    return max(longest, min(-(-longest // multiple) * multiple, seq_len))


def pack_lengths(lengths: list[int], seq_len: int) -> list[int]:
    """Block lengths of trainer.data.pack: examples concatenated in order, a block closed before it would pass
    `seq_len` (an example is never split)."""
    blocks, used = [], 0
    for n in lengths:
        if used and used + n > seq_len:
            blocks.append(used)
            used = 0
        used += n
    if used:
        blocks.append(used)
    return blocks


def batch_length_distribution(lengths: list[int], batch_size: int, seq_len: int) -> list[tuple[int, float]]:
    """[(padded length, probability)] of one micro-batch of the shuffled stream: a uniformly random
    `batch_size`-subset of the (truncated) rows, whose longest is the k-th shortest with probability
    C(k-1, b-1) / C(n, b). With fewer rows than the batch, every batch holds the longest."""
    s = sorted(min(n, seq_len) for n in lengths)
    n, b = len(s), min(batch_size, len(s))
    log_total = math.lgamma(n + 1) - math.lgamma(b + 1) - math.lgamma(n - b + 1)
    out: dict[int, float] = {}
    for k in range(b, n + 1):
        p = math.exp(math.lgamma(k) - math.lgamma(b) - math.lgamma(k - b + 1) - log_total)
        L = padded_length(s[k - 1], seq_len)
        out[L] = out.get(L, 0.0) + p
    return sorted(out.items())


def coarsen(dist: list[tuple[int, float]], buckets: int) -> list[tuple[int, float]]:
    """At most `buckets` (length, probability) points of equal probability mass, each at its group's mean length
    (rounded up): `recommend --data` times every candidate on these instead of on every distinct length."""
    if len(dist) <= buckets:
        return dist
    out, acc, acc_l, step, target = [], 0.0, 0.0, 1.0 / buckets, 1.0 / buckets
    for L, p in dist:
        acc += p
        acc_l += p * L
        if acc >= target - 1e-12:
            out.append((math.ceil(acc_l / acc), acc))
            target, acc, acc_l = step, 0.0, 0.0
    if acc > 0:
        out.append((math.ceil(acc_l / acc), acc))
    return out


@dataclass(frozen=True)
class DataTime:
    """Time of a run over a dataset (see the module docstring). `padding_waste`: the share of the padded tokens
    that are padding, expected over the shuffled batches."""

    seconds: float
    steps: int
    step_seconds: float
    units: int  # examples (or packed blocks) per epoch
    real_tokens: int  # per epoch, after truncation
    padded_tokens: float  # per epoch, expected
    longest_batch: int  # padded length of the longest possible micro-batch
    packed: bool

    @property
    def padding_waste(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def hours(self) -> float:
        return self.seconds / 3600.0


def micro_and_step_seconds(arch, tc, gpu, L: int) -> tuple[float, float]:
    """(t(L), per-step work) from planner.cost.throughput: t(L) = s(L, 2) - s(L, 1); work = s(L, 1) - t(L)."""
    from .cost import throughput

    s1 = throughput(arch, tc.replace(seq_len=L, grad_accum=1), gpu).step_seconds
    s2 = throughput(arch, tc.replace(seq_len=L, grad_accum=2), gpu).step_seconds
    return s2 - s1, 2 * s1 - s2


def data_time(arch, tc, gpu, stats: DataStats, epochs: float, *, packing: bool = False,
              buckets: int | None = None) -> DataTime:
    """Expected time of `epochs` passes over the dataset with `tc` on `gpu`: steps x (grad_accum x E[t(L)] +
    per-step work), steps = ceil(epochs x units / (batch x grad_accum x GPUs)) as trainer.data.steps_for.
    `buckets`: time on at most that many lengths (`coarsen`) instead of every distinct one."""
    units, full = stats.distribution(tc.batch_size, tc.seq_len, packing)
    dist = coarsen(full, buckets) if buckets else full
    per_step = tc.batch_size * tc.grad_accum * tc.num_gpus
    steps = max(1, math.ceil(epochs * len(units) / per_step))
    micro = 0.0
    for L, p in dist:
        micro += p * micro_and_step_seconds(arch, tc, gpu, L)[0]
    longest = dist[-1][0]
    work = micro_and_step_seconds(arch, tc, gpu, longest)[1]
    step = tc.grad_accum * micro + work
    mean_padded = sum(L * p for L, p in full)
    padded = len(units) * mean_padded  # n / b micro-batches of b rows per epoch
    return DataTime(seconds=steps * step, steps=steps, step_seconds=step, units=len(units), real_tokens=sum(units),
                    padded_tokens=padded, longest_batch=padded_length(max(units), tc.seq_len), packed=packing)


def padding_waste(stats: DataStats, batch_size: int, seq_len: int, packing: bool) -> float:
    """Expected share of padding in the padded micro-batches (1 - real tokens / padded tokens)."""
    units, dist = stats.distribution(batch_size, seq_len, packing)
    mean_padded = sum(L * p for L, p in dist)
    return 1.0 - (sum(units) / len(units)) / mean_padded


__all__ = [
    "CHARS_PER_TOKEN",
    "DataError",
    "DataStats",
    "DataTime",
    "TokenizerError",
    "batch_length_distribution",
    "data_time",
    "estimated_tokens",
    "load_tokenizer",
    "pack_lengths",
    "padded_length",
    "padding_waste",
    "read_stats",
]
