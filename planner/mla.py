"""Multi-head Latent Attention (MLA, DeepSeek-V2/V3) as transformers 5.17 runs it, as `planner.graph` ops.

Source: transformers 5.17 `models/deepseek_v3/modeling_deepseek_v3.py` (`DeepseekV3Attention`,
`apply_rotary_pos_emb_interleave`, `DeepseekV3RMSNorm`), `configuration_deepseek_v3.py`,
`integrations/sdpa_attention.py` and `integrations/flash_attention.py`.

Modules of one layer (H = num_attention_heads, qk_head_dim = qk_nope_head_dim + qk_rope_head_dim):

- queries: `q_a_proj` (h -> q_lora_rank, `attention_bias`), `q_a_layernorm` (RMSNorm of q_lora_rank), `q_b_proj`
  (q_lora_rank -> H x qk_head_dim, no bias); or, with `q_lora_rank` null, one `q_proj` (h -> H x qk_head_dim).
- keys/values: `kv_a_proj_with_mqa` (h -> kv_lora_rank + qk_rope_head_dim, `attention_bias`), split into the
  latent (normed by `kv_a_layernorm`, kv_lora_rank) and one shared rotary key head (qk_rope_head_dim);
  `kv_b_proj` (kv_lora_rank -> H x (qk_nope_head_dim + v_head_dim), no bias) expands the latent to every head.
- `o_proj` (H x v_head_dim -> h, `attention_bias`).

Forward: rotary on the last qk_rope_head_dim of each query head and on the shared key head (`rope_interleave`,
default true: `apply_rotary_pos_emb_interleave`, even/odd slices times the first half of cos/sin, then a `cat`;
false: Llama's `rotate_half`); the query is `cat(q_pass, q_rot)` (a new H x qk_head_dim tensor); the key is a
`new_empty` H x qk_head_dim tensor filled by two `copy_`s (k_nope from kv_b_proj's output, the rotary head expanded
to every head); the value is a strided view into kv_b_proj's output, so whatever saves it keeps that whole output
(H x (nope + v)) alive. `config.head_dim` is qk_rope_head_dim (`DeepseekV3Config.__post_init__`): the rotary
cos/sin tables are that wide. With `use_cache` (training without checkpointing) the DynamicCache keeps copies of
the normed latent and the rotated key head (the compressed cache), which `expand_kv` then reads.

sdpa: num_key_value_heads equals num_attention_heads in every DeepSeek config (the expanded keys have H heads;
transformers' `repeat_kv` would break otherwise), so there is no GQA. q/k have qk_head_dim and v has v_head_dim: the
flash backend needs equal head dims (`check_head_dim_size_flash`), so torch 2.13 takes the memory-efficient kernel
(head dims multiples of 8) before math (`planner.attention` with `SdpaCall.value_head_dim`); its output is
H x v_head_dim. flash_attention_2 pads the value to qk_head_dim (`F.pad`, a copy) and crops the output (a view);
eager as `eager_attention_forward` with H key/value heads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import attention as sdp
from .units import BF16, FP32, round_up


@dataclass(frozen=True)
class MLA:
    """The latent attention of a DeepSeek-V3 layer (config names)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True
    attention_bias: bool = False

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def linear_shapes(self, h: int, heads: int) -> tuple:
        """(name, in, out, bias) of the attention's `nn.Linear`s in forward order (`DeepseekV3Attention.__init__`)."""
        b = self.attention_bias
        if self.q_lora_rank is None:
            q = (("q_proj", h, heads * self.qk_head_dim, False),)
        else:
            q = (("q_a_proj", h, self.q_lora_rank, b), ("q_b_proj", self.q_lora_rank, heads * self.qk_head_dim, False))
        return q + (("kv_a_proj_with_mqa", h, self.kv_lora_rank + self.qk_rope_head_dim, b),
                    ("kv_b_proj", self.kv_lora_rank, heads * (self.qk_nope_head_dim + self.v_head_dim), False),
                    ("o_proj", heads * self.v_head_dim, h, b))

    @property
    def norm_widths(self) -> tuple:
        """Widths of the attention's RMSNorm weights: q_a_layernorm (with q_lora_rank) and kv_a_layernorm."""
        return ((self.q_lora_rank,) if self.q_lora_rank else ()) + (self.kv_lora_rank,)

    @property
    def norm_params(self) -> int:
        return sum(self.norm_widths)

    def attention_matmul_width(self, heads: int) -> int:
        """Elements per token and key of QK^T plus AV: H x (qk_head_dim + v_head_dim) (2 x q_dim in standard
        attention)."""
        return heads * (self.qk_head_dim + self.v_head_dim)


