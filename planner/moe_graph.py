"""The ops of a MoE feed-forward block, as `planner.graph` ops (see `planner.layers` for the conventions).

Mirrors transformers 5.17: the router (`<Family>TopKRouter.forward` in modeling_mixtral.py / modeling_qwen3_moe.py /
modeling_qwen2_moe.py), the experts run by the default `grouped_mm` implementation (integrations/moe.py
`grouped_mm_experts_forward`), Qwen2-MoE's shared expert and its sigmoid gate, and what autograd saves for each op
(torch 2.13: `GroupedMmBackward0` saves the input when the weight needs a gradient and the weight when the input
does; `IndexBackward0` saves the indices; `MaskedFillBackward0` the mask; `SoftmaxBackward0` its result;
`TopkBackward0` the indices). S = tokens x top_k rows, so a tensor of S rows is `top_k x width` per token.
"""

from __future__ import annotations

from .moe import expert_wrappers
from .units import BF16, BOOL, FP32

I64, I32 = 8, 4


def moe_block(b, x: int) -> int:
    """The sparse block of `b.arch.moe` on the normed hidden states `x`; returns the block's output."""
    a = b.arch
    if a.model_type == "deepseek_v3":  # its own router and order (planner.deepseek)
        from .deepseek import moe_block as deepseek_moe_block
        return deepseek_moe_block(b, x)
    m, h = a.moe, a.hidden_size
    shared = _shared_expert(b, x) if m.shared_intermediate else None
    scores, gate_in = _router(b, x)
    out = _experts_grouped_mm(b, x, scores)
    if shared is not None:
        g = b.g
        # sigmoid(shared_expert_gate(x)) * shared_expert_output, then added to the experts' output
        sg = b.linear(x, "shared_expert_gate", h, 1, False)  # an nn.Linear: LoRA all-linear adapts it
        sig = b.new(1, b.dtype[sg], b.g.rg(sg))
        g.op("sigmoid", [sg], [sig], saved=[sig] if g.rg(sg) else [])
        shared = b.mul(sig, shared, h)
        out = b.add(out, shared, h)
    return out


def _shared_expert(b, x: int) -> int:
    """Qwen2-MoE's shared expert: an ordinary gate/up/down MLP (`nn.Linear`s named gate_proj, up_proj, down_proj
    inside `mlp.shared_expert`)."""
    h, Is = b.arch.hidden_size, b.arch.moe.shared_intermediate
    gate = b.linear(x, "gate_proj", h, Is, False)
    act = b.activation(gate, Is)
    up = b.linear(x, "up_proj", h, Is, False)
    p = b.mul(act, up, Is)
    return b.linear(p, "down_proj", Is, h, False)


