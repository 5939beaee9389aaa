"""DoRA (peft `LoraConfig(use_dora=True)`, arXiv:2402.09353): LoRA plus a trained magnitude per output feature.

What a DoRA layer does in training, as peft 0.21 runs it (`tuners/lora/variants.py` `DoraLinearVariant.forward`,
`tuners/lora/dora.py` `DoraLinearLayer.forward`; the 4-bit base through `tuners/lora/bnb.py` `Linear4bit.forward`):

    x = x.to(fp32)                                   # peft casts the input to the adapter's dtype
    x = dropout(x); base_result = None               # with dropout 0: base_result = result (minus the bias)
    lora_weight = lora_B(lora_A(eye(in))).T          # (out, in) fp32, through the adapters' forward (FSDP-safe)
    weight = dequantize(base).to(fp32)               # the frozen weight as an fp32 copy (a 4-bit base is
                                                     # dequantized to bf16 first)
    norm = ||weight + scaling * lora_weight.detach()||_row   (then detached: no gradient, DoRA Sec. 4.3)
    m = magnitude / norm                             # saves norm for the magnitude's gradient
    lora = lora_B(lora_A(x))
    base_result = F.linear(x, weight)                # the base matmul again, in fp32; saves the fp32 weight copy
                                                     # when x needs a gradient
    result = result + ((m - 1) * base_result + m * lora * scaling)

So per adapted linear DoRA adds, beyond LoRA: transient in x in, in x r and out x in fp32 tensors while the layer
runs (the identity, its product through A and the fp32 delta weight), an fp32 copy of the weight (kept for backward
when the input needs a gradient), the weight norm's two out x in fp32 temporaries, and four tokens x out fp32
products. The magnitude is one fp32 vector of out_features per adapted linear.
"""

from __future__ import annotations

from ..units import BF16, FP32, param_bytes
from .base import Trainable
from .lora import LoRA, lora_targets