class MLAError(ValueError):
    """An MLA config ftplan cannot model."""


def mla_from_config(c: dict) -> MLA:
    """The MLA of a deepseek_v3 config `c` (family defaults applied)."""

    def pos_int(key: str, none_ok: bool = False):
        v = c.get(key)
        if v is None and none_ok:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise MLAError(f"'{key}' must be a positive integer{' or null' if none_ok else ''}, got {v!r}")
        return v

    m = MLA(pos_int("q_lora_rank", none_ok=True), pos_int("kv_lora_rank"), pos_int("qk_nope_head_dim"),
            pos_int("qk_rope_head_dim"), pos_int("v_head_dim"), rope_interleave=bool(c.get("rope_interleave", True)),
            attention_bias=bool(c.get("attention_bias", False)))
    if m.qk_rope_head_dim % 2:
        raise MLAError(f"'qk_rope_head_dim' must be even (rotary pairs), got {m.qk_rope_head_dim}")
    return m


# -- the graph --------------------------------------------------------------------------------------------------------


def decoder_layer(b, x: int) -> int:
    """`DeepseekV3DecoderLayer.forward`: input norm, MLA, residual add, post-attention norm, the dense MLP or the
    MoE block (`b.feed_forward`), residual add."""
    h = b.arch.hidden_size
    n1 = b.rmsnorm(x, h)
    o = attention(b, n1)
    h1 = b.add(x, o, h)
    n2 = b.rmsnorm(h1, h)
    dn = b.feed_forward(n2)
    if b.kind.mlp == "moe":
        b.g.op("caller_ref", [x], [])  # the layer loop's reference to the input (as planner.layers)
    return b.add(h1, dn, h)


def attention(b, x: int) -> int:
    """`DeepseekV3Attention.forward` on the normed hidden states `x`; returns o_proj's output."""
    a, m, g = b.arch, b.arch.mla, b.g
    h, H = a.hidden_size, a.num_heads
    dr, dqk = m.qk_rope_head_dim, m.qk_head_dim
    if m.q_lora_rank is None:
        q = b.linear(x, "q_proj", h, H * dqk, False)
    else:
        qa = b.linear(x, "q_a_proj", h, m.q_lora_rank, m.attention_bias)
        qa = b.rmsnorm(qa, m.q_lora_rank)
        q = b.linear(qa, "q_b_proj", m.q_lora_rank, H * dqk, False)
    ckv = b.linear(x, "kv_a_proj_with_mqa", h, m.kv_lora_rank + dr, m.attention_bias)
    # split: the latent and the rotary key head are views of ckv; the norm's fp32 cast copies only the latent
    kv = b.rmsnorm(ckv, m.kv_lora_rank)
    q_rot = _rope(b, q, H * dr)  # the view q[..., nope:] of every head
    k_rot = _rope(b, ckv, dr)
    if b.use_cache:  # DynamicCache.update: cat([empty, t]) copies, kept for the outputs' lifetime
        kv = b._held_copy("cache_k", [kv], m.kv_lora_rank, b.dtype[kv], b.seq, kv)
        k_rot = b._held_copy("cache_v", [k_rot], dr, max(b.dtype[kv], b.dtype[k_rot]), b.seq, k_rot)
    # query_states = cat((q_pass, q_rot)): a new tensor; its backward hands views of the gradient to both, and
    # the split of q (q_pass, q_rot) makes one full-width gradient for q
    qs = b.new(H * dqk, max(b.dtype[q], b.dtype[q_rot]), g.rg(q) or g.rg(q_rot))
    g.op("cat", [q, q_rot], [qs], grad_alias=[q_rot])
    kvb = b.linear(kv, "kv_b_proj", m.kv_lora_rank, H * (m.qk_nope_head_dim + m.v_head_dim), False)
    # key_states = new_empty(..., qk_head_dim); copy_(k_nope) into [..., :nope], copy_(k_rot.expand(H)) into the rest;
    # backward: k_nope's gradient joins the value's in one kv_b-wide tensor, the rotary head's is summed over heads
    ks = b.new(H * dqk, b.dtype[kvb], g.rg(kvb) or g.rg(k_rot))
    g.op("key_states", [kvb, k_rot], [ks])
    impl = {"sdpa": _sdpa, "eager": _eager, "flash_attention_2": _flash_attention_2}
    out = impl[b.recipe.attn_implementation](b, qs, ks, kvb)
    return b.linear(out, "o_proj", H * m.v_head_dim, h, m.attention_bias)