def _router(b, x: int):
    """Router logits `F.linear(x, W)` (E per token, the weight is a parameter, not an `nn.Linear`: no adapter), then
    Mixtral/Qwen: `softmax(logits, dtype=float)` (an fp32 copy of bf16 logits, then the fp32 softmax, saved),
    `topk` (fp32 values, int64 indices), optional renormalization (`/=` a (T, 1) sum in place: autograd keeps a
    copy of the values and the sum), and Qwen's cast back to the logits' dtype (Mixtral keeps fp32 scores).
    Returns (routing weights per (token, k), the router's input)."""
    g, a = b.g, b.arch
    m, h, E, k = a.moe, a.hidden_size, a.moe.num_experts, a.moe.top_k
    wrapped = {w[0]: w for w in expert_wrappers(a, b.tc)}
    if "gate.weight" in wrapped:  # LoRA all-linear: `W + (B A) scaling` (peft `_LoraParameterProxy`), then F.linear
        _, _, n_in, n_out, r = wrapped["gate.weight"]
        wr = _lora_fold(b, n_in * n_out, r * (n_in + n_out), factors=False)
        logits = b.new(E, b.R.weight, True)
        g.op("linear", [x, wr], [logits], saved=[x, wr])
    elif b.R.autocast:
        logits = b._linear_autocast(x, h, E, m.router_bias, trained=b.full)
    else:
        logits = b._linear_plain(x, h, E, m.router_bias, trained=b.full)
    rg = g.rg(logits)
    ldt = b.dtype[logits]
    if m.aux_loss:
        # `output_router_logits`: the OutputRecorder keeps each router's logits (index 0 of its outputs) in the
        # model's outputs, which the training loop holds to the next step (the load-balancing loss: `aux_loss_ops`)
        g.hold(logits)
    idx = b.new(k, I64, False)
    if m.softmax_first:
        lf = b.cast(logits, E, FP32)
        probs = b.new(E, FP32, rg)
        g.op("softmax", [lf], [probs], saved=[probs] if rg else [])
        top = b.new(k, FP32, rg)
        g.op("topk", [probs], [top, idx], saved=[idx] if rg else [])
        if m.norm_topk_prob:
            s = b.new(1, FP32, rg)
            g.op("sum", [top], [s])
            orig = b.new(k, FP32, False)  # in-place div: autograd keeps the values before the division
            g.op("clone", [top], [orig])
            normed = b.new(k, FP32, rg)
            g.op("div_", [top, s], [normed], saved=[s, orig] if rg else [], grad_alias=[top])
            top = normed
        if a.model_type != "mixtral":  # Qwen: router_top_value.to(router_logits.dtype)
            top = b.cast(top, k, ldt)
        return top, x
    top = b.new(k, ldt, rg)  # gpt-oss: topk of the logits, softmax over the k in their dtype
    g.op("topk", [logits], [top, idx], saved=[idx] if rg else [])
    sm = b.new(k, ldt, rg)
    g.op("softmax", [top], [sm], saved=[sm] if rg else [])
    return sm, x


