"""What a run is: the `RunSpec` the CLI resolves, the errors a run raises, the output file names, and the checks made
before a model is loaded (model folder, device, tokenizer, data)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from planner.config import TrainConfig
from planner.planfile import PlanFile

from . import data as D

LOG_NAME = "trainer_log.jsonl"
SUMMARY_NAME = "run_summary.json"
SPEC_NAME = "run_spec.json"
RECORD_NAME = "run_record.json"


class RunError(Exception):
    """A run that cannot go on; the message says why in plain words (the CLI exits 1)."""


class RunUsageError(RunError):
    """A user error found while preparing the run (a bad path, an incompatible checkpoint): the CLI exits 2."""

    def __init__(self, message: str, param_hint: str | None = None):
        super().__init__(message)
        self.param_hint = param_hint


class OutOfMemory(RunError):
    """Every plan of the chain ran out of memory (or fallback was off)."""


class Interrupted(RunError):
    """Stopped by SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, message: str, signum: int, summary: dict):
        super().__init__(message)
        self.signum = signum
        self.summary = summary


@dataclass
class RunSpec:
    """Everything a run needs, resolved by the CLI (JSON-serializable: the launcher passes it to each process).

    `train` is the TrainConfig to run (the plan's, with the command-line overrides); `fallbacks` the next ones
    in recommendation order, each with the same effective batch."""

    plan: str
    data: str
    output_dir: str
    model_path: str
    train: dict
    fallbacks: list = field(default_factory=list)
    eval_data: str | None = None
    tokenizer: str = ""
    data_format: str = "auto"
    train_on_inputs: bool = False
    packing: bool = False
    device: str = "auto"
    resume: bool = False
    fallback: bool = True
    record: bool = True
    keep_checkpoints: int = 2
    eval_steps: int = 0
    quiet: bool = False
    progress: bool = True
    command: str = ""
    resume_as_given: bool = False  # a fallback relaunch: run `train` even where the checkpoint's micro-batch differs
    nodes: dict = field(default_factory=dict)  # `trainer.launch.Nodes` fields of a run over several machines

    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.train)

    def fallback_configs(self) -> list[TrainConfig]:
        return [TrainConfig.from_dict(d) for d in self.fallbacks]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        return cls(**json.loads(text))


# -- checks made before a model is loaded -------------------------------------------------------------------------


def resolve_model_path(pf: PlanFile, override: str = "", plan_dir: str | Path | None = None) -> str:
    """The local folder with the base model's weights: `override`, the plan's `[model] path`, the plan's `ref` when
    it is a folder (or a config.json inside one), else the Hugging Face id of `ref` looked up in the local cache
    (no network). Relative paths are tried from the working directory, then from the plan's folder."""

    def local(p: str) -> Path | None:
        for base in (Path.cwd(), Path(plan_dir) if plan_dir else None):
            if base is None:
                continue
            q = (base / p).expanduser()
            if q.exists():
                q = q.parent if q.is_file() else q
                return q.resolve()
        return None

    if override:
        q = local(override)
        if q is None:
            raise RunUsageError(f"no such folder: {override}", "--model-path")
        return _with_weights(q, "--model-path")
    if pf.model_path:
        q = local(pf.model_path)
        if q is None:
            raise RunUsageError(f"the plan's [model] path {pf.model_path!r} does not exist (edit the plan or pass "
                                "--model-path)", "--model-path")
        return _with_weights(q, "[model] path")
    q = local(pf.model)  # a folder (or config.json) wins over a catalog name, as in `ftplan recommend --model`
    if q is not None:
        return _with_weights(q, "[model] ref")
    repo_id = pf.model
    try:
        from planner.profiles import ProfileError, resolve_model

        arch, _ = resolve_model(pf.model)
        repo_id = arch.hf_id or pf.model
    except (ProfileError, ValueError):
        pass
    if repo_id.count("/") != 1:
        raise RunUsageError(f"cannot find weights for model {pf.model!r}: not a local folder and no Hugging Face id "
                            "(set [model] path in the plan or pass --model-path)", "--model-path")
    from huggingface_hub import constants, snapshot_download

    try:
        path = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError and friends: not in the cache
        raise RunUsageError(f"{repo_id} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); ftplan "
                            f"does not download: run `hf download {repo_id}` first, or pass --model-path",
                            "--model-path") from None
    return _with_weights(Path(path), "[model] ref")


