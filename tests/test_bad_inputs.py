"""A corpus of bad inputs, as a new user types them: every command, flag, plan-file field, training-data shape and
model config file. Each must exit 2 with a message that names the field and the valid range or choices, and never
show a Python traceback. `ftplan run` cases all fail before a model is loaded (the tiny tokenizer is the only thing
read), so the corpus stays fast."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from planner.cli import cli

from conftest import EXAMPLES_DIR, TINY_LLAMA_CONFIG


class Env:
    """Files the cases point at, all under one temporary folder."""

    def __init__(self, root: Path, model_dir: Path):
        self.root = root
        self.model_dir = model_dir
        self.n = 0
        self.good_data = str(Path(EXAMPLES_DIR) / "alpaca.jsonl")
        (root / "a-file").write_text("not a folder\n")

    def path(self, name: str) -> str:
        self.n += 1
        return str(self.root / f"{self.n}-{name}")

    def file(self, name: str, content) -> str:
        p = self.path(name)
        if isinstance(content, bytes):
            Path(p).write_bytes(content)
        else:
            Path(p).write_text(content)
        return p

    def jsonl(self, rows, name="train.jsonl") -> str:
        return self.file(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))

    def config(self, content=None, **overrides) -> str:
        """A config.json in its own folder (content: raw text/bytes, else the tiny config with overrides)."""
        d = Path(self.path("cfg"))
        d.mkdir()
        if content is None:
            content = json.dumps({k: v for k, v in {**TINY_LLAMA_CONFIG, **overrides}.items() if v is not None})
        p = d / "config.json"
        (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
        return str(p)

    def empty_dir(self) -> str:
        d = self.path("empty")
        Path(d).mkdir()
        return d

    @property
    def unwritable(self) -> str:
        """A path whose parent is a regular file: not writable even by root."""
        return str(self.root / "a-file" / "out")

    def plan(self, edits: dict | None = None, *, raw: str | None = None) -> str:
        """A plan file for the tiny model; `edits` maps 'table.key' (or a top-level key) to a raw TOML value, None
        deletes it, a table name mapped to None deletes the table; 'fallback' maps to a list of dicts of raw values."""
        if raw is not None:
            return self.file("plan.toml", raw)
        doc = {
            "": {"version": "1"},
            "model": {"ref": json.dumps(str(self.model_dir)), "path": json.dumps(str(self.model_dir))},
            "train": {"method": '"lora"', "precision": '"fp32"', "rank": "8", "lora_dropout": "0.05",
                      "target_modules": '["q_proj", "v_proj"]', "num_virtual_tokens": "8", "seq_len": "64",
                      "batch_size": "4", "grad_accum": "1", "grad_ckpt": "false", "optimizer": '"adamw"',
                      "num_gpus": "1", "strategy": '"ddp"', "cpu_offload": "false"},
            "schedule": {"learning_rate": "0.005", "epochs": "1.0", "max_steps": "2", "warmup_ratio": "0.1",
                         "lr_scheduler": '"cosine"', "max_grad_norm": "1.0", "save_steps": "200",
                         "logging_steps": "5", "seed": "0"},
        }
        fallback = []
        for key, value in (edits or {}).items():
            if key == "fallback":
                fallback = value
                continue
            table, _, field = key.rpartition(".")
            if not table and field in doc and value is None:
                del doc[field]
                continue
            if value is None:
                doc[table].pop(field, None)
            else:
                doc.setdefault(table, {})[field] = value
        lines = []
        for table, fields in doc.items():
            if table:
                lines.append(f"[{table}]")
            lines += [f"{k} = {v}" for k, v in fields.items()]
            lines.append("")
        for fb in fallback:
            lines.append("[[fallback]]")
            lines += [f"{k} = {v}" for k, v in fb.items()]
            lines.append("")
        return self.file("plan.toml", "\n".join(lines))

    def run(self, *extra, plan=None, data=None, out=None) -> list:
        return ["run", plan or self.plan(), "--data", data or self.good_data, "--output-dir",
                out or self.path("out"), "--device", "cpu", "--no-progress", *extra]

    def run_dir(self, kind="adapter") -> str:
        d = Path(self.path("run"))
        d.mkdir()
        if kind == "adapter":
            (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8,
                                                               "base_model_name_or_path": str(self.model_dir)}))
        return str(d)


def C(case_id, args, field, valid, marks=()):
    """One case: `args` (a list, or a function of the Env returning one); the output must contain `field` and `valid`
    (plain substrings, whitespace-normalized)."""
    return pytest.param(args, field, valid, id=case_id, marks=marks)


M = ["estimate", "--model", "8b"]
R = ["recommend", "--model", "8b", "--gpu", "a100-80"]
CAL = ["calibrate", "--device", "cpu", "--timeout", "30"]  # a case that measured after all would stop soon
REP = ["report", "--model", "8b", "--gpu", "a100-80"]

CASES = [
    # -- top level and catalog ---------------------------------------------------------------------------------
    C("no-such-command", ["estimat"], "estimat", "estimate"),
    C("top-unknown-option", ["--bogus"], "--bogus", "--version"),
    C("gpus-show-unknown", ["gpus", "show", "a100-8"], "NAME", "a100-80"),
    C("gpus-show-missing-arg", ["gpus", "show"], "NAME", "Missing argument"),
    C("gpus-bad-subcommand", ["gpus", "frob"], "frob", "list, show"),
    C("gpus-list-extra-arg", ["gpus", "list", "extra"], "extra", "Got unexpected extra argument"),
    C("gpus-list-bad-option", ["gpus", "list", "--bogus"], "--bogus", "--json"),
    C("models-show-unknown", ["models", "show", "nope-13b"], "--model", "ftplan models list"),
    C("models-show-missing-arg", ["models", "show"], "REF", "Missing argument"),
    C("models-list-bad-option", ["models", "list", "--all"], "--all", "--json"),
    C("models-bad-subcommand", ["models", "delete"], "delete", "list, show"),
    # -- estimate: flags -------------------------------------------------------------------------------------
    C("est-missing-model", ["estimate"], "--model", "Missing option"),
    C("est-model-typo", ["estimate", "--model", "lama-2-7b"], "--model", "llama-2-7b"),
    C("est-model-empty", ["estimate", "--model", ""], "--model", "ftplan models list"),
    C("est-gpu-typo", [*M, "--gpu", "a100-8"], "--gpu", "a100-80"),
    C("est-method", [*M, "--method", "banana"], "--method", "'full', 'lora'"),
    C("est-precision", [*M, "--precision", "fp8"], "--precision", "'bf16', 'mixed', 'fp32'"),
    C("est-optimizer", [*M, "--optimizer", "adam"], "--optimizer", "'adamw'"),
    C("est-attn", [*M, "--attn", "flash"], "--attn", "'sdpa', 'eager', 'flash_attention_2'"),
    C("est-attn-fa2-t4", [*M, "--gpu", "t4", "--attn", "flash_attention_2"], "--attn", "valid on it: sdpa, eager"),
    C("est-attn-fa2-v100", [*M, "--gpu", "v100", "--attn", "flash_attention_2"], "--attn", "sm70"),
    C("est-attn-fa2-fp32", [*M, "--method", "full", "--precision", "fp32", "--attn", "flash_attention_2"], "--precision",
      "valid: bf16, mixed"),
    C("est-strategy", [*M, "--strategy", "zero4"], "--strategy", "'zero3'"),
    C("est-rank-zero", [*M, "--rank", "0"], "--rank", "positive integer"),
    C("est-rank-negative", [*M, "--rank", "-4"], "--rank", "positive integer"),
    C("est-rank-text", [*M, "--rank", "sixteen"], "--rank", "integer"),
    C("est-rank-too-big", [*M, "--rank", "9000", "--target-modules", "q_proj"], "--rank", "4096"),
    C("est-alpha-zero", [*M, "--lora-alpha", "0"], "--lora-alpha", "> 0"),
    C("est-alpha-text", [*M, "--lora-alpha", "x"], "--lora-alpha", "integer"),
    C("est-dropout-one", [*M, "--lora-dropout", "1.0"], "--lora-dropout", "[0, 1)"),
    C("est-dropout-negative", [*M, "--lora-dropout", "-0.1"], "--lora-dropout", "[0, 1)"),
    C("est-dropout-text", [*M, "--lora-dropout", "lots"], "--lora-dropout", "float"),
    C("est-targets-unknown", [*M, "--target-modules", "query,value"], "--target-modules", "q_proj"),
    C("est-targets-all-linear-mixed", [*M, "--target-modules", "all-linear,q_proj"], "--target-modules", "all-linear"),
    C("est-targets-empty", [*M, "--target-modules", ","], "--target-modules", "all-linear"),
    C("est-ia3-targets", [*M, "--method", "ia3", "--target-modules", "q_proj"], "--target-modules", "k_proj, v_proj"),
    C("est-vtokens-zero", [*M, "--method", "prefix", "--num-virtual-tokens", "0"], "--num-virtual-tokens",
      "positive integer"),
    C("est-vtokens-million", [*M, "--method", "prefix", "--num-virtual-tokens", "1000000"], "--num-virtual-tokens",
      "at most 131072"),
    C("est-prompt-vtokens-million", [*M, "--method", "prompt", "--num-virtual-tokens", "1000000"],
      "--num-virtual-tokens", "at most 131072"),
    C("est-seq-zero", [*M, "--seq-len", "0"], "--seq-len", "positive integer"),
    C("est-seq-negative", [*M, "--seq-len", "-1"], "--seq-len", "positive integer"),
    C("est-seq-text", [*M, "--seq-len", "2k"], "--seq-len", "integer"),
    C("est-seq-billion", [*M, "--seq-len", "1000000000"], "--seq-len", "at most 524288"),
    C("est-seq-beyond-cap", ["estimate", "--model", "llama-2-7b", "--seq-len", "16385"], "--seq-len",
      "at most 16384"),
    C("est-batch-zero", [*M, "--batch-size", "0"], "--batch-size", "positive integer"),
    C("est-batch-negative", [*M, "--batch-size", "-2"], "--batch-size", "positive integer"),
    C("est-accum-zero", [*M, "--grad-accum", "0"], "--grad-accum", "positive integer"),
    C("est-gpus-zero", [*M, "--num-gpus", "0"], "--num-gpus", "positive integer"),
    C("est-gpus-text", [*M, "--num-gpus", "two"], "--num-gpus", "integer"),
    C("est-offload-ddp", [*M, "--num-gpus", "2", "--cpu-offload"], "--cpu-offload", "fsdp, zero1, zero2, zero3"),
    C("est-qlora-fp32", [*M, "--method", "qlora", "--precision", "fp32"], "--precision", "valid: bf16"),
    C("est-prefix-ckpt", [*M, "--method", "prefix", "--grad-ckpt"], "--grad-ckpt", "--no-grad-ckpt"),
    C("est-tokens-word", [*M, "--dataset-tokens", "lots"], "--dataset-tokens", "50M"),
    C("est-tokens-zero", [*M, "--dataset-tokens", "0"], "--dataset-tokens", "positive"),
    C("est-tokens-negative", [*M, "--dataset-tokens", "-5M"], "--dataset-tokens", "50M"),
    C("est-epochs-zero", [*M, "--epochs", "0"], "--epochs", "> 0"),
    C("est-epochs-negative", [*M, "--epochs", "-1"], "--epochs", "> 0"),
    C("est-epochs-text", [*M, "--epochs", "three"], "--epochs", "float"),
    C("est-provider", [*M, "--gpu", "a100-80", "--dataset-tokens", "1M", "--provider", "nowhere"], "--provider",
      "Lambda"),
    C("est-unknown-option", [*M, "--ranks", "8"], "--ranks", "--rank"),
    C("est-flag-with-value", [*M, "--grad-ckpt=yes"], "--grad-ckpt", "does not take a value"),
    C("est-missing-value", [*M, "--rank"], "--rank", "requires an argument"),
    # -- model config files ------------------------------------------------------------------------------------
    C("cfg-missing-file", lambda e: ["estimate", "--model", e.path("config.json")], "--model", "no such file"),
    C("cfg-folder-without-config", lambda e: ["estimate", "--model", str(e.root)], "--model", "config.json"),
    C("cfg-invalid-json", lambda e: ["estimate", "--model", e.config("{not json")], "--model", "valid JSON"),
    C("cfg-empty", lambda e: ["estimate", "--model", e.config("")], "--model", "valid JSON"),
    C("cfg-not-utf8", lambda e: ["estimate", "--model", e.config(b'{"model_type": "llama\xff"}')], "--model",
      "UTF-8"),
    C("cfg-list", lambda e: ["estimate", "--model", e.config("[1, 2]")], "--model", "JSON object"),
    C("cfg-no-model-type", lambda e: ["estimate", "--model", e.config(model_type=None)], "--model", "model_type"),
    C("cfg-bert", lambda e: ["estimate", "--model", e.config(model_type="bert", architectures=["BertForMaskedLM"])],
      "--model", "ForCausalLM"),
    C("cfg-unsupported-family", lambda e: ["estimate", "--model", e.config(model_type="gpt_neox", architectures=None)],
      "--model", "valid: llama"),
    C("cfg-intermediate-negative", lambda e: ["estimate", "--model", e.config(intermediate_size=-3)],
      "intermediate_size", "positive integer"),
    C("cfg-hidden-text", lambda e: ["estimate", "--model", e.config(hidden_size="64")], "hidden_size",
      "positive integer"),
    C("cfg-layers-zero", lambda e: ["estimate", "--model", e.config(num_hidden_layers=0)], "num_hidden_layers",
      "positive integer"),
    C("cfg-kv-heads", lambda e: ["estimate", "--model", e.config(num_key_value_heads=3)], "num_key_value_heads",
      "must divide"),
    C("cfg-vocab-negative", lambda e: ["estimate", "--model", e.config(vocab_size=-1)], "vocab_size",
      "positive integer"),
    C("cfg-seq-beyond-cap", lambda e: ["estimate", "--model", e.config(), "--seq-len", "513"], "--seq-len",
      "at most 512"),
    # -- recommend ------------------------------------------------------------------------------------------------
    C("rec-missing-gpu", ["recommend", "--model", "8b"], "--gpu", "Missing option"),
    C("rec-gpu-typo", ["recommend", "--model", "8b", "--gpu", "a10O"], "--gpu", "ftplan gpus list"),
    C("rec-seq-zero", [*R, "--seq-len", "0"], "--seq-len", "positive integer"),
    C("rec-seq-billion", [*R, "--seq-len", "1000000000"], "--seq-len", "at most 524288"),
    C("rec-epochs-negative", [*R, "--epochs", "-1"], "--epochs", "> 0"),
    C("rec-epochs-zero", [*R, "--epochs", "0", "--dataset-tokens", "1M"], "--epochs", "> 0"),
    C("rec-effective-batch", [*R, "--effective-batch", "0"], "--effective-batch", "positive integer"),
    C("rec-max-gpus", [*R, "--max-gpus", "-1"], "--max-gpus", "positive integer"),
    C("rec-methods-bogus", [*R, "--methods", "lora,bogus"], "--methods", "valid: full, lora"),
    C("rec-methods-empty", [*R, "--methods", ","], "--methods", "valid: full, lora"),
    C("rec-margin-big", [*R, "--margin", "1.5"], "--margin", "[0, 1)"),
    C("rec-margin-negative", [*R, "--margin", "-0.1"], "--margin", "[0, 1)"),
    C("rec-objective", [*R, "--objective", "speed"], "--objective", "'quality', 'time', 'cost'"),
    C("rec-provider", [*R, "--provider", "nowhere"], "--provider", "Lambda"),
    C("rec-top-zero", [*R, "--top", "0"], "--top", "positive integer"),
    C("rec-pick-zero", [*R, "--pick", "0"], "--pick", "positive integer"),
    C("rec-pick-99", lambda e: [*R, "--pick", "99", "--save", e.path("plan.toml")], "--pick", "valid: 1 to"),
    C("rec-pick-hidden", lambda e: [*R, "--top", "2", "--pick", "3", "--save", e.path("plan.toml")], "--pick",
      "valid: 1 to 2"),
    C("rec-save-unwritable", lambda e: [*R, "--save", e.unwritable], "--save", "writable"),
    C("rec-save-folder", lambda e: [*R, "--save", str(e.root)], "--save", "directory"),
    C("rec-tokens-bad", [*R, "--dataset-tokens", "1.5X"], "--dataset-tokens", "50M"),
    # -- calibrate -----------------------------------------------------------------------------------------------
    C("cal-nothing", ["calibrate"], "--model", "--matrix"),
    C("cal-both", lambda e: [*CAL, "--model", e.config(), "--matrix", e.path("m.toml")], "--matrix", "give one"),
    C("cal-steps-zero", lambda e: [*CAL, "--model", e.config(), "--steps", "0"], "--steps", "> 0"),
    C("cal-timeout-zero", lambda e: [*CAL, "--model", e.config(), "--timeout", "0"], "--timeout", "> 0"),
    C("cal-busy-negative", lambda e: [*CAL, "--model", e.config(), "--busy-threshold", "-1"], "--busy-threshold",
      ">= 0"),
    C("cal-device", ["calibrate", "--model", "8b", "--device", "tpu"], "--device", "'cuda', 'cpu'"),
    C("cal-num-gpus", lambda e: [*CAL, "--model", e.config(), "--num-gpus", "2"], "--num-gpus", "valid: 1"),
    C("cal-model-unknown", [*CAL, "--model", "nope-13b"], "--model", "ftplan models list"),
    C("cal-gpu-unknown", lambda e: [*CAL, "--model", e.config(), "--gpu", "a100-8"], "--gpu", "a100-80"),
    C("cal-targets", lambda e: [*CAL, "--model", e.config(), "--target-modules", "qkv"], "--target-modules",
      "q_proj"),
    C("cal-seq-beyond-cap", lambda e: [*CAL, "--model", e.config(), "--seq-len", "100000"], "--seq-len",
      "at most 512"),
    C("cal-out-unwritable", lambda e: [*CAL, "--model", e.config(), "--out", e.unwritable], "--out", "writable"),
    C("cal-matrix-missing", lambda e: [*CAL, "--matrix", e.path("m.toml")], "--matrix", "No such file"),
    C("cal-matrix-invalid", lambda e: [*CAL, "--matrix", e.file("m.toml", "[[point]\n")], "--matrix", "invalid TOML"),
    C("cal-matrix-not-utf8", lambda e: [*CAL, "--matrix", e.file("m.toml", b"[[point]]\nmodel = '\xff'\n")],
      "--matrix", "UTF-8"),
    C("cal-matrix-no-points", lambda e: [*CAL, "--matrix", e.file("m.toml", "[defaults]\nsteps = 2\n")], "--matrix",
      "[[point]]"),
    C("cal-matrix-unknown-table", lambda e: [*CAL, "--matrix", e.file("m.toml", "[sweep]\n")], "--matrix",
      "valid: [defaults], [[point]]"),
    C("cal-matrix-unknown-key",
      lambda e: [*CAL, "--matrix", e.file("m.toml", f"[[point]]\nmodel = '{e.config()}'\nrnak = 4\n")], "rnak",
      "valid: model, steps"),
    C("cal-matrix-no-model", lambda e: [*CAL, "--matrix", e.file("m.toml", "[[point]]\nsteps = 2\n")], "'model'",
      "required"),
    C("cal-matrix-steps-zero",
      lambda e: [*CAL, "--matrix", e.file("m.toml", f"[[point]]\nmodel = '{e.config()}'\nsteps = 0\n")], "steps",
      ">= 1"),
    C("cal-matrix-steps-text",
      lambda e: [*CAL, "--matrix", e.file("m.toml", f"[[point]]\nmodel = '{e.config()}'\nsteps = 'many'\n")],
      "steps", "integer"),
    C("cal-matrix-method",
      lambda e: [*CAL, "--matrix", e.file("m.toml", f"[[point]]\nmodel = '{e.config()}'\nmethod = 'vera'\n")],
      "method", "full, lora"),
    C("cal-matrix-rank-text",
      lambda e: [*CAL, "--matrix", e.file("m.toml", f"[[point]]\nmodel = '{e.config()}'\nrank = 'x'\n")], "rank",
      "an integer"),
    C("cal-matrix-seq",
      lambda e: [*CAL, "--matrix", e.file("m.toml", f"[[point]]\nmodel = '{e.config()}'\nseq_len = [64, 9999]\n")],
      "seq_len", "at most 512"),
    C("cal-matrix-with-flags", lambda e: [*CAL, "--matrix", e.file("m.toml", "[[point]]\n"), "--rank", "4"],
      "--rank", "in the matrix file"),
    C("cal-option-before-fit", ["calibrate", "--steps", "3", "fit"], "--steps", "not of `ftplan calibrate fit`"),
    C("fit-gpu-unknown", ["calibrate", "fit", "--gpu", "b300"], "--gpu", "ftplan gpus list"),
    C("fit-results-missing", lambda e: ["calibrate", "fit", "--results", e.path("none")], "--results",
      "record files or folders"),
    C("fit-results-empty", lambda e: ["calibrate", "fit", "--results", e.empty_dir(), "--dry-run"], "--results",
      "no CUDA records"),
    C("fit-gpu-without-records", lambda e: ["calibrate", "fit", "--results", e.empty_dir(), "--gpu", "h100"], "--gpu",
      "GPUs with records"),
    C("fit-bad-option", ["calibrate", "fit", "--write-to", "x"], "--write-to", "--write"),
    # -- validate ---------------------------------------------------------------------------------------------------
    C("val-max-error-zero", ["validate", "--max-error", "0"], "--max-error", "> 0"),
    C("val-max-error-negative", ["validate", "--max-error", "-0.1"], "--max-error", "> 0"),
    C("val-max-error-text", ["validate", "--max-error", "five"], "--max-error", "float"),
    C("val-metric", ["validate", "--metric", "memory"], "--metric", "'allocated', 'reserved', 'tokens_per_s'"),
    C("val-results-missing", lambda e: ["validate", "--results", e.path("none")], "--results",
      "record files or folders"),
    C("val-gpu-unknown", ["validate", "--gpu", "z100"], "--gpu", "ftplan gpus list"),
    C("val-jsonl-misnamed", lambda e: ["validate", "--results", e.file("runs.jsonl", "{}\n")], "--results",
      "h100-sxm-80gb.jsonl"),
    # -- run: flags (all fail before a model is loaded) -------------------------------------------------------
    C("run-missing-data", lambda e: ["run", e.plan(), "--output-dir", e.path("o")], "--data", "Missing option"),
    C("run-missing-output", lambda e: ["run", e.plan(), "--data", e.good_data], "--output-dir", "Missing option"),
    C("run-missing-plan", ["run", "--data", "x.jsonl", "--output-dir", "o"], "PLAN", "Missing argument"),
    C("run-plan-folder", lambda e: e.run(plan=str(e.root)), "PLAN", "directory"),
    C("run-lr-zero", lambda e: e.run("--learning-rate", "0"), "--learning-rate", "> 0"),
    C("run-lr-text", lambda e: e.run("--lr", "fast"), "--lr", "float"),
    C("run-epochs-zero", lambda e: e.run("--epochs", "0"), "--epochs", "> 0"),
    C("run-max-steps-negative", lambda e: e.run("--max-steps", "-1"), "--max-steps", ">= 0"),
    C("run-warmup-one", lambda e: e.run("--warmup-ratio", "1"), "--warmup-ratio", "[0, 1)"),
    C("run-scheduler", lambda e: e.run("--lr-scheduler", "step"), "--lr-scheduler", "'cosine', 'linear'"),
    C("run-grad-norm-negative", lambda e: e.run("--max-grad-norm", "-1"), "--max-grad-norm", "> 0"),
    C("run-save-steps-zero", lambda e: e.run("--save-steps", "0"), "--save-steps", "positive integer"),
    C("run-logging-steps-zero", lambda e: e.run("--logging-steps", "0"), "--logging-steps", "positive integer"),
    C("run-eval-steps-negative", lambda e: e.run("--eval-steps", "-1"), "--eval-steps", ">= 0"),
    C("run-keep-zero", lambda e: e.run("--keep-checkpoints", "0"), "--keep-checkpoints", ">= 1"),
    C("run-format", lambda e: e.run("--format", "csv"), "--format", "'alpaca', 'chat'"),
    C("run-device", lambda e: e.run("--device", "tpu"), "--device", "'auto', 'cuda', 'cpu'"),
    C("run-method", lambda e: e.run("--method", "vera"), "--method", "'full', 'lora'"),
    C("run-rank-zero", lambda e: e.run("--rank", "0"), "--rank", "positive integer"),
    C("run-targets-unknown", lambda e: e.run("--target-modules", "foo"), "--target-modules", "q_proj"),
    C("run-ia3-targets", lambda e: e.run("--method", "ia3", "--target-modules", "q_proj"), "--target-modules",
      "k_proj, v_proj"),
    C("run-prefix-million", lambda e: e.run("--method", "prefix", "--num-virtual-tokens", "1000000"),
      "--num-virtual-tokens", "at most 256"),
    C("run-seq-billion", lambda e: e.run("--seq-len", "1000000000"), "--seq-len", "at most 1024"),
    C("run-packing-prefix", lambda e: e.run("--method", "prefix", "--packing"), "--packing", "full, lora"),
    C("run-qlora-cpu", lambda e: e.run("--method", "qlora", "--precision", "bf16"), "--method", "valid methods"),
    C("run-attn-fa2-cpu", lambda e: e.run("--precision", "bf16", "--attn", "flash_attention_2"), "--attn",
      "valid: sdpa, eager"),
    C("run-8bit-cpu", lambda e: e.run("--optimizer", "adamw8bit"), "--optimizer", "valid optimizers"),
    C("run-output-file", lambda e: e.run(out=e.file("out.txt", "x")), "--output-dir", "is a file"),
    C("run-output-unwritable", lambda e: e.run(out=e.unwritable), "--output-dir", "writable"),
    C("run-model-path-missing", lambda e: e.run("--model-path", e.path("none")), "--model-path", "folder"),
    C("run-tokenizer-missing", lambda e: e.run("--tokenizer", e.path("none")), "--tokenizer", "tokenizer"),
    C("run-unknown-option", lambda e: e.run("--learning_rate", "1e-4"), "--learning_rate", "--learning-rate"),
    # -- run: plan-file fields ------------------------------------------------------------------------------------
    C("plan-missing", lambda e: e.run(plan=e.path("plan.toml")), "PLAN", "no plan file"),
    C("plan-invalid-toml", lambda e: e.run(plan=e.plan(raw="[train\nmethod = 'lora'\n")), "PLAN", "invalid TOML"),
    C("plan-empty", lambda e: e.run(plan=e.plan(raw="")), "[model] ref", "required"),
    C("plan-not-utf8", lambda e: e.run(plan=e.file("plan.toml", b"version = 1\n[model]\nref = '\xff'\n")), "PLAN",
      "UTF-8"),
    C("plan-version-99", lambda e: e.run(plan=e.plan({"version": "99"})), "version", "valid: 1"),
    C("plan-version-text", lambda e: e.run(plan=e.plan({"version": '"one"'})), "version", "valid: 1"),
    C("plan-no-model", lambda e: e.run(plan=e.plan({"model": None})), "[model] ref", "required"),
    C("plan-model-ref-int", lambda e: e.run(plan=e.plan({"model.ref": "5"})), "[model] ref", "string"),
    C("plan-model-path-missing", lambda e: e.run(plan=e.plan({"model.path": '"/nonexistent/model"'})), "[model] path",
      "--model-path"),
    C("plan-no-train", lambda e: e.run(plan=e.plan({"train": None})), "[train]", "required"),
    C("plan-train-unknown", lambda e: e.run(plan=e.plan({"train.rnak": "8"})), "rnak", "valid: batch_size"),
    C("plan-method", lambda e: e.run(plan=e.plan({"train.method": '"vera"'})), "method", "full, lora"),
    C("plan-precision", lambda e: e.run(plan=e.plan({"train.precision": '"fp8"'})), "precision", "bf16, mixed, fp32"),
    C("plan-rank-zero", lambda e: e.run(plan=e.plan({"train.rank": "0"})), "rank", "positive integer"),
    C("plan-rank-text", lambda e: e.run(plan=e.plan({"train.rank": '"8"'})), "rank", "an integer"),
    C("plan-alpha-zero", lambda e: e.run(plan=e.plan({"train.lora_alpha": "0"})), "lora_alpha", "> 0"),
    C("plan-alpha-float", lambda e: e.run(plan=e.plan({"train.lora_alpha": "16.5"})), "lora_alpha", "integer"),
    C("plan-dropout-big", lambda e: e.run(plan=e.plan({"train.lora_dropout": "1.5"})), "lora_dropout", "[0, 1)"),
    C("plan-dropout-text", lambda e: e.run(plan=e.plan({"train.lora_dropout": '"x"'})), "lora_dropout", "number"),
    C("plan-targets-int", lambda e: e.run(plan=e.plan({"train.target_modules": "5"})), "target_modules",
      "all-linear"),
    C("plan-targets-empty", lambda e: e.run(plan=e.plan({"train.target_modules": "[]"})), "target_modules",
      "all-linear"),
    C("plan-targets-unknown", lambda e: e.run(plan=e.plan({"train.target_modules": '["qkv"]'})), "target_modules",
      "q_proj"),
    C("plan-seq-zero", lambda e: e.run(plan=e.plan({"train.seq_len": "0"})), "seq_len", "positive integer"),
    C("plan-seq-text", lambda e: e.run(plan=e.plan({"train.seq_len": '"64"'})), "seq_len", "an integer"),
    C("plan-seq-billion", lambda e: e.run(plan=e.plan({"train.seq_len": "1000000000"})), "seq_len", "at most 1024"),
    C("plan-batch-zero", lambda e: e.run(plan=e.plan({"train.batch_size": "0"})), "batch_size", "positive integer"),
    C("plan-batch-float", lambda e: e.run(plan=e.plan({"train.batch_size": "1.5"})), "batch_size",
      "an integer"),
    C("plan-accum-zero", lambda e: e.run(plan=e.plan({"train.grad_accum": "0"})), "grad_accum", "positive integer"),
    C("plan-ckpt-text", lambda e: e.run(plan=e.plan({"train.grad_ckpt": '"yes"'})), "grad_ckpt", "true or false"),
    C("plan-optimizer", lambda e: e.run(plan=e.plan({"train.optimizer": '"adam"'})), "optimizer", "adamw"),
    C("plan-gpus-zero", lambda e: e.run(plan=e.plan({"train.num_gpus": "0"})), "num_gpus", "positive integer"),
    C("plan-strategy", lambda e: e.run(plan=e.plan({"train.strategy": '"zero4"'})), "strategy", "zero3"),
    C("plan-offload-ddp", lambda e: e.run(plan=e.plan({"train.cpu_offload": "true", "train.num_gpus": "2"})),
      "cpu_offload", "fsdp, zero1, zero2, zero3"),
    C("plan-vtokens-zero", lambda e: e.run(plan=e.plan({"train.method": '"prompt"', "train.num_virtual_tokens": "0"})),
      "num_virtual_tokens", "positive integer"),
    C("plan-vtokens-million",
      lambda e: e.run(plan=e.plan({"train.method": '"prefix"', "train.num_virtual_tokens": "1000000"})),
      "num_virtual_tokens", "at most 256"),
    C("plan-qlora-fp32", lambda e: e.run(plan=e.plan({"train.method": '"qlora"'})), "precision", "valid: bf16"),
    C("plan-prefix-ckpt", lambda e: e.run(plan=e.plan({"train.method": '"prefix"', "train.grad_ckpt": "true"})),
      "grad_ckpt", "another method"),
    C("plan-schedule-unknown", lambda e: e.run(plan=e.plan({"schedule.lr": "0.1"})), "lr", "valid: epochs"),
    C("plan-lr-zero", lambda e: e.run(plan=e.plan({"schedule.learning_rate": "0"})), "learning_rate", "> 0"),
    C("plan-lr-text", lambda e: e.run(plan=e.plan({"schedule.learning_rate": '"fast"'})), "learning_rate", "number"),
    C("plan-epochs-zero", lambda e: e.run(plan=e.plan({"schedule.epochs": "0"})), "epochs", "> 0"),
    C("plan-epochs-text", lambda e: e.run(plan=e.plan({"schedule.epochs": '"two"'})), "epochs", "number"),
    C("plan-max-steps-negative", lambda e: e.run(plan=e.plan({"schedule.max_steps": "-3"})), "max_steps", ">= 0"),
    C("plan-max-steps-float", lambda e: e.run(plan=e.plan({"schedule.max_steps": "2.5"})), "max_steps", "integer"),
    C("plan-warmup-one", lambda e: e.run(plan=e.plan({"schedule.warmup_ratio": "1.0"})), "warmup_ratio", "[0, 1)"),
    C("plan-scheduler", lambda e: e.run(plan=e.plan({"schedule.lr_scheduler": '"step"'})), "lr_scheduler",
      "cosine, linear, constant"),
    C("plan-grad-norm-text", lambda e: e.run(plan=e.plan({"schedule.max_grad_norm": '"x"'})), "max_grad_norm",
      "number"),
    C("plan-grad-norm-zero", lambda e: e.run(plan=e.plan({"schedule.max_grad_norm": "0"})), "max_grad_norm", "> 0"),
    C("plan-save-steps-zero", lambda e: e.run(plan=e.plan({"schedule.save_steps": "0"})), "save_steps",
      "positive integer"),
    C("plan-logging-steps-text", lambda e: e.run(plan=e.plan({"schedule.logging_steps": '"5"'})), "logging_steps",
      "an integer"),
    C("plan-seed-text", lambda e: e.run(plan=e.plan({"schedule.seed": '"abc"'})), "seed", "integer"),
    C("plan-seed-negative", lambda e: e.run(plan=e.plan({"schedule.seed": "-1"})), "seed", ">= 0"),
    C("plan-fallback-unknown", lambda e: e.run(plan=e.plan({"fallback": [{"batchsize": "2"}]})), "batchsize",
      "valid: batch_size"),
    C("plan-fallback-batch-zero", lambda e: e.run(plan=e.plan({"fallback": [{"batch_size": "0"}]})), "batch_size",
      "positive integer"),
    C("plan-fallback-optimizer", lambda e: e.run(plan=e.plan({"fallback": [{"optimizer": '"adam"'}]})), "optimizer",
      "adamw"),
    # -- run: training data -----------------------------------------------------------------------------------------
    C("data-missing", lambda e: e.run(data=e.path("train.jsonl")), "--data", "no such file"),
    C("data-empty", lambda e: e.run(data=e.file("train.jsonl", "")), "--data", "one JSON object per line"),
    C("data-blank-lines", lambda e: e.run(data=e.file("train.jsonl", "\n\n  \n")), "--data", "one JSON object per line"),
    C("data-malformed", lambda e: e.run(data=e.jsonl([{"text": "a b c"}, '{"text": '])), "--data",
      "one JSON object per line"),
    C("data-not-utf8", lambda e: e.run(data=e.file("train.jsonl", b'{"text": "caf\xe9"}\n')), "--data", "UTF-8"),
    C("data-utf16", lambda e: e.run(data=e.file("train.jsonl", '{"text": "hello there"}\n'.encode("utf-16"))), "--data",
      "UTF-8"),
    C("data-binary", lambda e: e.run(data=e.file("train.jsonl", bytes(range(256)))), "--data", "UTF-8"),
    C("data-list-line", lambda e: e.run(data=e.jsonl([["a", "b"]])), "--data", "JSON object"),
    C("data-unknown-keys", lambda e: e.run(data=e.jsonl([{"question": "q", "answer": "a"}])), "--data",
      "valid formats: alpaca"),
    C("data-alpaca-no-output", lambda e: e.run(data=e.jsonl([{"instruction": "a", "output": "b"}, {"instruction": "y"}])),
      "--data", "alpaca format needs instruction, output"),
    C("data-alpaca-output-int", lambda e: e.run(data=e.jsonl([{"instruction": "a", "output": 3}])), "--data",
      "must be a string"),
    C("data-alpaca-output-empty", lambda e: e.run(data=e.jsonl([{"instruction": "a", "output": ""}])), "--data",
      "alpaca format needs"),
    C("data-text-empty", lambda e: e.run(data=e.jsonl([{"text": "  "}])), "--data", "text format needs text"),
    C("data-completion-empty", lambda e: e.run(data=e.jsonl([{"prompt": "a", "completion": ""}])), "--data",
      "prompt_completion format needs prompt, completion"),
    C("data-chat-no-assistant",
      lambda e: e.run(data=e.jsonl([{"messages": [{"role": "user", "content": "hi"}]}])), "--data",
      "no assistant message"),
    C("data-chat-empty-list", lambda e: e.run(data=e.jsonl([{"messages": []}])), "--data", "non-empty list"),
    C("data-chat-role", lambda e: e.run(data=e.jsonl([{"messages": [{"role": "bot", "content": "hi"}]}])), "--data",
      "system, user, assistant"),
    C("data-chat-content-int",
      lambda e: e.run(data=e.jsonl([{"messages": [{"role": "assistant", "content": 5}]}])), "--data",
      "must be a string"),
    C("data-conversational-mixed",
      lambda e: e.run(data=e.jsonl([{"prompt": [{"role": "user", "content": "hi"}], "completion": "yes"}])), "--data",
      "list of {role, content}"),
    C("data-json-array-invalid", lambda e: e.run(data=e.file("train.json", '[{"text": "a"},')), "--data",
      "a JSON array of objects"),
    C("data-json-array-non-objects", lambda e: e.run(data=e.file("train.json", '[1, 2]')), "--data", "JSON object"),
    C("data-folder-not-datasets", lambda e: e.run(data=str(e.root)), "--data", "save_to_disk"),
    C("data-forced-wrong-format", lambda e: e.run("--format", "chat"), "--data", "chat format needs messages"),
    C("eval-data-malformed", lambda e: e.run("--eval-data", e.jsonl(["{oops"])), "--eval-data",
      "one JSON object per line"),
    C("eval-data-missing", lambda e: e.run("--eval-data", e.path("eval.jsonl")), "--eval-data", "no such file"),
    # -- merge ---------------------------------------------------------------------------------------------------------
    C("merge-missing-output", lambda e: ["merge", e.run_dir()], "--output", "Missing option"),
    C("merge-missing-runs", lambda e: ["merge", "--output", e.path("m")], "RUNS", "Missing argument"),
    C("merge-run-missing", lambda e: ["merge", e.path("none"), "--output", e.path("m")], "RUNS", "output folder"),
    C("merge-run-not-a-run", lambda e: ["merge", e.run_dir(kind="empty"), "--output", e.path("m")], "RUNS",
      "adapter_config.json"),
    C("merge-two-no-combination", lambda e: ["merge", e.run_dir(), e.run_dir(), "--output", e.path("m")],
      "--combination", "linear, cat"),
    C("merge-one-with-combination", lambda e: ["merge", e.run_dir(), "--combination", "ties", "--output", e.path("m")],
      "--combination", "at least two runs"),
    C("merge-combination-bogus", lambda e: ["merge", e.run_dir(), "--combination", "avg", "--output", e.path("m")],
      "--combination", "'linear', 'cat'"),
    C("merge-weights-text",
      lambda e: ["merge", e.run_dir(), e.run_dir(), "--combination", "linear", "--weights", "a,b", "--output",
                 e.path("m")], "--weights", "comma list of numbers"),
    C("merge-weights-count",
      lambda e: ["merge", e.run_dir(), e.run_dir(), "--combination", "linear", "--weights", "1", "--output",
                 e.path("m")], "--weights", "one weight per run"),
    C("merge-density-zero", lambda e: ["merge", e.run_dir(), "--density", "0", "--output", e.path("m")], "--density",
      "(0, 1]"),
    C("merge-density-big", lambda e: ["merge", e.run_dir(), "--density", "1.5", "--output", e.path("m")], "--density",
      "(0, 1]"),
    C("merge-adapter-only-one", lambda e: ["merge", e.run_dir(), "--adapter-only", "--output", e.path("m")],
      "--adapter-only", "several runs"),
    C("merge-dtype", lambda e: ["merge", e.run_dir(), "--dtype", "fp8", "--output", e.path("m")], "--dtype",
      "'auto', 'bf16'"),
    C("merge-sign-method", lambda e: ["merge", e.run_dir(), "--majority-sign-method", "sum", "--output", e.path("m")],
      "--majority-sign-method", "'total', 'frequency'"),
    C("merge-output-not-empty", lambda e: ["merge", e.run_dir(), "--output", str(e.root)], "--output", "--overwrite"),
    C("merge-output-file", lambda e: ["merge", e.run_dir(), "--output", e.file("m.txt", "x"), "--overwrite"],
      "--output", "is a file"),
    C("merge-output-unwritable", lambda e: ["merge", e.run_dir(), "--output", e.unwritable], "--output", "writable"),
    C("merge-base-missing", lambda e: ["merge", e.run_dir(), "--base", e.path("none"), "--output", e.path("m")],
      "--base", "config.json"),
    # -- report --------------------------------------------------------------------------------------------------------
    C("rep-nothing", ["report"], "--model", "--accuracy"),
    C("rep-accuracy-and-model", ["report", "--accuracy", "--model", "8b"], "--accuracy", "--model"),
    C("rep-records-without-accuracy", [*REP, "--records", "x"], "--records", "only with --accuracy"),
    C("rep-records-missing", lambda e: ["report", "--accuracy", "--records", e.path("none")], "--records",
      "record files or folders"),
    C("rep-records-empty", lambda e: ["report", "--accuracy", "--records", e.empty_dir()], "--records", "no records"),
    C("rep-model-unknown", ["report", "--model", "nope-13b", "--gpu", "a100-80"], "--model", "ftplan models list"),
    C("rep-models-empty", ["report", "--models", ",", "--gpu", "a100-80"], "--model", "at least one"),
    C("rep-gpu-unknown", ["report", "--model", "8b", "--gpu", "z100"], "--gpu", "ftplan gpus list"),
    C("rep-seq-zero", [*REP, "--seq-len", "0"], "--seq-len", "positive integer"),
    C("rep-seq-billion", [*REP, "--seq-len", "1000000000"], "--seq-len", "at most 524288"),
    C("rep-batch-zero", [*REP, "--batch-size", "0"], "--batch-size", "positive integer"),
    C("rep-rank-negative", [*REP, "--rank", "-8"], "--rank", "positive integer"),
    C("rep-epochs-zero", [*REP, "--epochs", "0"], "--epochs", "> 0"),
    C("rep-margin", [*REP, "--margin", "1"], "--margin", "[0, 1)"),
    C("rep-provider", [*REP, "--provider", "nowhere"], "--provider", "valid: "),
    C("rep-optimizer", [*REP, "--optimizer", "adam"], "--optimizer", "'adamw'"),
    C("rep-objective", [*REP, "--objective", "fast"], "--objective", "'quality'"),
    C("rep-tokens", [*REP, "--dataset-tokens", "many"], "--dataset-tokens", "50M"),
    C("rep-max-gpus", [*REP, "--max-gpus", "0"], "--max-gpus", "positive integer"),
    C("rep-compare-gpus-unknown", [*REP, "--compare-gpus", "z100"], "--gpu", "ftplan gpus list"),
    C("rep-compare-gpus-fit-map", ["report", "--models", "7b,8b", "--gpus", "a100-80", "--compare-gpus", "h100"],
      "--compare-gpus", "only with one --model and one --gpu"),
    C("rep-out-unwritable", lambda e: [*REP, "--out", e.unwritable], "--out", "writable"),
    C("rep-out-file", lambda e: [*REP, "--out", e.file("r.txt", "x")], "--out", "is a file"),
]


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    return Env(tmp_path_factory.mktemp("bad-inputs"), tiny_model_dir)


@pytest.fixture(autouse=True)
def _no_records_in_the_checkout(monkeypatch, tmp_path):
    """A calibrate case that measured after all must not add a record to calibrate/results."""
    from calibrate import harness, record

    (tmp_path / "results").mkdir()
    monkeypatch.setattr(record, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path / "results")


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 150
    assert len({c.id for c in CASES}) == len(CASES)
    command_of = {"est": "estimate", "cfg": "estimate", "rec": "recommend", "gpus": "gpus", "models": "models",
                  "cal": "calibrate", "fit": "calibrate fit", "val": "validate", "run": "run", "plan": "run",
                  "data": "run", "eval": "run", "merge": "merge", "rep": "report"}
    commands = {command_of.get(c.id.split("-")[0]) for c in CASES}
    assert {"estimate", "recommend", "gpus", "models", "calibrate", "calibrate fit", "validate", "run", "merge",
            "report"} <= commands
    assert sum(c.id.startswith("plan-") for c in CASES) >= 40  # every plan-file field
    assert sum(c.id.startswith(("data-", "eval-")) for c in CASES) >= 20  # training-data shapes


@pytest.mark.parametrize("args, field, valid", CASES)
def test_bad_input_exits_2_naming_the_field_and_the_valid_values(env, args, field, valid):
    if callable(args):
        args = args(env)
    r = CliRunner().invoke(cli, args)
    out = _norm(r.output)
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 2, r.output
    assert field in out, f"field {field!r} not named in: {r.output}"
    assert valid in out, f"valid {valid!r} not named in: {r.output}"


JSON_CASES = [
    (["estimate", "--model", "8b", "--seq-len", "0"], "--seq-len", "a positive integer"),
    (["estimate", "--model", "8b", "--method", "banana"], "--method", ["full", "lora", "qlora", "dora", "qdora", "prefix", "prompt", "ia3"]),
    (["estimate", "--model", "8b", "--seq-len", "1000000000"], "--seq-len", "at most 524288"),
    (["estimate", "--model", "8b", "--ranks", "8"], "--ranks", ["--attn", "--rank"]),  # click's close matches
    (["recommend", "--model", "8b", "--gpu", "a100-80", "--pick", "99"], "--pick", "1 to 8"),
    (["recommend", "--model", "8b", "--gpu", "a100-80", "--provider", "nowhere"], "--provider", "AWS, Akash"),
    (["recommend", "--model", "8b"], "--gpu", "required"),
    (["gpus", "show", "z100"], "NAME", None),
    (["models", "show", "nope-13b"], "--model", None),
    (["validate", "--max-error", "0"], "--max-error", "> 0"),
    (["validate", "--metric", "memory"], "--metric", ["allocated", "reserved", "tokens_per_s"]),
    (["calibrate", "fit", "--gpu", "b300"], "--gpu", None),
    (["report"], "--model", None),
    (["report", "--model", "8b", "--gpu", "a100-80", "--margin", "2"], "--margin", "in [0, 1)"),
]


@pytest.mark.parametrize("args, field, valid", JSON_CASES, ids=lambda v: None)
def test_json_errors_are_a_json_object_on_stdout_with_the_same_exit_code(args, field, valid):
    plain = CliRunner().invoke(cli, args)
    r = CliRunner().invoke(cli, [*args, "--json"])
    assert plain.exit_code == r.exit_code == 2, (plain.output, r.output)
    assert "Traceback" not in r.output
    d = json.loads(r.stdout)
    assert set(d) == {"error", "field", "valid"}
    assert d["field"] == field, d
    if isinstance(valid, list):
        assert d["valid"] == valid, d
    elif valid is not None:
        assert valid in d["valid"], d
    assert d["error"] and d["error"] in _norm(plain.output)  # the same message as the text error
    assert "Usage:" not in r.stdout


def test_json_errors_of_run_and_merge(env):
    r = CliRunner().invoke(cli, env.run("--json", data=env.jsonl(["{oops"])))
    d = json.loads(r.stdout)
    assert r.exit_code == 2 and d["field"] == "--data" and "invalid JSON" in d["error"]
    assert d["valid"] == "one JSON object per line"
    r = CliRunner().invoke(cli, ["merge", env.run_dir(), "--density", "0", "--output", env.path("m"), "--json"])
    d = json.loads(r.stdout)
    assert r.exit_code == 2 and d == {"error": d["error"], "field": "--density", "valid": "in (0, 1]"}
    # output that succeeds is unchanged: one JSON document
    r = CliRunner().invoke(cli, ["gpus", "show", "h100", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["memory_bytes"] > 0


def test_a_fallback_made_invalid_by_an_override_is_dropped_from_the_run_plan(env):
    """`run --method prefix --no-grad-ckpt` on a recommend plan whose fallbacks turn checkpointing on: the plan
    written into the run keeps only the fallbacks valid for prefix tuning (it used to be unreadable)."""
    from planner.planfile import read_plan

    plan = env.plan({"train.grad_ckpt": "true", "fallback": [{"batch_size": "2", "grad_accum": "2", "grad_ckpt": "true"},
                                                             {"batch_size": "2", "grad_accum": "2"}]})
    out = env.path("out")
    r = CliRunner().invoke(cli, env.run("--method", "prefix", plan=plan, out=out))
    assert r.exit_code == 2 and "--no-grad-ckpt" in r.output  # the advice ...
    r = CliRunner().invoke(cli, env.run("--method", "prefix", "--no-grad-ckpt", plan=plan, out=out,
                                        data=env.jsonl(["{oops"])))  # ... works (stopped at the data, cheaply)
    assert r.exit_code == 2 and "--data" in r.output and "Traceback" not in r.output
    written = read_plan(Path(out) / "plan.toml")
    assert written.train.method == "prefix" and not written.train.grad_ckpt
    assert written.fallback == [{"batch_size": 2, "grad_accum": 2}]


@pytest.mark.parametrize("name", ["run", "merge"])
def test_run_and_merge_without_torch_say_what_to_install(env, name):
    """The planner-only install: no traceback, the missing package and the extra to install."""
    import os
    import subprocess
    import sys

    command = env.run() if name == "run" else ["merge", env.run_dir(), "--output", env.path("m")]
    root = Path(__file__).resolve().parents[1]
    code = "import sys; sys.modules['torch'] = None; from planner.cli import main; main()"
    p = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(root)))
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "needs torch" in p.stderr and "pip install 'ftplan[train]'" in p.stderr


def test_a_failed_run_with_json_prints_one_json_object(env, monkeypatch):
    """Out of memory on every plan (exit 1): stdout holds one JSON object, the error with the run's summary."""
    import torch

    from trainer import recipe

    real = recipe.forward

    def forward(model, batch, tc, device_type):
        if model.training:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return real(model, batch, tc, device_type)

    monkeypatch.setattr(recipe, "forward", forward)
    r = CliRunner().invoke(cli, env.run("--no-fallback", "--no-record", "--json"))
    assert r.exit_code == 1 and "Traceback" not in r.output
    d = json.loads(r.stdout)
    assert "out of memory" in d["error"] and d["summary"]["status"] == "oom"
