"""ftplan's training-loop overhead: the same tiny configuration through `ftplan run` and through a plain, hand-written
transformers `Trainer` + peft script; prints the steady-state step times and their ratio.

    .venv/bin/python benchmarks/run_overhead.py                 # CPU, about 2 minutes on 2 cores
    .venv/bin/python benchmarks/run_overhead.py --steps 80 --repeats 3 --threads 2

Both arms train the same saved model (a Llama with hidden 256, 4 layers, random weights) with LoRA r16 on q_proj,v_proj,
fp32, torch AdamW, lr 2e-4 with warm-up + cosine, clipping 1.0, micro-batch 4 of 256 tokens (every sequence full
length, so both see the same shapes), on the same tokenized text, each in its own process, alternating arms. A step's
time is the wall time between consecutive optimizer-step ends (data, forward, backward, optimizer, and whatever the
loop does around them: logging, callbacks, progress); the first `--skip` steps are left out, then the median.
The result: median ftplan / median Trainer; the target is <= 1.02 (exit code 1 above `--tolerance`).

Differences that cost nothing measurable: the Trainer arm's AdamW has weight_decay 0 (TrainingArguments' default),
ftplan's the torch default 0.01 (the recipe's `make_optimizer`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEQ, BATCH, RANK, LR = 256, 4, 16, 2e-4


def build(workdir: Path) -> None:
    """Tokenizer (BPE trained on examples/), model (random weights, seed 0), data (text rows of >= 2 x SEQ tokens),
    and the plan file."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = []
    for path in sorted(glob.glob(str(ROOT / "examples" / "*.jsonl"))):
        for line in open(path):
            for v in json.loads(line).values():
                texts += [v] if isinstance(v, str) else [m["content"] for m in v]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                      bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                      pad_token_id=hf_tok.pad_token_id)
    torch.manual_seed(0)
    model_dir = workdir / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    hf_tok.save_pretrained(model_dir)

    import random

    rng = random.Random(0)
    sentences = [json.loads(line)["text"] for line in open(ROOT / "examples" / "text.jsonl")]
    with open(workdir / "train.jsonl", "w") as f:
        for _ in range(400):
            f.write(json.dumps({"text": " ".join(rng.choice(sentences) for _ in range(30))}) + "\n")

    sys.path.insert(0, str(ROOT))
    from planner.config import TrainConfig
    from planner.planfile import PlanFile, Schedule, write_plan

    tc = TrainConfig(method="lora", precision="fp32", rank=RANK, target_modules=("q_proj", "v_proj"), seq_len=SEQ,
                     batch_size=BATCH, optimizer="adamw")
    write_plan(PlanFile(model=str(model_dir), model_path=str(model_dir), train=tc, gpu="l4-24gb",
                        schedule=Schedule(learning_rate=LR, warmup_ratio=0.03, save_steps=10_000, logging_steps=10)),
               workdir / "plan.toml")


def arm_ftplan(workdir: Path, steps: int, out: Path) -> list[float]:
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cmd = [sys.executable, "-c", "from planner.cli import cli; cli()", "run", str(workdir / "plan.toml"),
           "--data", str(workdir / "train.jsonl"), "--output-dir", str(out), "--device", "cpu",
           "--max-steps", str(steps), "--no-progress", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"ftplan run failed:\n{r.stderr[-3000:]}")
    times = [json.loads(line)["time"] for line in (out / "trainer_log.jsonl").read_text().splitlines()
             if '"loss"' in line]
    return [b - a for a, b in zip(times, times[1:])]


TRAINER_SCRIPT = r'''
import json, sys, time
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

workdir, steps, seq, batch, rank, lr = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
tok = AutoTokenizer.from_pretrained(f"{workdir}/model")
rows = [json.loads(l)["text"] for l in open(f"{workdir}/train.jsonl")]
enc = [tok(t + tok.eos_token, truncation=True, max_length=seq)["input_ids"] for t in rows]
train = [{"input_ids": ids, "labels": list(ids)} for ids in enc]

def collate(features):
    n = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), n), tok.pad_token_id)
    labels = torch.full((len(features), n), -100)
    mask = torch.zeros((len(features), n), dtype=torch.long)
    for i, f in enumerate(features):
        k = len(f["input_ids"])
        ids[i, :k] = torch.tensor(f["input_ids"]); labels[i, :k] = torch.tensor(f["labels"]); mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(f"{workdir}/model", dtype=torch.float32, attn_implementation="sdpa")
model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                                         target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))

class Clock(TrainerCallback):
    def __init__(self): self.ends = []
    def on_step_end(self, args, state, control, **kw): self.ends.append(time.perf_counter())

clock = Clock()
args = TrainingArguments(output_dir=f"{workdir}/trainer-out", per_device_train_batch_size=batch, max_steps=steps,
                         learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0.03, max_grad_norm=1.0,
                         optim="adamw_torch", logging_steps=10, save_strategy="no", report_to=[], use_cpu=True,
                         dataloader_num_workers=0, seed=0, disable_tqdm=True, remove_unused_columns=False)
Trainer(model=model, args=args, train_dataset=train, data_collator=collate, callbacks=[clock]).train()
print(json.dumps([b - a for a, b in zip(clock.ends, clock.ends[1:])]))
'''


def arm_trainer(workdir: Path, steps: int) -> list[float]:
    r = subprocess.run([sys.executable, "-c", TRAINER_SCRIPT, str(workdir), str(steps), str(SEQ), str(BATCH),
                        str(RANK), str(LR)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"Trainer script failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    ap.add_argument("--skip", type=int, default=10, help="first steps left out (warm-up)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per arm (alternating)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1: steadiest on a busy machine)")
    ap.add_argument("--tolerance", type=float, default=0.02, help="allowed overhead (0.02 = 2%%)")
    ap.add_argument("--workdir", default=None, help="keep the model, data and outputs here")
    args = ap.parse_args()
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                      TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ftplan-overhead-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    build(workdir)
    runs = {"ftplan": [], "trainer": []}
    for i in range(args.repeats):
        for arm in (("ftplan", "trainer") if i % 2 == 0 else ("trainer", "ftplan")):
            steps = (arm_ftplan(workdir, args.steps, workdir / f"ftplan-{i}") if arm == "ftplan"
                     else arm_trainer(workdir, args.steps))
            steady = steps[args.skip:]
            runs[arm].append(statistics.median(steady))
            print(f"  run {i + 1} {arm:8} median step {1e3 * runs[arm][-1]:8.2f} ms  "
                  f"(steps {args.skip + 2}-{args.steps}, min {1e3 * min(steady):.2f}, max {1e3 * max(steady):.2f})",
                  flush=True)
    f, t = statistics.median(runs["ftplan"]), statistics.median(runs["trainer"])
    ratio = f / t
    print(f"\nconfig   Llama hidden 256 x 4 layers, LoRA r{RANK} q_proj,v_proj, fp32, batch {BATCH} x {SEQ} tokens, "
          f"CPU, {args.threads} thread(s), {args.steps} steps x {args.repeats} runs per arm")
    print(f"ftplan   median step {1e3 * f:8.2f} ms")
    print(f"Trainer  median step {1e3 * t:8.2f} ms")
    verdict = "OK" if ratio <= 1 + args.tolerance else "OVER"
    print(f"ratio    ftplan / Trainer = {ratio:.4f}  (overhead {100 * (ratio - 1):+.2f}%, target <= "
          f"{100 * args.tolerance:g}%: {verdict})   [{time.time() - t0:.0f} s; work dir {workdir}]")
    return 0 if verdict == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