class DoRA(LoRA):
    bf16_adapters = False  # DoRA's magnitude and weight-norm ops are modelled with fp32 adapters only
    name = "dora"
    label = "DoRA"
    description = "LoRA with a trained per-feature magnitude (weight-decomposed), base frozen"
    quality_tier = 1.9
    quality_reason = ("DoRA matches or beats LoRA at the same rank (arXiv:2402.09353, Tables 1-4): 0.1 below LoRA's "
                      "tier at each rank")

    def trainable_tensors(self, arch, tc) -> list[Trainable]:
        """LoRA's A and B plus `lora_magnitude_vector`: one fp32 vector of out_features per adapted linear
        (peft `DoraLinearLayer.update_layer`: the weight norm, fp32 because the fp32 delta promotes it)."""
        L = arch.num_layers
        return super().trainable_tensors(arch, tc) + [
            Trainable(1, lin.out_features, L, FP32) for lin in lora_targets(arch, tc)
        ]

    def families(self) -> list[dict]:
        return [dict(method=self.name, rank=r, target_modules=("all-linear",)) for r in (16, 64)]

    def peft_kwargs(self, tc) -> dict:
        return dict(super().peft_kwargs(tc), use_dora=True)

    # -- the step's graph ---------------------------------------------------------------------------------------
    def after_linear(self, b, x: int, y: int, name: str, n_in: int, n_out: int) -> int:
        if name not in self.adapted(b):
            return y
        g, tc, R = b.g, b.tc, b.R
        r = tc.rank
        if R.quantized:  # bitsandbytes' LoRA Linear4bit clones the base result "defensively" first
            c = b.new(n_out, b.dtype[y], g.rg(y))
            g.op("clone", [y], [c], grad_alias=[y])
            y = c
        xl = self.adapter_input(b, x, n_in)
        d = self.dropout_input(b, xl, n_in)
        # lora_weight = lora_B(lora_A(eye(in))).T: its graph is dropped when the layer returns (only its detached
        # value is used), so these live to the end of the layer's forward and are never saved for backward
        mm = BF16 if R.autocast else FP32
        eye = b.fixed(param_bytes(n_in * n_in, FP32), False, "temporaries", FP32)
        g.op("eye", [], [eye])
        held = [eye]
        if R.autocast:  # autocast casts the identity for lora_A's matmul
            eye16 = b.fixed(param_bytes(n_in * n_in, BF16), False, "temporaries", BF16)
            g.op("to_copy", [eye], [eye16])
            held.append(eye16)
        a_eye = b.fixed(param_bytes(n_in * r, mm), False, "temporaries", mm)
        g.op("lora_A_eye", held[-1:], [a_eye])
        lw = b.fixed(param_bytes(n_in * n_out, mm), False, "temporaries", mm)
        g.op("lora_B_eye", [a_eye], [lw])
        held.append(a_eye)
        if mm != FP32:  # `lora_weight.to(x.dtype)`: x is the fp32 dropout output
            lw32 = b.fixed(param_bytes(n_in * n_out, FP32), False, "temporaries", FP32)
            g.op("to_copy", [lw], [lw32])
            lw = lw32
        held.append(lw)
        # weight = dequantize_module_weight(base).to(fp32)
        if R.quantized:
            blocks = -(-(n_in * n_out) // 64)
            w16 = b.fixed(param_bytes(n_in * n_out, BF16), False, "temporaries", BF16)
            # bnb dequantize_4bit: the nested absmax dequantized into one fp32 buffer (offset added in place)
            g.op("dequantize_4bit", [], [w16], fwd_temp=(0, param_bytes(blocks, FP32)))
            wf = b.fixed(param_bytes(n_in * n_out, FP32), False, "weight_copies", FP32)
            g.op("to_copy", [w16], [wf])
        elif R.weight != FP32:
            wf = b.fixed(param_bytes(n_in * n_out, FP32), False, "weight_copies", FP32)
            g.op("to_copy", [], [wf])
        else:
            wf = None  # an fp32 base weight is used as it is
        # get_weight_norm: weight + scaling * lora_weight, then the row norm (fp32 out)
        scaled = b.fixed(param_bytes(n_in * n_out, FP32), False, "temporaries", FP32)
        g.op("mul_scalar", [lw], [scaled])
        summed = b.fixed(param_bytes(n_in * n_out, FP32), False, "temporaries", FP32)
        g.op("add", [scaled] + ([wf] if wf is not None else []), [summed])
        norm = b.fixed(param_bytes(n_out, FP32), False, "activations", FP32)
        g.op("vector_norm", [summed], [norm])
        # m = magnitude / norm (saves norm for the magnitude's gradient)
        m = b.fixed(param_bytes(n_out, FP32), True, "activations", FP32)
        g.op("div_magnitude", [norm], [m], saved=[norm], param_grad=(0, param_bytes(n_out, FP32)))
        lora = self.lora_output(b, d, n_in, n_out)
        if tc.lora_dropout > 0:  # base_result = F.linear(x, weight), again, on the dropout output
            base = self._base_again(b, d, wf, n_in, n_out)
        else:
            base = y
            if b.arch.linear(name).bias:  # base_result - bias
                base = b.new(n_out, b.dtype[y], g.rg(y))
                g.op("sub_bias", [y], [base], grad_alias=[y])
        m1 = b.fixed(param_bytes(n_out, FP32), True, "activations", FP32)
        g.op("sub_one", [m], [m1], grad_alias=[m])
        t2 = self._scale(b, m1, base, n_out)
        t3 = self._scale(b, m, lora, n_out)
        t4 = b.mul_scalar(t3, n_out)
        dora = b.add(t2, t4, n_out)
        g.op("dora_return", held + ([wf] if wf is not None else []), [])  # the layer's locals are released
        s = b.add(y, dora, n_out)
        out = b.cast(s, n_out, b.dtype[y])
        self.module_return(b, x, xl)
        return out

    def _base_again(self, b, d: int, wf, n_in: int, n_out: int) -> int:
        """`F.linear(x, weight)` on the dropout output: fp32 (weight and input fp32), or under autocast on bf16 casts
        of both (the weight's cast is not cached: the frozen weight does not require grad). The weight (copy) is
        saved when x needs a gradient."""
        g = b.g
        rg = g.rg(d)
        if b.R.autocast:
            xc = b.cast(d, n_in, BF16)
            wc = b.fixed(param_bytes(n_in * n_out, BF16), False, "weight_copies", BF16)
            g.op("weight_cast", [wf] if wf is not None else [], [wc])
            y = b.new(n_out, BF16, rg)
            g.op("linear_again", [xc, wc], [y], saved=[wc] if rg else [])
            return y
        y = b.new(n_out, FP32, rg)
        if wf is None:  # the fp32 base parameter itself: saving it costs nothing
            g.op("linear_again", [d], [y])
        else:
            g.op("linear_again", [d, wf], [y], saved=[wf] if rg else [])
        return y

    def _scale(self, b, v: int, t: int, width: int) -> int:
        """`v * t` with v a (1, out) fp32 vector that needs a gradient: saves t (and v when t needs a gradient); the
        vector's gradient sums `grad * t` over tokens through a tokens x out fp32 transient."""
        g = b.g
        y = b.new(width, FP32, True)
        g.op("mul_vector", [v, t], [y], saved=[t] + ([v] if g.rg(t) else []), bwd_temp=(b.seq * width * FP32, 0))
        return y

    # -- throughput ---------------------------------------------------------------------------------------------
    def adapter_matmul_params(self, arch, tc) -> int:
        """LoRA's A and B, plus the base matmul DoRA runs again on the dropout output (with dropout > 0)."""
        again = sum(lin.in_features * lin.out_features for lin in lora_targets(arch, tc)) if tc.lora_dropout > 0 else 0
        return super().adapter_matmul_params(arch, tc) + arch.num_layers * again


METHOD = DoRA()
