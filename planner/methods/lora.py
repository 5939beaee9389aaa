"""LoRA (peft `LoraConfig`): trained low-rank adapters A (r x in) and B (out x r) beside frozen linear layers.

`use_rslora` (rank-stabilized LoRA, arXiv:2312.03732) changes only the scaling, alpha / sqrt(r) instead of
alpha / r (peft tuners/lora/layer.py `update_layer`): no tensor, FLOP or byte changes. Over a 4-bit base
(`--quant nf4`) this is QLoRA: the base is `planner.quant`'s business, not the method's.
"""

from __future__ import annotations

from ..units import BF16, BOOL, FP32, param_bytes
from .base import Method, TargetError, Trainable, rank_label
from ..modules_to_save import peft_kwargs as saved_peft_kwargs

RANKS = (8, 16, 64)  # what recommend tries
# peft 0.21 utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: q_proj, v_proj for llama, mistral,
# qwen2, qwen3, gemma, gemma2, gemma3_text; Phi-3 has no entry (peft asks for target_modules): its fused q/k/v
# projection; OLMo-2 has none either: ftplan passes q_proj, v_proj explicitly, as for its Llama-shaped neighbours.
DEFAULT_TARGETS = ("q_proj", "v_proj")
FUSED_DEFAULT_TARGETS = ("qkv_proj",)
FAMILY_DEFAULT_TARGETS = {
    "llama": DEFAULT_TARGETS, "mistral": DEFAULT_TARGETS, "qwen2": DEFAULT_TARGETS, "qwen3": DEFAULT_TARGETS,
    "gemma": DEFAULT_TARGETS, "gemma2": DEFAULT_TARGETS, "gemma3_text": DEFAULT_TARGETS, "olmo2": DEFAULT_TARGETS,
    "phi3": FUSED_DEFAULT_TARGETS,
}


def family_default_targets(arch) -> tuple:
    """The target modules LoRA uses on `arch` when the user names none (`FAMILY_DEFAULT_TARGETS`; a family not in
    the table: q_proj, v_proj where the layer has them, else the fused qkv_proj)."""
    if arch.model_type in FAMILY_DEFAULT_TARGETS:
        return FAMILY_DEFAULT_TARGETS[arch.model_type]
    if arch.mla is not None:  # DeepSeek-V3: peft has no default; every MLA projection (planner.deepseek)
        return arch.linear_names
    return DEFAULT_TARGETS if set(DEFAULT_TARGETS) <= set(arch.linear_names) else FUSED_DEFAULT_TARGETS


def lora_targets(arch, tc) -> tuple:
    """The `Linear`s of one decoder layer that LoRA adapts. `all-linear` is every linear layer of the decoder
    (peft excludes the output layer, lm_head). Unknown names raise TargetError listing the valid ones."""
    if arch.moe is not None:
        return _moe_targets(arch, tc)
    if tc.all_linear:
        return arch.linears
    names = set(arch.linear_names)
    missing = [t for t in tc.target_modules if t not in names]
    if missing:
        raise TargetError(
            f"target_modules {', '.join(missing)} not in {arch.name}; valid: {', '.join(arch.linear_names)}, all-linear"
        )
    targets = tuple(lin for lin in arch.linears if lin.name in tc.target_modules)
    for lin in targets:
        if tc.rank > min(lin.in_features, lin.out_features):
            raise TargetError(
                f"rank {tc.rank} exceeds {lin.name} ({lin.in_features} x {lin.out_features}); "
                f"valid: 1..{min(lin.in_features, lin.out_features)}"
            )
    return targets


def _moe_targets(arch, tc) -> tuple:
    """LoRA targets on a MoE model (planner.moe `lora_linears`, `expert_wrappers`): the adapted `nn.Linear`s of any
    layer as `Linear`s (rank checks, labels), after the checks peft itself makes. `all-linear` on Mixtral/Qwen3-MoE
    wraps the fused experts and the router with `ParamWrapper`, which raises for lora_dropout != 0 (peft 0.21
    tuners/lora/layer.py: "does not work with lora_dropout != 0")."""
    from ..arch import Linear
    from ..moe import MoEError, expert_wrappers, lora_linears, lora_target_names

    valid = lora_target_names(arch)
    missing = [] if tc.all_linear else [t for t in tc.target_modules if t not in valid]
    if missing:
        raise TargetError(f"target_modules {', '.join(missing)} not in {arch.name}; valid: {', '.join(valid)}, "
                          "all-linear")
    try:
        wrapped = expert_wrappers(arch, tc)
    except MoEError as e:
        raise TargetError(str(e)) from None
    if wrapped and tc.lora_dropout:
        named = "all-linear" if tc.all_linear else ",".join(tc.target_modules)
        raise TargetError(f"target_modules {named} on {arch.name}: peft 0.21 wraps the fused experts or router "
                          f"(target_parameters, ParamWrapper), which refuses lora_dropout != 0 (got {tc.lora_dropout}); "
                          "valid: lora_dropout 0, or target_modules naming attention projections")
    seen: dict = {}
    for kind, _ in arch.kind_counts:
        for name, n_in, n_out in lora_linears(arch, tc, kind):
            seen.setdefault((name, n_in, n_out), Linear(name, n_in, n_out, False))
    targets = tuple(seen.values())
    for lin in targets:
        if tc.rank > min(lin.in_features, lin.out_features) and lin.name != "shared_expert_gate":
            raise TargetError(
                f"rank {tc.rank} exceeds {lin.name} ({lin.in_features} x {lin.out_features}); "
                f"valid: 1..{min(lin.in_features, lin.out_features)}"
            )
    return targets


