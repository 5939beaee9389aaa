"""Shared test configuration.

Markers: `gpu` (needs CUDA; skipped without it) and `slow` (end-to-end runs; run by default, deselect with
`-m "not slow"`). Fixtures here must stay cheap to import: torch is imported lazily inside fixtures."""

from __future__ import annotations

import importlib.util
import os

import pytest


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test reaches the network or writes into the user's caches."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    os.environ.setdefault("PYTHONHASHSEED", "0")


# -- tiny model, tokenizer and plans for `ftplan run` / `ftplan merge` tests (trainer/*) ---------------------------

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE trained on examples/*.jsonl with the `tokenizers` library, wrapped for transformers
    (BOS added like Llama's tokenizer, a chat template, a pad token)."""
    import glob
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for path in sorted(glob.glob(os.path.join(EXAMPLES_DIR, "*.jsonl"))):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                for v in rec.values():
                    if isinstance(v, str):
                        texts.append(v)
                    elif isinstance(v, list):
                        texts += [m["content"] for m in v]
    texts += ["### Instruction:\n", "\n\n### Input:\n", "\n\n### Response:\n"] * 60  # trainer/data.py's alpaca template
    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts * 3, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=TINY_CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A folder with the tiny tokenizer only (tokenizer.json, tokenizer_config.json with the chat template)."""
    d = tmp_path_factory.mktemp("tiny-tokenizer")
    _tiny_tokenizer().save_pretrained(d)
    return d


def _pretrain(model, tok, steps: int = 60):
    """A few steps of plain language modelling on examples/text.jsonl (about half a second), so that the tiny model
    is a (weak) language model rather than random weights: adapters then have features to adapt, and the tests'
    'loss goes down' checks have a clear margin."""
    import json

    import torch

    with open(os.path.join(EXAMPLES_DIR, "text.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from threads, and they stall on a busy machine
    try:
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(texts), (16,), generator=g)
            model(input_ids=enc.input_ids[idx], attention_mask=enc.attention_mask[idx],
                  labels=labels[idx]).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny Llama (hidden 64, 2 layers, GQA 4/2 heads, tied embeddings) built from its config, briefly pretrained
    on the example text, saved with `save_pretrained` (fp32) together with the tiny tokenizer: a local checkpoint
    folder that `from_pretrained` loads like a real one."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    _pretrain(model, tok)
    d = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write_tiny_plan(path, model_dir, *, method="lora", lr=None, max_steps=25, seq_len=64, batch_size=4, grad_accum=1,
                    save_steps=200, precision="fp32", fallback=(), seed=0, **train):
    """A plan file for the tiny model (what `ftplan recommend --save` writes, with CPU-sized numbers)."""
    from planner.config import TrainConfig
    from planner.planfile import PlanFile, Schedule, write_plan

    defaults = {"full": 1e-3, "lora": 5e-3, "prefix": 3e-2, "prompt": 1e-1, "ia3": 1e-1}
    extra = {"target_modules": ("q_proj", "v_proj"), "rank": 8, "num_virtual_tokens": 8}
    extra.update(train)
    tc = TrainConfig(method=method, precision=precision, seq_len=seq_len, batch_size=batch_size,
                     grad_accum=grad_accum, **extra)
    sched = Schedule(learning_rate=lr or defaults.get(method, 5e-3), max_steps=max_steps, warmup_ratio=0.1,
                     save_steps=save_steps, logging_steps=5, seed=seed)
    write_plan(PlanFile(model=str(model_dir), model_path=str(model_dir), train=tc, gpu="l4-24gb", schedule=sched,
                        fallback=list(fallback)), path)
    return path


@pytest.fixture
def tiny_plan(tmp_path, tiny_model_dir):
    """Factory: `tiny_plan(method="lora", **fields)` -> path of a plan.toml for the tiny model."""
    counter = iter(range(1000))

    def make(**kw):
        return write_tiny_plan(tmp_path / f"plan{next(counter)}.toml", tiny_model_dir, **kw)

    return make


TINY_LLAMA_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 128,
                     "tie_word_embeddings": False}


@pytest.fixture
def make_tiny_config(tmp_path):
    """`make_tiny_config(**overrides) -> Path` of a tiny Llama config.json (random weights are built from it)."""

    def make(**overrides):
        import json

        d = tmp_path / "tiny"
        d.mkdir(exist_ok=True)
        path = d / "config.json"
        path.write_text(json.dumps({**TINY_LLAMA_CONFIG, **overrides}))
        return path

    return make