def _experts_grouped_mm(b, x: int, scores: int) -> int:
    """`grouped_mm_experts_forward`: sort the S (token, expert) pairs by expert (int64 values and permutation),
    gather the token rows (`hidden_states[perm // top_k]`, saving the int64 indices), gather the routing weights,
    the (S,) sentinel mask (bool; saved by every masked_fill), the per-expert counts (histc) and offsets, then
    up projection `grouped_mm` (S x 2I; saves its input when the weights train) and `masked_fill` (a new S x 2I,
    which the gate's views keep alive), `act(gate) * up`, the down projection (S x h), `masked_fill`, the product
    with the routing weights (saved both ways; fp32 when the scores are, as Mixtral's), the inverse permutation
    (int64 S, plus a transient arange), the gather back to token order (saves inv_perm), and the sum over top_k,
    cast back to the hidden states' dtype."""
    g, a, R = b.g, b.arch, b.R
    m, h = a.moe, a.hidden_size
    k, I = m.top_k, m.expert_intermediate
    E = m.num_experts
    trained = b.full
    rg_x = g.rg(x)
    wdt = R.weight
    # sort(expert_ids): values and permutation, int64 (S)
    ids_sorted, perm = b.new(k, I64, False), b.new(k, I64, False)
    g.op("sort", [], [ids_sorted, perm])
    src = b.new(k, I64, False)
    g.op("floordiv", [perm], [src])
    # `hidden_states[perm // top_k]`, then `masked_fill_(sentinel_mask, 0)` in place: one (S, h) storage in
    # forward; in backward the in-place fill's gradient is a second (S, h) tensor. The gather's output is a
    # zero-size stand-in so that the storage is counted once; the fill allocates it and its backward copy.
    xg0 = b.new(0, b.dtype[x], rg_x)
    g.op("index", [x, src], [xg0], saved=[src] if rg_x else [])
    sw = b.new(k, b.dtype[scores], g.rg(scores))
    g.op("index", [scores, perm], [sw], saved=[perm] if g.rg(scores) else [])
    # histc over the sorted ids (int32 on CUDA, fp32 on CPU: 4 B either way), counts and offsets (E values)
    hist_in = b.new(k, I32, False)
    g.op("to_int", [ids_sorted], [hist_in])
    counts = b.fixed(_block(E * FP32), False, "activations", FP32)
    g.op("histc", [hist_in], [counts])
    offs = b.fixed(_block(E * I32), False, "activations", I32)
    g.op("cumsum", [counts], [offs])
    mask = b.new(k, BOOL, False)
    g.op("ge", [ids_sorted], [mask])
    xg = b.new(k * h, b.dtype[x], rg_x)
    g.op("masked_fill_", [xg0, mask], [xg], saved=[mask] if rg_x else [],
         bwd_temp=(b.seq * k * h * b.dtype[x], 0) if rg_x else (0, 0))
    xg = b.cast(xg, k * h, wdt, None)  # `input.to(weight.dtype)` (grouped_mm is not autocast-enabled)
    wrapped = {w[0]: w for w in expert_wrappers(a, b.tc)}
    up = _grouped_linear(b, xg, [mask, offs], k * h, k * 2 * I, E * 2 * I * h, trained, wrapped.get("gate_up_proj"))
    if m.expert_bias:
        up = _bias_add(b, ids_sorted, up, k * 2 * I, E * 2 * I, trained)
    upm = b.new(k * 2 * I, b.dtype[up], g.rg(up))
    g.op("masked_fill", [up, mask], [upm], saved=[mask])
    if m.gpt_oss_gate:
        p = _gpt_oss_gate(b, upm, k * I)
    else:
        act = b.activation(upm, k * I)  # act(gate): saves the gate view, which keeps `upm` alive
        p = b.new(k * I, b.dtype[upm], g.rg(upm))
        saved = [act, upm] if g.rg(upm) else []  # `act * up`: saves act and the up view (of upm)
        g.op("mul", [act, upm], [p], saved=saved)
    dn = _grouped_linear(b, p, [offs], k * I, k * h, E * h * I, trained, wrapped.get("down_proj"))
    if m.expert_bias:
        dn = _bias_add(b, ids_sorted, dn, k * h, E * h, trained)
    dnm = b.new(k * h, b.dtype[dn], g.rg(dn))
    g.op("masked_fill", [dn, mask], [dnm], saved=[mask])
    # proj_out * sample_weights_g.unsqueeze(-1): saves both; the weights' gradient is a full S x h product
    # summed over h (transient)
    wdt_out = max(b.dtype[dnm], b.dtype[sw])
    w = b.new(k * h, wdt_out, g.rg(dnm) or g.rg(sw))
    # fp32 routing weights (Mixtral, DeepSeek-V3): a 16-bit dnm's gradient is the product in fp32, then cast, and
    # the weights' product is live too at the cast (the traces: tiny-mixtral-v512 full FT -1.19 % -> 0.00 %). In a
    # checkpointed layer the recomputed dnm is released once unpacked, before the cast: one dnm less there
    widened = g.rg(dnm) and b.dtype[dnm] != wdt_out
    early = widened and g.rg(sw) and b.checkpointed
    g.op("mul_routing", [dnm, sw], [w], saved=([sw] if g.rg(dnm) else []) + ([dnm] if g.rg(sw) else []),
         bwd_temp=(b.seq * k * h * (wdt_out * (g.rg(sw) + widened) - (b.dtype[dnm] if early else 0)), 0))
    inv = b.new(k, I64, False)
    g.op("inv_perm", [perm], [inv], fwd_temp=(0, 0))
    ar = b.new(k, I64, False)
    g.op("arange", [], [ar])
    g.op("index_put_", [inv, ar], [])
    back = b.new(k * h, b.dtype[w], g.rg(w))
    g.op("index", [w, inv], [back], saved=[inv] if g.rg(w) else [])
    out = b.new(h, b.dtype[back], g.rg(back))
    # backward: the expanded (T, top_k, h) gradient viewed as (S, h) is copied (reshape of a non-contiguous tensor)
    g.op("sum_topk", [back], [out])
    # Python locals of `grouped_mm_experts_forward` live until it returns: its input, the gathered rows and the
    # histc input
    g.op("return", [x, xg, hist_in], [])
    return b.cast(out, h, b.dtype[x])