class LoRA(Method):
    name = "lora"
    label = "LoRA"
    description = "low-rank adapters on linear layers, base frozen"
    uses_rank = True
    bf16_adapters = True  # adapter_dtype(): trainable tensors, dropout input and adapter outputs in bf16
    quants = ("none", "nf4")
    quality_tier = 2.0
    quality_reason = ("LoRA 2.0 at rank >= 64, +0.1 at rank 16-63, +0.2 below (LoRA arXiv:2106.09685; "
                      "LoRA Learns Less and Forgets Less arXiv:2405.09673)")
    peft_type = "LORA"
    supports_modules_to_save = True

    def validate(self, tc) -> None:
        super().validate(tc)
        if not isinstance(tc.rank, int) or isinstance(tc.rank, bool) or tc.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {tc.rank!r}")
        if tc.lora_alpha is not None and tc.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {tc.lora_alpha}")
        if not 0.0 <= tc.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {tc.lora_dropout}")
        if not tc.target_modules:
            raise ValueError("target_modules must name at least one module, or be 'all-linear'")

    def config_label(self, tc) -> str:
        return rank_label(tc.base_quant.label_prefix + self.label, tc)

    def quality(self, tc) -> float:
        return self.quality_tier + (0.0 if tc.rank >= 64 else 0.1 if tc.rank >= 16 else 0.2)

    def families(self) -> list[dict]:
        return [dict(method=self.name, rank=r, target_modules=("all-linear",)) for r in RANKS]

    def family_label(self, fam: dict) -> str:
        from ..quant import get_quant

        targets = fam.get("target_modules") or ("all-linear",)  # recommend names a MoE model's attention projections
        return f"{get_quant(fam.get('quant', 'none')).label_prefix}{self.label} r{fam['rank']} {','.join(targets)}"

    def scaling(self, tc) -> float:
        """peft: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
        return tc.alpha / (tc.rank ** 0.5 if tc.use_rslora else tc.rank)

    # -- parameters ---------------------------------------------------------------------------------------------
    def trainable_tensors(self, arch, tc) -> list[Trainable]:
        """Per adapted linear and layer: lora_A (r x in) and lora_B (out x r), fp32, no bias.
        Llama-2-7b, r=8 on q_proj,v_proj: 32 x 2 x 8 x (4096 + 4096) = 4,194,304 (peft's README example)."""
        L = arch.num_layers
        out = []
        if arch.moe is not None:  # per layer kind, and the wrapped experts (planner.moe)
            from ..moe import lora_trainable

            lora_targets(arch, tc)  # peft's own refusals first
            return lora_trainable(arch, tc, adapter_dtype(tc))
        for lin in lora_targets(arch, tc):
            dt = adapter_dtype(tc)
            out += [Trainable(tc.rank, lin.in_features, L, dt), Trainable(lin.out_features, tc.rank, L, dt)]
        return out

    # -- the step's graph ---------------------------------------------------------------------------------------
    def adapted(self, b) -> frozenset:
        names = getattr(b, "_lora_names", None)
        if names is None:
            if b.arch.moe is not None:  # the layer's own kind: shared expert or dense MLP (planner.moe)
                from ..moe import lora_linears

                names = frozenset(n for n, _, _ in lora_linears(b.arch, b.tc, b.kind))
            else:
                names = frozenset(lin.name for lin in lora_targets(b.arch, b.tc))
            b._lora_names = names
        return names

    def after_linear(self, b, x: int, y: int, name: str, n_in: int, n_out: int) -> int:
        """peft LoRA: `result + lora_B(lora_A(dropout(x.to(fp32)))) * scaling`, then `.to(result dtype)`.

        Adapters are fp32. Saved: dropout's 1-byte mask (when x needs a gradient; `native_dropout` on CUDA),
        lora_A's input (the fp32 dropout output, 4 B/element; bf16 cast under autocast, 2 B), lora_A's output
        (r values per token) for lora_B. With dropout 0 the input itself is saved (its fp32 cast)."""
        if name not in self.adapted(b):
            return y
        xl = self.adapter_input(b, x, n_in)
        d = self.dropout_input(b, xl, n_in)
        lora = self.lora_output(b, d, n_in, n_out)
        bs = b.mul_scalar(lora, n_out)
        s = b.add(y, bs, n_out)
        out = b.cast(s, n_out, b.dtype[y])
        self.module_return(b, x, xl)
        return out

    def adapter_input(self, b, x: int, n_in: int) -> int:
        """`x = self._cast_input_dtype(x, lora_A.weight.dtype)` (peft 0.21 tuners_utils.py): `x.to(adapter dtype)`, a
        copy unless x already has it."""
        return b.cast(x, n_in, adapter_dtype(b.tc))

    def module_return(self, b, x: int, xl: int) -> None:
        """The LoRA module's forward returns: until then its argument `x` (referenced by the caller, e.g. LlamaMLP's
        `self.down_proj(act * up)` temporary) and the cast copy that peft binds to its local `x` stay alive, even
        after their last use by an op (peft 0.21 tuners/lora/layer.py `Linear.forward` (lines 1074-1106) and
        tuners/lora/bnb.py `Linear4bit.forward`: `x = self._cast_input_dtype(x, ...)` is rebound inside the adapter
        loop and lives through `result + lora_B(lora_A(dropout(x))) * scaling` and the final `.to(...)`)."""
        b.g.op("lora_return", [x, xl], [])

    def dropout_input(self, b, xl: int, n_in: int) -> int:
        """`dropout(x)` of the adapter-dtype input `xl` (`adapter_input`)."""
        g = b.g
        dt = adapter_dtype(b.tc)
        if b.tc.lora_dropout <= 0:
            return xl
        d = b.new(n_in, dt, g.rg(xl))
        mask = b.new(n_in, BOOL, False, kind="activations")
        g.op("native_dropout", [xl], [d, mask], saved=[mask] if g.rg(xl) else [])
        return d

    def lora_output(self, b, d: int, n_in: int, n_out: int) -> int:
        """`lora_B(lora_A(d))`."""
        r = b.tc.rank
        a = _trained_linear(b, d, n_in, r)
        return _trained_linear(b, a, r, n_out)

    # -- throughput ---------------------------------------------------------------------------------------------
    def adapter_matmul_params(self, arch, tc) -> int:
        """r x (in + out) per adapted linear: LoRA's own matmuls."""
        if arch.moe is not None:  # per layer kind (the wrapped experts fold their adapters once per step, not per token)
            from ..moe import lora_linears

            return sum(n * tc.rank * (i + o) for kind, n in arch.kind_counts for _, i, o in lora_linears(arch, tc, kind))
        return arch.num_layers * sum(tc.rank * (lin.in_features + lin.out_features) for lin in lora_targets(arch, tc))

    # -- running ------------------------------------------------------------------------------------------------
    def peft_kwargs(self, tc) -> dict:
        from ..config import ALL_LINEAR

        return dict(r=tc.rank, lora_alpha=tc.alpha, lora_dropout=tc.lora_dropout, use_rslora=tc.use_rslora,
                    target_modules=ALL_LINEAR if tc.all_linear else list(tc.target_modules), task_type="CAUSAL_LM",
                    **saved_peft_kwargs(tc))

    def peft_config(self, tc, model_type=None):
        import peft

        return peft.LoraConfig(**self.peft_kwargs(tc))


def adapter_dtype(tc) -> int:
    """Bytes per element of the adapters: fp32 (peft's `autocast_adapter_dtype=True`), or bf16 when the recipe casts
    them (`Recipe.adapter_dtype`, TRL on a quantized model)."""
    return BF16 if tc.recipe.adapter_dtype == "bf16" else FP32


def _trained_linear(b, x: int, n_in: int, n_out: int) -> int:
    """An fp32 adapter matrix (LoRA A or B): saves its input; under autocast its bf16 casts and the bf16 copy of
    the weight (cast per forward, saved when the input needs a gradient)."""
    g = b.g
    if not b.R.autocast:
        dt = adapter_dtype(b.tc)
        y = b.new(n_out, dt, True)
        g.op("adapter", [x], [y], saved=[x], param_grad=(0, param_bytes(n_in * n_out, dt)))
        return y
    xc = b.cast(x, n_in, BF16)
    wc = b.fixed(param_bytes(n_in * n_out, BF16), rg=True, kind="weight_copies", dtype=BF16)
    g.op("weight_cast", [], [wc], param_grad=(0, param_bytes(n_in * n_out, FP32)))
    y = b.new(n_out, BF16, True)
    g.op("adapter", [xc, wc], [y], saved=[xc] + ([wc] if g.rg(xc) else []))
    return y


METHOD = LoRA()