def _rope(b, t: int, width: int) -> int:
    """Rotary embedding of `width` elements per token (H x qk_rope_head_dim of the query, qk_rope_head_dim of the
    shared key head). Interleaved (`apply_rotary_pos_emb_interleave`): `x1 * cos - x2 * sin` and
    `x2 * cos + x1 * sin` on the even/odd halves (four half-width products, two half-width sums), then `cat`;
    nothing saved but cos/sin (shared). Otherwise Llama's `rotate_half` form (`Builder.rope`)."""
    if not b.arch.mla.rope_interleave:
        return b.rope(t, width)
    g = b.g
    dt = max(b.dtype[t], b.R.act)
    rg = g.rg(t)
    half = width // 2
    parts = []
    for _ in range(2):
        p1 = b.new(half, dt, rg)
        g.op("mul_cos", [t], [p1])
        p2 = b.new(half, dt, rg)
        g.op("mul_sin", [t], [p2])
        s = b.new(half, dt, rg)
        g.op("add", [p1, p2], [s], grad_alias=[p1, p2])
        parts.append(s)
    out = b.new(width, dt, rg)
    g.op("cat", parts, [out], grad_alias=parts)
    return out


def sdpa_call(b, rg: bool) -> sdp.SdpaCall:
    """What `sdpa_attention_forward` passes: H query and H key/value heads (no GQA), qk_head_dim for q and k,
    v_head_dim for v, causal without a mask."""
    a, m = b.arch, b.arch.mla
    dt = BF16 if b.R.autocast else b.R.lin
    name = "fp32" if dt == FP32 else ("fp16" if b.tc.precision == "fp16" else "bf16")
    dropout = float(a.config.get("attention_dropout", 0.0) or 0.0)
    call = sdp.transformers_sdpa_call(name, a.num_heads, a.num_heads, m.qk_head_dim, b.seq, b.seq, False,
                                      dropout=dropout, requires_grad=rg)
    return replace(call, value_head_dim=m.v_head_dim)