def _bias_add(b, ids_sorted: int, y: int, width: int, numel: int, trained: bool) -> int:
    """gpt-oss's expert biases (`_grouped_linear(..., bias=...)`): `bias[expert_ids_g]` gathers an (S, width) copy
    in the weights' dtype, added in place to the grouped_mm output (`out.add_(bias)`), then freed. A trained bias
    saves the int64 sorted expert ids (`IndexBackward0`) and gets an (E, width) gradient (`index_put` of the
    output's gradient, which `add_` hands to both operands unchanged). The in-place add is modelled as a new
    tensor that replaces `y` (a negative transient keeps the instant at y + the gathered copy)."""
    g = b.g
    gathered = b.new(width, b.R.weight, trained)
    g.op("bias_index", [ids_sorted], [gathered], saved=[ids_sorted] if trained else [],
         param_grad=(0, _block(numel * b.R.weight)) if trained else (0, 0))
    out = b.new(width, b.dtype[y], g.rg(y) or trained)
    g.op("add_", [y, gathered], [out], grad_alias=[y, gathered], fwd_temp=(-b.seq * width * b.dtype[y], 0))
    return out


def _gpt_oss_gate(b, upm: int, width: int) -> int:
    """`GptOssExperts._apply_gate` (modeling_gpt_oss.py) on the (S, 2I) up projection, gate and up interleaved
    (`[..., ::2]`, `[..., 1::2]`: views): `gate.clamp(max=7)` and `up.clamp(-7, 7)` (each saves its input view,
    keeping the (S, 2I) tensor), `gate * 1.702` (transient), `sigmoid` (saves its result), `gate * sigmoid`
    (saves both), `up + 1` (nothing), `(up + 1) * glu` (saves both): five (S, I)-wide tensors kept where SiLU
    keeps one. Backward: each clamp's (S, I) gradient, then the strided view's zero-filled (S, 2I) copy (the
    second summed into the first). `width` = S x I per token."""
    g = b.g
    dt, rg = b.dtype[upm], g.rg(upm)
    view_grad = (b.seq * width * dt, 0) if rg else (0, 0)
    gate = b.new(width, dt, rg)
    g.op("clamp", [upm], [gate], saved=[upm] if rg else [], bwd_temp=view_grad)
    up = b.new(width, dt, rg)
    g.op("clamp", [upm], [up], saved=[upm] if rg else [], bwd_temp=view_grad)
    scaled = b.mul_scalar(gate, width)
    sig = b.new(width, dt, rg)
    g.op("sigmoid", [scaled], [sig], saved=[sig] if rg else [])
    glu = b.mul(gate, sig, width)
    up1 = b.new(width, dt, rg)
    g.op("add_scalar", [up], [up1], grad_alias=[up])
    return b.mul(up1, glu, width)


def unsummed_grad_bytes_per_token(arch, R) -> int:
    """Bytes per token of the gradient of the experts' (S, h) output before the sum over top_k: in the routing
    weights' dtype when wider (Mixtral keeps fp32 scores), else the weights' dtype."""
    m = arch.moe
    scores = (FP32 if (m.softmax_first and arch.model_type in ("mixtral", "deepseek_v3"))  # DeepSeek: fp32 router
              else (BF16 if R.lin == BF16 else FP32))
    return m.top_k * arch.hidden_size * max(R.weight, scores)


