"""`TrainConfig`: one fine-tuning configuration, the unit that estimate, recommend, run and calibrate share.

It describes *how* a model is trained, not which model or GPU (see `planner.arch.ModelArch` and
`planner.profiles.GPUProfile`). The defaults are what a user of peft and the transformers `Trainer` expects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from .frozen import fields_hash
from .methods import ALIASES, METHOD_CHOICES, get_method
from .quant import get_quant
from .recipe import Recipe
from .strategies import OFFLOAD_STRATEGY_NAMES, STRATEGY_NAMES

PRECISIONS = ("bf16", "mixed", "fp32", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd", "adafactor")
STRATEGIES = STRATEGY_NAMES  # planner/strategies: ddp, fsdp, zero1, zero2, zero3

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class TrainConfig:
    """One training configuration (per device).

    Args:
        method: a registered method (`planner.methods`: full, lora, dora, prefix, prompt, ia3); `qlora` is the
            alias of method lora over quant nf4 (and `qdora` of dora over nf4).
        quant: how the frozen base weights are stored (`planner.quant`: none, or nf4 4-bit).
        precision: bf16 (weights, grads and optimizer state in bf16), mixed (fp32 master weights, grads and
            state, forward/backward under bf16 autocast), fp16 (as mixed, under fp16 autocast with a GradScaler: for
            GPUs without bf16) or fp32. A 4-bit base computes in bf16.
        rank: LoRA/DoRA rank r.  # higher increases quality and memory
        use_rslora: rank-stabilized LoRA scaling, alpha / sqrt(r) (scaling only: no memory change).
        lora_alpha: LoRA scaling numerator; None means 2 x rank.
        lora_dropout: dropout on the LoRA input; > 0 stores a mask and a copy of each adapted input.
        target_modules: module names to adapt (e.g. ("q_proj", "v_proj")) or ("all-linear",).
        num_virtual_tokens: prefix / prompt tuning length.
        seq_len: tokens per sequence (every sequence full length).
        batch_size: sequences per device per micro-step.
        grad_accum: micro-steps per optimizer step (memory-neutral, multiplies the effective batch).
        grad_ckpt: gradient checkpointing (non-reentrant) of every decoder layer.  # True reduces memory
        optimizer: adamw | adamw8bit | paged_adamw8bit | sgd | adafactor.
        num_gpus: data-parallel devices.
        strategy: ddp | fsdp (full shard) | zero1 | zero2 | zero3 when num_gpus > 1 (`planner.strategies`).
        cpu_offload: offload optimizer state (zero1/zero2/zero3/fsdp) and, for zero3/fsdp, parameters to CPU.
        recipe: how the step runs (`planner.recipe.Recipe`: attention, loss, packing, offloading, k-bit
            preparation); `Recipe.REFERENCE` by default.
    """

    method: str = "lora"
    quant: str = "none"
    precision: str = "bf16"
    rank: int = 16
    lora_alpha: int | None = None
    lora_dropout: float = 0.05
    use_rslora: bool = False
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    num_virtual_tokens: int = 20
    seq_len: int = 2048
    batch_size: int = 1
    grad_accum: int = 1
    grad_ckpt: bool = False
    optimizer: str = "adamw"
    num_gpus: int = 1
    strategy: str = "ddp"
    cpu_offload: bool = False
    recipe: Recipe = Recipe.REFERENCE
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.method in ALIASES:  # `qlora` is LoRA over an NF4 base
            method, quant = ALIASES[self.method]
            if self.quant not in ("none", quant):
                raise ValueError(f"quant {self.quant!r} contradicts method {self.method!r} (which means {method} over {quant})")
            object.__setattr__(self, "method", method)
            object.__setattr__(self, "quant", quant)
        if not isinstance(self.recipe, Recipe):
            object.__setattr__(self, "recipe", Recipe.from_dict(self.recipe))
        _choice("method", self.method, METHOD_CHOICES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("strategy", self.strategy, STRATEGIES)
        for name in ("seq_len", "batch_size", "grad_accum", "num_gpus"):
            _positive(name, getattr(self, name))
        spec = get_method(self.method)
        q = get_quant(self.quant)
        object.__setattr__(self, "_spec", spec)  # not fields: equality, hashing and to_dict ignore them
        object.__setattr__(self, "_base_quant", q)
        spec.validate(self)
        if self.quant not in spec.quants:
            raise ValueError(f"quant {self.quant!r} is not valid with method {self.method!r} "
                             f"(valid: {', '.join(spec.quants)})")
        if q.quantized and self.precision != "bf16":
            raise ValueError(
                f"precision {self.precision!r} is not valid with {self.method_name} ({spec.name} over a {q.name} base): "
                "it computes in bf16 over 4-bit weights (valid: bf16)"
            )
        if self.recipe.offload_checkpoints and not self.grad_ckpt:
            raise ValueError("recipe.offload_checkpoints offloads the inputs gradient checkpointing keeps: it needs "
                             "grad_ckpt (valid with offload_checkpoints: grad_ckpt true)")
        if self.recipe.attn_implementation == "flash_attention_2" and self.precision == "fp32":
            # flash-attn computes in fp16/bf16 only; transformers casts fp32 inputs back only under autocast or
            # for a quantized model (integrations/flash_attention.py `get_target_dtype`)
            raise ValueError("precision 'fp32' is not valid with recipe.attn_implementation 'flash_attention_2' "
                             "(flash-attn computes in fp16/bf16; valid: bf16, mixed)")
        if self.recipe.loss == "cce" and self.precision == "fp32" and not q.quantized:
            # ml-cross-entropy d42911f: `cce_linear_cross_entropy` needs a bf16 GPU, and its backward kernel takes
            # bf16/fp16 embeddings and classifier (cce_backward.py); Axolotl runs it under bf16
            raise ValueError("recipe.loss 'cce' is not valid with precision 'fp32': Cut Cross-Entropy computes in "
                             "bf16 (valid precisions with cce: bf16, mixed)")
        if self.recipe.adapter_dtype == "bf16" and (not spec.bf16_adapters or self.precision != "bf16"):
            raise ValueError(f"recipe.adapter_dtype 'bf16' is modelled for LoRA, QLoRA and IA3 in precision bf16, not "
                             f"{self.method_name} in {self.precision} (valid here: fp32)")
        if self.recipe.packing and not spec.supports_packing:
            raise ValueError(f"recipe.packing is not valid with method {self.method!r}: peft prepends the virtual "
                             "tokens to every row and ignores position_ids, so packed examples would attend to each "
                             "other (valid with packing: full, lora, qlora, dora, ia3)")
        if self.recipe.padding != "none" and spec.uses_virtual_tokens:
            raise ValueError(f"recipe.padding {self.recipe.padding!r} is not modelled with method {self.method!r} "
                             "(peft widens the attention mask by the virtual tokens; valid here: none)")
        if self.recipe.packing and self.recipe.attn_implementation == "flash_attention_2" and self.batch_size > 1:
            # transformers 5.17 modeling_flash_attention_utils.py `_is_packed_sequence`: `batch_size == 1 and ...`;
            # with more rows it runs flash_attn_func over whole rows and packed examples attend to each other
            # (Axolotl's multipack patch of the unpad path, which handles several rows, is not modelled either)
            raise ValueError(f"recipe.packing with recipe.attn_implementation 'flash_attention_2' and batch_size "
                             f"{self.batch_size} is not modelled: transformers detects packed rows for flash-attn "
                             "only with one row per micro-batch (valid: batch_size 1, or --attn sdpa)")
        if self.num_gpus == 1 and self.strategy != "ddp":
            object.__setattr__(self, "strategy", "ddp")
        if self.cpu_offload and self.strategy not in OFFLOAD_STRATEGY_NAMES:
            raise ValueError(f"cpu_offload needs strategy {', '.join(OFFLOAD_STRATEGY_NAMES[:-1])} or "
                             f"{OFFLOAD_STRATEGY_NAMES[-1]} (valid with offload: {', '.join(sorted(OFFLOAD_STRATEGY_NAMES))})")
        object.__setattr__(self, "_hash", fields_hash(self))  # last: the fields above may have been normalized

    def __hash__(self) -> int:
        """The hash dataclass would compute (every field but `extra`), computed once at the end of `__post_init__`
        (the planner's lru_caches are keyed on the config; recommend asks them thousands of times per second)."""
        h = self.__dict__.get("_hash")
        return fields_hash(self) if h is None else h  # None only while __post_init__ validates

    # -- derived ----------------------------------------------------------------------------------
    @property
    def alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.rank

    @property
    def tokens_per_micro_step(self) -> int:
        return self.seq_len * self.batch_size

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step over all devices."""
        return self.seq_len * self.batch_size * self.grad_accum * self.num_gpus

    @property
    def spec(self):
        """The registered `planner.methods.Method` of `method`."""
        return self._spec

    @property
    def base_quant(self):
        """The `planner.quant.BaseQuant` of `quant`."""
        return self._base_quant

    @property
    def method_name(self) -> str:
        """The name users know the (method, base quantization) pair by: `qlora` for LoRA over NF4, else the
        method (records, tables and reports group by it)."""
        if self.quant == "none":
            return self.method
        for alias, pair in ALIASES.items():
            if pair == (self.method, self.quant):
                return alias
        return self.method

    @property
    def is_peft(self) -> bool:
        return not self.spec.trains_base

    @property
    def all_linear(self) -> bool:
        return tuple(self.target_modules) == (ALL_LINEAR,)

    def replace(self, **changes) -> "TrainConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain values (plan files, records, `--json`); `method` is the name users know the pair by (`qlora`, not
        `lora` with quant nf4), so that files and JSON keep the values they always had."""
        d = asdict(self)
        d["method"] = self.method_name
        d["target_modules"] = list(self.target_modules)
        if self.recipe.is_reference:  # files and JSON of the reference recipe stay as they were
            d.pop("recipe")
        d.pop("extra", None)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a plain dict (a plan file, a record); unknown keys are an error naming the valid keys."""
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        d = dict(d)
        for f in fields(cls):  # a plan file or record is untyped text: name the field with the wrong type
            problem = _type_problem(f.type, d.get(f.name))
            if problem:
                raise ValueError(f"{f.name} must be {problem}, got {d[f.name]!r}")
        if "target_modules" in d and d["target_modules"] is not None:
            d["target_modules"] = parse_target_modules(d["target_modules"])
        return cls(**{k: v for k, v in d.items() if v is not None})

    def describe(self) -> str:
        """Short human label: `QLoRA r16 all-linear, bf16, b4 x s2048, ckpt, adamw`."""
        from .methods import method_label

        parts = [method_label(self)]
        if self.recipe.modules_to_save:  # peft's trained copies (planner.modules_to_save)
            parts[0] += " +" + "+".join(self.recipe.modules_to_save)
        if not self.base_quant.quantized:
            parts.append(self.precision)
        parts.append(f"b{self.batch_size}x{self.seq_len}" + (f" ga{self.grad_accum}" if self.grad_accum > 1 else ""))
        if self.grad_ckpt:
            parts.append("ckpt" + ("+offload" if self.recipe.offload_checkpoints else ""))
        parts.append(self.optimizer)
        if self.num_gpus > 1:
            parts.append(f"{self.num_gpus}x {self.strategy}" + ("+offload" if self.cpu_offload else ""))
        return ", ".join(parts)


def parse_target_modules(value) -> tuple[str, ...]:
    """`'q_proj,v_proj'` or `['q_proj', 'v_proj']` -> `('q_proj', 'v_proj')`; `'all-linear'` -> `('all-linear',)`."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    else:
        items = [str(v).strip() for v in value]
    items = tuple(v for v in items if v)
    if ALL_LINEAR in items and len(items) > 1:
        raise ValueError("target_modules: 'all-linear' cannot be combined with module names")
    return items


def _type_problem(annotation: str, value) -> str | None:
    """What `value` should be for a field annotated `annotation` (None: acceptable, or a type not checked here)."""
    if value is None:
        return None
    kind = str(annotation).replace(" | None", "")
    if kind == "bool" and not isinstance(value, bool):
        return "true or false"
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return "an integer"
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return "a number"
    if kind.startswith("tuple[str") and not (isinstance(value, str) or (
            isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))):
        return "a list of module names, or 'all-linear'"
    return None


def _choice(name: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(valid)}; got {value!r}")


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
