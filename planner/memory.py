"""Peak device memory of one training step: what `torch.cuda.max_memory_allocated()` reports, per GPU.

The step is the reference recipe (`trainer/recipe.py`). Memory is the sum of

- static terms, one function each below: weights (bf16/fp32, or NF4 4-bit with double-quantized constants),
  trainable adapter weights, optimizer state, library workspaces;
- the step's timeline: the embedding, every decoder layer, and the loss are replayed op by op
  (`planner.layers` builds them, `planner.graph` replays autograd) to get what each keeps for backward, what
  it allocates transiently, and the gradients it leaves. Layers compose: while layer i runs forward everything
  kept by layers < i is live; while it runs backward the parameter gradients of layers > i are live too.

The peak is the maximum over the timeline's events, not a sum of everything: the forward, the loss backward
(logits in fp32 three times over), the first and last layer backward (with checkpointing: each layer's
recomputation plus backward), the embedding backward, and the optimizer step. The logits stay alive from the
loss forward until the next forward returns (a plain training loop keeps `outputs`), so they count in
backward and in the optimizer step.
"""

from __future__ import annotations

import dataclasses

import functools
from dataclasses import dataclass, field

from .arch import ModelArch
from .config import TrainConfig
from .frozen import memo
from .graph import Offload, Point, forward_without_saving, peak_point, pinned_bytes, simulate
from .attention import DEFAULT_CAPABILITY, canonical_capability, effective_implementation, parse_capability
from .layers import (batch_mask, chunked_loss_batch, embedding_backward_scratch_bytes, head_graph, layer_graph, regime,
                     tail_graph)
from .methods import total_params, trainable_params
from .deepseek import buffer_bytes as deepseek_buffer_bytes
from .modules_to_save import first_input_requires_grad
from .moe import check_supported as check_moe_supported
from .moe import param_tensors as moe_param_tensors
from .moe_graph import unsummed_grad_bytes_per_token
from .quant import nf4_linear_bytes  # noqa: F401  (re-exported: the NF4 term lives with the quantization)
from .strategies import GRADIENTS, OPTIMIZER_STATE, strategy_of
from .units import BF16, FP32, MIB, param_bytes

# -- static terms ---------------------------------------------------------------------------------------------------


def param_tensors(arch: ModelArch) -> list[tuple[str, tuple[int, int], int]]:
    """Every parameter tensor of the base model as (group, (rows, cols), count); 1-D tensors are (1, n).
    Groups: embedding, lm_head, linear (decoder weights, (out, in)), bias, norm. Tied embeddings have no
    lm_head tensor."""
    h = arch.hidden_size
    out = [("embedding", (arch.vocab_size, h), 1)]
    if not arch.tie_word_embeddings:
        out.append(("lm_head", (arch.vocab_size, h), 1))
    L = arch.num_layers
    for lin in arch.linears:
        out.append(("linear", (lin.out_features, lin.in_features), L))
        if lin.bias:
            out.append(("bias", (1, lin.out_features), L))
    out.append(("norm", (1, h), sum(k.norms * n for k, n in arch.kind_counts) + 1))
    for kind, n in arch.kind_counts:  # q/k norms: head_dim wide (Qwen3, Gemma-3) or the projection's (OLMo-2)
        for width in kind.qk_norm_widths(arch.head_dim, arch.q_dim, arch.kv_dim):
            if width:
                out.append(("norm", (1, width), n))
    if arch.moe:  # experts, routers, shared experts, dense-first MLPs (planner.moe)
        out += moe_param_tensors(arch)
    if arch.mla:  # q_a_layernorm, kv_a_layernorm (planner.mla)
        out += [("norm", (1, w), arch.num_layers) for w in arch.mla.norm_widths]
    return out


def base_weight_bytes(arch: ModelArch, tc: TrainConfig) -> dict[str, int]:
    """Bytes of the base model's parameters on the device.

    bf16: 2 B/param; mixed and fp32: 4 B/param (fp32 master weights). A quantized base (`planner.quant`, e.g.
    NF4): decoder linear weights as the quantization stores them, everything else (embeddings, lm_head, norms,
    biases) fp32 after peft's `prepare_model_for_kbit_training`. Each tensor is rounded to the allocator's
    512-byte block."""
    R = regime(tc)
    quant = tc.base_quant
    out = {"weights": 0, "quant_constants": 0}
    for group, (rows, cols), count in param_tensors(arch):
        if R.quantized and group == "linear":
            for k, v in quant.linear_bytes(rows * cols).items():
                out[k] += v * count
        else:
            out["weights"] += param_bytes(rows * cols, R.weight) * count
    return out


def trainable_tensors(arch: ModelArch, tc: TrainConfig) -> tuple:
    """Every trainable tensor (`planner.methods.Trainable`: shape, count, bytes per element), from the method:
    all base parameters for full FT (in the weights' dtype), else the adapters (fp32) and the recipe's trained
    copies of embed_tokens / lm_head (`planner.modules_to_save`, in the weights' dtype). Cached per model and
    configuration without batch (recommend asks for the same tensors at every micro-batch)."""
    return _trainable_tensors(arch, batch_free(tc))


@functools.lru_cache(maxsize=4096)
def _trainable_tensors(arch: ModelArch, tc: TrainConfig) -> tuple:
    return tuple(tc.spec.all_trainable_tensors(arch, tc))


def adapter_bytes(arch: ModelArch, tc: TrainConfig) -> int:
    """Trainable adapter weights (0 for full FT, whose trained weights are the base weights)."""
    if tc.spec.trains_base:
        return 0
    return sum(param_bytes(t.numel, t.dtype_bytes) * t.count for t in trainable_tensors(arch, tc))


def gradient_bytes(arch: ModelArch, tc: TrainConfig) -> int:
    """Gradients of all trainable tensors, in each tensor's dtype (bf16 grads for a bf16 model, fp32 for
    mixed/fp32 master weights and for adapters). Cached per configuration without batch."""
    return _gradient_bytes(arch, batch_free(tc))


@functools.lru_cache(maxsize=4096)
def _gradient_bytes(arch: ModelArch, tc: TrainConfig) -> int:
    return sum(param_bytes(t.numel, t.dtype_bytes) * t.count for t in trainable_tensors(arch, tc))


PAGED_MIN_NUMEL = 100_000  # bitsandbytes Optimizer8bit.get_state_buffer: paged only from 1e5 elements
MIN_8BIT_NUMEL = 4096  # bitsandbytes Optimizer2State: smaller tensors keep fp32 state


