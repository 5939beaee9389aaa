"""sdpa backend dispatch: the planner's rules (planner.attention) against the trace's own implementation
(calibrate.sdpa_dispatch) applied to the tensors transformers really passes to sdpa, and the rules themselves."""

import itertools

import pytest

from planner import attention as sdp

CAPABILITIES = [(7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]


def _call(dtype="fp32", H=32, K=8, d=64, mask=False, dropout=0.0, q=1024, kv=None):
    return sdp.transformers_sdpa_call(dtype, H, K, d, q, kv or q, mask, dropout=dropout)


@pytest.mark.parametrize("call, sm, backend", [
    (_call("fp32", 32, 8), (9, 0), "math"),  # the key case: fp32 with grouped heads -> enable_gqa -> math
    (_call("fp32", 32, 8), (8, 0), "math"),
    (_call("bf16", 32, 8), (9, 0), "flash"),  # native GQA in flash
    (_call("fp32", 32, 32), (9, 0), "efficient"),  # equal heads: mem-efficient takes fp32
    (_call("fp32", 32, 8, mask=True), (9, 0), "efficient"),  # a mask: repeat_kv, equal heads
    (_call("bf16", 32, 8, mask=True), (8, 0), "efficient"),
    (_call("bf16", 32, 32), (7, 5), "math"),  # below sm80: no flash, no bf16 in mem-efficient
    (_call("fp16", 32, 32), (7, 5), "efficient"),
    (_call("fp16", 32, 8), (7, 0), "math"),  # enable_gqa and no flash: nothing fused takes grouped heads
    (_call("bf16", 16, 16, d=256), (8, 6), "flash"),  # > 224 without dropout trains on sm86
    (_call("bf16", 16, 16, d=256, dropout=0.1), (8, 6), "efficient"),
    (_call("bf16", 16, 16, d=200), (8, 9), "efficient"),
    (_call("bf16", 16, 4, d=320), (9, 0), "efficient"),  # head_dim > 256: transformers repeats kv
    (_call("bf16", 16, 4, q=1044, kv=1024), (9, 0), "math"),  # causal needs a square for flash; GQA for mem-eff
])
def test_rules(call, sm, backend):
    assert sdp.select_backend(call, sm) == backend


def test_transformers_passes_enable_gqa_only_without_a_mask():
    assert _call(K=8).enable_gqa and _call(K=8).is_causal and _call(K=8).kv_heads == 8
    m = _call(K=8, mask=True)
    assert not m.enable_gqa and m.kv_heads == 32 and not m.is_causal
    assert not _call(K=8, d=320).enable_gqa
    assert not _call(K=32).enable_gqa


def test_alignment_and_cudnn_order():
    assert sdp.gemm_alignment("bf16", (9, 0)) == 8 and sdp.gemm_alignment("fp32", (9, 0)) == 4
    assert sdp.gemm_alignment("fp32", (7, 0)) == 1 and sdp.gemm_alignment("fp16", (7, 5)) == 8
    assert sdp.priority_order((9, 0))[0] == "flash"  # the assumed cuDNN 9.10 is not preferred
    assert sdp.priority_order((9, 0), cudnn_version=91600)[0] == "cudnn"
    assert sdp.priority_order((8, 0), cudnn_version=91600)[0] == "flash"
    assert sdp.select_backend(_call("bf16", 32, 8), (9, 0), cudnn_version=91600) == "cudnn"
    assert sdp.canonical_capability((8, 0)) == sdp.canonical_capability((9, 0))
    assert sdp.canonical_capability((8, 6)) != sdp.canonical_capability((8, 0))


def _transformers_sdpa_args(dtype, H, K, d, q_len, kv_len, mask_kind, dropout):
    """The tensors transformers 5.17 `sdpa_attention_forward` hands to F.sdpa for this attention call."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    from transformers.integrations import sdpa_attention as ta

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    B = 2

    def proj(heads, n):  # (B, n, heads * d) -> view -> transpose, as the attention modules do
        return torch.empty(B, n, heads * d, dtype=dt, device="meta", requires_grad=True).view(B, n, heads, d).transpose(1, 2)

    q, k, v = proj(H, q_len), proj(K, kv_len), proj(K, kv_len)
    mask = None
    if mask_kind == "padding":
        mask = torch.ones(B, 1, q_len, kv_len, dtype=torch.bool, device="meta")
    elif mask_kind == "packed":  # block-diagonal (one row of several sequences): also a bool (B, 1, S, KV)
        mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device="meta")

    class Module(torch.nn.Module):
        num_key_value_groups = H // K
        is_causal = True

    seen = {}

    def capture(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        seen.update(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    enable_gqa=enable_gqa)
        return query.new_empty(query.shape)

    saved = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = capture
    try:
        ta.sdpa_attention_forward(Module(), q, k, v, mask, dropout=dropout)
    finally:
        F.scaled_dot_product_attention = saved
    return seen


def test_planner_and_trace_dispatchers_agree_on_a_grid():
    """The same decision from the abstract call (planner) and from the real tensors (trace), on every case."""
    pytest.importorskip("transformers")
    from calibrate import sdpa_dispatch

    cases = itertools.product(("fp32", "bf16", "fp16"), ((32, 8), (32, 32), (16, 4)), (64, 80, 96, 200, 256, 320),
                              ("none", "padding", "packed"), (0.0, 0.1), ((64, 64), (64, 40)))
    seen_backends = set()
    n = 0
    for dtype, (H, K), d, mask_kind, dropout, (ql, kl) in cases:
        if mask_kind == "none" and ql != kl:
            continue
        call = sdp.transformers_sdpa_call(dtype, H, K, d, ql, kl, mask_kind != "none", dropout=dropout)
        a = _transformers_sdpa_args(dtype, H, K, d, ql, kl, mask_kind, dropout)
        assert a["enable_gqa"] == call.enable_gqa and a["key"].shape[1] == call.kv_heads
        assert a["is_causal"] == call.is_causal
        for sm in CAPABILITIES:
            planned = sdp.select_backend(call, sm)
            traced = sdpa_dispatch.select(a["query"], a["key"], a["value"], a["attn_mask"], a["dropout_p"],
                                          a["is_causal"], a["enable_gqa"], sm)
            assert planned == traced, (dtype, H, K, d, mask_kind, dropout, sm, ql, kl)
            seen_backends.add(planned)
            n += 1
    assert seen_backends == {"flash", "efficient", "math"} and n > 2000


def test_trace_dispatcher_prefers_cudnn_with_a_newer_runtime(monkeypatch):
    torch = pytest.importorskip("torch")
    from calibrate import sdpa_dispatch

    q = torch.empty(1, 32, 64, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, 8, 64, 64, dtype=torch.bfloat16, device="meta")
    assert sdpa_dispatch.select(q, k, k, None, 0.0, True, True, (9, 0)) == "flash"
    monkeypatch.setattr(sdpa_dispatch, "CUDNN_VERSION", 91600)
    assert sdpa_dispatch.select(q, k, k, None, 0.0, True, True, (9, 0)) == "cudnn"
    # a non-contiguous last dimension rules out every fused kernel
    qt = torch.empty(1, 32, 64, 64, dtype=torch.bfloat16, device="meta").transpose(-1, -2)
    assert sdpa_dispatch.select(qt, qt, qt, None, 0.0, True, False, (9, 0)) == "math"


def _layer_kept(method, precision="bf16", sm=(9, 0), attn="sdpa", S=1024):
    from planner.config import TrainConfig
    from planner.graph import simulate
    from planner.layers import layer_graph
    from planner.profiles import load_model
    from planner.recipe import Recipe

    arch = load_model("llama-3.2-1b")
    tc = TrainConfig(method=method, precision=precision, seq_len=S, target_modules=("all-linear",),
                     recipe=Recipe(attn_implementation=attn))
    b, x, y = layer_graph(arch, tc, S, S, True, False, sm=sm)
    return simulate(b.g, outputs=[y], incoming_grads=[y]).kept[0]


def test_math_kernel_saves_the_fp32_attention_matrix(monkeypatch):
    """QLoRA after k-bit preparation reaches sdpa in fp32 with grouped heads: math, which keeps the (H, S, S) fp32
    probabilities (32 x 1024 x 1024 x 4 B = 128 MiB a sequence for Llama-3.2-1B) and fp32 q, k, v copies (k and v
    repeated to every head), instead of what mem-efficient would keep (q, k, v, out, lse)."""
    matrix = 32 * 1024 * 1024 * 4
    qkv32 = 3 * 1024 * 32 * 64 * 4
    math = {m: _layer_kept(m, p) for m, p in (("qlora", "bf16"), ("full", "fp32"))}
    monkeypatch.setattr(sdp, "select_backend", lambda call, sm=None: "efficient")
    fused = {m: _layer_kept(m, p) for m, p in (("qlora", "bf16"), ("full", "fp32"))}
    for m in math:
        assert matrix + qkv32 - 4 * 1024 * 32 * 64 * 4 <= math[m] - fused[m] <= matrix + qkv32, m


def test_eager_saves_fp32_probabilities_and_their_cast_copy():
    """eager (bf16) against sdpa's flash: the fp32 softmax output + the bf16 copy that `matmul(probs, v)` saves
    (6 B per score), and k, v repeated to every head (the K-head cache copies are kept by the cache in both);
    flash's output and logsumexp are not kept."""
    H, d, S = 32, 64, 1024
    diff = _layer_kept("lora", attn="eager") - _layer_kept("lora")
    expected = 6 * H * S * S + 2 * H * d * S * 2 - H * d * S * 2 - S * H * 4
    assert diff == expected


def test_estimate_follows_the_gpu_capability():
    """The same bf16 plan on sm75 cannot use flash (nor bf16 in mem-efficient): math, much more memory."""
    from planner.config import TrainConfig
    from planner.memory import estimate_memory
    from planner.profiles import load_gpu, load_model

    arch = load_model("llama-3.2-1b")
    tc = TrainConfig(method="lora", seq_len=1024, batch_size=4)
    h100 = estimate_memory(arch, tc, load_gpu("h100-sxm-80gb")).peak_allocated_bytes
    t4 = estimate_memory(arch, tc, load_gpu("t4-16gb")).peak_allocated_bytes
    ws = 2 * 32 * 2**20  # the H100's larger cuBLAS workspaces
    assert t4 > h100 - ws + 16 * 4 * 32 * 1024 * 1024 * 4 / 2