def _grouped_linear(b, x: int, extra_inputs: list, width_in: int, width_out: int, numel: int, trained: bool,
                    wrapper=None) -> int:
    """`F.grouped_mm(x, W^T, offs)` over all experts: output S x out in the weights' dtype; saves x when W trains
    (full FT: W's gradient, E x out x in). A LoRA-wrapped stack (`wrapper`, planner.moe `expert_wrappers`) runs on
    the folded copy W' = W + scaling B A (`_lora_fold`), which requires a gradient: grouped_mm saves x and W', and
    its backward writes W's full-size gradient for the fold's backward."""
    g = b.g
    if wrapper is not None:
        _, E, n_in, n_out, r = wrapper
        w = _lora_fold(b, numel, r * E * (n_in + n_out), factors=True, dims=(E, n_out, n_in, r))
        y = b.new(width_out, b.dtype[x], True)
        g.op("grouped_mm", [x, w] + list(extra_inputs), [y], saved=[x, w])
        return y
    y = b.new(width_out, b.dtype[x], g.rg(x) or trained)
    pgrad = (0, _block(numel * b.R.weight)) if trained else (0, 0)
    g.op("grouped_mm", [x] + list(extra_inputs), [y], saved=[x] if trained else [], param_grad=pgrad)
    return y


def _lora_fold(b, numel: int, adapter_numel: int, factors: bool, dims: tuple = ()) -> int:
    """peft 0.21 `ParamWrapper` (tuners/lora/layer.py): while the wrapped module runs, the parameter is replaced
    through `nn.utils.parametrize` (cached for the call) by a new tensor of its size and dtype. A stack of experts
    with one adapter: `_LoraFactorsProxy`, `baddbmm(W, lhs, rhs, alpha=scaling)` with lhs, rhs the bf16 casts of
    lora_B and lora_A reshaped per expert (`get_delta_factors`; saved by baddbmm, r E (in + out) values). The 2-D
    router: `_LoraParameterProxy`, `W + delta` with delta = (B A scaling).to(bf16) (transient). Backward: the
    bf16 gradients of the factors, cast to the fp32 adapters' gradients (param_grad). Returns W' (fixed bytes,
    requires grad). `numel`: W's elements; `adapter_numel`: lora_A's and lora_B's together; `dims`: (E, out, in,
    r) of an expert stack, kept with W's dtype on the builder (`fold_gemms`, by node index) for the kernel walk
    (planner.kernels: E GEMMs of out x in x r per forward, two more in backward, none scaling with the batch; fp32
    after k-bit preparation)."""
    from .methods.lora import adapter_dtype

    g, wdt = b.g, b.R.weight
    adt = adapter_dtype(b.tc)
    fold = b.fixed(_block(numel * wdt), True, "activations", wdt)
    if factors:
        lr = b.fixed(_block(adapter_numel * wdt), False, "activations", wdt)
        g.op("lora_factors", [], [lr])
        b.__dict__.setdefault("fold_gemms", {})[len(g.nodes)] = dims + (wdt,)
        g.op("lora_fold", [lr], [fold], saved=[lr], param_grad=(0, _block(adapter_numel * adt)),
             bwd_temp=(0, _block(adapter_numel * wdt)))
    else:
        g.op("lora_fold", [], [fold], param_grad=(0, _block(adapter_numel * adt)),
             fwd_temp=(0, _block(numel * wdt) + _block(numel * FP32)))
    return fold


def _block(nbytes: int) -> int:
    return -(-nbytes // 512) * 512


def aux_loss_ops(b) -> None:
    """transformers 5.17 `load_balancing_loss_func` (modeling_<family>.py, `output_router_logits`), after the
    language-model loss: per MoE layer `softmax(router_logits)` in the logits' dtype (saved for backward: E values
    per token and layer, all alive until the aux loss's backward), `topk` and `bincount` (transient int64 indices),
    `routing_weights.float().sum(0)` (a transient fp32 copy). The gradients it sends to each layer's held logits are
    E values per token and layer, not modelled (as small as the saved probabilities)."""
    g, a = b.g, b.arch
    m = a.moe
    n_sparse = sum(n for k, n in a.kind_counts if k.mlp == "moe")
    ldt = b.R.lin
    probs = b.new(n_sparse * m.num_experts, ldt, True)
    temp = b.seq * (m.num_experts * FP32 + m.top_k * (ldt + I64))
    g.op("aux_loss", [], [probs], saved=[probs], fwd_temp=(temp, 0))
    loss = b.fixed(512, True, "activations", FP32)
    g.op("aux_sum", [probs], [loss], saved=[probs])
