"""`--data` time vs the sum over the real batches `ftplan run` builds, and vs the old full-rows figure.

    python benchmarks/data_time_bench.py      # needs the train extra (torch, transformers, tokenizers)

For 3 seeded 600-row text files (tests/test_datastats.py's generator, lengths with a long tail), the tiny BPE
tokenizer of tests/conftest.py, Llama-3.1-8B LoRA on an H100 at seq 128, with and without packing, at b4 x 2 and
b8 x 1: `ftplan estimate --data` (the expectation over shuffled batches) against the real batches of
trainer/data.py (ExampleOrder seed 0, collate), and against dataset tokens / full-row tokens/s (what
`--dataset-tokens` gives).
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> int:
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    import conftest
    import test_datastats as T
    from planner.cli import cli
    from planner.config import TrainConfig
    from planner.profiles import load_gpu, load_model
    from trainer import data as D

    tmp = pathlib.Path(tempfile.mkdtemp())
    tokdir = tmp / "tok"
    conftest._tiny_tokenizer().save_pretrained(tokdir)
    tok = AutoTokenizer.from_pretrained(tokdir)
    worst = 0.0
    for seed in (0, 1, 2):
        path = T._text_file(tmp / f"t{seed}.jsonl", seed=seed)
        for packing in (False, True):
            for batch, accum in ((4, 2), (8, 1)):
                args = ["estimate", "--model", "8b", "--method", "lora", "--gpu", "h100", "--seq-len", "128",
                        "--batch-size", str(batch), "--grad-accum", str(accum), "--epochs", "3", "--data", str(path),
                        "--tokenizer", str(tokdir), "--json"] + (["--packing"] if packing else [])
                d = json.loads(CliRunner().invoke(cli, args).output)
                ds = D.load_dataset(path, tok, 128, packing=packing)
                tc = TrainConfig(method="lora", seq_len=128, batch_size=batch, grad_accum=accum)
                real, _ = T._real_batches_seconds(load_model("8b"), tc, load_gpu("h100"), ds.examples, 3,
                                                  tok.pad_token_id)
                pred = d["hours"] * 3600
                full = d["data"]["tokens_after_truncation"] * 3 / d["tokens_per_s"]
                worst = max(worst, abs(pred / real - 1))
                print(f"seed {seed} {'packed  ' if packing else 'unpacked'} b{batch}x{accum}: --data {pred:6.1f} s, "
                      f"real batches {real:6.1f} s ({100 * (pred / real - 1):+.2f}%); full rows {full:6.1f} s "
                      f"({100 * (full / real - 1):+.1f}%)")
    print(f"worst |--data / real batches - 1| = {100 * worst:.2f}%  (target <= 2%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