def _sdpa(b, q: int, k: int, v: int) -> int:
    """`F.scaled_dot_product_attention(q, k, v, is_causal=True)` on the kernel torch 2.13 picks (memory-efficient
    on sm80+ in 16-bit: the value's head dim differs). Saved: q, k, v (v: the kv_b_proj output it views), the
    output (H x v_head_dim) and the fp32 logsumexp (H per token, tokens padded to 32); backward scratch: the fp32
    delta and, for 16-bit outputs, the fp32 dq accumulator (tokens padded to 128, H x qk_head_dim). cuDNN and
    flash (not reached with unequal head dims) as in `Builder.sdpa`; the math backend (GPUs below sm80 in bf16)
    as `_sdpa_math`."""
    g, a, m = b.g, b.arch, b.arch.mla
    H, dqk, dv = a.num_heads, m.qk_head_dim, m.v_head_dim
    rg = g.rg(q) or g.rg(k) or g.rg(v)
    call = sdpa_call(b, rg)
    backend = sdp.select_backend(call, b.sm)
    if backend == "math":
        return _sdpa_math(b, q, k, v, call, rg)
    if b.R.autocast:
        q, k = b.cast(q, H * dqk, BF16), b.cast(k, H * dqk, BF16)
        v = b.cast(v, H * dv, BF16)
    dt = b.dtype[q]
    fused = backend in ("flash", "cudnn")
    lse_tokens = b.seq if fused else round_up(b.seq, 32)
    out = b.new(H * dv, dt, rg)
    lse = g.tensor((lse_tokens * H * FP32, 0), kind="activations")
    b.dtype[lse] = FP32
    s128 = round_up(b.seq, 128)
    if fused:
        ws = (s128 * H * FP32 + s128 * H * dqk * FP32, 0)
    else:
        ws = (lse_tokens * H * FP32 + (s128 * H * dqk * FP32 if dt != FP32 else 0), 0)
    g.op("sdpa", [q, k, v], [out, lse], saved=[q, k, v, out, lse] if rg else [], bwd_temp=ws)
    return out


def _sdpa_math(b, q: int, k: int, v: int, call, rg: bool) -> int:
    """torch 2.13 `_scaled_dot_product_attention_math` (as `Builder._sdpa_math`) with MLA's widths: fp32 copies of
    q, k (H x qk_head_dim) and v (H x v_head_dim, contiguous), both scaled by sqrt(scale) (saved by the QK^T
    product), the causal bool tril turned into an fp32 additive mask (shared by the batch), the fp32 scores and
    probabilities (saved), the output cast back and made contiguous by transformers' transpose."""
    g, a, m = b.g, b.arch, b.arch.mla
    H, dqk, dv = a.num_heads, m.qk_head_dim, m.v_head_dim
    S = call.q_len
    dt = b.dtype[q]
    q32, k32, v32 = b.cast(q, H * dqk, FP32), b.cast(k, H * dqk, FP32), b.cast(v, H * dv, FP32)
    qs = b.mul_scalar(q32, H * dqk)
    ks = b.mul_scalar(k32, H * dqk)
    mat = (H * S * S * FP32, 0)
    scores = g.tensor(mat, rg=rg)
    b.dtype[scores] = FP32
    g.op("bmm_qk", [qs, ks], [scores], saved=[qs, ks] if rg else [])
    mask = g.tensor((0, S * S * FP32))
    b.dtype[mask] = FP32
    g.op("attn_mask", [], [mask], fwd_temp=(0, S * S))
    masked = g.tensor(mat, rg=rg)
    b.dtype[masked] = FP32
    g.op("add_mask", [scores, mask], [masked], grad_alias=[scores])
    return b._math_softmax_pv(masked, v32, mat, rg, call.dropout, H * S * S, H * dv, dt)


def _matrix(b, dtype: int, rg: bool) -> int:
    """A (B, H, S, S) attention matrix of `dtype`."""
    t = b.g.tensor((b.arch.num_heads * b.seq * b.seq * dtype, 0), rg=rg)
    b.dtype[t] = dtype
    return t