def _with_weights(folder: Path, hint: str) -> str:
    if not (folder / "config.json").exists():
        raise RunUsageError(f"{folder} has no config.json (a model folder from save_pretrained is needed)", hint)
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise RunUsageError(f"{folder} has a config.json but no weights (*.safetensors / *.bin); `ftplan run` "
                            "trains real weights: point [model] path or --model-path at the downloaded model", hint)
    return str(folder)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RunUsageError("--device cuda: no CUDA device is available (valid here: cpu)", "--device")
    return device


# several CPU processes over gloo: DDP through accelerate, FSDP2 applied directly (`trainer.fsdp`), ZeRO through the
# DeepSpeed engine directly (`trainer.zero`) when deepspeed is installed
CPU_STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")


def check_device(tc: TrainConfig, device: str) -> None:
    """What needs CUDA (bitsandbytes, flash-attn) or a launcher that CPU lacks: usage errors naming the option."""
    if device == "cuda":
        import torch

        from planner.attention import implementation_error

        cap = torch.cuda.get_device_capability()
        err = implementation_error(tc.recipe.attn_implementation, torch.cuda.get_device_name(), cap)
        if err:
            raise RunUsageError(err, "--attn")
        return
    if tc.recipe.attn_implementation == "flash_attention_2":
        raise RunUsageError("attn_implementation 'flash_attention_2' needs CUDA (flash-attn 2, sm80 or newer); on CPU "
                            "valid: sdpa, eager", "--attn")
    if tc.base_quant.quantized:
        raise RunUsageError(f"{tc.method_name} needs CUDA (bitsandbytes 4-bit base); on CPU valid methods are full, lora, "
                            "dora, prefix, prompt, ia3 with --quant none", "--method")
    if tc.optimizer in ("adamw8bit", "paged_adamw8bit"):
        raise RunUsageError(f"optimizer {tc.optimizer} needs CUDA (bitsandbytes); on CPU valid optimizers are "
                            "adamw, sgd, adafactor", "--optimizer")
    if tc.recipe.offload_checkpoints:
        raise RunUsageError("offloaded checkpoints need CUDA (pinned host memory; torch refuses pin_memory without an "
                            "accelerator); on CPU valid: checkpointing without offload", "--offload-ckpt")
    if tc.num_gpus > 1 and tc.strategy not in CPU_STRATEGIES:
        raise RunUsageError(f"strategy {tc.strategy} does not run on CPU processes (valid on CPU: "
                            f"{', '.join(CPU_STRATEGIES)})", "--strategy")
    if tc.num_gpus > 1 and tc.strategy.startswith("zero"):
        from . import zero

        if not zero.available():
            raise RunUsageError(f"strategy {tc.strategy} runs on DeepSpeed, which is not installed: pip install "
                                "'ftplan[deepspeed]' (or use ddp or fsdp)", "--strategy")
    if tc.num_gpus > 1 and tc.cpu_offload:
        raise RunUsageError("--cpu-offload moves GPU memory to the host: on CPU there is nothing to offload "
                            "(drop --cpu-offload, or run on cuda)", "--cpu-offload")


def prepare_data(spec: RunSpec, tokenizer=None) -> tuple:
    """(tokenizer, train Dataset, eval Dataset or None): everything checked before a model is loaded."""
    if tokenizer is None:
        tokenizer = load_tokenizer(spec.tokenizer or spec.model_path)
    tc = spec.train_config()
    train = D.load_dataset(spec.data, tokenizer, tc.seq_len, fmt=spec.data_format,
                           train_on_inputs=spec.train_on_inputs, packing=spec.packing)
    ev = None
    if spec.eval_data:
        ev = D.load_dataset(spec.eval_data, tokenizer, tc.seq_len, fmt=spec.data_format,
                            train_on_inputs=spec.train_on_inputs, packing=False)
    return tokenizer, train, ev


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RunUsageError(f"cannot load a tokenizer from {path}: {e}".split("\n")[0], "--tokenizer") from None
    if tok.pad_token_id is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            raise RunUsageError(f"the tokenizer at {path} has neither a pad nor an EOS token", "--tokenizer")
    return tok

