"""`plan.toml`: the chosen plan as a file that `ftplan run` reads and a person can edit.

    [model]       which model (catalog name / config.json path) and where its weights are
    [gpu]         GPU type and count the plan was made for
    [train]       the TrainConfig fields (method, rank, batch, checkpointing, optimizer, ...)
    [schedule]    learning rate, epochs, warm-up, checkpoint interval, seed
    [prediction]  what ftplan predicted (compared with the measured run at the end)
    [[fallback]]  the next plans in recommendation order with the same effective batch (used on out-of-memory)
    [launch]      optional: the machines of a multi-node run (num_machines, main_process_ip, main_process_port)

Written with a small TOML writer (flat tables of str/int/float/bool/list); read with `tomllib`.
"""

from __future__ import annotations

import datetime as _dt
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .config import STRATEGIES, TrainConfig
from .fileio import write_text

PLAN_VERSION = 1


@dataclass
class Schedule:
    """Optimizer schedule of a run.

    Args:
        learning_rate: peak learning rate (2e-4 for adapters, 2e-5 for full fine-tuning are common starts).
        epochs: passes over the dataset (fractions allowed).
        max_steps: stop after this many optimizer steps (0: from epochs).
        warmup_ratio: fraction of steps with linear warm-up before the cosine decay.
        lr_scheduler: cosine | linear | constant.
        max_grad_norm: gradient clipping (the recipe clips at 1.0).
        save_steps: checkpoint every N optimizer steps (and on SIGINT/SIGTERM).
        logging_steps: progress/log interval in optimizer steps.
        seed: data order and initialization seed.
    """

    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int = 0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    save_steps: int = 200
    logging_steps: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            v, kinds = getattr(self, f.name), _SCHEDULE_TYPES[f.name]
            if isinstance(v, bool) or not isinstance(v, kinds):
                what = "a string" if kinds is str else "an integer" if kinds is int else "a number"
                raise ValueError(f"schedule.{f.name} must be {what}, got {v!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"schedule.learning_rate must be > 0, got {self.learning_rate}")
        if self.epochs <= 0:
            raise ValueError(f"schedule.epochs must be > 0, got {self.epochs}")
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule.lr_scheduler must be one of cosine, linear, constant; got {self.lr_scheduler!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"schedule.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("save_steps", "logging_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"schedule.{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"schedule.max_grad_norm must be > 0, got {self.max_grad_norm}")
        for name in ("max_steps", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"schedule.{name} must be >= 0, got {getattr(self, name)}")


_SCHEDULE_TYPES = {"learning_rate": (int, float), "epochs": (int, float), "max_steps": int, "warmup_ratio": (int, float),
                   "lr_scheduler": str, "max_grad_norm": (int, float), "save_steps": int, "logging_steps": int,
                   "seed": int}


@dataclass
class PlanFile:
    model: str  # catalog name, alias, hf id, or config.json path (what `--model` accepts)
    train: TrainConfig
    gpu: str | None = None
    model_path: str = ""  # local checkpoint with weights ('' = resolve the hf id in the local HF cache)
    schedule: Schedule = field(default_factory=Schedule)
    prediction: dict = field(default_factory=dict)
    fallback: list = field(default_factory=list)  # list of dicts of TrainConfig fields that change
    created: str = ""
    command: str = ""
    launch: dict = field(default_factory=dict)  # [launch]: num_machines, main_process_ip, main_process_port

    def fallback_configs(self) -> list[TrainConfig]:
        return [self.train.replace(**{k: v for k, v in fb.items()}) for fb in self.fallback]


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table (a non-reference recipe)
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


_TRAIN_COMMENTS = {
    "method": "full | lora | dora | prefix | prompt | ia3 (qlora = lora with quant nf4)",
    "quant": "base weights: none | nf4 (4-bit: QLoRA, QDoRA)",
    "use_rslora": "rank-stabilized LoRA scaling alpha/sqrt(r): scaling only, no memory change",
    "precision": "bf16 | mixed (fp32 master weights + bf16 autocast) | fp16 (as mixed, fp16 autocast + GradScaler) | fp32",
    "rank": "LoRA rank: higher increases quality and memory",
    "lora_alpha": "LoRA scaling numerator (usually 2 x rank)",
    "target_modules": '["all-linear"] or module names, e.g. ["q_proj", "v_proj"]',
    "batch_size": "sequences per GPU per micro-step",
    "grad_accum": "micro-steps per optimizer step (memory-neutral)",
    "grad_ckpt": "gradient checkpointing: true reduces memory, costs ~30% speed",
    "optimizer": "adamw | adamw8bit | paged_adamw8bit | sgd | adafactor",
    "strategy": "multi-GPU: " + " | ".join(STRATEGIES),
}


def write_plan(pf: PlanFile, path: str | Path) -> None:
    """Write `pf` as commented TOML (a person can edit it; `read_plan` validates it)."""
    lines = [
        "# ftplan plan: edit freely, then `ftplan run <this file> --data train.jsonl --output-dir runs/<name>`.",
        f"# created {pf.created or _dt.datetime.now().isoformat(timespec='seconds')}" + (f" by: {pf.command}" if pf.command else ""),
        f"version = {PLAN_VERSION}",
        "",
        "[model]",
        f"ref = {_toml_value(pf.model)}  # catalog name, alias, Hugging Face id or config.json path",
        f"path = {_toml_value(pf.model_path)}  # local checkpoint folder with weights ('' = the hf id from the local cache)",
    ]
    if pf.gpu:
        lines += ["", "[gpu]", f"name = {_toml_value(pf.gpu)}", f"count = {pf.train.num_gpus}"]
    lines += ["", "[train]"]
    for k, v in pf.train.to_dict().items():
        if v is None:
            continue
        c = _TRAIN_COMMENTS.get(k)
        lines.append(f"{k} = {_toml_value(v)}" + (f"  # {c}" if c else ""))
    lines += ["", "[schedule]"]
    for k, v in asdict(pf.schedule).items():
        lines.append(f"{k} = {_toml_value(v)}")
    if pf.prediction:
        lines += ["", "[prediction]  # what ftplan predicted for this plan; the run compares its measurements"]
        for k, v in pf.prediction.items():
            if v is not None and not isinstance(v, dict):
                lines.append(f"{k} = {_toml_value(v)}")
    if pf.launch:
        lines += ["", "[launch]  # machines of a multi-node run; each node: ftplan run ... --machine-rank R"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in pf.launch.items() if v is not None]
    for fb in pf.fallback:
        lines += ["", "[[fallback]]  # next plan on out-of-memory (same effective batch)"]
        for k, v in fb.items():
            lines.append(f"{k} = {_toml_value(v)}")
    write_text(path, "\n".join(lines) + "\n")


def read_plan(path: str | Path) -> PlanFile:
    """Read and validate a plan file; ValueError names the table and field on any problem."""
    p = Path(path)
    try:
        d = tomllib.loads(p.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no plan file at {p} (valid: a plan.toml written by `ftplan recommend --save`)") from None
    except OSError as e:
        raise ValueError(f"{p}: cannot read ({e.strerror}); valid: a plan.toml file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); valid: a TOML file in UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: invalid TOML ({e})") from None
    version = d.get("version", PLAN_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= PLAN_VERSION:
        raise ValueError(f"{p}: version {version!r} is not a plan version this ftplan reads (valid: "
                         f"{', '.join(str(v) for v in range(1, PLAN_VERSION + 1))}); a newer ftplan wrote it?")
    model = d.get("model")
    if not isinstance(model, dict) or "ref" not in model:
        raise ValueError(f"{p}: [model] ref is required (a catalog name, Hugging Face id or config.json path)")
    for key in ("ref", "path"):
        if not isinstance(model.get(key, ""), str):
            raise ValueError(f"{p}: [model] {key} must be a string (a catalog name, Hugging Face id or path), "
                             f"got {model[key]!r}")
    if not isinstance(d.get("train"), dict):
        raise ValueError(f"{p}: [train] table is required (the fields of `ftplan estimate`'s options)")
    try:
        train = TrainConfig.from_dict(d["train"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{p}: [train] {e}") from None
    known = {f.name for f in fields(Schedule)}
    sched = d.get("schedule", {})
    if not isinstance(sched, dict):
        raise ValueError(f"{p}: [schedule] must be a table (learning_rate, epochs, ...)")
    unknown = sorted(set(sched) - known)
    if unknown:
        raise ValueError(f"{p}: [schedule] unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    try:
        schedule = Schedule(**sched)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{p}: {e}") from None
    fallback = d.get("fallback", [])
    if not isinstance(fallback, list):
        raise ValueError(f"{p}: fallback must be [[fallback]] tables of [train] fields")
    for i, fb in enumerate(fallback):
        try:
            TrainConfig.from_dict({**train.to_dict(), **fb})
        except (ValueError, TypeError) as e:
            raise ValueError(f"{p}: [[fallback]] #{i + 1}: {e}") from None
    launch = d.get("launch", {})
    types = {"num_machines": int, "main_process_ip": str, "main_process_port": int}
    if not isinstance(launch, dict):
        raise ValueError(f"{p}: [launch] must be a table of {', '.join(types)}")
    for k, v in launch.items():
        if k not in types:
            raise ValueError(f"{p}: [launch] unknown field {k}; valid: {', '.join(types)}")
        if isinstance(v, bool) or not isinstance(v, types[k]):
            raise ValueError(f"{p}: [launch] {k} must be {'an integer' if types[k] is int else 'a string'}, got {v!r}")
    return PlanFile(
        launch=launch,
        model=d["model"]["ref"],
        model_path=d["model"].get("path", ""),
        train=train,
        gpu=d.get("gpu", {}).get("name"),
        schedule=schedule,
        prediction=d.get("prediction", {}),
        fallback=fallback,
    )
