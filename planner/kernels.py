"""The kernels of one training micro-step, read off the graph the memory model replays (`planner.layers`).

Every op the memory model records (`planner.graph.Graph.op`) is one kernel of the step, with the bytes of its
operands; a new recipe option, method or layer kind that adds ops to the graph is timed with no change here.
What this module derives from each op:

- GEMMs (`linear`, `matmul_4bit`, peft's `adapter` and DoRA's `linear_again`): the shape of the forward GEMM
  (M = tokens, N = output features, K = input features, read from the operand sizes and dtypes the builder
  records), and which backward GEMMs run: the input gradient (M x K, reduced over N) when the input needs a
  gradient, the weight gradient (N x K, reduced over M) when the weight is trained (a parameter gradient, or a
  trained weight copy among the inputs). The dtype of the activation operand says whether the GEMM runs on
  tensor cores (2 bytes) or the CUDA cores (4 bytes: peft's fp32 LoRA matrices, `--precision fp32`);
- `matmul_4bit` (bitsandbytes `Linear4bit`) also dequantizes its N x K NF4 weight per pass (read 0.5, write 2
  bytes per element), forward and, when its input needs a gradient, backward;
- `sdpa`: attention, timed from its FLOPs (`planner.cost`), by the kernel PyTorch picks (`planner.layers.Builder.sdpa`):
  flash for bf16 without a mask (the causally masked half skipped), the memory-efficient kernel with a
  materialized mask (prefix tuning, sliding windows: every score computed) or fp32 operands (QLoRA's fp32
  attention: CUDA cores);
- every other op is bandwidth-bound: forward it reads its inputs and writes its outputs; backward (when one of
  its outputs receives a gradient) it reads the output gradients and the tensors it saved and writes the
  gradients of the inputs that need one (an input the gradient reaches unchanged, `grad_alias`, costs nothing);
  a tensor whose gradient comes from several ops has them summed (one addition per extra use).

Kernel counts (one per forward op, one per input gradient or parameter gradient in backward) carry the per-launch
overhead that dominates small models. The profile is per sequence of the micro-batch (the graph's `per_batch`
channel) plus fixed bytes, so one walk serves every batch size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .arch import ModelArch
from .config import TrainConfig
from .graph import Graph
from .layers import head_graph, layer_graph, tail_graph
from .modules_to_save import first_input_requires_grad

GEMM_OPS = frozenset({"linear", "matmul_4bit", "adapter", "linear_again"})
# attention outside the fused sdpa kernels (planner.layers: sdpa's math backend, eager, flash-attn 2): timed by
# FLOPs like sdpa, one call per QK^T product; the (S, KV) softmax, mask and casts stay bandwidth-bound ops
ATTENTION_MATMULS = frozenset({"bmm_qk", "matmul_qk", "flash_attn", "flash_attn_varlen"})
# bookkeeping ops of the memory model and views (gpt-oss's rotary halves, its sliced sink column): no kernel runs
NO_KERNEL = frozenset({"batch", "dora_return", "lora_return", "caller_ref", "python_local", "chunk", "slice"})


@dataclass(frozen=True)
class Gemm:
    """One GEMM per sequence: M = `tokens` x micro-batch, N, K; `dtype` bytes of its operands (2: tensor cores);
    `count` times per micro-step; `phase`: forward / input_grad / weight_grad / recompute."""

    tokens: int
    n: int
    k: int
    dtype: int
    phase: str
    count: int = 1


@dataclass(frozen=True)
class StepOps:
    """The kernels of one micro-step of one configuration, batch size aside.

    gemms: the GEMMs (shapes per sequence); memory_bytes: (per sequence, fixed) bytes moved by bandwidth-bound
    ops; dequant_bytes: fixed bytes moved dequantizing 4-bit weights; kernels: (forward, backward) kernel
    launches (forward ops are issued by Python module code, backward ones by the C++ autograd engine);
    attention: ((kernel, causal, forward calls, backward calls), ...) with kernel `flash`, `efficient` or
    `efficient_fp32` and causal whether the kernel skips the masked half."""

    gemms: tuple
    memory_bytes: tuple
    dequant_bytes: int
    kernels: int
    attention: tuple


def _first_activation(g: Graph, inputs) -> int | None:
    for t in inputs:
        if g.tensors[t].size[0] > 0:
            return t
    return None


class _Walk:
    """Accumulates the kernels of pieces (graphs) with a multiplicity each."""

    def __init__(self) -> None:
        self.gemms: dict = {}
        self.mem = [0, 0]
        self.dequant = 0
        self.kernels = [0, 0]  # forward (Python-side ops), backward (autograd engine)
        self.attn: dict = {}

    def gemm(self, tokens, n, k, dtype, phase, times) -> None:
        key = (tokens, n, k, dtype, phase)
        self.gemms[key] = self.gemms.get(key, 0) + times

    def _launch(self, times: int, run_bwd: bool) -> None:
        """Kernels issued by the host: one per forward call, one more per call that runs backward."""
        self.kernels[0] += times
        if run_bwd:
            self.kernels[1] += times

    def _grouped(self, b, n, times: int, seq: int, run_bwd: bool, phase: str) -> None:
        """A MoE layer's `F.grouped_mm` over the E experts (planner/moe_graph.py `_grouped_linear`): its input holds
        seq x top_k routed rows; with balanced routing (planner.moe) each expert multiplies seq x top_k / E of them,
        so it times as E GEMMs of that many rows; backward: the input gradient, and the weights' when they train."""
        g, dt, m = b.g, b.dtype, b.arch.moe
        x = _first_activation(g, n.inputs)
        y = n.outputs[0] if n.outputs else None
        if x is None or y is None or g.tensors[y].size[0] == 0:
            return
        rows = seq * m.top_k
        K = g.tensors[x].size[0] // (rows * dt[x])
        N = g.tensors[y].size[0] // (rows * dt[y])
        per_expert = max(1, rows // m.num_experts)
        e = times * m.num_experts
        self.gemm(per_expert, N, K, dt[x], phase, e)
        self.kernels[0] += times
        if run_bwd:
            if g.tensors[x].rg:
                self.gemm(per_expert, K, N, dt[x], "input_grad", e)
                self.kernels[1] += times
            if n.param_grad != (0, 0) or any(g.tensors[t].rg and g.tensors[t].size[0] == 0 for t in n.inputs):
                self.gemm(per_expert, N, K, dt[x], "weight_grad", e)  # trained, or a LoRA-folded copy (planner.moe)
                self.kernels[1] += times

    def _fold(self, dims: tuple, times: int, run_bwd: bool) -> None:
        """peft's `baddbmm(W, B, A)` over a LoRA-wrapped expert stack (planner/moe_graph.py `_lora_fold`): E GEMMs
        of out x in x r, and in backward the factors' gradients (out x r x in and r x in x out); batch-independent
        (phase "fixed": M is not multiplied by the micro-batch), in the expert weights' dtype (`dt` bytes: fp32 after
        k-bit preparation)."""
        E, n_out, n_in, r, dt = dims
        self.gemm(n_out, n_in, r, dt, "fixed", times * E)
        self.kernels[0] += times
        if run_bwd:
            self.gemm(n_out, r, n_in, dt, "fixed", times * E)
            self.gemm(r, n_in, n_out, dt, "fixed", times * E)
            self.kernels[1] += 2 * times

    def add(self, b, times: int, seq: int, backward: bool = True, phase: str = "forward") -> None:
        g, dt = b.g, b.dtype
        masked = any(n.name == "mask_bias" for n in g.nodes)
        folds = getattr(b, "fold_gemms", {})
        for idx, n in enumerate(g.nodes):
            if n.name in NO_KERNEL:
                continue
            outs_rg = any(g.tensors[t].rg for t in n.outputs)
            run_bwd = backward and outs_rg
            if idx in folds:
                self._fold(folds[idx], times, run_bwd)
                continue
            if n.name == "grouped_mm" and b.arch.moe is not None:
                self._grouped(b, n, times, seq, run_bwd, phase)
                continue
            if n.name in GEMM_OPS:
                x = _first_activation(g, n.inputs)
                y = n.outputs[0] if n.outputs else None
                if x is not None and y is not None and g.tensors[y].size[0] > 0:
                    K = g.tensors[x].size[0] // (seq * dt[x])
                    N = g.tensors[y].size[0] // (seq * dt[y])
                    d = dt[x]
                    self.gemm(seq, N, K, d, phase, times)
                    self.kernels[0] += times
                    if n.name == "matmul_4bit":
                        self.dequant += times * int(2.5 * N * K)
                        self.kernels[0] += times
                    if run_bwd:
                        if g.tensors[x].rg:
                            self.gemm(seq, K, N, d, "input_grad", times)
                            self.kernels[1] += times
                            if n.name == "matmul_4bit":
                                self.dequant += times * int(2.5 * N * K)
                                self.kernels[1] += times
                        trained_w = n.param_grad != (0, 0) or any(
                            g.tensors[t].rg and g.tensors[t].size[0] == 0 for t in n.inputs)
                        if trained_w:
                            self.gemm(seq, N, K, d, "weight_grad", times)
                            self.kernels[1] += times
                    continue
            if n.name in ATTENTION_MATMULS or n.name == "sdpa":  # timed by FLOPs, one call per QK^T (sdpa: fused)
                x = _first_activation(g, n.inputs)
                fp32 = x is not None and dt.get(x) == 4
                if n.name == "sdpa":
                    # MLA's value head dim differs from q/k's: the memory-efficient kernel (planner.mla)
                    eff = masked or b.arch.mla is not None
                    kernel, causal = ("efficient_fp32" if fp32 else "efficient" if eff else "flash"), not masked
                elif n.name in ("flash_attn", "flash_attn_varlen"):  # flash-attn 2 skips the causally masked half
                    # (varlen over packed rows: timed as one causal sequence per row, an upper bound: the
                    # examples' blocks are smaller)
                    kernel, causal = "flash", True
                else:  # sdpa's math backend and eager multiply the whole (S, KV) matrix
                    kernel, causal = ("efficient_fp32" if fp32 else "flash"), False
                acc = self.attn.setdefault((kernel, causal), [0, 0])
                acc[0] += times
                acc[1] += times if run_bwd else 0
                self._launch(times, run_bwd)
                continue
            if n.name in ("bmm_pv", "matmul_pv"):  # the second half of the call counted at its QK^T
                self._launch(times, run_bwd)
                continue
            # bandwidth-bound: read inputs, write outputs
            size = [0, 0]
            for t in (*n.inputs, *n.outputs):
                s = g.tensors[t].size
                size[0] += s[0]
                size[1] += s[1]
            if n.name == "weight_cast" and not n.inputs:  # reads the fp32 master weight (twice the bf16 copy)
                size[1] += 2 * sum(g.tensors[t].size[1] for t in n.outputs)
            self.mem[0] += times * size[0]
            self.mem[1] += times * size[1]
            self.kernels[0] += times
            if not run_bwd:
                continue
            grads = [t for t in n.inputs if g.tensors[t].rg and t not in n.grad_alias]
            if not grads and n.param_grad == (0, 0):
                continue
            out = [0, 0]
            for t in (*n.outputs, *n.saved, *grads):
                s = g.tensors[t].size
                out[0] += s[0]
                out[1] += s[1]
            out[1] += n.param_grad[1]
            self.mem[0] += times * out[0]
            self.mem[1] += times * out[1]
            self.kernels[1] += times * (len(grads) + (n.param_grad != (0, 0)))
        if backward:
            self._accumulations(g, times)

    def _accumulations(self, g: Graph, times: int) -> None:
        """A tensor whose gradient arrives from k > 1 ops (a norm's output feeding q, k and v; a linear's input
        feeding peft's adapter too; the residual stream) has the gradients summed by autograd: k - 1 additions,
        each reading two and writing one (torch `InputBuffer::add`); a gradient handed on unchanged
        (`grad_alias`) is not a copy."""
        uses = [0] * len(g.tensors)
        for n in g.nodes:
            if n.name in NO_KERNEL or not any(g.tensors[t].rg for t in n.outputs):
                continue
            for t in set(n.inputs):
                if g.tensors[t].rg:
                    uses[t] += 1
        for t, k in enumerate(uses):
            if k > 1:
                s = g.tensors[t].size
                self.mem[0] += times * (k - 1) * 3 * s[0]
                self.mem[1] += times * (k - 1) * 3 * s[1]
                self.kernels[1] += times * (k - 1)

    def result(self) -> StepOps:
        gemms = tuple(Gemm(*k, count=c) for k, c in sorted(self.gemms.items()))
        attn = tuple((k, causal, f, b) for (k, causal), (f, b) in sorted(self.attn.items()))
        return StepOps(gemms, tuple(self.mem), self.dequant, tuple(self.kernels), attn)


@functools.lru_cache(maxsize=4096)
def step_ops(arch: ModelArch, tc: TrainConfig) -> StepOps:
    """The kernels of one micro-step of `tc` on `arch` (`tc` without its batch: see `planner.memory.batch_free`):
    every decoder layer (one walk per distinct layer kind, times its layers), the embedding, the final norm,
    lm_head and loss, the method's extra piece (prefix encoder), and with checkpointing each layer's forward
    once more."""
    method = tc.spec
    extra_seq, extra_kv = method.virtual_tokens(tc)
    seq = tc.seq_len + extra_seq
    kv_seq = tc.seq_len + extra_kv
    first_rg = first_input_requires_grad(tc)
    counts: dict = {}
    kinds: dict = {}
    for i, kind in enumerate(arch.layer_kinds):
        key = (i == 0, kind.replay_key(kv_seq))
        counts[key] = counts.get(key, 0) + 1
        kinds.setdefault(key, kind)
    w = _Walk()
    for key, n in counts.items():
        b, _, _ = layer_graph(arch, tc, seq, kv_seq, first_rg if key[0] else True, tc.grad_ckpt, kinds[key])
        w.add(b, n, seq)
        if tc.grad_ckpt:
            w.add(b, n, seq, backward=False, phase="recompute")
    hb, _ = head_graph(arch, tc, seq)
    w.add(hb, 1, seq)
    tb, _, _, _ = tail_graph(arch, tc, seq)
    w.add(tb, 1, seq)
    piece = method.extra_piece(arch, tc)
    if piece is not None:
        from types import SimpleNamespace

        pg, _ = piece  # no GEMMs: the dtypes are not needed
        w.add(SimpleNamespace(g=pg, dtype={}), 1, seq)
    return w.result()


__all__ = ["Gemm", "StepOps", "step_ops", "GEMM_OPS"]