def _eager(b, q: int, k: int, v: int) -> int:
    """`eager_attention_forward` (modeling_deepseek_v3.py) with H key/value heads (`repeat_kv` by 1 returns its
    input): `matmul(q, k^T)` saves both; `* scaling`; `+ attention_mask` (the float mask `eager_mask` builds, counted
    once per step in planner.memory); `softmax(dtype=fp32)`: an fp32 copy of 16-bit scores and the fp32
    probabilities (saved); `.to(q.dtype)` (a copy unless fp32), saved by `matmul(probs, v)` with a contiguous copy
    of v (matmul's reshape of the strided view); the (B, H, S, v_head_dim) output's `transpose(1, 2).contiguous()` copies it. Not under
    autocast (MoE models are planned in bf16)."""
    g, a, m, R = b.g, b.arch, b.arch.mla, b.R
    H = a.num_heads
    rg = g.rg(q) or g.rg(k) or g.rg(v)
    sdt = b.dtype[q]
    scores = _matrix(b, sdt, rg)
    g.op("matmul_qk", [q, k], [scores], saved=[q, k] if rg else [])
    scaled = _matrix(b, sdt, rg)
    g.op("mul_scalar", [scores], [scaled])
    added = _matrix(b, max(sdt, R.act), rg)
    g.op("add_mask", [scaled], [added], grad_alias=[scaled])
    x = added
    if b.dtype[x] != FP32:
        x32 = _matrix(b, FP32, rg)
        g.op("to_copy", [x], [x32])
        x = x32
    probs = _matrix(b, FP32, rg)
    g.op("softmax", [x], [probs], saved=[probs] if rg else [])
    if sdt != FP32:
        pc = _matrix(b, sdt, rg)
        g.op("to_copy", [probs], [pc])
        probs = pc
    # matmul folds (B, H) into bmm's batch: the value, a strided view into kv_b_proj's output, cannot be viewed
    # that way, so `reshape` copies it (H x v_head_dim), and the bmm saves the copy
    vc = b.new(H * m.v_head_dim, b.dtype[v], g.rg(v))
    g.op("reshape_copy", [v], [vc])
    out = b.new(H * m.v_head_dim, b.dtype[probs], rg)
    g.op("matmul_pv", [probs, vc], [out], saved=[probs, vc] if rg else [])
    return b._contiguous(out, H * m.v_head_dim)


def _flash_attention_2(b, q: int, k: int, v: int) -> int:
    """transformers 5.17 `flash_attention_forward` (integrations/flash_attention.py) over flash-attn 2: the value
    is padded to qk_head_dim (`F.pad`: a new H x qk_head_dim tensor; its backward slices the gradient), flash-attn
    saves q, k, the padded v, its (B, S, H, qk_head_dim) output and the fp32 logsumexp; the output is cropped to
    v_head_dim (a view), and MLA's `reshape(B, S, -1)` of that strided view copies it (H x v_head_dim). Backward
    scratch: softmax_d (tokens padded to 128) and dq_accum (tokens padded to 128, head dim to 32; 256 above 192),
    fp32. Equal head counts: no dk/dv expansion. bf16 only (MoE models are planned in bf16)."""
    g, a, m = b.g, b.arch, b.arch.mla
    H, dqk, dv = a.num_heads, m.qk_head_dim, m.v_head_dim
    rg = g.rg(q) or g.rg(k) or g.rg(v)
    if b.dtype[q] == FP32:
        raise ValueError("flash_attention_2 computes in fp16/bf16; an fp32 model reaches it in fp32")
    dt = b.dtype[q]
    vp = b.new(H * dqk, b.dtype[v], g.rg(v))
    g.op("pad", [v], [vp])
    out = b.new(H * dqk, dt, rg)
    lse = g.tensor((b.seq * H * FP32, 0), kind="activations")
    b.dtype[lse] = FP32
    s128, d32 = round_up(b.seq, 128), round_up(dqk, 32) if dqk <= 192 else 256
    ws = s128 * H * FP32 + s128 * H * d32 * FP32
    g.op("flash_attn", [q, k, vp], [out, lse], saved=[q, k, vp, out, lse] if rg else [], bwd_temp=(ws, 0))
    cropped = b.new(H * dv, dt, rg)
    g.op("contiguous", [out], [cropped])
    return cropped


__all__ = ["MLA", "MLAError", "mla_from_config", "decoder_layer", "attention", "sdpa_call"]