def optimizer_state_bytes(arch: ModelArch, tc: TrainConfig) -> dict[str, int]:
    """See `_optimizer_state_bytes` (cached per model and configuration without batch)."""
    return dict(_optimizer_state_bytes(arch, batch_free(tc)))


@functools.lru_cache(maxsize=4096)
def _optimizer_state_bytes(arch: ModelArch, tc: TrainConfig) -> dict[str, int]:
    """Optimizer state on the device, split into allocated (`state`) and CUDA managed memory (`paged`).

    AdamW (torch): exp_avg + exp_avg_sq in the parameter's dtype (2 x 2 B for bf16 params, 2 x 4 B for fp32).
    AdamW8bit / PagedAdamW8bit (bitsandbytes): 2 x 1 B plus an fp32 absmax per 256 values and state; tensors
    under 4096 elements keep 2 x fp32. Paged buffers (>= 1e5 elements) are `cudaMallocManaged` memory outside
    `torch.cuda.max_memory_allocated` (they still occupy the device until paged out).
    SGD (momentum 0, the Trainer default): none.
    Adafactor (transformers, beta1=None): factored second moment, fp32 row and column vectors for matrices, a full
    fp32 vector for 1-D tensors (arXiv:1804.04235)."""
    out = {"state": 0, "paged": 0}
    opt = tc.optimizer
    for t in trainable_tensors(arch, tc):
        n, count, b = t.numel, t.count, t.dtype_bytes
        if opt == "adamw":
            out["state"] += 2 * param_bytes(n, b) * count
        elif opt in ("adamw8bit", "paged_adamw8bit"):
            if n < MIN_8BIT_NUMEL:
                out["state"] += 2 * param_bytes(n, FP32) * count
                continue
            blocks = -(-n // 256)
            absmax = 2 * param_bytes(blocks, FP32) * count
            states = 2 * param_bytes(n, 1) * count
            out["state"] += absmax
            if opt == "paged_adamw8bit" and n >= PAGED_MIN_NUMEL:
                out["paged"] += states
            else:
                out["state"] += states
        elif opt == "adafactor":
            rows, cols = t.rows, t.cols
            if rows > 1 and cols > 1:
                out["state"] += (param_bytes(rows, FP32) + param_bytes(cols, FP32)) * count
            else:
                out["state"] += param_bytes(n, FP32) * count
    return out


def optimizer_step_temp_bytes(arch: ModelArch, tc: TrainConfig) -> int:
    """Transient memory of `optimizer.step()` on top of weights, gradients and state.

    AdamW foreach (torch's CUDA default): `torch._foreach_sqrt(exp_avg_sqs)` materializes one new tensor per
    parameter at once: one parameter-sized buffer in the state dtype (torch/optim/adam.py `_multi_tensor_adam`).
    8-bit bitsandbytes and SGD (momentum 0, foreach `add_`) update in place: nothing. Adafactor works one
    tensor at a time: for a bf16 matrix of n elements it holds fp32 copies of the gradient and the weight, the
    squared update and its replacement (4 x 4n B; 2 x 4n for fp32 tensors), so the largest matrix decides.
    Plus `clip_grad_norm_`'s per-tensor norms (one 512-byte block each)."""
    tensors = trainable_tensors(arch, tc)
    n_tensors = sum(t.count for t in tensors)
    clip = 2 * 512 * n_tensors
    if tc.optimizer == "adamw":
        return sum(param_bytes(t.numel, t.dtype_bytes) * t.count for t in tensors) + clip
    if tc.optimizer == "adafactor":
        worst = max((param_bytes(t.numel, FP32) * (4 if t.dtype_bytes != FP32 else 2) for t in tensors), default=0)
        return worst + clip
    return clip


def grad_scaler_bytes(tc: TrainConfig) -> int:
    """`--precision fp16`: torch.amp.GradScaler (torch 2.13 `torch/amp/grad_scaler.py`) keeps its fp32 `_scale` and
    int32 `_growth_tracker` (one-element tensors, a 512-byte block each) from the first `scale()`, and one more block
    at a time: the scaled loss during backward, `found_inf` (per device; `unscale_` works in place) at the step.
    Counted with the optimizer state: 3 blocks. Other precisions: 0."""
    return 3 * 512 if tc.precision == "fp16" else 0


def cuda_workspace_bytes(gpu=None) -> int:
    """cuBLAS workspaces allocated through the caching allocator: one per (thread, stream) handle, and a training
    step uses two threads (forward on the main thread, backward on autograd's device thread): 2 x 32 MiB on
    Hopper, 2 x 8.125 MiB elsewhere (torch CublasHandlePool.cpp). Measured on H100: 64 MiB (the constant
    difference between the shared measurements and the live-tensor trace)."""
    per_handle = gpu.cublas_workspace_bytes if gpu is not None else 32 * MIB
    return 2 * per_handle


# -- the timeline ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pieces:
    """Replayed pieces of one configuration (batch 1; activations scale with the batch)."""

    head: object
    tail: object
    prefix: object | None
    replays: tuple  # one replay key (first layer?, (kind without window, masked)) per distinct layer graph
    layers: tuple  # per replay: Timeline (checkpointed when tc.grad_ckpt)
    forward_nosave: tuple  # per replay: forward points of a checkpointed layer's first forward (when checkpointed)
    layer_input: tuple  # bytes of one layer's input (what a checkpoint keeps)
    pending: tuple  # per replay: gradients live while a checkpointed layer recomputes (`_recompute_pending`)
    of_layer: tuple  # per layer: the index of its replay
    counts: tuple  # per replay: counts[i] = how many layers < i are that replay (i = 0..num_layers)
    backward_layers: tuple  # the layers whose backward can be the peak (see `_backward_candidates`)
    attn_mask: tuple = (0, 0)  # the 4D mask the model builds once per forward (`attention_mask_bytes`)
    first_input_saved: bool = False  # the first layer saves its input for backward (so its `kept` counts it)
    cached_casts: tuple = ()  # per replay: autocast's cached bf16 casts of trained weights (`autocast_cached_cast_bytes`)


_PIECE_FIELDS = ("method", "quant", "recipe", "precision", "rank", "lora_alpha", "lora_dropout", "target_modules", "num_virtual_tokens",
                 "seq_len", "grad_ckpt")
_piece_configs: dict = {}


def _piece_key(tc: TrainConfig) -> TrainConfig:
    """The configuration without what the pieces do not depend on (batch, optimizer, GPUs), memoized; with one
    exception, `gathered_recipe`; TRL's activation offloading, which decides by a saved tensor's bytes, so its
    replay is per batch size; and TRL's chunked loss, whose piece tells a batch that fits one chunk from the others
    (`planner.layers.chunked_loss_batch`)."""
    return memo(tc, "_piece_key", _new_piece_key)


def _new_piece_key(tc: TrainConfig) -> TrainConfig:
    if tc.recipe.activation_offload:
        batch = tc.batch_size
    elif tc.recipe.loss == "chunked":
        batch = chunked_loss_batch(tc)
    else:
        batch = 1
    k = tuple(getattr(tc, f) for f in _PIECE_FIELDS) + (batch, gathered_recipe(tc), gathered_precision(tc))
    out = _piece_configs.get(k)
    if out is None:
        out = tc.replace(batch_size=batch, grad_accum=1, optimizer="adamw", num_gpus=1, strategy="ddp", cpu_offload=False)
        if k[-2:] != (out.recipe, out.precision):
            out = out.replace(recipe=k[-2], precision=k[-1])
        _piece_configs[k] = out
    return out


def _gathers_bf16(tc: TrainConfig) -> bool:
    """FSDP2 over several GPUs gathers every parameter in its `MixedPrecisionPolicy.param_dtype`
    (torch/distributed/fsdp/_fully_shard/_fsdp_param.py: the all-gather output is cast to param_dtype), bf16 under
    bf16 weights, bf16 autocast or a 4-bit base (`planner.strategies.fsdp2.mixed_precision_policy`)."""
    if tc.num_gpus > 1 and tc.strategy == "fsdp" and tc.precision in ("bf16", "mixed"):
        from .strategies.fsdp2 import mixed_precision_policy

        return mixed_precision_policy(tc)["param_dtype"] == "bfloat16"
    return False


def _deepspeed_casts_bf16(tc: TrainConfig) -> bool:
    """DeepSpeed's bf16 mode across GPUs (ZeRO-1/2/3, `planner.strategies.zero.deepspeed_bf16`) casts every
    floating parameter to bf16, peft's fp32 adapters included (deepspeed 0.19.8 runtime/engine.py
    `_cast_module_mixed_precision`: `p.data = p.data.to(param_dtype)`). Checked against the real engine
    (calibrate/trace_zero.py, LoRA points)."""
    if tc.num_gpus < 2 or tc.strategy not in ("zero1", "zero2", "zero3"):
        return False
    from .strategies.zero import deepspeed_bf16

    return deepspeed_bf16(tc)


def gathered_adapter_dtype(tc: TrainConfig) -> str:
    """The dtype the layers compute the adapters in: `Recipe.adapter_dtype`, except under FSDP2's bf16 gathers
    (`_gathers_bf16`) or DeepSpeed's bf16 cast (`_deepspeed_casts_bf16`): peft's fp32 LoRA matrices then run in
    bf16, exactly as `adapter_dtype="bf16"` models them (the input is no longer copied to fp32 and saved)."""
    if tc.spec.bf16_adapters and (_gathers_bf16(tc) or _deepspeed_casts_bf16(tc)):
        return "bf16"
    return tc.recipe.adapter_dtype


def gathered_precision(tc: TrainConfig) -> str:
    """The precision the layers compute in: `tc.precision`, except that under FSDP2's bf16 gathers (`_gathers_bf16`)
    `mixed` computes on bf16 weights: the embedding's output, so the residual stream, is bf16, and autocast makes no
    bf16 copies of weights that already are (`bf16`'s pieces; the fp32 shards, gradients and state keep their bytes:
    the static terms read `tc`). Checked against the multi-GPU trace's mixed points."""
    return "bf16" if tc.precision == "mixed" and _gathers_bf16(tc) else tc.precision


def gathered_recipe(tc: TrainConfig):
    """The recipe the layers compute with: `tc.recipe` with `gathered_adapter_dtype`; and over a 4-bit base under
    FSDP2's bf16 gathers, the embeddings, norms and lm_head that k-bit preparation made fp32 are gathered (so
    compute) in bf16, the residual stream with them: the layers run as without the preparation
    (`kbit_preparation=False`, the "qlora-bf16" regime of `planner.layers.regime`), while the shards keep their
    fp32 bytes (the static terms read `tc` itself). Checked against the multi-GPU trace's QLoRA points."""
    r = tc.recipe
    adapter = gathered_adapter_dtype(tc)
    kbit = r.kbit_preparation and not (tc.base_quant.quantized and _gathers_bf16(tc))
    if adapter == r.adapter_dtype and kbit == r.kbit_preparation:
        return r
    return dataclasses.replace(r, adapter_dtype=adapter, kbit_preparation=kbit)


def prefix_cast_dtype(tc: TrainConfig) -> int:
    """Bytes per element of prefix tuning's keys/values when the pieces' regime does not give them (else 0). peft
    0.21 casts them to `base_model.dtype` (peft_model.py `get_prompt`:
    `past_key_values.to(self.base_model_torch_dtype)`), transformers' dtype of the first floating parameter:
    under FSDP2 the shard's, fp32 under `mixed`, while the layers compute on bf16 gathers (`gathered_precision`):
    the cache `cat(prefix, k)` is then fp32. Checked against the multi-GPU trace's prefix point."""
    if not tc.spec.virtual_tokens(tc)[1]:  # no prefix keys/values (prefix tuning's only)
        return 0
    own = regime(tc).weight
    return own if own != regime(_piece_key(tc)).weight else 0


@functools.lru_cache(maxsize=4096)
def _pieces(arch: ModelArch, tc: TrainConfig, sm: tuple = DEFAULT_CAPABILITY, prefix_dtype: int = 0) -> _Pieces:
    """Replay each piece once per (model, configuration without batch/optimizer/GPUs, the GPU's attention
    dispatch: `sm` is a canonical compute capability, planner.attention; `prefix_cast_dtype`)."""
    method = tc.spec
    extra_seq, extra_kv = method.virtual_tokens(tc)
    seq = tc.seq_len + extra_seq
    kv_seq = tc.seq_len + extra_kv
    first_rg = first_input_requires_grad(tc)
    if arch.moe and tc.grad_ckpt and not tc.base_quant.quantized and method.peft_type:
        # peft 0.21 PeftModel.__init__: a model with gradient checkpointing on (not k-bit) gets
        # `enable_input_require_grads()`, so the embeddings' output, the first layer's input, needs a gradient.
        # Applied to MoE models only: the dense models' frozen snapshot predates this (see the MoE report).
        first_rg = True
    # one replay per distinct (first layer?, kind, masked at this key length); the first layer's input needs no
    # gradient unless embeddings train
    index, kinds, of_layer = {}, [], []
    for i, kind in enumerate(arch.layer_kinds):
        key = (i == 0, kind.replay_key(kv_seq))
        if key not in index:
            index[key] = len(kinds)
            kinds.append(kind)
        of_layer.append(index[key])
    counts = [[0] for _ in kinds]
    for r in of_layer:
        for j, c in enumerate(counts):
            c.append(c[-1] + (j == r))
    # TRL's activation offloading: every piece's saved tensors go through its hooks, except inside checkpointed
    # layers (the checkpoint's own hooks are innermost there: only the checkpoint's saved input reaches TRL's)
    off = Offload(batch=tc.batch_size) if tc.recipe.activation_offload else None
    layer_off = None if tc.grad_ckpt else off
    # checkpointed: one pack per layer (its input, offloaded), so the last `stash` layers' inputs reach the loss in
    # the forward stash
    n = min(arch.num_layers, off.stash) if off is not None and not tc.recipe.offload_checkpoints else 0
    ckpt_stash = tuple((n - 1 - i, (seq * arch.hidden_size * regime(tc).act, 0)) for i in range(n))
    layers, nosave, cached = [], [], []
    first_input_saved = False
    for key, kind in zip(index, kinds):
        b, x, y = layer_graph(arch, tc, seq, kv_seq, first_rg if key[0] else True, tc.grad_ckpt, kind, sm,
                              prefix_dtype)
        t = simulate(b.g, outputs=[y], incoming_grads=[y], offload=layer_off)
        if layer_off is not None:
            # the previous layer's forward stash (drained by this layer's first packs) and the next layer's last
            # copies, still in the backward stash when this one's backward starts: a layer of the same kind's
            b, x, y = layer_graph(arch, tc, seq, kv_seq, first_rg if key[0] else True, tc.grad_ckpt, kind, sm,
                                  prefix_dtype)
            t = simulate(b.g, outputs=[y], incoming_grads=[y], offload=layer_off, carry_in=t.end_copies,
                         stash_in=t.end_stash_entries)
        layers.append(t)
        if key[0]:
            first_input_saved = bool(b.g.tensors[x].savers)
        if tc.grad_ckpt:
            nosave.append(forward_without_saving(b.g, outputs=[y]))
        cached.append(autocast_cached_cast_bytes(b))
    hb, e = head_graph(arch, tc, seq)
    tb, x, loss, logits = tail_graph(arch, tc, seq)
    prefix = None
    piece = method.extra_piece(arch, tc)
    if piece is not None:
        pg, c = piece
        prefix = simulate(pg, outputs=[], incoming_grads=[c], offload=off)
    return _Pieces(
        head=simulate(hb.g, outputs=[e], incoming_grads=[e], offload=off),
        tail=simulate(tb.g, outputs=[], incoming_grads=[loss], offload=off, release_stash=False,
                      stash_in=ckpt_stash if tc.grad_ckpt else (layers[of_layer[-1]].end_stash_entries if off else ()),
                      hook_at=getattr(tb, "lm_head_output", None)),
        prefix=prefix,
        replays=tuple(index),
        layers=tuple(layers),
        forward_nosave=tuple(nosave),
        layer_input=(seq * arch.hidden_size * regime(tc).act, 0),
        pending=tuple(_recompute_pending(arch, tc, kind, seq) for kind in kinds),
        of_layer=tuple(of_layer),
        counts=tuple(tuple(c) for c in counts),
        backward_layers=_backward_candidates(of_layer),
        attn_mask=attention_mask_bytes(arch, tc, seq, kv_seq),
        first_input_saved=first_input_saved,
        cached_casts=tuple(cached),
    )


def fp32_weights_under_autocast(tc: TrainConfig) -> bool:
    """Whether the trained weights are fp32 leaves when the layers run under autocast: not under DeepSpeed's bf16
    mode, which casts the whole model to bf16 (`planner.strategies.zero.deepspeed_bf16`), nor under FSDP2's bf16
    gathers (their pieces compute in bf16: `gathered_precision`)."""
    from .strategies.zero import deepspeed_bf16

    return not (tc.num_gpus > 1 and tc.strategy.startswith("zero") and deepspeed_bf16(tc))


def autocast_cached_cast_bytes(b) -> int:
    """Bytes of the bf16 (fp16) casts that autocast caches for one layer's forward: under autocast, the cast of an
    fp32 leaf tensor that requires grad (a trained weight: full FT's linears, peft's fp32 LoRA matrices) is kept in
    autocast's cache until the autocast context exits (torch 2.13 `aten/src/ATen/autocast_mode.h` `cached_cast`:
    `arg.requires_grad() && arg.is_leaf() && !arg.is_view()`; the cache is cleared on leaving the outermost
    autocast, `torch.autocast.__exit__`), which trainer/recipe.py `forward` enters around the forward only. Without
    checkpointing the linears save these copies for backward anyway; under checkpointing, which saves nothing in
    the first forward, the cache alone holds them, every layer's, until the forward (with the loss) returns: the
    layer graph's trained `weight_copies` in bf16."""
    if not b.R.autocast:
        return 0
    g = b.g
    return sum(t.size[1] for i, t in enumerate(g.tensors)
               if t.kind == "weight_copies" and t.rg and b.dtype.get(i) == BF16)


def attention_mask_bytes(arch: ModelArch, tc: TrainConfig, seq: int, kv_seq: int) -> tuple:
    """The 4D mask the model builds once per forward and every layer reads (per sequence, fixed). eager:
    transformers 5.17 `masking_utils.eager_mask` never skips the causal mask: `torch.where(bool mask, 0, min)`
    of the embeddings' dtype, (B, 1, S, KV). It lives while the model's forward runs (a local of the base model's
    forward, freed before the loss) and, under gradient checkpointing, until the first layer's backward (each
    checkpoint keeps its layer's arguments for the recomputation). sdpa with packed rows or a padded batch
    (`planner.layers.batch_mask`): the bool mask `sdpa_mask` builds, with the same lifetime. gpt-oss (eager for
    sdpa, `planner.attention.effective_implementation`) builds two, the full and the sliding-window mask
    (`GptOssModel.forward`: `create_causal_mask` and `create_sliding_window_causal_mask`, both always)."""
    keys = kv_seq if tc.spec.virtual_tokens(tc)[1] else seq
    impl = effective_implementation(arch.model_type, tc.recipe.attn_implementation)
    if impl == "sdpa" and batch_mask(tc):
        # packed or padded rows: `sdpa_mask` materializes the bool mask, (B, 1, S, KV), one byte each
        return (seq * keys, 0)
    if impl != "eager":
        return (0, 0)
    masks = 2 if arch.model_type == "gpt_oss" else 1
    return (masks * seq * keys * regime(tc).act, 0)


def masks_alive_in_backward(arch: ModelArch, i: int, mask_bytes: int) -> int:
    """Of the step's attention masks (`attention_mask_bytes`, under checkpointing), the bytes still alive while
    layer i runs backward: each checkpoint keeps its layer's mask until that layer's backward is done, so a
    mask lives while a layer of its type at or below i remains. gpt-oss's two masks (full, sliding): the full
    mask is gone by the backward of a sliding layer 0 once layer 1 is done."""
    if arch.model_type != "gpt_oss" or not mask_bytes:
        return mask_bytes
    types = {k.window is None for k in arch.layer_kinds[: i + 1]}
    return mask_bytes * len(types) // 2


def _backward_candidates(keys: list) -> tuple[int, ...]:
    """Layers whose backward event can hold the step's peak. While layer i runs backward the live bytes are
    `kept(<i) + held(>i) + grads(>i)` plus its own backward peak. If the layers from 1 on repeat with period p
    (keys[i] == keys[i + p]), the same-phase layers i and i + p differ by one period's constant sum, so over the
    layers of one phase the bytes are linear in the period index and the maximum sits at the first or last period:
    layer 0, layers 1..p and the last p layers cover every layer (p = 1 uniform, 2 Gemma-2, 6 a 5:1 local/global
    pattern; a pattern with no shorter period takes every layer). Layers 0, 1, 2, L-2, L-1 are always listed."""
    L = len(keys)
    p = next(p for p in range(1, L) if all(keys[i] == keys[i + p] for i in range(1, L - p))) if L > 1 else 1
    out = {0, 1, 2, L - 2, L - 1} | set(range(1, 1 + p)) | set(range(L - p, L))
    return tuple(sorted(i for i in out if 0 <= i < L))


def _at(size, batch: int) -> int:
    return size[0] * batch + size[1]


class Event:
    """One instant of the step: its total live bytes, and (computed on demand) their composition."""

    __slots__ = ("name", "total", "_static", "_extra", "_point", "_batch")

    def __init__(self, name: str, static: dict, static_total: int, extra: dict, point: Point | None, batch: int):
        self.name = name
        self._static, self._extra, self._point, self._batch = static, extra, point, batch
        self.total = static_total + sum(extra.values()) + (point.at(batch) if point is not None else 0)

    @property
    def parts(self) -> dict:
        parts = dict(self._static)
        for k, v in self._extra.items():
            parts[k] = parts.get(k, 0) + v
        if self._point is not None:
            for k, v in self._point.kinds_at(self._batch).items():
                parts[k] = parts.get(k, 0) + v
        return {k: v for k, v in parts.items() if v}


def _recompute_pending(arch: ModelArch, tc: TrainConfig, kind, seq: int) -> tuple:
    """Gradients already live when a checkpointed layer starts recomputing: backward ops that need no saved tensor
    run first (torch.utils.checkpoint recomputes on the first unpack of a saved tensor). Dense layers: none beyond
    what the event counts. A MoE layer: the output's gradient, and the (S, h) copy that the backward of
    `weighted_out.view(T, top_k, h).sum(1)` makes (the expanded gradient reshaped: `planner.moe_graph`)."""
    if kind.mlp != "moe":
        return (0, 0)
    # Qwen2-MoE: the shared expert's gating product is the block's last op with saved tensors, so its backward,
    # which needs them, runs (and recomputes) before the experts' sum is reached
    unsummed = 0 if arch.moe.shared_intermediate else unsummed_grad_bytes_per_token(arch, regime(tc))
    return (seq * arch.hidden_size * regime(tc).act + seq * unsummed, 0)


def previous_leaf_embedding_bytes(arch: ModelArch, tc: TrainConfig) -> int:
    """The previous step's embedding output and its `.grad`, alive until this step's forward returns:
    2 x B x S x h x act under gradient checkpointing with a frozen embedding (not trained nor a trained copy), else 0.

    transformers 5.17 `PreTrainedModel.gradient_checkpointing_enable` (modeling_utils.py) calls
    `enable_input_require_grads()`, whose forward hook on the input embeddings runs `output.requires_grad_(True)`;
    a frozen embedding's output has no grad_fn, so it becomes a leaf that requires grad, and backward stores its
    gradient in `.grad` (torch 2.13 `AccumulateGrad`, which holds the leaf variable itself). The training loop keeps
    the last micro-batch's outputs until the next forward returns (trainer/step.py `TrainStep.outputs`): the loss
    there keeps its autograd graph's nodes, so the AccumulateGrad node, the leaf and its gradient. S is the real
    tokens (prompt tuning's virtual tokens are concatenated after the embedding)."""
    from .modules_to_save import trains_embedding

    if not tc.grad_ckpt or trains_embedding(tc):
        return 0
    return 2 * tc.batch_size * tc.seq_len * arch.hidden_size * regime(tc).act


def _first_input_kept(P: _Pieces, ck: bool, offloaded: bool, leaf_input: bool) -> bool:
    """The first layer's input (the embeddings) is referenced by the model's forward until the decoder stack returns
    (transformers 5.17 modeling_llama.py `LlamaModel.forward`: the local `inputs_embeds`, `hidden_states =
    inputs_embeds`), so it is live in the last layer's forward. Whether the per-layer `kept` bytes already count it:
    a checkpoint keeps it (in host memory when offloaded, except a leaf embedding output, which autograd's
    AccumulateGrad keeps on the device), or, without checkpointing, the first layer saves it for backward."""
    if ck:
        return not offloaded or leaf_input
    return P.first_input_saved


def timeline_events(arch: ModelArch, tc: TrainConfig, static: dict, grads_total: int, opt_temp: int,
                    sm: tuple = DEFAULT_CAPABILITY) -> list[Event]:
    """Every candidate peak of the step with its composition. `static`: bytes live throughout (weights,
    optimizer state from the second step on, workspaces) by term; `sm`: the GPU's compute capability."""
    P = _pieces(arch, _piece_key(tc), canonical_capability(sm), prefix_cast_dtype(tc))
    B = tc.batch_size
    L = arch.num_layers
    ck = tc.grad_ckpt
    static_total = sum(static.values())

    def sim(i: int):
        return P.layers[P.of_layer[i]]

    def total_over(values: list, lo: int, hi: int) -> int:
        """sum over layers lo <= i < hi of values[replay of layer i]: each replay's value times its count."""
        out = 0
        for c, v in zip(P.counts, values):
            out += (c[hi] - c[lo]) * v
        return out

    strategy = strategy_of(tc)

    def event(name, point, moment=None, layer=None, **extra):
        if moment is not None and tc.num_gpus > 1:  # what the strategy gathers or reduces at that moment
            extra["sharding_buffers"] = strategy.step_buffers(arch, tc, moment, layer)
        return Event(name, static, static_total, extra, point, B)  # `parts` drops the zero terms

    # strategies that shard gradients (ZeRO-2/3, FSDP) reduce-scatter each layer's as backward produces it: 1/N kept
    shard = strategy_of(tc).ways(GRADIENTS, tc.num_gpus)
    # ... or, under FSDP2's CPU offload, copy each shard to the host at once: none kept on the device
    # (or, ZeRO-3, write them into its gradient partition, a buffer of its own: `preallocates_gradients`)
    on_device = 0 if strategy.offloads_gradients(tc) or strategy.preallocates_gradients(tc) else 1
    # FSDP2 leaves each sharded gradient in its parameter's own dtype (foreach_reduce casts the reduce output to
    # orig_dtype), whatever dtype the pieces computed it in (`gathered_recipe`, `gathered_precision`): scaled back
    grad_num, grad_den = gradient_bytes(arch, tc), gradient_bytes(arch, _piece_key(tc))

    def grad_shard(nbytes: int) -> int:
        if grad_den and grad_num != grad_den:
            nbytes = nbytes * grad_num // grad_den
        return -(-nbytes // shard) * on_device

    g_tail = grad_shard(_at(P.tail.param_grads, B))
    # per replay: what such a layer keeps while later layers run forward, what it keeps after its backward (KV
    # caches, held by the outputs), and the parameter gradients it leaves
    # offloaded checkpoints (`offload_checkpoints`): the input each checkpoint keeps is in host memory instead
    # offloaded checkpoints (`offload_checkpoints`): the input each checkpoint keeps is in host memory instead, but
    # for a frozen embedding the first layer's input is a leaf that requires grad (transformers'
    # `enable_input_require_grads`, which `gradient_checkpointing_enable` calls), and autograd's AccumulateGrad node
    # of that leaf keeps it on the device until the backward reaches it
    offloaded = ck and (tc.recipe.offload_checkpoints or tc.recipe.activation_offload)
    # TRL's hooks see the checkpoints' inputs unless transformers' offloaded checkpointing wraps each checkpoint in
    # save_on_cpu, whose hooks are then the innermost (`offload_checkpoints` with `activation_offload`)
    trl = ck and tc.recipe.activation_offload and not tc.recipe.offload_checkpoints
    leaf_input = offloaded and not first_input_requires_grad(tc)
    kept = [(_at(P.layer_input, B) if (not offloaded or (leaf_input and key[0])) else 0) if ck else _at(s.kept, B)
            for key, s in zip(P.replays, P.layers)]
    held = [_at(s.held, B) for s in P.layers]
    layer_grads = [grad_shard(_at(s.param_grads, B)) for s in P.layers]
    held_tail = _at(P.tail.held, B)
    held_layers = total_over(held, 0, L)
    head_kept = _at(P.head.kept, B) + (_at(P.prefix.kept, B) if P.prefix else 0)
    kept_all = total_over(kept, 0, L)
    # the previous step's outputs (logits, KV caches; a leaf embedding output and its gradient) live until this
    # step's forward returns
    leaf_embeds = previous_leaf_embedding_bytes(arch, tc)
    previous = held_tail + held_layers + leaf_embeds
    events: list[Event] = []
    mask = _at(P.attn_mask, B)  # alive through the layers' forward; under checkpointing, through their backward
    mask_late = mask if ck else 0

    # forward
    last_fwd = P.forward_nosave[P.of_layer[L - 1]] if ck else sim(L - 1).forward
    embeds = _at(P.layer_input, B) if L > 1 and not _first_input_kept(P, ck, offloaded, leaf_input) else 0
    # TRL's offloading of checkpointed inputs (one pack per layer): the forward stash keeps the inputs of the
    # previous min(L, 5) - 1 layers on the device while the last layer runs
    stash_inputs = (min(L, 5) - 1) * _at(P.layer_input, B) if trl else 0
    # checkpointed or offloaded under autocast: the earlier layers' cached casts of trained weights, then every
    # layer's (the replays dropped them, or sent them to the host: autocast's cache holds the device copies)
    off_layers = (ck or tc.recipe.activation_offload) and fp32_weights_under_autocast(tc)
    cached = (lambda hi: total_over(P.cached_casts, 0, hi)) if off_layers and P.cached_casts else (lambda hi: 0)
    events.append(event("forward (last layer)", peak_point(last_fwd, B), "forward",
                        activations=head_kept + kept_all - kept[P.of_layer[L - 1]] + embeds + mask + stash_inputs,
                        logits=previous, weight_copies=cached(L - 1)))
    events.append(event("forward (loss)", peak_point(P.tail.forward, B), "forward_loss",
                        activations=head_kept + kept_all + mask_late, logits=previous, weight_copies=cached(L)))
    # the tail unit's pre-backward fires on the lm_head output's gradient, after the loss's own backward: when the
    # strategy gathers more from then on (FSDP2's prefetched last layer, untied), two events
    split = (tc.num_gpus > 1 and P.tail.backward_post
             and strategy.step_buffers(arch, tc, "head_backward") != strategy.step_buffers(arch, tc, "loss_backward"))
    if split:
        events.append(event("loss backward", peak_point(P.tail.backward_pre, B), "loss_backward",
                            activations=head_kept + kept_all + mask_late))
        events.append(event("lm_head backward", peak_point(P.tail.backward_post, B), "head_backward",
                            activations=head_kept + kept_all + mask_late))
    else:
        events.append(event("loss backward", peak_point(P.tail.backward, B), "loss_backward",
                            activations=head_kept + kept_all + mask_late))
    if tc.num_gpus > 1 and strategy.step_buffers(arch, tc, "tail_reduce"):  # the tail unit's gradient reduction
        events.append(event("lm_head reduce-scatter", None, "tail_reduce", activations=head_kept + kept_all + mask_late,
                            logits=held_tail, gradients=g_tail))

    # backward through layer i: kept by layers < i, held by layers > i, gradients of layers > i and the tail
    for i in P.backward_layers:
        acts = (head_kept + total_over(kept, 0, i) + held_tail + total_over(held, i + 1, L)
                + masks_alive_in_backward(arch, i, mask_late))
        grads = g_tail + total_over(layer_grads, i + 1, L)
        name = "last layer" if i == L - 1 else ("first layer" if i == 0 else f"layer {i}")
        s = sim(i)
        if i == 0 and leaf_input:  # the leaf embeddings, held by AccumulateGrad, next to the unpacked copy
            acts += _at(P.layer_input, B)
        if ck:  # the checkpoint re-runs the layer's forward while the output gradient waits
            # MoE layers stop the recomputation at the last saved tensor (`Timeline.recompute`); dense layers keep
            # the whole forward (the frozen snapshot; the difference there is one output-sized tensor)
            moe = arch.layer_kinds[i].mlp == "moe"
            # TRL's offloading: the copy of the next layer's input (or the loss's last copies) is still in the
            # backward stash until this layer's first node, which unpacks this layer's input, has run
            lag = (_at(P.layer_input, B) if i < L - 1 else _at(P.tail.end_copies, B)) if trl else 0
            events.append(event(f"{name} recompute", peak_point(s.recompute if moe else s.forward, B), "layer_backward", i,
                                activations=acts, gradients=grads,
                                temporaries=_at(P.layer_input, B) + _at(P.pending[P.of_layer[i]], B) + lag))
        events.append(event(f"{name} backward", peak_point(s.backward, B), "layer_backward", i, activations=acts,
                            gradients=grads))

    # embedding backward: every layer's gradients are done; a trained embedding copy's kernel scratch
    copy_scratch = (embedding_backward_scratch_bytes(arch, B * tc.seq_len, regime(tc).weight)
                    if "embed_tokens" in tc.recipe.modules_to_save else 0)
    events.append(event("embedding backward", peak_point(P.head.backward, B), "embedding_backward",
                        activations=head_kept + held_tail + held_layers, gradients=g_tail + total_over(layer_grads, 0, L),
                        temporaries=copy_scratch))
    if tc.num_gpus > 1 and strategy.step_buffers(arch, tc, "embedding_reduce"):  # the embedding unit's reduction
        events.append(event("embedding reduce-scatter", None, "embedding_reduce",
                            activations=head_kept + held_tail + held_layers,
                            gradients=g_tail + total_over(layer_grads, 0, L)))
    # optimizer step: gradients complete; the logits and caches still referenced by the loop's `outputs`
    events.append(event("optimizer step", None, "optimizer", gradients=grads_total,
                        logits=held_tail + held_layers + _at(P.head.held, B), optimizer_temporaries=opt_temp,
                        activations=leaf_embeds))
    return events


def pinned_block_bytes(nbytes: int) -> int:
    """Bytes the pinned-memory allocator takes for `nbytes`: the next power of two (torch 2.13
    `ATen/core/CachingHostAllocator.h` `allocate`: `PowerOf2Ceil(size)` below `pinned_max_round_threshold`, which
    is unlimited by default)."""
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


def offloaded_checkpoint_bytes(arch: ModelArch, tc: TrainConfig) -> int:
    """Pinned host memory of offloaded checkpoints: every decoder layer's input (B x S x h in the residual stream's
    dtype) copied to a pinned buffer by `save_on_cpu(pin_memory=True)` when its checkpoint saves it (transformers
    5.17 `gradient_checkpointing_enable(offload=True)`; torch `autograd/graph.py` `save_on_cpu.pack_to_cpu`:
    `torch.empty(..., pin_memory=True)` then `copy_`). All are live at the end of the forward; the host allocator
    caches the blocks for the next step."""
    if not (tc.grad_ckpt and tc.recipe.offload_checkpoints):
        return 0
    seq = tc.seq_len + tc.spec.virtual_tokens(tc)[0]
    return arch.num_layers * pinned_block_bytes(tc.batch_size * seq * arch.hidden_size * regime(tc).act)


def activation_offload_host_bytes(arch: ModelArch, tc: TrainConfig, copied: bool = False) -> int:
    """Pinned host memory of TRL's activation offloading (`Recipe.activation_offload`): every tensor its hooks offload
    in one forward, each in a pinned buffer rounded to a power of two (`planner.graph.Offload`, `pinned_bytes`), all
    live at the end of the forward; the host allocator caches the blocks for the next step. Without checkpointing
    that is what every piece offloads; with it, each decoder layer's checkpointed input (B x S x h) plus what the
    embedding and the loss offload (the inputs go to save_on_cpu instead with `offload_checkpoints`, whose hooks
    transformers enters around each checkpoint, inside TRL's). `copied=True`: the bytes those tensors hold (what crosses the host link each
    way), without the allocator's rounding."""
    if not tc.recipe.activation_offload:
        return 0
    P = _pieces(arch, _piece_key(tc), canonical_capability(DEFAULT_CAPABILITY), prefix_cast_dtype(tc))
    L = arch.num_layers
    of = (lambda t: t.host_copied) if copied else (lambda t: t.host)
    host = of(P.head) + of(P.tail) + (of(P.prefix) if P.prefix else 0)
    if tc.grad_ckpt and tc.recipe.offload_checkpoints:  # the inputs go to save_on_cpu (`offloaded_checkpoint_bytes`)
        return host
    if tc.grad_ckpt:
        x = _at(P.layer_input, tc.batch_size)
        return host + L * (x if copied else pinned_bytes(x))
    return host + sum(c[L] * of(t) for c, t in zip(P.counts, P.layers))


def kbit_preparation_event(arch: ModelArch, tc: TrainConfig, static: dict) -> Event:
    """Model load of QLoRA: `prepare_model_for_kbit_training` casts each non-quantized parameter with
    `param.data = param.data.to(fp32)`, so while the largest one (the embedding, or an untied lm_head) is cast its
    bf16 original and fp32 copy coexist, on top of the 4-bit weights (the adapters and the cuBLAS workspace come
    later). Rarely the peak, but part of what `max_memory_allocated()` sees over load and training."""
    largest = max(rows * cols for group, (rows, cols), _ in param_tensors(arch) if group != "linear")
    base = {"weights": static["weights"], "quant_constants": static["quant_constants"]}
    return Event("model load (k-bit preparation)", base, sum(base.values()),
                 {"temporaries": param_bytes(largest, BF16)}, None, tc.batch_size)


# -- the estimate ---------------------------------------------------------------------------------------------------

# Breakdown terms, in display order, with what they hold.
TERMS = {
    "weights": "base model weights (4-bit packed for QLoRA)",
    "quant_constants": "NF4 absmax and double-quantization constants",
    "trainable_weights": "adapter weights (LoRA A/B, IA3 vectors, prefix/prompt encoders, modules_to_save copies)",
    "gradients": "gradients of trainable parameters",
    "optimizer_state": "optimizer state (AdamW moments, 8-bit states, Adafactor factors)",
    "activations": "tensors saved for backward (and the batch, rotary tables, KV caches)",
    "logits": "logits kept by the training loop's outputs",
    "weight_copies": "bf16 copies of fp32 weights made by autocast",
    "temporaries": "transients at the peak: activation gradients, loss buffers, scratch",
    "optimizer_temporaries": "optimizer.step() scratch (AdamW foreach sqrt, Adafactor fp32 copies)",
    "cuda_workspace": "cuBLAS workspaces",
    "sharding_buffers": "gathered parameters / communication buckets of the multi-GPU strategy",
}


@dataclass
class MemoryEstimate:
    """Predicted memory of one training step on one device (all integers are bytes)."""

    peak_allocated_bytes: int
    breakdown: dict  # term -> bytes, sums to peak_allocated_bytes
    peak_event: str
    events: dict  # event name -> bytes (per device)
    paged_bytes: int  # bitsandbytes paged optimizer state (managed memory, outside allocated)
    cpu_offload_bytes: int  # host memory used by CPU offload (per device share)
    trainable_params: int
    total_params: int
    notes: list = field(default_factory=list)
    host_pinned_bytes: int = 0  # pinned host memory of offloaded activations/checkpoints (per device)

    @property
    def host_bytes(self) -> int:
        """Host memory this device's training step needs: pinned offload buffers plus CPU-offloaded state."""
        return self.host_pinned_bytes + self.cpu_offload_bytes


_static_configs: dict = {}


def batch_free(tc: TrainConfig) -> TrainConfig:
    """`tc` without batch and accumulation: the cache key of everything that does not depend on them (the static
    terms, trainable tensors, optimizer state; `planner.cost`'s per-configuration bytes), memoized."""
    if tc.batch_size == 1 and tc.grad_accum == 1:
        return tc
    return memo(tc, "_batch_free", _new_batch_free)  # one plan asks several times


def _new_batch_free(tc: TrainConfig) -> TrainConfig:
    key = (tuple(getattr(tc, f) for f in _PIECE_FIELDS), tc.optimizer, tc.num_gpus, tc.strategy, tc.cpu_offload)
    out = _static_configs.get(key)
    if out is None:
        out = _static_configs[key] = tc.replace(batch_size=1, grad_accum=1)
    return out


@functools.lru_cache(maxsize=4096)
def _static_terms(arch: ModelArch, tc: TrainConfig, workspace: int):
    """Batch-independent terms (cached per model and configuration without batch)."""
    from .sharding import shard_static

    base = base_weight_bytes(arch, tc)
    opt = optimizer_state_bytes(arch, tc)
    static = {
        "weights": base["weights"] + param_bytes(arch.head_dim // 2, FP32)  # + rotary inv_freq buffer
        + (deepseek_buffer_bytes(arch) if arch.mla else 0),  # + DeepSeek's router bias buffers
        "quant_constants": base["quant_constants"],
        "trainable_weights": adapter_bytes(arch, tc),
        "optimizer_state": opt["state"] + grad_scaler_bytes(tc),
        "cuda_workspace": workspace,
    }
    static, grads, opt_temp, offload, notes = shard_static(
        arch, tc, static, gradient_bytes(arch, tc), optimizer_step_temp_bytes(arch, tc)
    )
    params = (trainable_params(arch, tc), total_params(arch, tc))
    return static, grads, opt_temp, offload, tuple(notes), opt["paged"], params


def estimate_memory(arch: ModelArch, tc: TrainConfig, gpu=None) -> MemoryEstimate:
    """Peak `torch.cuda.max_memory_allocated()` of the reference recipe for `tc` on one device."""
    check_moe_supported(arch, tc)
    static, grads, opt_temp, offload, sharding_notes, paged, params = _static_terms(arch, batch_free(tc),
                                                                                      cuda_workspace_bytes(gpu))
    sharding_notes = list(sharding_notes)
    cc = getattr(gpu, "compute_capability", None)
    sm = parse_capability(cc) if cc else DEFAULT_CAPABILITY
    events = timeline_events(arch, tc, static, grads, opt_temp, sm)
    if tc.base_quant.quantized and tc.recipe.kbit_preparation:
        events.append(kbit_preparation_event(arch, tc, static))
    peak = max(events, key=lambda e: e.total)
    parts = peak.parts
    if "inputs" in parts:  # the batch's token ids are reported with the activations
        parts["activations"] = parts.get("activations", 0) + parts.pop("inputs")
    breakdown = {k: parts[k] for k in TERMS if parts.get(k)}
    breakdown.update({k: v for k, v in parts.items() if k not in breakdown and v})
    return MemoryEstimate(
        peak_allocated_bytes=sum(breakdown.values()),
        breakdown=breakdown,
        peak_event=peak.name,
        events={e.name: e.total for e in events},
        paged_bytes=paged // strategy_of(tc).ways(OPTIMIZER_STATE, tc.num_gpus),
        cpu_offload_bytes=offload,
        trainable_params=params[0],
        total_params=params[1],
        notes=sharding_notes,
        host_pinned_bytes=offloaded_checkpoint_bytes(arch, tc) + activation_offload_host_bytes(arch, tc),
    )
