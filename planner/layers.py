"""The ops of one training step, piece by piece, as `planner.graph` ops: what each allocates and saves.

Each builder mirrors the forward code it models (transformers 5.17 `modeling_llama.py` / `modeling_qwen2.py` /
`modeling_gemma2.py` / `modeling_phi3.py` / `loss_utils.py`, peft 0.21 `tuners/lora/layer.py` and `ia3/layer.py`,
bitsandbytes 0.50 `Linear4bit`) and autograd's saved tensors for each op (`derivatives.yaml`: an input is saved only
when the gradient that needs it is required). Sizes are per sequence of the micro-batch (the `per_batch` channel)
or fixed (weight copies, parameter gradients); widths are elements per token.

Dtypes follow the precision (see `Regime`): bf16 keeps everything in bf16; `mixed` keeps the residual stream
and norms in fp32 (fp32 embeddings and weights) while autocast runs linears and sdpa in bf16; fp32 is fp32
throughout; QLoRA's residual stream, norms, embeddings and lm_head are fp32 after
`prepare_model_for_kbit_training`, and `Linear4bit` computes in bf16 but returns its input's dtype (fp32);
without the preparation (`Recipe.kbit_preparation=False`) they stay bf16, as loaded.
peft adapters (LoRA A/B, IA3 vectors, prompt encoders) are fp32 in every case (peft `autocast_adapter_dtype`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from . import attention as sdp
from .arch import ModelArch
from .config import TrainConfig
from .graph import ZERO, Graph
from .layerkinds import LayerKind
from .methods import get_method
from .mla import decoder_layer as mla_decoder_layer
from .modules_to_save import trains_embedding, trains_lm_head
from .moe_graph import moe_block
from .units import BF16, FP32, param_bytes, round_up  # noqa: F401  (param_bytes: re-exported)


@dataclass(frozen=True)
class Regime:
    """Bytes per element of each kind of tensor under a precision."""

    name: str
    act: int  # residual stream, embeddings, rotary cos/sin
    lin: int  # output of a linear layer
    attn: int  # sdpa operands and output
    logits: int  # lm_head output
    weight: int  # unquantized base weights (and full-FT trainable weights)
    autocast: bool  # linears and sdpa run under bf16 autocast
    quantized: bool  # linear weights of the decoder are 4-bit (QLoRA)


def regime(tc: TrainConfig) -> Regime:
    """The dtypes `tc` computes in: by base quantization, k-bit preparation and precision (`_regime`, memoized)."""
    return _regime(tc.base_quant.quantized, tc.recipe.kbit_preparation, tc.precision)


@functools.lru_cache(maxsize=None)
def _regime(quantized: bool, kbit_preparation: bool, precision: str) -> Regime:
    if quantized and not kbit_preparation:
        # no prepare_model_for_kbit_training (TRL, LLaMA-Factory): embeddings, norms and lm_head stay in the bf16
        # the model was loaded in, so the residual stream is bf16 and Linear4bit's casts are no-ops
        return Regime("qlora-bf16", act=BF16, lin=BF16, attn=BF16, logits=BF16, weight=BF16, autocast=False,
                      quantized=True)
    if quantized:
        return Regime("qlora", act=FP32, lin=FP32, attn=FP32, logits=FP32, weight=FP32, autocast=False, quantized=True)
    if precision in ("mixed", "fp16"):  # fp16 autocast: the same bytes as bf16's (2 B)
        return Regime(precision, act=FP32, lin=BF16, attn=BF16, logits=BF16, weight=FP32, autocast=True, quantized=False)
    if precision == "fp32":
        return Regime("fp32", act=FP32, lin=FP32, attn=FP32, logits=FP32, weight=FP32, autocast=False, quantized=False)
    return Regime("bf16", act=BF16, lin=BF16, attn=BF16, logits=BF16, weight=BF16, autocast=False, quantized=False)


class Builder:
    """Builds one piece (a decoder layer, the embedding, the loss) for an architecture and a configuration.

    `seq`: tokens per sequence seen by the layers (prompt tuning adds its virtual tokens);
    `kv_seq`: keys per sequence (prefix tuning adds its virtual tokens); `kind`: the decoder layer's kind
    (default: layer 0's)."""

    def __init__(self, arch: ModelArch, tc: TrainConfig, seq: int, kv_seq: int, checkpointed: bool = False,
                 kind: LayerKind | None = None, sm: tuple = sdp.DEFAULT_CAPABILITY):
        self.arch, self.tc, self.seq, self.kv_seq = arch, tc, seq, kv_seq
        self.checkpointed = checkpointed  # a checkpointed layer: recomputed saved tensors go when unpacked
        self.sm = tuple(sm)  # the GPU's compute capability: which sdpa kernel runs (planner.attention)
        self.kind = kind or arch.layer_kinds[0]
        self.masked = self.kind.masked(kv_seq)  # this layer attends through a materialized (sliding-window) mask
        # transformers builds a KV cache in training unless gradient checkpointing turns `use_cache` off
        # (a packed batch passes use_cache=False: trainer.data.collate, trainer.recipe.synthetic_batch)
        self.use_cache = (bool(arch.config.get("use_cache", True)) and not checkpointed and not tc.grad_ckpt
                          and tc.recipe.loss not in NO_CACHE_LOSSES and not tc.recipe.packing)
        self.batch_mask = batch_mask(tc)  # packed or padded rows: sdpa and eager get a materialized 4D mask
        self.R = regime(tc)
        self.g = Graph()
        self.dtype: dict[int, int] = {}
        self.method = get_method(tc.method)
        self.full = self.method.trains_base
        self.head_trained = trains_lm_head(tc)  # lm_head, or peft's trained copy of it (planner.modules_to_save)
        self.embedding_trained = trains_embedding(tc)  # the input embedding, or its trained copy
        self.recipe = tc.recipe
        # what transformers runs for the recipe's attention on this family (gpt-oss: eager for sdpa)
        self.attn_impl = sdp.effective_implementation(arch.model_type, tc.recipe.attn_implementation)

    # -- primitives ---------------------------------------------------------------------------------------------
    def new(self, width: int, dtype: int, rg: bool, kind: str = "activations", seq: int | None = None) -> int:
        """A tensor of `width` elements per token, `seq` tokens per sequence."""
        t = self.g.tensor(((seq or self.seq) * width * dtype, 0), rg=rg, kind=kind)
        self.dtype[t] = dtype
        return t

    def fixed(self, nbytes: int, rg: bool, kind: str, dtype: int) -> int:
        t = self.g.tensor((0, nbytes), rg=rg, kind=kind)
        self.dtype[t] = dtype
        return t

    def input(self, width: int, dtype: int, rg: bool) -> int:
        t = self.g.tensor((self.seq * width * dtype, 0), rg=rg, external=True)
        self.dtype[t] = dtype
        return t

    def cast(self, x: int, width: int, dtype: int, seq: int | None = None) -> int:
        """`x.to(dtype)`: a new tensor when the dtype changes (ToCopyBackward saves nothing), else `x` itself."""
        if self.dtype[x] == dtype:
            return x
        y = self.new(width, dtype, self.g.rg(x), seq=seq)
        self.g.op("to_copy", [x], [y])
        return y

    def mul_scalar(self, x: int, width: int) -> int:
        """`x * python_scalar`: a new tensor, nothing saved."""
        y = self.new(width, self.dtype[x], self.g.rg(x))
        self.g.op("mul_scalar", [x], [y])
        return y

    def add(self, a: int, b: int, width: int) -> int:
        """`a + b` with type promotion. Nothing saved; the output gradient passes to a same-dtype input unchanged."""
        dt = max(self.dtype[a], self.dtype[b])
        y = self.new(width, dt, self.g.rg(a) or self.g.rg(b))
        alias = [t for t in (a, b) if self.dtype[t] == dt]
        self.g.op("add", [a, b], [y], grad_alias=alias)
        return y

    def mul(self, a: int, b: int, width: int) -> int:
        """`a * b` (same shape): saves `b` if `a` needs a gradient and `a` if `b` does."""
        dt = max(self.dtype[a], self.dtype[b])
        saved = ([b] if self.g.rg(a) else []) + ([a] if self.g.rg(b) else [])
        y = self.new(width, dt, self.g.rg(a) or self.g.rg(b))
        self.g.op("mul", [a, b], [y], saved=saved)
        return y

    # -- norms --------------------------------------------------------------------------------------------------
    def rmsnorm(self, x: int, width: int, groups: int = 1) -> int:
        """LlamaRMSNorm: `w * (x.float() * rsqrt(x.float().pow(2).mean(-1) + eps)).to(x.dtype)`.

        Saved, when x needs a gradient: the fp32 copy of x (x itself if already fp32: 4 B/element either way)
        and rsqrt (4 B per token and group); when w is trained (full FT): the normalized tensor cast back to x's
        dtype. GemmaRMSNorm computes `(x.float() * rsqrt(...)) * (1 + w.float())` then casts, OLMo-2's
        `(w * x.float() * rsqrt(...)).to(dtype)` likewise: they save the fp32 normalized tensor instead
        (4 B/element). `groups`: rows normalized per token (a per-head q/k norm over the (B, S, H, D) view: one
        mean and rsqrt per head, Qwen3RMSNorm / Gemma3RMSNorm on `head_dim`)."""
        g, R = self.g, self.R
        rx, rw = g.rg(x), self.full
        xd = self.dtype[x]
        x32 = self.cast(x, width, FP32)
        sq = self.new(width, FP32, rx)
        g.op("pow", [x32], [sq], saved=[x32] if rx else [])
        var = self.new(groups, FP32, rx)
        g.op("mean", [sq], [var])
        var2 = self.new(groups, FP32, rx)
        g.op("add_eps", [var], [var2])
        r = self.new(groups, FP32, rx)
        g.op("rsqrt", [var2], [r], saved=[r] if rx else [])
        y32 = self.new(width, FP32, rx)
        g.op("mul_norm", [x32, r], [y32], saved=[x32, r] if rx else [])
        wbytes = R.weight  # fp32 after k-bit preparation (QLoRA's regime) and under mixed/fp32
        out_dt = max(wbytes, xd)
        pgrad = (0, param_bytes(width, wbytes)) if rw else ZERO
        if self.arch.fp32_norm_product:
            out32 = self.new(width, FP32, rx or rw)
            g.op("mul_weight", [y32], [out32], saved=[y32] if rw else [], param_grad=pgrad,
                 bwd_temp=(self.seq * width * FP32, 0) if rw else ZERO)
            return self.cast(out32, width, xd)
        yc = self.cast(y32, width, xd)
        out = self.new(width, out_dt, rx or rw)
        # w * yc: the weight gradient is (grad * yc) summed over tokens: a full-size product is transient
        g.op("mul_weight", [yc], [out], saved=[yc] if rw else [], param_grad=pgrad,
             bwd_temp=(self.seq * width * out_dt, 0) if rw else ZERO)
        return out

    # -- linear layers ------------------------------------------------------------------------------------------
    def linear(self, x: int, name: str, n_in: int, n_out: int, bias: bool) -> int:
        """The base `nn.Linear` (or bitsandbytes `Linear4bit`) of module `name`, wrapped by the method's ops."""
        x = self.method.before_linear(self, x, name, n_in)
        if self.R.quantized:
            y = self._linear4bit(x, n_in, n_out, bias)
        elif self.R.autocast:
            y = self._linear_autocast(x, n_in, n_out, bias, trained=self.full)
        else:
            y = self._linear_plain(x, n_in, n_out, bias, trained=self.full)
        return self.method.after_linear(self, x, y, name, n_in, n_out)

    def _linear_plain(self, x: int, n_in: int, n_out: int, bias: bool, trained: bool) -> int:
        """`F.linear` in the weights' dtype: saves the input only when the weight is trained."""
        R = self.R
        w = R.weight
        y = self.new(n_out, w, self.g.rg(x) or trained)
        pgrad = (0, param_bytes(n_in * n_out, w) + (param_bytes(n_out, w) if bias else 0)) if trained else ZERO
        self.g.op("linear", [x], [y], saved=[x] if trained else [], param_grad=pgrad)
        return y

    def _linear_autocast(self, x: int, n_in: int, n_out: int, bias: bool, trained: bool) -> int:
        """Under bf16 autocast: the input is cast to bf16 (a new tensor per call, saved when the weight is trained);
        the fp32 weight is cast to bf16 (cached for the forward when it requires grad) and that copy is saved
        when the input needs a gradient. A trained weight's bf16 gradient is cast back to fp32 (the param grad)."""
        g = self.g
        xc = self.cast(x, n_in, BF16)
        wc = self.fixed(param_bytes(n_in * n_out, BF16), rg=trained, kind="weight_copies", dtype=BF16)
        pgrad = (0, param_bytes(n_in * n_out, FP32) + (param_bytes(n_out, FP32) if bias else 0)) if trained else ZERO
        g.op("weight_cast", [], [wc], param_grad=pgrad)
        y = self.new(n_out, BF16, g.rg(xc) or trained)
        saved = ([xc] if trained else []) + ([wc] if g.rg(xc) else [])
        g.op("linear", [xc, wc], [y], saved=saved)
        return y

    def _linear4bit(self, x: int, n_in: int, n_out: int, bias: bool) -> int:
        """bitsandbytes Linear4bit (frozen): `x.to(bf16)`, dequantize NF4 -> bf16 (N x K) + fp32 absmax (twice:
        dequantized, + offset), `F.linear`, `.to(x.dtype)`. Nothing saved; backward dequantizes again."""
        g = self.g
        xc = self.cast(x, n_in, BF16)
        blocks = -(-(n_in * n_out) // 64)
        deq = (0, param_bytes(n_in * n_out, BF16) + 2 * param_bytes(blocks, FP32))
        y16 = self.new(n_out, BF16, g.rg(xc))
        g.op("matmul_4bit", [xc], [y16], fwd_temp=deq, bwd_temp=deq)
        return self.cast(y16, n_out, self.dtype[x])

    # -- attention ----------------------------------------------------------------------------------------------
    def rope(self, q: int, width: int) -> int:
        """`q * cos + rotate_half(q) * sin` with cos/sin in the embeddings' dtype: four new tensors, none saved
        but cos/sin (shared). Backward: each half's slice gradient is materialized at full size. OLMo-2 keeps
        cos/sin fp32 and casts the result back to q's dtype (`q_embed.to(q_type)`, modeling_olmo2.py)."""
        g = self.g
        q_dtype = self.dtype[q]
        dt = max(self.dtype[q], FP32 if self.arch.rope_fp32 else self.R.act)
        rg = g.rg(q)
        t1 = self.new(width, dt, rg)
        g.op("mul_cos", [q], [t1])
        neg = self.new(width // 2, self.dtype[q], rg)
        g.op("neg", [q], [neg], bwd_temp=(self.seq * width * self.dtype[q], 0))
        rot = self.new(width, self.dtype[q], rg)
        g.op("cat", [neg, q], [rot], grad_alias=[])
        t2 = self.new(width, dt, rg)
        g.op("mul_sin", [rot], [t2])
        out = self.add(t1, t2, width)
        return self.cast(out, width, q_dtype) if self.arch.rope_fp32 else out

    def rope_halves(self, q: int, width: int) -> int:
        """gpt-oss's `_apply_rotary_emb` (modeling_gpt_oss.py): `first, second = chunk(q, 2)`, then
        `cat(first * cos - second * sin, second * cos + first * sin)` with half-width cos/sin of q's dtype: four
        half-width products and two half-width sums, then the full-width cat; nothing of size saved (cos/sin do
        not need a gradient). Backward: each half's gradient (two uses summed), then `split`'s backward cats them
        into q's gradient. The halves are modelled as tensors of their own (they are views: forward over-counts
        one width while the rotation runs)."""
        g = self.g
        dt, rg, hw = self.dtype[q], g.rg(q), width // 2
        first, second = self.new(hw, dt, rg), self.new(hw, dt, rg)
        g.op("chunk", [q], [first, second])
        parts = []
        for a, b, name in ((first, second, "sub"), (second, first, "add")):
            t1, t2 = self.new(hw, dt, rg), self.new(hw, dt, rg)
            g.op("mul_cos", [a], [t1])
            g.op("mul_sin", [b], [t2])
            y = self.new(hw, dt, rg)
            # a - b: the gradient passes to `a` unchanged and is negated for `b` (a new tensor)
            g.op(name, [t1, t2], [y], grad_alias=[t1] if name == "sub" else [t1, t2])
            parts.append(y)
        out = self.new(width, dt, rg)
        g.op("cat", parts, [out])
        return out

    def sdpa(self, q: int, k: int, v: int, prefix=None) -> int:
        """`F.scaled_dot_product_attention` as transformers calls it and CUDA runs it (`planner.attention`: the
        backend torch 2.13 selects for the dtype, heads, mask, head dim and the GPU's compute capability). Under
        autocast q, k, v are cast to bf16 first (inside sdpa). Grouped heads without a mask go to sdpa with
        `enable_gqa`; with a mask (prefix tuning, a sliding window) `repeat_kv` copies keys and values to every
        head first.

        flash / cuDNN save q, k, v, the output and an fp32 logsumexp of H values per token; backward adds the flash
        workspaces (fp32 softmax_d and dq_accum, tokens padded to 128). memory-efficient saves the same with the
        logsumexp padded to 32 tokens and, with a mask, an additive bias of q's dtype (keys padded to 16); its
        backward scratch is an fp32 delta and, for a 16-bit output, an fp32 dq accumulator. math
        (`_sdpa_math`) saves the full attention matrix.

        Prefix tuning: keys/values are `cat(prefix, k)` held by the cache."""
        g, a = self.g, self.arch
        R = self.R
        H, K, d = a.num_heads, a.num_kv_heads, a.head_dim
        rg = g.rg(q) or g.rg(k) or g.rg(v) or prefix is not None
        k, v = self._cached_kv(k, v, prefix)
        masked = prefix is not None or self.masked or self.batch_mask
        dt = BF16 if R.autocast else self.dtype[q]
        dropout = float(a.config.get("attention_dropout", 0.0) or 0.0)
        name = "fp32" if dt == FP32 else ("fp16" if self.tc.precision == "fp16" else "bf16")
        kv_len = self.kv_seq if prefix is not None else self.seq  # prompt tuning's virtual tokens are keys too
        call = sdp.transformers_sdpa_call(name, H, K, d, self.seq, kv_len, masked,
                                          dropout=dropout, requires_grad=rg)
        kv_width = call.kv_heads * d
        # one key/value head (MQA: Gemma-3-1B): repeat_kv's expand + reshape only merges a size-1 dimension, a
        # view, not a copy; sdpa's backward still writes dense (B, H, S, D) gradients for k and v, which the
        # expand's backward sums back to one head, and a dtype cast of the view is dense too
        mqa_view = call.kv_heads != K and K == 1
        grads_dense = 0
        if call.kv_heads != K and not mqa_view:  # transformers' repeat_kv: keys and values copied to every head
            k, v = self._repeat_kv(k, H * d), self._repeat_kv(v, H * d)
        if mqa_view:  # the views that reach sdpa uncast get dense gradients there
            grads_dense = sum((H - K) * d * self.kv_seq * self.dtype[t] for t in (k, v)
                              if not (R.autocast and self.dtype[t] != BF16))
        if R.autocast:  # inside F.sdpa: autocast casts what it is given
            q = self.cast(q, H * d, BF16)
            cast_width = H * d if mqa_view else kv_width
            k, v = self.cast(k, cast_width, BF16, self.kv_seq), self.cast(v, cast_width, BF16, self.kv_seq)
        elif self.dtype[k] != dt:  # an fp32 prefix cache over bf16 gathers (`prefix_dtype`): the run's autocast casts
            cast_width = H * d if mqa_view else kv_width
            k, v = self.cast(k, cast_width, dt, self.kv_seq), self.cast(v, cast_width, dt, self.kv_seq)
        backend = sdp.select_backend(call, self.sm)
        if backend == "math":
            return self._sdpa_math(q, k, v, call, rg)
        saved_extra = []
        if masked:  # the mem-efficient kernel keeps an additive bias of q's dtype, keys padded to 16
            bias = self.g.tensor((self.seq * round_up(self.kv_seq, 16) * dt, 0), kind="activations")
            self.dtype[bias] = dt
            g.op("mask_bias", [], [bias])
            saved_extra = [bias]
        fused = backend in ("flash", "cudnn")
        lse_tokens = self.seq if fused else round_up(self.seq, 32)
        out = self.new(H * d, dt, rg)
        lse = self.g.tensor((lse_tokens * H * FP32, 0), kind="activations")
        self.dtype[lse] = FP32
        s128 = round_up(self.seq, 128)
        if fused:  # flash's softmax_d and dq_accum
            ws = (s128 * H * FP32 + s128 * H * d * FP32, 0)
        else:  # mem-efficient's delta and, for a 16-bit output, its fp32 dq accumulator (cutlass kNeedsAccumGradQ)
            ws = (lse_tokens * H * FP32 + (s128 * H * d * FP32 if dt != FP32 else 0) + grads_dense, 0)
        g.op("sdpa", [q, k, v], [out, lse], saved=([q, k, v, out, lse] + saved_extra) if rg else [], bwd_temp=ws)
        return out

    def _sdpa_math(self, q: int, k: int, v: int, call, rg: bool) -> int:
        """torch 2.13 `_scaled_dot_product_attention_math` (aten/src/ATen/native/transformers/attention.cpp, a
        CompositeImplicitAutograd op, so autograd saves what its decomposition saves): fp16/bf16 inputs are upcast
        to fp32 (`.to(kFloat)`, the default without `allow_fp16_bf16_reduction_math_sdp`); `q * sqrt(scale)`;
        `enable_gqa` repeats the fp32 keys/values to every head (`repeat_interleave`: a copy each);
        `k * sqrt(scale)` (transposed); `is_causal` builds a bool (S, KV) `tril` turned into an fp32 additive mask
        (shared by the batch); `attn = q @ k^T` (B, H, S, KV) fp32, saving both operands; `+ mask` (in place on
        CUDA); `_safe_softmax` saves its fp32 output; dropout (CUDA `native_dropout`: a bool mask and the dropped
        matrix); `attn @ v` saves the probabilities and v; the output is cast back to the inputs' dtype.
        Backward: the gradients of the (B, H, S, KV) probabilities and scores, fp32."""
        g = self.g
        H, d = self.arch.num_heads, self.arch.head_dim
        S, KV = call.q_len, call.kv_len
        kvw = call.kv_heads * d
        dt = self.dtype[q]
        q32 = self.cast(q, H * d, FP32)
        k32 = self.cast(k, kvw, FP32, KV)
        v32 = self.cast(v, kvw, FP32, KV)
        qs = self.mul_scalar(q32, H * d)
        if call.kv_heads != H:  # enable_gqa: repeat_interleave of the fp32 copies
            k32, v32 = self._repeat_kv(k32, H * d, KV), self._repeat_kv(v32, H * d, KV)
        ks = self.new(H * d, FP32, self.g.rg(k32), seq=KV)
        g.op("mul_scalar", [k32], [ks])
        mat = (H * S * KV * FP32, 0)
        scores = g.tensor(mat, rg=rg)
        self.dtype[scores] = FP32
        g.op("bmm_qk", [qs, ks], [scores], saved=[qs, ks] if rg else [])
        if call.is_causal or call.mask:
            # is_causal: bool tril (S, KV), one byte each, alive while the fp32 additive mask is written;
            # a passed mask: its additive form of the inputs' dtype, per sequence (B, 1, S, KV)
            size = (0, S * KV * FP32) if call.is_causal else (S * KV * dt, 0)
            m = g.tensor(size)
            self.dtype[m] = FP32
            g.op("attn_mask", [], [m], fwd_temp=(0, S * KV) if call.is_causal else ZERO)
            masked = g.tensor(mat, rg=rg)
            self.dtype[masked] = FP32
            g.op("add_mask", [scores, m], [masked], grad_alias=[scores])
            scores = masked
        return self._math_softmax_pv(scores, v32, mat, rg, call.dropout, H * S * KV, H * d, dt)

    def _math_softmax_pv(self, scores: int, v32: int, mat: tuple, rg: bool, dropout: float, elems: int, width: int,
                         dt: int) -> int:
        """The end of sdpa's math backend from the (masked) fp32 scores (`_sdpa_math`; MLA's too): `_safe_softmax`
        saves its fp32 output (`mat`: its size); dropout (CUDA `native_dropout`: a bool mask of `elems` and the
        dropped matrix); `attn @ v` saves the probabilities and the fp32 v; the output (`width` per token) cast back
        to `dt`, and transformers' `transpose(1, 2).contiguous()` copies it (the fused kernels write (B, S, H, D))."""
        g = self.g
        probs = g.tensor(mat, rg=rg)
        self.dtype[probs] = FP32
        g.op("softmax", [scores], [probs], saved=[probs] if rg else [])
        if dropout > 0.0:
            keep = g.tensor((elems, 0))
            dropped = g.tensor(mat, rg=rg)
            self.dtype[keep], self.dtype[dropped] = 1, FP32
            g.op("native_dropout", [probs], [dropped, keep], saved=[keep] if rg else [])
            probs = dropped
        out32 = self.new(width, FP32, rg)
        g.op("bmm_pv", [probs, v32], [out32], saved=[probs, v32] if rg else [])
        return self._contiguous(self.cast(out32, width, dt), width)

    def _eager_kv(self, q: int, k: int, v: int, prefix) -> tuple:
        """What eager attention (with or without sinks) multiplies: (requires grad, keys, values, keys per sequence)
        after the KV cache or prefix (`_cached_kv`) and `repeat_kv` to every head (transformers' `eager_attention_forward`
        repeats grouped keys and values first)."""
        a = self.arch
        H, K, d = a.num_heads, a.num_kv_heads, a.head_dim
        rg = self.g.rg(q) or self.g.rg(k) or self.g.rg(v) or prefix is not None
        k, v = self._cached_kv(k, v, prefix)
        kv_len = self.kv_seq if prefix is not None else self.seq
        if K != H:
            k, v = self._repeat_kv(k, H * d, kv_len), self._repeat_kv(v, H * d, kv_len)
        return rg, k, v, kv_len

    def _cached_kv(self, k: int, v: int, prefix) -> tuple[int, int]:
        """Keys and values after the cache update. Prefix tuning: `cat(prefix, k)` (peft casts the prefix to the
        base model's dtype), kept by the cache; otherwise transformers' DynamicCache (use_cache=True unless
        checkpointing): `cat([empty, k])` copies k and v and keeps them for the outputs' lifetime; its empty
        tensors have k's dtype, so v is promoted to it."""
        K, d = self.arch.num_kv_heads, self.arch.head_dim
        if prefix is not None:
            pk, pv = prefix
            k = self._held_copy("cat_k", [pk, k], K * d, max(self.dtype[pk], self.dtype[k]), self.kv_seq, k)
            v = self._held_copy("cat_v", [pv, v], K * d, max(self.dtype[pv], self.dtype[v]), self.kv_seq, v)
        elif self.use_cache:
            dk = self.dtype[k]
            k = self._held_copy("cache_k", [k], K * d, dk, self.seq, k)
            v = self._held_copy("cache_v", [v], K * d, max(dk, self.dtype[v]), self.seq, v)
        return k, v

    def _matrix(self, dtype: int, rg: bool, kv_len: int) -> int:
        """A (B, H, S, KV) attention matrix of `dtype`."""
        t = self.g.tensor((self.arch.num_heads * self.seq * kv_len * dtype, 0), rg=rg)
        self.dtype[t] = dtype
        return t

    def eager(self, q: int, k: int, v: int, prefix=None) -> int:
        """transformers 5.17 `eager_attention_forward` (modeling_llama.py): `repeat_kv` copies keys and values to
        every head; `matmul(q, k^T)` saves both; `* scaling`; `+ attention_mask` (the float mask `eager_mask`
        always builds, of the embeddings' dtype, counted once per step in planner.memory); `softmax(dtype=fp32)`:
        an fp32 copy of the scores (aten `softmax` converts first, except CUDA's fp16 -> fp32 shortcut) and its
        fp32 output, saved; `.to(query.dtype)`, a copy unless fp32, saved by `matmul(probs, v)` with v; dropout
        (p = 0 returns its input). Under autocast, `matmul` casts its operands to bf16 (copies, saved) and the
        fp32 mask promotes the sum to fp32. The output `transpose(1, 2).contiguous()` is a copy."""
        g, a = self.g, self.arch
        R = self.R
        H, d = a.num_heads, a.head_dim
        rg, k, v, kv_len = self._eager_kv(q, k, v, prefix)
        qdt = self.dtype[q]
        qa, ka = q, k
        if R.autocast:
            qa, ka = self.cast(q, H * d, BF16), self.cast(k, H * d, BF16, kv_len)
        sdt = self.dtype[qa]
        scores = self._matrix(sdt, rg, kv_len)
        g.op("matmul_qk", [qa, ka], [scores], saved=[qa, ka] if rg else [])
        scaled = self._matrix(sdt, rg, kv_len)
        g.op("mul_scalar", [scores], [scaled])
        added = self._matrix(max(sdt, R.act), rg, kv_len)
        g.op("add_mask", [scaled], [added], grad_alias=[scaled])
        x = added
        if self.dtype[x] != FP32:
            x32 = self._matrix(FP32, rg, kv_len)
            g.op("to_copy", [x], [x32])
            x = x32
        probs = self._matrix(FP32, rg, kv_len)
        g.op("softmax", [x], [probs], saved=[probs] if rg else [])
        if qdt != FP32:
            pc = self._matrix(qdt, rg, kv_len)
            g.op("to_copy", [probs], [pc])
            probs = pc
        va = v
        if R.autocast:
            probs_a = probs
            if self.dtype[probs] != BF16:
                probs_a = self._matrix(BF16, rg, kv_len)
                g.op("to_copy", [probs], [probs_a])
            probs, va = probs_a, self.cast(v, H * d, BF16, kv_len)
        out = self.new(H * d, self.dtype[probs], rg)
        g.op("matmul_pv", [probs, va], [out], saved=[probs, va] if rg else [])
        return self._contiguous(out, H * d)

    def eager_sinks(self, q: int, k: int, v: int, prefix=None) -> int:
        """gpt-oss's `eager_attention_forward` (transformers 5.17 modeling_gpt_oss.py), the attention its model runs
        (no sdpa path; planner.attention.effective_implementation): `repeat_kv` copies keys and values to every
        head; `matmul(q, k^T)` saves both; `* scaling`; `+ attention_mask` (the float mask of the layer's type:
        full or sliding, counted per step in planner.memory); `cat` with the per-head learned sink, one more key
        column: (B, H, S, KV + 1); minus its row max (`max(dim=-1)` saves int64 indices, (B, H, S, 1)); softmax
        in that dtype (bf16: no fp32 copy), saved; the sink column sliced off (a view, which `matmul(probs, v)`
        saves with v, keeping the whole (KV + 1) storage); dropout p = 0 and `.to(v.dtype)` return their input.
        Backward: the (S, KV) gradient of the view, then the slice's zero-padded (KV + 1) copy; softmax's
        gradient, which the subtraction hands on (the max's share is reduced to (B, H, S, 1) first: no full copy,
        as the trace shows); the max's scattered gradient summed into the same; `cat`'s backward narrows (views). A trained sink's gradient is H values."""
        g, a = self.g, self.arch
        H, d = a.num_heads, a.head_dim
        rg, k, v, kv_len = self._eager_kv(q, k, v, prefix)
        dt = self.dtype[q]
        mat = H * self.seq * kv_len * dt  # one (S, KV) matrix per sequence
        scores = self._matrix(dt, rg, kv_len)
        g.op("matmul_qk", [q, k], [scores], saved=[q, k] if rg else [])
        scaled = self._matrix(dt, rg, kv_len)
        g.op("mul_scalar", [scores], [scaled])
        added = self._matrix(max(dt, self.R.act), rg, kv_len)
        g.op("add_mask", [scaled], [added], grad_alias=[scaled])
        cdt = self.dtype[added]
        combined = self._matrix(cdt, rg, kv_len + 1)
        sink_grad = (0, param_bytes(H, self.R.weight)) if self.full else ZERO
        g.op("cat_sinks", [added], [combined], param_grad=sink_grad)
        row_max = self.new(H, cdt, rg)
        arg = self.new(H, 8, False)
        g.op("max", [combined], [row_max, arg], saved=[arg] if rg else [])
        shifted = self._matrix(cdt, rg, kv_len + 1)
        g.op("sub", [combined, row_max], [shifted], grad_alias=[combined])
        probs = self._matrix(cdt, rg, kv_len + 1)
        g.op("softmax", [shifted], [probs], saved=[probs] if rg else [])
        g.op("python_local", [added], [])  # `attn_weights` (the masked scores) is rebound only after the softmax
        view = self._matrix(cdt, rg, 0)  # probs[..., :-1]: a view (no storage); its gradient is a bwd_temp below
        g.op("slice", [probs], [view], bwd_temp=(mat, 0) if rg else ZERO)
        out = self.new(H * d, cdt, rg)
        g.op("matmul_pv", [view, v], [out], saved=[probs, v] if rg else [], bwd_temp=(mat, 0) if rg else ZERO)
        return self._contiguous(out, H * d)

    def flash_attention_2(self, q: int, k: int, v: int, prefix=None) -> int:
        """transformers 5.17 `flash_attention_forward` (integrations/flash_attention.py) over flash-attn 2's
        `flash_attn_func` (csrc/flash_attn/flash_api.cpp `mha_fwd` / `mha_bwd`, Dao-AILab/flash-attention 765fbd9).
        fp32 inputs are cast back (`fa_peft_integration_check`) to the autocast dtype, or for a quantized model to
        its `config.dtype` (bf16): q, k, v copies, which flash-attn's autograd function saves with the bf16 output
        (B, S, H, D) and an fp32 logsumexp (B, H, S). Grouped heads are native (no repeat). Without padding or
        packing no mask is built and nothing is unpadded. Backward: dq, dk, dv, `softmax_d` (B, H, S rounded to
        128) and `dq_accum` (B, S rounded to 128, H, head_dim rounded to 32) in fp32 and, with grouped heads,
        `dk_expanded` / `dv_expanded` (B, KV, H, D) in the inputs' dtype, summed into dk, dv."""
        g, a = self.g, self.arch
        H, K, d = a.num_heads, a.num_kv_heads, a.head_dim
        rg = g.rg(q) or g.rg(k) or g.rg(v) or prefix is not None
        k, v = self._cached_kv(k, v, prefix)
        kv_len = self.kv_seq if prefix is not None else self.seq
        if self.dtype[q] == FP32:
            if not (self.R.autocast or self.R.quantized):
                raise ValueError("flash_attention_2 computes in fp16/bf16; an fp32 model reaches it in fp32")
            q = self.cast(q, H * d, BF16)
            k, v = self.cast(k, K * d, BF16, kv_len), self.cast(v, K * d, BF16, kv_len)
        dt = self.dtype[q]
        d32 = round_up(d, 32) if d <= 192 else 256
        if self.recipe.packing:
            return self._flash_varlen(q, k, v, rg, d32)
        if self.recipe.padding == "longest":
            return self._flash_unpadded(q, k, v, rg, d32)
        out = self.new(H * d, dt, rg)
        lse = self.g.tensor((self.seq * H * FP32, 0), kind="activations")
        self.dtype[lse] = FP32
        s128 = round_up(self.seq, 128)
        ws = s128 * H * FP32 + s128 * H * d32 * FP32 + (2 * kv_len * H * d * dt if K != H else 0)
        g.op("flash_attn", [q, k, v], [out, lse], saved=[q, k, v, out, lse] if rg else [], bwd_temp=(ws, 0))
        return out

    def _flash_varlen(self, q: int, k: int, v: int, rg: bool, d32: int) -> int:
        """Packed rows under flash_attention_2: transformers 5.17 `_flash_attention_forward` sees packed position
        ids (`_is_packed_sequence`, one row) and takes `_prepare_from_posids`: `q.contiguous().view(-1, H, D)`, the
        same for k and v: q and k (rotary outputs transposed to (B, S, heads, D)) are copied, v (the projection's
        view transposed back) is not, unless it is a slice of a fused qkv projection. Then flash-attn's
        `flash_attn_varlen_func` (csrc/flash_attn/flash_api.cpp `mha_varlen_fwd` / `mha_varlen_bwd`, Dao-AILab/
        flash-attention 00979f5): out (total, H, D), softmax_lse (H, total) fp32 and rng_state saved with q, k, v;
        backward dq, dk, dv, softmax_d (H, total + 128 n) and dq_accum (total + 128 n, H, head_dim rounded to 32)
        in fp32 for n sequences (`PACKED_EXAMPLES_PER_ROW` per row), and with grouped heads dk_expanded /
        dv_expanded (total, H, D). The cumulative lengths (int32, n + 1) are negligible."""
        a = self.arch
        H, K, d = a.num_heads, a.num_kv_heads, a.head_dim
        q = self._contiguous(q, H * d)
        k = self._contiguous(k, K * d)
        if a.fused_qkv:
            v = self._contiguous(v, K * d)
        return self._flash_varlen_kernel(q, k, v, rg, d32, sequences_per_row=PACKED_EXAMPLES_PER_ROW)

    def _flash_varlen_kernel(self, q: int, k: int, v: int, rg: bool, d32: int, sequences_per_row: int) -> int:
        """flash-attn's `flash_attn_varlen_func` over the tokens of each row (`mha_varlen_fwd` / `mha_varlen_bwd`,
        see `_flash_varlen`): out and the fp32 logsumexp saved with q, k, v; backward scratch over total + 128 per
        sequence."""
        g, a = self.g, self.arch
        H, K, d = a.num_heads, a.num_kv_heads, a.head_dim
        dt = self.dtype[q]
        out = self.new(H * d, dt, rg)
        lse = self.g.tensor((self.seq * H * FP32, 0), kind="activations")
        self.dtype[lse] = FP32
        rows = self.seq + 128 * sequences_per_row
        ws = rows * H * FP32 + rows * H * d32 * FP32 + (2 * self.seq * H * d * dt if K != H else 0)
        g.op("flash_attn_varlen", [q, k, v], [out, lse], saved=[q, k, v, out, lse] if rg else [], bwd_temp=(ws, 0))
        return out

    def _flash_unpadded(self, q: int, k: int, v: int, rg: bool, d32: int) -> int:
        """A padded batch under flash_attention_2: transformers 5.17 `flash_attention_mask` passes the 2D mask on
        (it has zeros) and `_flash_attention_forward` unpads (`_upad_input`, modeling_flash_attention_utils.py):
        `_get_unpad_data` (int64 indices of the real tokens, per layer), then `_index_first_axis` for q, k and v:
        `reshape(-1, heads, D)` (a copy of the transposed rotary outputs q and k; a view of v unless the KV cache
        holds it or it slices a fused qkv) and `[indices]` (a gathered copy of the real tokens, which keeps the indices for backward: its
        gradient is zeros of the padded size with the rows put back); then flash-attn's varlen kernel over the
        real tokens (`_flash_varlen_kernel`, one sequence per row) and `_pad_input` (zeros (B S, H, D) with the
        output rows put in). The worst batch is predicted: every row `seq_len` long but one padded position."""
        g, a = self.g, self.arch
        H, K, d = a.num_heads, a.num_kv_heads, a.head_dim
        idx = self.new(1, 8, False)  # `_get_unpad_data`: int64 indices of the real tokens
        g.op("unpad_indices", [], [idx])
        q = self._gather(self._contiguous(q, H * d), H * d, idx)
        k = self._gather(self._contiguous(k, K * d), K * d, idx)
        # v reaches flash transposed back to the projection's layout (a view) unless the KV cache holds it in
        # (B, K, S, D) or it slices a fused qkv projection
        v = self._gather(self._contiguous(v, K * d) if (a.fused_qkv or self.use_cache) else v, K * d, idx)
        out = self._flash_varlen_kernel(q, k, v, rg, d32, sequences_per_row=1)
        padded = self.new(H * d, self.dtype[out], rg)
        g.op("pad_input", [out, idx], [padded], saved=[idx] if rg else [])
        return padded

    def _gather(self, x: int, width: int, idx: int) -> int:
        """`x[indices]` over the flattened tokens: a copy of the rows; keeps the indices for backward."""
        y = self.new(width, self.dtype[x], self.g.rg(x))
        self.g.op("index", [x, idx], [y], saved=[idx] if self.g.rg(x) else [])
        return y

    def _contiguous(self, x: int, width: int) -> int:
        """`x.transpose(1, 2).contiguous()` of a (B, H, S, D) tensor: a copy (nothing saved)."""
        y = self.new(width, self.dtype[x], self.g.rg(x))
        self.g.op("contiguous", [x], [y], grad_alias=[x])
        return y

    def attention(self, q: int, k: int, v: int, prefix=None) -> int:
        """The attention of the recipe's `attn_implementation` (planner.recipe): sdpa, eager or flash_attention_2, as
        transformers runs it for the family (`planner.attention.effective_implementation`: gpt-oss runs eager, with
        its sinks)."""
        if self.arch.attention_sinks:
            return self.eager_sinks(q, k, v, prefix)
        impl = {"sdpa": self.sdpa, "eager": self.eager, "flash_attention_2": self.flash_attention_2}
        return impl[self.attn_impl](q, k, v, prefix)

    def _repeat_kv(self, t: int, width: int, seq: int | None = None) -> int:
        """`repeat_kv` / `repeat_interleave` over heads: a copy with every head; nothing saved."""
        r = self.new(width, self.dtype[t], self.g.rg(t), seq=seq or self.kv_seq)
        self.g.op("repeat_kv", [t], [r])
        return r

    def _held_copy(self, name: str, inputs: list, width: int, dtype: int, seq: int, source: int) -> int:
        """A copy made by a cache update (`cat`), held for the outputs' lifetime; its gradient is a view of the
        output's gradient when the dtype is unchanged."""
        c = self.new(width, dtype, any(self.g.rg(t) for t in inputs), seq=seq)
        self.g.op(name, inputs, [c], grad_alias=[source] if dtype == self.dtype[source] else [])
        self.g.hold(c)
        return c

    # -- the decoder layer --------------------------------------------------------------------------------------
    def decoder_layer(self, x: int, prefix=None) -> int:
        """One decoder layer of `self.kind` (pre-norms, absent in OLMo-2; Gemma-2/3 and OLMo-2 add post-attention
        and post-feed-forward norms; Qwen3/Gemma-3 per-head and OLMo-2 whole-projection q/k norms, before rotary;
        a sliding window masks `sdpa`)."""
        a, kind = self.arch, self.kind
        if a.mla is not None:  # DeepSeek-V3's latent attention (planner.mla)
            return mla_decoder_layer(self, x)
        h = a.hidden_size
        lin = {l.name: l for l in a.linears}
        n1 = self.rmsnorm(x, h) if kind.pre_norms else x
        if a.fused_qkv:
            L = lin["qkv_proj"]
            qkv = self.linear(n1, "qkv_proj", L.in_features, L.out_features, L.bias)
            q = k = v = qkv  # views of one storage
            qv, kv = a.q_dim, a.kv_dim
            q = self._view(qkv, qv)
            k = self._view(qkv, kv)
            v = self._view(qkv, kv)
        else:
            q = self.linear(n1, "q_proj", h, a.q_dim, lin["q_proj"].bias)
            k = self.linear(n1, "k_proj", h, a.kv_dim, lin["k_proj"].bias)
            v = self.linear(n1, "v_proj", h, a.kv_dim, lin["v_proj"].bias)
        if kind.qk_norm:
            per_head = kind.qk_norm_over == "head"
            q = self.rmsnorm(q, a.q_dim, a.num_heads if per_head else 1)
            k = self.rmsnorm(k, a.kv_dim, a.num_kv_heads if per_head else 1)
        rope = self.rope_halves if a.rope_on_halves else self.rope
        q = rope(q, a.q_dim)
        k = rope(k, a.kv_dim)
        o_in = self.attention(q, k, v, prefix)
        o = self.linear(o_in, "o_proj", a.q_dim, h, lin["o_proj"].bias)
        if kind.post_attention_norm:
            o = self.rmsnorm(o, h)
        h1 = self.add(x, o, h)
        n2 = self.rmsnorm(h1, h) if kind.pre_norms else h1
        dn = self.feed_forward(n2)
        if kind.post_feedforward_norm:
            dn = self.rmsnorm(dn, h)
        out = self.add(h1, dn, h)
        # the model's layer loop references the layer's input until the layer returns (transformers 5.17
        # modeling_llama.py `LlamaModel.forward`: `hidden_states = decoder_layer(hidden_states, ...)`)
        self.g.op("caller_ref", [x], [])
        return out

    def feed_forward(self, n2: int) -> int:
        """The layer's MLP: gate/up/down (Phi-3: fused gate_up), or the MoE block of a `moe` kind
        (planner.moe_graph)."""
        a = self.arch
        if self.kind.mlp == "moe":
            return moe_block(self, n2)
        h, I = a.hidden_size, a.intermediate_size
        lin = {l.name: l for l in a.linears}
        # a MoE model's dense layers: their projections are not in `linears` (attention only), and have no bias
        bias = {n: lin[n].bias if n in lin else False for n in ("gate_proj", "up_proj", "down_proj")}
        if a.fused_qkv:
            L = lin["gate_up_proj"]
            gu = self.linear(n2, "gate_up_proj", h, 2 * I, L.bias)
            gate, up = self._view(gu, I), self._view(gu, I)
            act = self.activation(gate, I)
            p = self.mul(up, act, I)
        else:
            gate = self.linear(n2, "gate_proj", h, I, bias["gate_proj"])
            act = self.activation(gate, I)
            up = self.linear(n2, "up_proj", h, I, bias["up_proj"])
            p = self.mul(act, up, I)
        return self.linear(p, "down_proj", I, h, bias["down_proj"])

    def _view(self, t: int, width: int) -> int:
        """A view into `t` (Phi-3's fused projections): same storage, modelled as `t` itself."""
        return t

    def activation(self, x: int, width: int) -> int:
        """SiLU / GELU(tanh): saves its input when it needs a gradient."""
        y = self.new(width, self.dtype[x], self.g.rg(x))
        self.g.op("act", [x], [y], saved=[x] if self.g.rg(x) else [])
        return y


# -- pieces of the model --------------------------------------------------------------------------------------------

PACKED_EXAMPLES_PER_ROW = 2  # examples in a packed row of the predicted batch (trainer.recipe.synthetic_batch)


def batch_mask(tc: TrainConfig) -> bool:
    """Whether transformers 5.17 materializes a 4D mask for sdpa and eager from the batch itself: packed rows
    (`masking_utils.find_packed_sequence_indices` finds several sequences, `packed_sequence_mask_function`) or a
    padded batch (`padding_mask_function`; `_ignore_causal_mask_sdpa` no longer skips the mask once a padding
    token is present). flash_attention_2 builds none (varlen kernels instead)."""
    return tc.recipe.packing or tc.recipe.padding == "longest"




def layer_graph(arch: ModelArch, tc: TrainConfig, seq: int, kv_seq: int, input_rg: bool, checkpointed: bool,
                kind: LayerKind | None = None, sm: tuple = sdp.DEFAULT_CAPABILITY, prefix_dtype: int = 0):
    """One decoder layer of `kind` (default: layer 0's) as a Graph. Returns (builder, input id, output id). With
    checkpointing the input is kept by the checkpoint (held), and the saved tensors are what the recomputation
    re-creates. `prefix_dtype`: the dtype peft casts prefix tuning's keys/values to when it is not the regime's
    weight dtype (`planner.memory.prefix_cast_dtype`; 0: the regime's)."""
    b = Builder(arch, tc, seq, kv_seq, checkpointed, kind, sm)
    b.prefix_dtype = prefix_dtype
    R = b.R
    x = b.input(arch.hidden_size, R.act, input_rg)
    if checkpointed and not tc.recipe.offload_checkpoints:
        # the checkpoint keeps its input to the end of the layer's backward; offloaded (`offload_checkpoints`), the
        # input is a copy unpacked from host memory for the recompute, which dies after its last use. Under TRL's
        # activation offloading (`activation_offload`) the checkpoint's saved input goes through TRL's hooks (torch
        # 2.13 checkpoint.py `_CheckpointFrame.save_inputs` packs it outside the checkpoint's own hooks): the copy
        # brought back stays in TRL's backward stash through the layer's backward (and into the next layer's first
        # node: `planner.memory`), so it is held here as the checkpoint's own input is
        b.g.hold(x, scope="piece")
    y = b.decoder_layer(x, b.method.layer_prefix(b, arch, tc))
    return b, x, y


def tail_graph(arch: ModelArch, tc: TrainConfig, seq: int):
    """Final norm, then the recipe's loss (`LOSSES`): for `plain`, lm_head, (Gemma-2 logit soft-capping), and
    `ForCausalLMLoss`; the fused and chunked losses take the normed hidden states and the lm_head weight
    themselves. Returns (builder, input id, loss id, logits id or None)."""
    b = Builder(arch, tc, seq, seq)
    R = b.R
    h = arch.hidden_size
    x = b.input(h, R.act, True)
    n = b.rmsnorm(x, h)
    loss, logits = LOSSES[tc.recipe.loss](b, n)
    if arch.moe is not None and arch.moe.aux_loss:
        from .moe_graph import aux_loss_ops

        aux_loss_ops(b)  # the router load-balancing loss (output_router_logits)
    # the normed hidden states stay referenced until the loss is computed (transformers 5.17 modeling_llama.py
    # `LlamaForCausalLM.forward`: `hidden_states = outputs.last_hidden_state` then `self.loss_function(...)`;
    # trainer/losses.py's `forward`: `hidden = out.last_hidden_state` passed to the chunked / fused loss)
    b.g.op("caller_ref", [n], [])
    return b, x, loss, logits


def lm_head_logits(b: Builder, n: int) -> int:
    """lm_head (never quantized nor LoRA-adapted: 'all-linear' excludes it; tied or not, same compute) and Gemma-2's
    logit soft-capping. Trained (full FT, or peft's copy in `modules_to_save`): its input is saved and backward adds
    the weight-gradient GEMM `grad_logits^T @ x` (V x h, in the weight's dtype). The logits stay alive (held by the outputs the training loop keeps)."""
    g, R, arch = b.g, b.R, b.arch
    h, V = arch.hidden_size, arch.vocab_size
    since = len(g.nodes)
    if R.autocast:
        logits = b._linear_autocast(n, h, V, False, trained=b.head_trained)
    else:  # QLoRA: lm_head is fp32 after k-bit preparation, its input fp32
        logits = b._linear_plain(n, h, V, False, trained=b.head_trained)
    g.unhooked(since)  # TRL's activation offloading leaves the lm_head's saved tensors alone (NoOpManager)
    # the lm_head module's output: FSDP2's tail unit [final norm, lm_head] registers its pre-backward hook on it
    # (`planner.strategies.fsdp2`, moment "head_backward")
    b.lm_head_output = logits
    if arch.final_logit_softcapping:
        t1 = b.mul_scalar(logits, V)
        t2 = b.new(V, b.dtype[t1], True)
        g.op("tanh", [t1], [t2], saved=[t2])
        logits = b.mul_scalar(t2, V)
    g.hold(logits)
    return logits


def plain_loss(b: Builder, n: int):
    """transformers' `ForCausalLMLoss` (loss_utils.py) over the lm_head's logits: `logits.float()` (a copy unless
    fp32), `log_softmax` (fp32, saved), `nll_loss` (its gradient: fp32 zeros + scatter)."""
    g = b.g
    V = b.arch.vocab_size
    logits = lm_head_logits(b, n)
    lf = b.cast(logits, V, FP32)
    lsm = b.new(V, FP32, True)
    g.op("log_softmax", [lf], [lsm], saved=[lsm])
    loss = b.fixed(512, True, "activations", FP32)
    g.op("nll_loss", [lsm], [loss], saved=[lsm])
    return loss, logits


TRL_CHUNK_TOKENS = 4096  # trl 1.16.0 trl/kernels/chunked_logprob.py `TOKEN_CHUNK_SIZE`: tokens per projection tile
TRL_CHUNK_VOCAB = 32768  # trl 1.16.0 trl/trainer/utils.py `_CHUNKED_LOGPROB_CHUNK_SIZE`: vocabulary columns per tile
TRL_STATS = 7  # `ChunkedLogProbFunction.forward`'s fp32 per-token statistics (running_max ... target_logit)


def _lm_head_weight_bytes(b: Builder) -> int:
    """Bytes per element of the lm_head weight: fp32 under `mixed`/`fp32` and after k-bit preparation, else bf16."""
    return b.R.weight


def chunked_valid_per_row(tc: TrainConfig) -> int:
    """Valid target tokens per row that TRL's fused LM head scores (trl 1.16.0 trl/trainer/utils.py
    `add_fused_lm_head`: `labels[:, 1:]`, mask = labels != -100; the synthetic batch's labels are its ids, none
    ignored): S - 1; with prompt learning's virtual tokens in the sequence, peft prefixes the labels with that many
    -100 (peft 0.21 `PeftModelForCausalLM.forward`: `prefix_labels`), so after the shift all S real tokens count."""
    return tc.seq_len if get_method(tc.method).virtual_tokens(tc)[0] else tc.seq_len - 1


def chunked_loss_chunks(tc: TrainConfig) -> int:
    """Token tiles of TRL's `ChunkedLogProbFunction` (trl 1.16.0 trl/kernels/chunked_logprob.py: `for token_start in
    range(0, N, TOKEN_CHUNK_SIZE)`), N = B x `chunked_valid_per_row` valid tokens (CUDA scores only those)."""
    return -(-tc.batch_size * chunked_valid_per_row(tc) // TRL_CHUNK_TOKENS)


def chunked_loss_batch(tc: TrainConfig) -> int:
    """The one batch size that stands for `tc.batch_size` in the chunked loss's piece: the piece depends on the batch
    linearly except through the tile buffers, min(N, 4096) tokens (`chunked_loss_chunks`): every batch with two
    token tiles or more gives the same buffers as the smallest such, floor(4096 / valid per row) + 1."""
    return min(tc.batch_size, TRL_CHUNK_TOKENS // max(chunked_valid_per_row(tc), 1) + 1)


def chunked_loss(b: Builder, n: int):
    """TRL 1.16.0's fused LM head, SFTTrainer's loss (trl/trainer/utils.py `add_fused_lm_head` `_fused_forward`,
    lines 1599-1690: the mask, `hidden_states[mask]` at 1642-1656, the scatter at 1658, the loss at 1662;
    trl/kernels/chunked_logprob.py `ChunkedLogProbFunction.forward` 311-392 (`mm_buf` 347, saved 386) and
    `backward` 394-465 (`mm_buf` 413, the casts at return 455); trl/trainer/sft_trainer.py `__init__` 1144
    (`outputs=("log_probs", "entropy", "is_top1")`) and `compute_loss` 1611-1618; run as is by
    trainer/losses.py). The backbone runs with use_cache=False; no logits are made or kept. N valid tokens per row
    (`chunked_valid_per_row`), P = S - 1 shifted positions, h hidden (dtype hd), V vocabulary, cd the compute dtype
    (autocast's, else hd), wd the lm_head weight's; the tile T = min(B N, 4096) tokens x 32768 columns.

    Forward, on CUDA (Triton: `compact`): mask = labels != -100 (bool, P; kept by the scatters' and the index's
    backward); `hidden_states[mask]` (a copy, N h hd, saved) and `labels[mask]` (int64 N, saved), each through a
    `nonzero` (int64 N x 2, transient). `ChunkedLogProbFunction.forward`: 7 fp32 per-token statistics, the tile
    buffer `mm_buf` T x 32768 cd, per token tile `hidden.to(cd)` (T h cd unless hd is cd), per vocabulary tile
    `weight[s:e].to(cd)` (a transient, unless wd is cd), then log_z (saved), log-probs, entropy (saved) and is_top1
    (bool), with one fp32 N temporary at a time; the Triton kernels work in place. The per-token outputs are
    scattered back to (B, P) (`new_zeros(mask.shape).masked_scatter`: the zeros and the result), the fused loss
    and SFTTrainer's `-log_probs` each one fp32 P transient while the three (B, P) outputs are referenced.
    Backward: `masked_select` of the log-probs' gradient (fp32 N), then `ChunkedLogProbFunction.backward`: fp32
    zeros for the hidden gradient (N h 4) and, with a trained lm_head, for its gradient (V h 4), `mm_buf` again and
    the same cd copies, each fp32 accumulator cast to its input's dtype at return (a copy unless fp32; with
    `torch.addmm(..., out_dtype=torch.float32, out=acc)` on CUDA the GEMMs add nothing); the index's backward:
    zeros (B, P, h) with the rows put back, then the slice's into (B, S, h)."""
    g, R, arch, tc = b.g, b.R, b.arch, b.tc
    h, V = arch.hidden_size, arch.vocab_size
    hd = b.dtype[n]
    cd = R.lin if R.autocast else hd
    wdt = _lm_head_weight_bytes(b)
    trained = b.head_trained
    N, P = chunked_valid_per_row(tc), b.seq - 1
    tile = min(tc.batch_size * N, TRL_CHUNK_TOKENS)
    vtile = min(V, TRL_CHUNK_VOCAB)
    mm_buf = tile * TRL_CHUNK_VOCAB * cd
    hcopy = tile * h * cd if hd != cd else 0
    wcopy = vtile * h * cd if wdt != cd else 0
    # the copies are locals reassigned per tile (`hidden_chunk` per token tile; `w_chunk` per tile in backward, a
    # temporary in forward's `torch.mm`): the new one is made while the old is alive. The next token tile's copy is
    # counted as a full one (exact from two full tiles on).
    token_tiles = chunked_loss_chunks(tc)
    vocab_tiles = -(-V // TRL_CHUNK_VOCAB)
    fwd_copies = max(hcopy + wcopy, 2 * hcopy if token_tiles > 1 else 0)
    # two lm_head tiles' copies at once: the next tile's beside the previous one's (the last tile is V mod 32768
    # columns: beside the first only with exactly two vocabulary tiles)
    last_cols = V - (vocab_tiles - 1) * TRL_CHUNK_VOCAB
    wpair = wcopy + (wcopy * last_cols // vtile if vocab_tiles == 2 else wcopy)
    bwd_copies = hcopy + (wpair if token_tiles * vocab_tiles > 1 else wcopy)
    if token_tiles > 1:
        bwd_copies = max(bwd_copies, 2 * hcopy + wcopy)
    mask = b.new(1, 1, False, seq=P)
    g.op("label_mask", [], [mask])
    packed = b.new(h, hd, True, seq=N)
    targets = b.new(1, 8, False, seq=N)
    g.op("index_valid", [n, mask], [packed, targets], saved=[mask], fwd_temp=(N * 16, 0),
         bwd_temp=(P * h * hd + N * 16, 0))
    g.op("logprob_tiles", [packed, targets], [], fwd_temp=(TRL_STATS * N * FP32, mm_buf + fwd_copies))
    logp = b.new(1, FP32, True, seq=N)
    ent = b.new(1, FP32, False, seq=N)  # only logged: no gradient reaches it
    log_z = b.new(1, FP32, False, seq=N)
    top = b.new(1, 1, False, seq=N)
    grad_tmp = (N * h * FP32 if hd != FP32 else 0, mm_buf + bwd_copies
                + (param_bytes(V * h, FP32) if trained and wdt != FP32 else 0))
    g.op("chunked_logprob", [packed, targets], [logp, ent, log_z, top], saved=[packed, targets, log_z, ent],
         fwd_temp=((TRL_STATS + 1) * N * FP32 - N, mm_buf + hcopy), bwd_temp=grad_tmp,
         param_grad=(0, param_bytes(V * h, wdt) if trained else 0))
    lp_full = b.new(1, FP32, True, seq=P)
    ent_full = b.new(1, FP32, False, seq=P)
    top_full = b.new(1, 1, False, seq=P)
    g.op("scatter_valid", [logp, ent, top, mask], [lp_full, ent_full, top_full], saved=[mask],
         fwd_temp=(3 * P, 0), bwd_temp=(N * 16, 0))
    loss = b.fixed(512, True, "activations", FP32)
    g.op("nll_sum", [lp_full, ent_full, top_full], [loss], fwd_temp=(P * FP32, 0))
    return loss, None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def liger_loss(b: Builder, n: int):
    """Liger-Kernel's fused linear cross-entropy (`LigerForCausalLMLoss`, linkedin/Liger-Kernel ead96b6
    `ops/fused_linear_cross_entropy.py`): the gradients are computed in the forward and saved; no logits are kept
    and the backbone keeps its KV cache (`lce_forward` passes `use_cache` through).

    Forward, on the S tokens of each sequence flattened (a view): `grad_input = zeros_like(x)` (S h, x's dtype; saved,
    and returned as x's gradient in backward: no new buffer), `grad_weight = zeros_like(w)` when the lm_head trains
    (saved, becomes its gradient), the fp32 per-token loss and the padded/shifted int64 labels (transient); then per
    chunk of c = next_pow2(ceil(B S / ceil(V / h))) rows: the logits c x V (bf16 under autocast, else x's dtype;
    Triton writes their gradient in place), `grad_logits @ w` (c x h, under autocast a bf16 cast of the weight per
    call, cached when the weight trains), and a trained lm_head's `grad_weight += mm(...).float()` (V h in the logits'
    dtype, plus its fp32 copy unless fp32; on sm80+ with an fp32 weight and bf16 logits `addmm(out=grad_weight)` in
    place). The chunk is linear in B here (c(B) = B c(1)): exact when B is a power of two."""
    g, R, arch = b.g, b.R, b.arch
    h, V = arch.hidden_size, arch.vocab_size
    S = b.seq
    dt = b.dtype[n]
    wdt = _lm_head_weight_bytes(b)
    trained = b.head_trained
    ldt = BF16 if R.autocast else dt
    c1 = _next_pow2(-(-S // -(-V // h)))
    labels = S * (8 + 8 + FP32)  # padded labels, their shifted copy, the fp32 per-token loss
    if R.autocast:
        fwd = (labels + c1 * V * BF16 + c1 * h * BF16, param_bytes(V * h, BF16))
    elif trained:
        fwd = (labels + c1 * V * ldt, param_bytes(V * h, ldt) + (param_bytes(V * h, FP32) if ldt != FP32 else 0))
    else:
        fwd = (labels + c1 * V * ldt + c1 * h * dt, 0)
    gi = b.new(h, dt, False, kind="temporaries")
    outs = [gi]
    gw_bytes = param_bytes(V * h, wdt) if trained else 0
    if trained:
        outs.append(b.fixed(gw_bytes, False, "gradients", wdt))
    loss = b.fixed(512, True, "activations", FP32)
    # backward hands back the saved buffers: the engine's new input gradient and parameter gradient are these
    g.op("liger_flce", [n], [loss] + outs, saved=outs, fwd_temp=fwd, bwd_temp=(-S * h * dt, -gw_bytes),
         param_grad=(0, gw_bytes))
    return loss, None


def cce_loss(b: Builder, n: int):
    """Apple's Cut Cross-Entropy as Axolotl's patch calls it (`linear_cross_entropy(e, c, labels, shift=True,
    impl="cce")`, apple/ml-cross-entropy d42911f `cce.py`, `cce_lse_forward.py`, `cce_backward.py`, `utils.py`): no
    logits are materialized; the backbone keeps its KV cache.

    Forward: under autocast e (the S x h hidden states) and c (the lm_head) are cast to bf16 and saved as cast;
    the valid indices (`nonzero` int64 (M, 2), int32, scaled, summed to int64 M: the sum saved), the fp32 log-sum-exp
    per token (saved), the negated target logits (fp32, transient) and the fp32 logit average (V, saved).
    Backward: argsort of the logit average (int64 + int32 V), `de = zeros_like(e)` then cast to the input's dtype,
    `dc = zeros_like(c)` (a trained lm_head) then cast to its dtype."""
    g, R, arch = b.g, b.R, b.arch
    h, V = arch.hidden_size, arch.vocab_size
    S = b.seq
    wdt = _lm_head_weight_bytes(b)
    trained = b.head_trained
    e = b.cast(n, h, BF16) if R.autocast else n
    ins = [e]
    pgrad = (0, param_bytes(V * h, wdt)) if trained else ZERO
    if R.autocast:
        wc = b.fixed(param_bytes(V * h, BF16), rg=trained, kind="weight_copies", dtype=BF16)
        g.op("weight_cast", [], [wc], param_grad=pgrad)
        ins.append(wc)
        pgrad = ZERO
    idx = b.new(1, 8, False)  # int64 valid indices
    lse = b.new(1, FP32, False)
    avg = b.fixed(param_bytes(V, FP32), False, "activations", FP32)
    g.op("valid_indices", [], [idx], fwd_temp=(S * (16 + 8 + 8), 0))
    loss = b.fixed(512, True, "activations", FP32)
    g.op("cce", ins + [idx], [loss, lse, avg], saved=ins + [idx, lse, avg], fwd_temp=(S * FP32, 0),
         bwd_temp=(0, param_bytes(V, 8 + 4)), param_grad=pgrad)
    return loss, None


LOSSES = {"plain": plain_loss, "chunked": chunked_loss, "liger": liger_loss, "cce": cce_loss}    # the recipe's `loss` -> its ops after the final norm
NO_CACHE_LOSSES = ("chunked",)  # TRL's chunked path calls the backbone with use_cache=False


EMBEDDING_BWD_DIRECT_MAX_TOKENS = 3072  # torch Embedding.cu: `num_indices <= 3072 && !scale_grad_by_freq`
EMBEDDING_BWD_ROWS_PER_THREAD = 10  # torch EmbeddingBackwardKernel.cu `NROWS_PER_THREAD`


def embedding_backward_scratch_bytes(arch: ModelArch, tokens: int, grad_bytes: int) -> int:
    """Transient bytes of CUDA's `embedding_dense_backward_cuda` beside the V x h gradient it returns, for `tokens`
    ids (B x S) and a gradient of `grad_bytes` per element (torch `aten/src/ATen/native/cuda/Embedding.cu` and
    `EmbeddingBackwardKernel.cu` `embedding_backward_cuda_kernel`, read at pytorch/pytorch main, 2.x):

    - N <= 3072 ids: one kernel accumulates into the zeroed gradient: nothing else;
    - above: the ids are radix-sorted (`sorted_indices`, `orig_indices`: 2 x N int64; the `arange` beside them is
      freed first), `segment_offsets` (N int64), `partials_per_segment` and its offsets (2 x min(N, V) int64),
      `partial_segment_offset` (M int64) and `grad_weight_per_segment` (M x h in the op-math type: fp32 for a
      bf16/fp16 gradient), M = N // 10 + min(N, V), all live while `sum_and_scatter` writes the gradient (the
      two-pass path: the fused atomic path is taken only when min(N, V) x h is too small to fill the GPU).
    cub's sort and unique-by-key temporaries are not counted. Applied to peft's trained embedding copy; full
    fine-tuning keeps the frozen snapshot's 4 x S int64 (the same kernel: left for a deliberate snapshot update)."""
    n = tokens
    if n <= EMBEDDING_BWD_DIRECT_MAX_TOKENS:
        return 0
    segs = min(n, arch.vocab_size)
    m = n // EMBEDDING_BWD_ROWS_PER_THREAD + segs
    ints = 3 * param_bytes(n, 8) + 2 * param_bytes(segs, 8) + param_bytes(m, 8)
    return ints + param_bytes(m * arch.hidden_size, FP32 if grad_bytes < FP32 else grad_bytes)


def head_graph(arch: ModelArch, tc: TrainConfig, seq: int):
    """Embedding lookup (plus Gemma's sqrt(h) scaling and prompt tuning's virtual tokens), and the rotary cos/sin
    every layer saves. The embedding gradient (full FT, or peft's trained copy in `modules_to_save`, which is untied
    from lm_head: its own gradient) is dense V x h; CUDA's embedding backward also sorts the token ids (a few int64
    buffers per token)."""
    b = Builder(arch, tc, seq, seq)
    g, R = b.g, b.R
    h = arch.hidden_size
    S = tc.seq_len
    ids = g.tensor((S * 8, 0), kind="inputs", held=True)
    b.dtype[ids] = 8
    g.op("batch", [], [ids])
    full = b.embedding_trained
    e = b.new(h, R.act, full, seq=S)
    if full:
        V = arch.vocab_size
        grad = param_bytes(V * h, R.weight)
        if arch.tie_word_embeddings and b.full:
            # the lm_head gradient waits in the accumulator; the embedding's is summed into it (transient)
            g.op("embedding", [ids], [e], bwd_temp=(4 * S * 8, grad))
        elif b.full:
            g.op("embedding", [ids], [e], param_grad=(0, grad), bwd_temp=(4 * S * 8, 0))
        else:  # peft's copy: its kernel scratch depends on B x S, so `embedding_backward_scratch_bytes` adds it
            g.op("embedding", [ids], [e], param_grad=(0, grad))
    else:
        g.op("embedding", [ids], [e])
    if arch.scales_embeddings:
        e = b.mul_scalar(e, h)
    e = b.method.head(b, e, arch, tc)
    d = arch.head_dim // 2 if arch.rope_on_halves else arch.head_dim  # gpt-oss: half-width tables
    # position_ids are (1, S): the tables are shared by the batch; Gemma-3 computes one pair per layer type;
    # OLMo-2's stay fp32 (no cast, so no fp32 pair to free). Packed rows carry their own (B, S) position ids
    # (an int64 input kept by the batch), so the rotary embedding computes (B, S, d) tables: one pair per sequence.
    # A padded batch carries its (B, S) int64 attention_mask.
    if tc.recipe.packing or tc.recipe.padding == "longest":
        extra = g.tensor((S * 8, 0), kind="inputs", held=True)
        b.dtype[extra] = 8
        g.op("batch", [], [extra])
    table = FP32 if arch.rope_fp32 else R.act

    def rows(nbytes_per_row: int) -> tuple:
        return (nbytes_per_row, 0) if tc.recipe.packing else (0, nbytes_per_row)

    for _ in range(arch.rope_tables):
        cos = g.tensor(rows(param_bytes(b.seq * d, table)), kind="activations")
        sin = g.tensor(rows(param_bytes(b.seq * d, table)), kind="activations")
        b.dtype[cos] = b.dtype[sin] = table
        g.op("rotary", [], [cos, sin], fwd_temp=rows((2 if arch.rope_fp32 else 3) * param_bytes(b.seq * d, FP32)))
        g.hold(cos)
        g.hold(sin)
    if tc.grad_ckpt and arch.masked_layers(b.seq) and b.attn_impl == "sdpa":
        # a sliding-window mask: one bool (1, 1, S, S) tensor expanded over the batch (transformers 5.17
        # masking_utils.sdpa_mask), an input of every checkpointed layer, so the checkpoints keep it to backward;
        # packed or padded rows make it (B, 1, S, S) (the packed-sequence / padding term indexes the batch)
        per_row = batch_mask(tc) and tc.recipe.attn_implementation == "sdpa"
        mask = g.tensor((b.seq * b.seq, 0) if per_row else (0, b.seq * b.seq), kind="activations")
        b.dtype[mask] = 1
        g.op("sliding_mask", [], [mask])
        g.hold(mask)
    return b, e
