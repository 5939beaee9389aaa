"""Generate trace reference points: `python -m calibrate.trace_grid --out calibrate/reference/trace-points.jsonl`
(and `--grid dora --out calibrate/reference/trace-points-dora.jsonl`,
`--grid families --out calibrate/reference/trace-points-families.jsonl`, `--grid moe --out
calibrate/reference/trace-points-moe.jsonl`, `--grid multigpu --out calibrate/reference/trace-points-multigpu.jsonl`,
`--grid attn --out calibrate/reference/trace-points-attn.jsonl`, `--grid deepseek --out
calibrate/reference/trace-points-deepseek.jsonl`, `--grid recipe --out
calibrate/reference/trace-points-recipe.jsonl`, `--grid shape --out calibrate/reference/trace-points-shape.jsonl`,
`--grid zero --out calibrate/reference/trace-points-zero.jsonl`, `--grid mts --out calibrate/reference/trace-points-mts.jsonl`, `--grid cross --out
calibrate/reference/trace-points-cross.jsonl`, `--grid fp16 --out
calibrate/reference/trace-points-fp16.jsonl`).

Each point runs `calibrate.trace.trace_step` (the real recipe on fake tensors) for one (model, configuration)
and writes one JSON line. The analytic model is tested against these points (tests/test_trace_reference.py),
so they cover what the eight measured rows do not: every method and optimizer, checkpointing, fp32, long
sequences, 7B to 70B. The grid is deterministic (fixed seed); regenerate after changing the recipe or the
library versions, and commit the file with the versions it records.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from planner.config import TrainConfig
from planner.methods import ALIASES, get_method

CUDA_WORKSPACE_H100 = 2 * 32 * 2**20  # two cuBLAS handles (forward thread, autograd thread) x 32 MiB on sm90

# (catalog model, weight in the random sample)
MODELS = {
    "qwen2.5-0.5b": 3,
    "llama-3.2-1b": 3,
    "llama-3.2-3b": 1,
    "llama-2-7b": 2,
    "llama-3.1-8b": 2,
    "qwen2.5-7b": 1,
    "mistral-7b": 1,
    "llama-2-13b": 1,
    "gemma-2-2b": 1,
    "phi-3-mini": 1,
}


def structured_points() -> list[tuple[str, dict]]:
    """Hand-picked points: each mechanism in isolation on a small Llama and a 7B, plus 70B adapters."""
    pts = []
    for model in ("llama-3.2-1b", "llama-2-7b"):
        for ckpt in (False, True):
            pts += [
                (model, dict(method="full", precision="bf16", seq_len=1024, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="full", precision="mixed", seq_len=1024, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="full", precision="fp32", seq_len=512, batch_size=1, grad_ckpt=ckpt)),
                (model, dict(method="lora", rank=16, target_modules=("q_proj", "v_proj"), seq_len=2048, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="lora", rank=64, target_modules=("all-linear",), seq_len=2048, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="lora", rank=16, target_modules=("all-linear",), lora_dropout=0.0, seq_len=2048, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="lora", rank=16, target_modules=("all-linear",), precision="mixed", seq_len=1024, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="qlora", rank=16, target_modules=("all-linear",), seq_len=2048, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="qlora", rank=8, target_modules=("q_proj", "v_proj"), seq_len=1024, batch_size=1, grad_ckpt=ckpt)),
                (model, dict(method="prefix", num_virtual_tokens=32, seq_len=1024, batch_size=2 + ckpt)),
                (model, dict(method="prompt", num_virtual_tokens=20, seq_len=1024, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="ia3", seq_len=1024, batch_size=2, grad_ckpt=ckpt)),
            ]
        for opt in ("adamw8bit", "paged_adamw8bit", "sgd", "adafactor"):
            pts.append((model, dict(method="full", precision="bf16", seq_len=512, batch_size=1, optimizer=opt)))
            pts.append((model, dict(method="lora", rank=16, target_modules=("all-linear",), seq_len=1024, batch_size=1, optimizer=opt)))
    for seq in (4096, 16384):
        pts.append(("llama-3.2-1b", dict(method="lora", rank=16, target_modules=("all-linear",), seq_len=seq, batch_size=1, grad_ckpt=True)))
        pts.append(("qwen2.5-0.5b", dict(method="full", precision="bf16", seq_len=seq, batch_size=1, grad_ckpt=True)))
    pts += [
        ("llama-3.1-70b", dict(method="qlora", rank=16, target_modules=("all-linear",), seq_len=2048, batch_size=1, grad_ckpt=True)),
        ("llama-3.1-70b", dict(method="lora", rank=16, target_modules=("q_proj", "v_proj"), seq_len=1024, batch_size=1, grad_ckpt=True)),
        ("llama-2-13b", dict(method="full", precision="bf16", seq_len=512, batch_size=1, grad_ckpt=True)),
    ]
    return pts


def dora_points() -> list[tuple[str, dict]]:
    """DoRA and rsLoRA (issue: a method added as one module): every precision, a 4-bit base (QDoRA), with and
    without dropout (DoRA's second base matmul), checkpointing, a GQA and a non-GQA family, biases (Qwen2),
    fused projections (Phi-3), and the optimizers whose state follows the trainable tensors."""
    all_lin = ("all-linear",)
    pts = []
    for model in ("llama-3.2-1b", "qwen2.5-0.5b"):
        for ckpt in (False, True):
            pts += [
                (model, dict(method="dora", rank=16, target_modules=all_lin, seq_len=1024, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="dora", rank=8, target_modules=("q_proj", "v_proj"), lora_dropout=0.0, seq_len=1024,
                             batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="dora", rank=16, target_modules=all_lin, precision="mixed", seq_len=512, batch_size=1,
                             grad_ckpt=ckpt)),
                (model, dict(method="dora", quant="nf4", rank=16, target_modules=all_lin, seq_len=1024, batch_size=2,
                             grad_ckpt=ckpt)),
            ]
    pts += [
        ("llama-2-7b", dict(method="dora", rank=16, target_modules=("q_proj", "v_proj"), seq_len=1024, batch_size=1)),
        ("llama-2-7b", dict(method="dora", rank=16, target_modules=all_lin, seq_len=512, batch_size=1)),
        ("llama-2-7b", dict(method="dora", rank=16, target_modules=all_lin, seq_len=1024, batch_size=2, grad_ckpt=True)),
        ("llama-2-7b", dict(method="dora", rank=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                            precision="mixed", lora_dropout=0.0, seq_len=512, batch_size=1)),
        ("llama-2-7b", dict(method="dora", quant="nf4", rank=64, target_modules=all_lin, seq_len=2048, batch_size=1,
                            grad_ckpt=True)),
        ("phi-3-mini", dict(method="dora", rank=8, target_modules=all_lin, seq_len=512, batch_size=1)),
        ("qwen2.5-0.5b", dict(method="dora", rank=32, target_modules=all_lin, precision="fp32", seq_len=512, batch_size=1)),
        ("qwen2.5-0.5b", dict(method="dora", rank=16, target_modules=all_lin, seq_len=512, batch_size=2, optimizer="adafactor")),
        ("llama-3.2-1b", dict(method="dora", rank=16, target_modules=all_lin, seq_len=512, batch_size=2, optimizer="sgd")),
        ("llama-3.2-1b", dict(method="lora", use_rslora=True, rank=16, target_modules=all_lin, seq_len=1024, batch_size=2)),
    ]
    return pts


# Small configs of each dense family issue 13 added (the real transformers classes, traced in seconds): every family's
# own modules at sizes where the layers, not constants, decide the peak. Points name them `family:<key>`.
_SMALL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=8192, max_position_embeddings=16384)
FAMILY_CONFIGS = {
    "qwen3": dict(_SMALL, model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=96,
                  tie_word_embeddings=False),
    # five sliding layers (window 1024: masked at 1536 tokens, not at 512) and a global one; tied embeddings
    "gemma3_text": dict(_SMALL, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], head_dim=128,
                        sliding_window=1024),
    # the multimodal config: ftplan plans (and traces) its text tower
    "gemma3": dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"],
                   text_config=dict(_SMALL, model_type="gemma3_text", head_dim=64, sliding_window=1024,
                                    num_attention_heads=4, num_key_value_heads=1),
                   vision_config=dict(model_type="siglip_vision_model", hidden_size=64, num_hidden_layers=1)),
    "olmo2": dict(_SMALL, model_type="olmo2", architectures=["Olmo2ForCausalLM"], pad_token_id=0, eos_token_id=1),
    # Phi-4's shape (GQA through the fused qkv_proj)
    "phi3": dict(_SMALL, model_type="phi3", architectures=["Phi3ForCausalLM"], pad_token_id=0, eos_token_id=1,
                 bos_token_id=1, sliding_window=None),
    # Mistral-Small-3's explicit head_dim (128 with hidden 512 and 8 heads)
    "mistral": dict(_SMALL, model_type="mistral", architectures=["MistralForCausalLM"], head_dim=128,
                    sliding_window=None),
}


def family_arch(model: str):
    """The ModelArch of a grid point's model: `family:<key>` (FAMILY_CONFIGS), a small MoE config (MOE_CONFIGS) or a
    catalog name."""
    from planner.arch import arch_from_config
    from planner.profiles import load_model

    if model.startswith("family:"):
        return arch_from_config(FAMILY_CONFIGS[model.split(":", 1)[1]], name=model)
    if model in MOE_CONFIGS:
        return arch_from_config(MOE_CONFIGS[model], name=model)
    if model in DEEPSEEK_CONFIGS:
        return arch_from_config(DEEPSEEK_CONFIGS[model], name=model)
    if model in TINY_FAMILIES:
        return arch_from_config(TINY_FAMILIES[model])
    if model in SMALL_VOCAB:
        return arch_from_config(SMALL_VOCAB[model], name=model)
    if model in MTS_FAMILIES:
        return arch_from_config(MTS_FAMILIES[model])
    return load_model(model)


def family_points() -> list[tuple[str, dict]]:
    """Per family: full FT (bf16, mixed), LoRA with the family's default targets and all-linear, QLoRA, with and
    without checkpointing, at 512 and 1536 tokens (Gemma-3's sliding layers mask only at the longer); plus a few
    full-size catalog points."""
    from planner.methods.lora import family_default_targets

    pts = []
    for key in FAMILY_CONFIGS:
        model = f"family:{key}"
        default = family_default_targets(family_arch(model))
        for ckpt in (False, True):
            for seq in (512, 1536):
                pts += [
                    (model, dict(method="full", precision="bf16", seq_len=seq, batch_size=2, grad_ckpt=ckpt)),
                    (model, dict(method="lora", rank=16, target_modules=default, seq_len=seq, batch_size=2,
                                 grad_ckpt=ckpt)),
                    (model, dict(method="qlora", rank=16, target_modules=("all-linear",), seq_len=seq, batch_size=2,
                                 grad_ckpt=ckpt)),
                ]
            pts.append((model, dict(method="full", precision="mixed", seq_len=512, batch_size=2, grad_ckpt=ckpt)))
            pts.append((model, dict(method="lora", rank=8, target_modules=("all-linear",), precision="mixed",
                                    seq_len=1536, batch_size=1, grad_ckpt=ckpt)))
    pts += [
        ("qwen3-8b", dict(method="lora", rank=16, target_modules=("all-linear",), seq_len=2048, batch_size=1,
                          grad_ckpt=True)),
        ("gemma-3-4b", dict(method="qlora", rank=16, target_modules=("all-linear",), seq_len=2048, batch_size=1,
                            grad_ckpt=True)),
        ("phi-4", dict(method="lora", rank=16, target_modules=("qkv_proj",), seq_len=1024, batch_size=1,
                       grad_ckpt=True)),
        ("mistral-small-3", dict(method="qlora", rank=16, target_modules=("all-linear",), seq_len=1024,
                                 batch_size=1, grad_ckpt=True)),
    ]
    return pts


# Small MoE configs (planner/moe.py families) whose MoE layers, not the loss, decide the peak: a vocabulary of 4096
_MOE_BASE = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                 vocab_size=4096, max_position_embeddings=16384)
MOE_CONFIGS = {
    "tiny-qwen3-moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], intermediate_size=1024,
                           moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
                           **_MOE_BASE),
    "tiny-qwen3-moe-dense0": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], intermediate_size=1024,
                                  moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                                  mlp_only_layers=[0], **_MOE_BASE),
    "tiny-mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], intermediate_size=768,
                         num_local_experts=8, num_experts_per_tok=2, **_MOE_BASE),
    "tiny-qwen2-moe": dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], intermediate_size=1024,
                           moe_intermediate_size=256, shared_expert_intermediate_size=512, num_experts=8,
                           num_experts_per_tok=2, **_MOE_BASE),
}

# The same with a 512-token vocabulary: the loss no longer dominates, so the MoE layers' own transients (forward
# of the last layer, a checkpointed layer's recomputation) decide the peak: a stress test of the layer graph
MOE_CONFIGS.update({f"{k}-v512": dict(v, vocab_size=512) for k, v in list(MOE_CONFIGS.items())})
_FIRST_MOE = tuple(MOE_CONFIGS)  # the configs of the grid's first 45 points (t000-t044), which stay as traced

# gpt-oss (eager attention with sinks, alternating 128-token sliding and full layers, clamped SwiGLU experts with
# biases, a router with a bias), traced as bf16 weights (the MXFP4 experts dequantized, as the HF recipes load it)
GPT_OSS_CONFIGS = {
    "tiny-gpt-oss": dict(model_type="gpt_oss", architectures=["GptOssForCausalLM"], intermediate_size=256,
                         num_local_experts=8, num_experts_per_tok=2, sliding_window=128, **_MOE_BASE),
}
GPT_OSS_CONFIGS["tiny-gpt-oss-v512"] = dict(GPT_OSS_CONFIGS["tiny-gpt-oss"], vocab_size=512)
MOE_CONFIGS.update(GPT_OSS_CONFIGS)
# the router load-balancing loss in training (`output_router_logits`): the routers' logits kept, the aux loss
MOE_CONFIGS.update({f"{k}-aux": dict(MOE_CONFIGS[k], output_router_logits=True)
                    for k in ("tiny-qwen3-moe-v512", "tiny-mixtral", "tiny-qwen2-moe-v512", "tiny-gpt-oss-v512")})


def moe_points() -> list[tuple[str, dict]]:
    """MoE families (issue 13 item 2): full FT and LoRA on the attention projections, with and without
    checkpointing, the optimizers, dropout on and off, dense-first layers, a shared expert, Mixtral's fp32 routing
    weights; and two full-size catalog models. Small configs are named in MOE_CONFIGS (their config travels in the
    record), catalog ones by name."""
    qv, qkvo = ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")
    pts = []
    for model in [m for m in _FIRST_MOE if not m.endswith("-v512")]:
        for ckpt in (False, True):
            pts += [
                (model, dict(method="full", precision="bf16", seq_len=1024, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="lora", rank=16, target_modules=qv, seq_len=2048, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="lora", rank=8, target_modules=qkvo, lora_dropout=0.0, seq_len=1024, batch_size=4,
                             grad_ckpt=ckpt)),
            ]
    for model in [m for m in _FIRST_MOE if m.endswith("-v512")]:
        for ckpt in (False, True):
            pts += [
                (model, dict(method="full", precision="bf16", seq_len=1024, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="lora", rank=16, target_modules=qv, seq_len=2048, batch_size=2, grad_ckpt=ckpt)),
            ]
    for opt in ("adamw8bit", "sgd", "adafactor"):
        pts.append(("tiny-qwen3-moe", dict(method="full", precision="bf16", seq_len=512, batch_size=2, optimizer=opt)))
    pts += [
        ("qwen3-30b-a3b", dict(method="lora", rank=16, target_modules=qv, seq_len=2048, batch_size=1, grad_ckpt=True)),
        ("mixtral-8x7b", dict(method="lora", rank=16, target_modules=qkvo, seq_len=1024, batch_size=1, grad_ckpt=True)),
    ]
    return (pts + gpt_oss_points() + moe_all_linear_points() + aux_loss_points() + expert_name_points()
            + moe_qlora_points() + moe_precision_points())


def gpt_oss_points() -> list[tuple[str, dict]]:
    """gpt-oss (t045 on): full FT and LoRA with and without checkpointing, a stress vocabulary, and gpt-oss-20b."""
    qv, qkvo = ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")
    pts = []
    for ckpt in (False, True):
        pts += [
            ("tiny-gpt-oss", dict(method="full", precision="bf16", seq_len=1024, batch_size=2, grad_ckpt=ckpt)),
            ("tiny-gpt-oss", dict(method="lora", rank=16, target_modules=qv, seq_len=2048, batch_size=2,
                                  grad_ckpt=ckpt)),
            ("tiny-gpt-oss", dict(method="lora", rank=8, target_modules=qkvo, lora_dropout=0.0, seq_len=1024,
                                  batch_size=4, grad_ckpt=ckpt)),
            ("tiny-gpt-oss-v512", dict(method="full", precision="bf16", seq_len=1024, batch_size=2, grad_ckpt=ckpt)),
            ("tiny-gpt-oss-v512", dict(method="lora", rank=16, target_modules=qv, seq_len=1024, batch_size=2,
                                       grad_ckpt=ckpt)),
        ]
    pts.append(("gpt-oss-20b", dict(method="lora", rank=16, target_modules=qkvo, seq_len=1024, batch_size=1,
                                    grad_ckpt=True)))
    return pts


def moe_all_linear_points() -> list[tuple[str, dict]]:
    """LoRA all-linear on each MoE family (t056 on): peft 0.21 wraps Mixtral's and Qwen3-MoE's fused experts and
    router (`ParamWrapper`, lora_dropout 0), adapts Qwen2-MoE's shared expert and gate, gpt-oss's attention only;
    with and without checkpointing, dense-first layers, a stress vocabulary, and Qwen3-30B-A3B (128 experts)."""
    pts = []
    lora = dict(method="lora", rank=16, target_modules=("all-linear",), lora_dropout=0.0, seq_len=1024, batch_size=2)
    for model in ("tiny-qwen3-moe", "tiny-mixtral", "tiny-qwen2-moe", "tiny-gpt-oss", "tiny-qwen3-moe-dense0"):
        for ckpt in (False, True):
            pts.append((model, dict(lora, grad_ckpt=ckpt)))
    pts.append(("tiny-mixtral-v512", dict(lora, grad_ckpt=True)))
    pts.append(("qwen3-30b-a3b", dict(lora, seq_len=2048, batch_size=1, grad_ckpt=True)))
    return pts


def aux_loss_points() -> list[tuple[str, dict]]:
    """`output_router_logits` on (t068 on): the load-balancing loss of each family, full FT and LoRA."""
    lora = dict(method="lora", rank=16, target_modules=("q_proj", "v_proj"), seq_len=2048, batch_size=2)
    full = dict(method="full", precision="bf16", seq_len=1024, batch_size=2)
    return [
        ("tiny-qwen3-moe-v512-aux", dict(lora, grad_ckpt=False)),
        ("tiny-qwen3-moe-v512-aux", dict(lora, grad_ckpt=True)),
        ("tiny-mixtral-aux", dict(full, grad_ckpt=False)),
        ("tiny-mixtral-aux", dict(full, grad_ckpt=True)),
        ("tiny-qwen2-moe-v512-aux", dict(full, grad_ckpt=True)),
        ("tiny-gpt-oss-v512-aux", dict(lora, grad_ckpt=True)),
    ]


def expert_name_points() -> list[tuple[str, dict]]:
    """transformers-4 expert names that peft converts to target_parameters (t074 on)."""
    lora = dict(method="lora", rank=16, lora_dropout=0.0, seq_len=1024, batch_size=2)
    return [
        ("tiny-mixtral", dict(lora, target_modules=("w1", "w3", "w2"), grad_ckpt=True)),
        ("tiny-qwen3-moe-v512", dict(lora, target_modules=("gate", "q_proj", "v_proj"), grad_ckpt=False)),
    ]


def moe_qlora_points() -> list[tuple[str, dict]]:
    """QLoRA on MoE models (t076 on): attention projections 4-bit, the fused experts and routers unquantized and
    cast to fp32 by k-bit preparation (grouped_mm in fp32), Qwen2-MoE's shared expert and the dense-first MLPs
    4-bit; all-linear wrapping the fp32 experts; without k-bit preparation (TRL: bf16 experts); Qwen3-30B-A3B."""
    qv = ("q_proj", "v_proj")
    q = dict(method="qlora", rank=16, seq_len=1024, batch_size=2)
    wide = dict(q, target_modules=("all-linear",), lora_dropout=0.0)
    no_kbit = dict(recipe=dict(kbit_preparation=False))
    return [
        ("tiny-mixtral", dict(q, target_modules=qv, grad_ckpt=False)),
        ("tiny-mixtral", dict(q, target_modules=qv, grad_ckpt=True)),
        ("tiny-qwen3-moe", dict(wide, grad_ckpt=True)),
        ("tiny-qwen2-moe-v512", dict(wide, grad_ckpt=False)),
        ("tiny-gpt-oss-v512", dict(q, target_modules=qv, grad_ckpt=True)),
        ("tiny-qwen3-moe-dense0", dict(wide, grad_ckpt=False)),
        ("tiny-mixtral", dict(q, target_modules=qv, grad_ckpt=True, **no_kbit)),
        ("tiny-gpt-oss", dict(wide, grad_ckpt=False, **no_kbit)),
        ("qwen3-30b-a3b", dict(q, target_modules=qv, seq_len=2048, batch_size=1, grad_ckpt=True)),
    ]


def moe_precision_points() -> list[tuple[str, dict]]:
    """`mixed` and `fp32` (t085 on): fp32 experts run by grouped_mm outside autocast (no autocast kernel), bf16
    attention and router linears under autocast; full FT and LoRA all-linear (the fp32 fold) with and without
    checkpointing; gpt-oss in fp32 (its eager sinks attention under autocast is not modelled)."""
    wide = dict(method="lora", rank=16, target_modules=("all-linear",), lora_dropout=0.0, seq_len=1024, batch_size=2)
    full = dict(method="full", seq_len=1024, batch_size=2)
    return [
        ("tiny-mixtral", dict(full, precision="mixed", grad_ckpt=False)),
        ("tiny-qwen3-moe", dict(full, precision="mixed", grad_ckpt=True)),
        ("tiny-qwen2-moe-v512", dict(wide, precision="mixed", grad_ckpt=False)),
        ("tiny-mixtral-v512", dict(wide, precision="mixed", grad_ckpt=True)),
        ("tiny-qwen3-moe", dict(full, precision="fp32", grad_ckpt=False)),
        ("tiny-gpt-oss-v512", dict(wide, target_modules=("q_proj", "v_proj"), precision="fp32", grad_ckpt=True)),
    ]


# Small DeepSeek-V3 configs (planner/deepseek.py, planner/mla.py): MLA with and without q_lora_rank, interleaved and
# rotate_half rotary, a dense first layer, group-limited routing, shared experts (one; two)
_DEEPSEEK_BASE = dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], hidden_size=512,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1024,
                      moe_intermediate_size=256, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                      first_k_dense_replace=1, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
                      v_head_dim=64, max_position_embeddings=16384)
DEEPSEEK_CONFIGS = {
    "tiny-deepseek-v3-v512": dict(_DEEPSEEK_BASE, q_lora_rank=192, n_shared_experts=1, vocab_size=512),
    "tiny-deepseek-v3-noqlora": dict(_DEEPSEEK_BASE, q_lora_rank=None, n_shared_experts=2, rope_interleave=False,
                                     vocab_size=4096),
}


def deepseek_points() -> list[tuple[str, dict]]:
    """DeepSeek-V3 (issue 13): full FT and LoRA (every attention projection; the q/kv up-projections), with and
    without checkpointing, on the two DEEPSEEK_CONFIGS (bf16: the precision MoE models are planned in); eager and
    flash_attention_2 on both; a T4, where sdpa runs its math backend; and the full-size catalog model."""
    pts = []
    for model, cfg in DEEPSEEK_CONFIGS.items():
        q = ("q_a_proj", "q_b_proj") if cfg.get("q_lora_rank") else ("q_proj",)
        every = q + ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
        for ckpt in (False, True):
            pts += [
                (model, dict(method="full", precision="bf16", seq_len=1024, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="lora", rank=16, target_modules=every, seq_len=2048, batch_size=2, grad_ckpt=ckpt)),
            ]
        pts.append((model, dict(method="lora", rank=8, target_modules=(q[-1], "kv_b_proj"), lora_dropout=0.0,
                                seq_len=1024, batch_size=4, grad_ckpt=True)))
        # a T4 (sm75): no bf16 memory-efficient kernel, sdpa's math backend
        pts.append((model, dict(method="full", precision="bf16", seq_len=512, batch_size=2), "t4-16gb"))
    for attn in ("eager", "flash_attention_2"):  # flash-attn 2 pads the value head dim to the query's
        pts += [("tiny-deepseek-v3-v512", dict(method="full", precision="bf16", seq_len=1024, batch_size=2,
                                               recipe=dict(attn_implementation=attn))),
                ("tiny-deepseek-v3-noqlora", dict(method="lora", rank=16, target_modules=("kv_b_proj", "o_proj"),
                                                  seq_len=1024, batch_size=2, grad_ckpt=True,
                                                  recipe=dict(attn_implementation=attn)))]
    # the catalog's 671B model (its weights decide the peak; the layers' terms match too)
    pts.append(("deepseek-v3", dict(method="lora", rank=16, target_modules=("q_b_proj", "kv_b_proj"), seq_len=1024,
                                    batch_size=1, grad_ckpt=True)))
    return pts + deepseek_qlora_points() + deepseek_all_linear_points()


def deepseek_all_linear_points() -> list[tuple[str, dict]]:
    """LoRA all-linear (t021 on): peft 0.21 wraps the fused experts and the router (`ParamWrapper`, lora_dropout
    0, as on Qwen3-MoE), with and without checkpointing, on both configs; and the router alone (`gate`)."""
    wide = dict(method="lora", rank=16, target_modules=("all-linear",), lora_dropout=0.0, seq_len=1024, batch_size=2)
    return [("tiny-deepseek-v3-v512", dict(wide, grad_ckpt=False)),
            ("tiny-deepseek-v3-v512", dict(wide, grad_ckpt=True)),
            ("tiny-deepseek-v3-noqlora", dict(wide, grad_ckpt=True)),
            ("tiny-deepseek-v3-noqlora", dict(wide, target_modules=("gate", "kv_b_proj"), grad_ckpt=False))]


def deepseek_qlora_points() -> list[tuple[str, dict]]:
    """QLoRA (t017 on) and mixed (t019 on): the MLA projections, shared experts and dense-first MLPs 4-bit, the fused experts and the
    router fp32 after k-bit preparation (planner/moe.py "QLoRA")."""
    q = dict(method="qlora", rank=16, seq_len=1024, batch_size=2)
    every = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    return [("tiny-deepseek-v3-v512", dict(q, target_modules=every, grad_ckpt=False)),
            ("tiny-deepseek-v3-noqlora", dict(q, target_modules=("kv_b_proj", "o_proj"), grad_ckpt=True)),
            # mixed (t019 on): fp32 experts outside autocast, the router's F.linear under it (bf16 logits)
            ("tiny-deepseek-v3-v512", dict(method="full", precision="mixed", seq_len=1024, batch_size=2,
                                           grad_ckpt=False)),
            ("tiny-deepseek-v3-noqlora", dict(q, method="lora", precision="mixed", target_modules=("kv_b_proj",
                                                                                                  "o_proj"),
                                              grad_ckpt=True))]


def multigpu_points() -> list[tuple[str, dict]]:
    """FSDP2 across GPUs (calibrate/trace_multigpu.py): 2, 8 and 64 GPUs, full fine-tuning and LoRA, with and
    without checkpointing, on two tied models (the tail unit holds the embedding) and an untied 7B."""
    pts = []
    fsdp = dict(strategy="fsdp", seq_len=512, batch_size=1)
    for model in ("qwen2.5-0.5b", "llama-3.2-1b"):
        for ckpt in (False, True):
            for n in (2, 8, 64):
                pts.append((model, dict(fsdp, method="full", precision="bf16", num_gpus=n, grad_ckpt=ckpt)))
            pts.append((model, dict(fsdp, method="lora", rank=16, target_modules=("all-linear",), num_gpus=8,
                                    grad_ckpt=ckpt)))
    pts += [("llama-2-7b", dict(fsdp, method="full", precision="bf16", num_gpus=8, grad_ckpt=True)),
            ("llama-2-7b", dict(fsdp, method="full", precision="bf16", num_gpus=64, grad_ckpt=False))]
    return pts + multigpu_offload_qlora_points() + multigpu_untied_peft_points()


ZERO_CONFIGS = {  # small enough for two real CPU processes (calibrate/trace_zero.py), big enough that the model
    # states and gathered parameters are most of the peak
    "tiny-zero-llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256,
                            intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=8192, max_position_embeddings=1024, tie_word_embeddings=False),
    "tiny-zero-qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=256,
                            intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=8192, max_position_embeddings=1024, tie_word_embeddings=True),
}


def zero_points() -> list[tuple[str, dict]]:
    """DeepSpeed ZeRO-2 and ZeRO-3 in bf16 mode on 2 GPUs (calibrate/trace_zero.py: the real engine, two CPU
    processes over gloo): full fine-tuning and LoRA, without checkpointing on an untied model, with it on a tied one."""
    pts = []
    for strategy in ("zero2", "zero3"):
        for method in ("full", "lora"):
            for ckpt, model in ((False, "tiny-zero-llama"), (True, "tiny-zero-qwen2")):
                d = dict(method=method, precision="bf16", seq_len=256, batch_size=1, num_gpus=2, strategy=strategy,
                         grad_ckpt=ckpt)
                if get_method(method).uses_rank:
                    d.update(rank=16, target_modules=("all-linear",))
                pts.append((model, d))
    return pts


def multigpu_offload_qlora_points() -> list[tuple[str, dict]]:
    """FSDP2 with CPU offload (device memory and host RAM), QLoRA over a bf16-stored 4-bit base (issue 12 item 2)
    and bf16 autocast, on 2 and 8 GPUs: two tied catalog models and an untied small family (`family:mistral`). Appended
    after the first grid's 18 points (`--append` traces only these)."""
    fsdp = dict(strategy="fsdp", seq_len=512, batch_size=1, precision="bf16")
    lora = dict(method="lora", rank=16, target_modules=("all-linear",))
    qlora = dict(lora, quant="nf4")
    return [
        ("llama-3.2-1b", dict(fsdp, method="full", num_gpus=2, grad_ckpt=True, cpu_offload=True)),
        ("llama-3.2-1b", dict(fsdp, method="full", num_gpus=8, grad_ckpt=False, cpu_offload=True)),
        ("llama-3.2-1b", dict(fsdp, **lora, num_gpus=8, grad_ckpt=True, cpu_offload=True)),
        ("qwen2.5-0.5b", dict(fsdp, method="full", num_gpus=2, grad_ckpt=False, cpu_offload=True)),
        ("qwen2.5-0.5b", dict(fsdp, **lora, num_gpus=2, grad_ckpt=False, cpu_offload=True)),
        ("family:mistral", dict(fsdp, **lora, num_gpus=8, grad_ckpt=False, cpu_offload=True)),
        ("llama-3.2-1b", dict(fsdp, **qlora, num_gpus=2, grad_ckpt=True)),
        ("llama-3.2-1b", dict(fsdp, **qlora, num_gpus=8, grad_ckpt=True, cpu_offload=True)),
        ("qwen2.5-0.5b", dict(fsdp, **qlora, num_gpus=8, grad_ckpt=False)),
        ("family:mistral", dict(fsdp, **qlora, num_gpus=2, grad_ckpt=False)),
        # bf16 autocast over fp32 shards: FSDP2 gathers bf16, so the layers compute as in bf16
        ("qwen2.5-0.5b", dict(fsdp, method="full", precision="mixed", num_gpus=8, grad_ckpt=True)),
        ("llama-3.2-1b", dict(fsdp, **lora, precision="mixed", num_gpus=2, grad_ckpt=False, cpu_offload=True)),
        # fp32 gradient shards (kept as the fp32 reduce-scatter output) through the backward: the optimizer peaks
        ("qwen2.5-0.5b", dict(fsdp, method="full", precision="mixed", num_gpus=2, grad_ckpt=True)),
    ]


def multigpu_untied_peft_points() -> list[tuple[str, dict]]:
    """Appended after the 31 points above. Untied models, where the tail unit's pre-backward prefetches the last
    decoder layer only once the logits' gradient exists, after the loss's own backward (`planner.strategies.fsdp2`
    "head_backward"): full fine-tuning checkpointed and offloaded at N = 2 (the loss's peak once counted the
    prefetched layer: +5.2 %), full at N = 8, LoRA checkpointed; and the methods whose layers compute in bf16 under
    FSDP2's bf16 gathers over bf16 autocast (`planner.memory.gathered_precision`): IA3 (tied; its vectors gathered in
    bf16, `planner.methods.ia3.vector_dtype`), prompt tuning (checkpointed) and prefix tuning (untied); and TRL's
    chunked loss on an untied model (`planner.strategies.fsdp2.prefetches_at_logits`)."""
    fsdp = dict(strategy="fsdp", seq_len=512, batch_size=1)
    lora = dict(method="lora", rank=16, target_modules=("all-linear",))
    return [
        ("family:mistral", dict(fsdp, method="full", precision="bf16", num_gpus=2, grad_ckpt=True, cpu_offload=True)),
        ("family:mistral", dict(fsdp, method="full", precision="bf16", num_gpus=8, grad_ckpt=False)),
        ("family:mistral", dict(fsdp, **lora, precision="bf16", num_gpus=2, grad_ckpt=True)),
        ("qwen2.5-0.5b", dict(fsdp, method="ia3", precision="mixed", num_gpus=2, grad_ckpt=False)),
        ("llama-3.2-1b", dict(fsdp, method="prompt", precision="mixed", num_gpus=2, grad_ckpt=True)),
        # peft casts the prefix to the fp32 shards' dtype (`planner.memory.prefix_cast_dtype`)
        ("family:mistral", dict(fsdp, method="prefix", precision="mixed", num_gpus=8, grad_ckpt=False)),
        # a loss that never calls the lm_head module: the tail completes on the root output, the prefetch comes first
        ("family:mistral", dict(fsdp, method="full", precision="bf16", num_gpus=2, grad_ckpt=False,
                                recipe=dict(loss="chunked"))),
    ]


# attention grid: two tiny families where the attention matrices dominate (small vocabulary, 1K tokens)
ATTN_FAMILIES = {
    # llama-3.2-1b's shape of attention (grouped heads 4:1, head_dim 64), scaled down
    "tiny-llama3-gqa": dict(model_type="llama", hidden_size=512, num_hidden_layers=2, num_attention_heads=8,
                            num_key_value_heads=2, intermediate_size=1024, vocab_size=4096, tie_word_embeddings=True,
                            max_position_embeddings=16384, rope_theta=500000.0),
    # llama-2's (every head its own keys), scaled down
    "tiny-llama2-mha": dict(model_type="llama", hidden_size=512, num_hidden_layers=2, num_attention_heads=8,
                            num_key_value_heads=8, intermediate_size=1024, vocab_size=4096, tie_word_embeddings=False,
                            max_position_embeddings=16384),
}


def attn_points() -> list[tuple[str, dict, str]]:
    """attn_implementation x precision/method x checkpointing x a GQA and a non-GQA family, on the H100 (sm90)
    (flash_attention_2 without fp32: flash-attn refuses it), plus fp32 points on the T4 (sm75: no flash) and the
    L4 (sm89).
    Returns (family, train dict, gpu profile)."""
    all_lin = ("all-linear",)
    recipes = [
        dict(method="lora", target_modules=all_lin, precision="bf16"),
        dict(method="full", precision="bf16"),
        dict(method="full", precision="mixed"),
        dict(method="full", precision="fp32"),
        dict(method="qlora", target_modules=all_lin),
        dict(method="prefix", num_virtual_tokens=32),
        dict(method="prompt", num_virtual_tokens=16),
    ]
    pts = []
    for fam in ATTN_FAMILIES:
        for attn in ("sdpa", "eager", "flash_attention_2"):
            for r in recipes:
                for ckpt in (False, True):
                    if (ckpt and r["method"] == "prefix") or (attn == "flash_attention_2" and r.get("precision") == "fp32"):
                        continue
                    pts.append((fam, dict(r, seq_len=1024, batch_size=2, grad_ckpt=ckpt,
                                          recipe=dict(attn_implementation=attn)), "h100-sxm-80gb"))
        for gpu in ("t4-16gb", "l4-24gb"):
            pts.append((fam, dict(method="full", precision="fp32", seq_len=1024, batch_size=2), gpu))
            pts.append((fam, dict(method="lora", target_modules=all_lin, precision="fp32", seq_len=1024, batch_size=2,
                                  grad_ckpt=True), gpu))
    return pts


# tiny families built from config.json fields (no catalog entry): a GQA Llama and a non-GQA Qwen2 (q/k/v biases)
TINY_FAMILIES = {
    "tiny-llama-gqa": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=512,
                           intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                           vocab_size=32000, max_position_embeddings=4096),
    "tiny-qwen2-mha": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=512,
                           intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                           vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
}


def recipe_points() -> list[tuple[str, dict]]:
    """Issue 11: every loss x precision x method (full, lora, qlora) x checkpointing on a GQA and a non-GQA tiny
    family (calibrate/reference/trace-points-recipe.jsonl; seconds per point)."""
    combos = [("full", "bf16"), ("full", "mixed"), ("lora", "bf16"), ("lora", "mixed"), ("qlora", "bf16")]
    pts = []
    for model in TINY_FAMILIES:
        for loss in ("plain", "chunked", "liger", "cce"):
            for i, (method, precision) in enumerate(combos):
                for ckpt in (False, True):
                    d = dict(method=method, seq_len=512, batch_size=1 + (i + ckpt) % 2, grad_ckpt=ckpt,
                             recipe={"loss": loss})
                    name, quant = ALIASES.get(method, (method, "none"))
                    if quant == "none":
                        d["precision"] = precision
                    if get_method(name).uses_rank:
                        d.update(rank=16, target_modules=("all-linear",))
                    pts.append((model, d))
    return pts


# the GQA tiny family with a 2k vocabulary: the decoder layers, not the logits, hold the peak (activation offloading)
SMALL_VOCAB = {"tiny-llama-gqa-v2k": dict(TINY_FAMILIES["tiny-llama-gqa"], vocab_size=2048)}


def actoffload_points() -> list[tuple[str, dict]]:
    """Issue 11 item 4: TRL's activation offloading (`Recipe.activation_offload`) for full FT, LoRA and QLoRA, with and
    without checkpointing (TRL allows both: under non-reentrant checkpointing its hooks see each checkpoint's saved
    input), on the GQA and the non-GQA tiny family (calibrate/reference/trace-points-actoffload.jsonl).
    Each with the plain loss and TRL's default chunked loss; full FT / LoRA under mixed precision (autocast's bf16
    weight copies, offloaded too) on the GQA family; and a 2k-vocabulary GQA model at 2048 tokens, where the decoder
    layers (their forward stash, the copies brought back) hold the peak instead of the logits: LoRA, QLoRA with and
    without checkpointing and full FT with it (LoRA with checkpointing there is left out: the analytic model of its
    recomputation is short by 7 % with or without offloading, a gap of the reference recipe's layer model); and LoRA
    with transformers' offloaded checkpointing as well (`gradient_checkpointing_kwargs: {offload: true}`)."""
    combos = [("full", "bf16"), ("lora", "bf16"), ("qlora", "bf16")]
    pts = []
    for model in list(TINY_FAMILIES) + list(SMALL_VOCAB):
        small = model in SMALL_VOCAB
        for loss in ("plain",) if small else ("plain", "chunked"):
            mixed = [("full", "mixed"), ("lora", "mixed")] if loss == "chunked" and model == "tiny-llama-gqa" else []
            for i, (method, precision) in enumerate(combos + mixed):
                name, quant = ALIASES.get(method, (method, "none"))
                quantized, adapters = quant != "none", get_method(name).uses_rank
                for ckpt in (False, True):
                    if (precision == "mixed" and ckpt) or (small and (adapters and not quantized) == ckpt
                                                           and not quantized):
                        continue
                    d = dict(method=method, seq_len=2048 if small else 512, batch_size=1 + (i + ckpt) % 2,
                             grad_ckpt=ckpt, recipe={"activation_offload": True, "loss": loss})
                    if not quantized:
                        d["precision"] = precision
                    if adapters:
                        d.update(rank=16, target_modules=("all-linear",))
                    pts.append((model, d))
    for model in TINY_FAMILIES:  # with transformers' offloaded checkpointing too (TRL's offloading + offload=True)
        pts.append((model, dict(method="lora", precision="bf16", seq_len=512, batch_size=2, grad_ckpt=True,
                                rank=16, target_modules=("all-linear",),
                                recipe={"activation_offload": True, "offload_checkpoints": True, "loss": "chunked"})))
    return pts


def shape_points() -> list[tuple[str, dict]]:
    """Issue 11 item 3, the shape of the data: packed rows and batches padded to the longest row, under sdpa
    (the mem-efficient kernel and its bias), eager and flash_attention_2 (packing: varlen over one row; padding:
    unpad, varlen, pad), crossed
    with full / LoRA / QLoRA, precisions and checkpointing on a GQA and a non-GQA tiny family
    (calibrate/reference/trace-points-shape.jsonl; seconds per point)."""
    all_lin = ("all-linear",)
    combos = {  # (method, precision) -> train fields
        "full-bf16": dict(method="full", precision="bf16"),
        "full-mixed": dict(method="full", precision="mixed"),
        "full-fp32": dict(method="full", precision="fp32"),
        "lora-bf16": dict(method="lora", precision="bf16", rank=16, target_modules=all_lin),
        "qlora": dict(method="qlora", rank=16, target_modules=all_lin),
    }
    shapes = {"packing": {"packing": True}, "padding": {"padding": "longest"}}
    plan = [  # (attention, shape, combo, checkpointing)
        ("sdpa", "packing", "full-bf16", False), ("sdpa", "packing", "lora-bf16", True), ("sdpa", "packing", "qlora", False),
        ("sdpa", "packing", "full-mixed", True), ("sdpa", "packing", "full-fp32", False),
        ("sdpa", "padding", "full-bf16", True), ("sdpa", "padding", "lora-bf16", False), ("sdpa", "padding", "qlora", True),
        ("sdpa", "padding", "full-mixed", False), ("sdpa", "padding", "full-fp32", True),
        ("eager", "packing", "lora-bf16", False), ("eager", "packing", "qlora", True),
        ("eager", "padding", "lora-bf16", True), ("eager", "padding", "full-mixed", False),
        ("flash_attention_2", "packing", "lora-bf16", False), ("flash_attention_2", "packing", "qlora", True),
        ("flash_attention_2", "packing", "full-mixed", False),
        ("flash_attention_2", "padding", "lora-bf16", True), ("flash_attention_2", "padding", "qlora", False),
    ]
    pts = []
    for model in TINY_FAMILIES:
        for attn, shape, combo, ckpt in plan:
            # flash-attn detects packed rows in a one-row batch only
            batch = 1 if (attn == "flash_attention_2" and shape == "packing") else 2
            pts.append((model, dict(combos[combo], seq_len=1024, batch_size=batch, grad_ckpt=ckpt,
                                    recipe=dict(shapes[shape], attn_implementation=attn))))
    # sliding-window layers (Gemma-3: window 1024, masked at 1536 tokens): the window's mask, kept by the
    # checkpoints, is per row once the batch is packed or padded
    for shape in shapes:
        pts.append(("family:gemma3_text", dict(combos["lora-bf16"], seq_len=1536, batch_size=2, grad_ckpt=True,
                                               recipe=dict(shapes[shape]))))
    return pts


def cross_points(n: int = 48, seed: int = 11) -> list[tuple[str, dict]]:
    """Issue 11's numbers ask the trace and the model to agree on a grid that crosses every recipe option with every
    method, precision and checkpointing on a GQA and a non-GQA family; the per-option grids (attn, recipe, shape,
    actoffload, mts) each vary one option over the reference. This one draws `n` configurations (a fixed seed) with
    every option drawn at once: attention implementation, loss, packing or padding, activation offloading, offloaded
    checkpoints, k-bit preparation, adapter dtype, modules_to_save, method, precision and checkpointing; a draw the
    recipe refuses (`TrainConfig` raises) is drawn again (calibrate/reference/trace-points-cross.jsonl)."""
    rng = random.Random(seed)
    methods = [("full", {}), ("lora", dict(rank=16, target_modules=("all-linear",))),
               ("lora", dict(rank=8, target_modules=("q_proj", "v_proj"))),
               ("qlora", dict(rank=16, target_modules=("all-linear",))), ("dora", dict(rank=8, target_modules=("q_proj", "v_proj")))]
    pts: list = []
    while len(pts) < n:
        method, extra = rng.choice(methods)
        ckpt = rng.random() < 0.5
        shape = rng.choice([{}, {"packing": True}, {"padding": "longest"}])
        recipe = dict(shape, attn_implementation=rng.choice(["sdpa", "sdpa", "eager", "flash_attention_2"]),
                      loss=rng.choice(["plain", "chunked", "liger", "cce"]),
                      activation_offload=rng.random() < 0.3, offload_checkpoints=ckpt and rng.random() < 0.3)
        d = dict(extra, method=method, seq_len=rng.choice([256, 512]), batch_size=rng.choice([1, 2]), grad_ckpt=ckpt)
        name, quant = ALIASES.get(method, (method, "none"))
        if quant != "none":
            recipe["kbit_preparation"] = rng.random() < 0.5
        else:
            d["precision"] = rng.choice(["bf16", "bf16", "mixed", "fp16", "fp32"])
        if get_method(name).bf16_adapters:  # LoRA, QLoRA: the adapter dtype and modules_to_save draws
            recipe["adapter_dtype"] = rng.choice(["fp32", "fp32", "bf16"])
            recipe["modules_to_save"] = rng.choice([(), (), ("lm_head",), ("embed_tokens",)])
        if recipe["attn_implementation"] == "flash_attention_2" and shape.get("packing"):
            d["batch_size"] = 1  # flash-attn finds packed rows in a one-row batch only
        try:
            TrainConfig(**d, recipe=recipe)
        except ValueError:
            continue
        pts.append((rng.choice(list(TINY_FAMILIES)), dict(d, recipe=recipe)))
    return pts

# modules_to_save grid: an untied GQA Llama and a tied non-GQA Qwen2 (peft copies a tied module on its own)
MTS_FAMILIES = {
    "tiny-llama-gqa": TINY_FAMILIES["tiny-llama-gqa"],
    "tiny-qwen2-tied": dict(TINY_FAMILIES["tiny-qwen2-mha"], tie_word_embeddings=True),
    # a vocabulary that dwarfs the layers, so that the embedding backward (with CUDA's sort scratch) holds the peak
    "tiny-llama-bigvocab": dict(TINY_FAMILIES["tiny-llama-gqa"], hidden_size=256, intermediate_size=512,
                                num_hidden_layers=2, num_attention_heads=4, vocab_size=131072, max_position_embeddings=16384),
}


def mts_points() -> list[tuple[str, dict]]:
    """peft `modules_to_save` (issue 11 section 6): LoRA and QLoRA x embed_tokens / lm_head / both x checkpointing on
    a tied and an untied tiny family, plus LoRA under mixed precision, short rows, DoRA, IA3, and an embedding
    backward at the peak (a large vocabulary) (calibrate/reference/
    trace-points-mts.jsonl; seconds per point)."""
    saves = (("embed_tokens",), ("lm_head",), ("embed_tokens", "lm_head"))
    pts = []
    for model in ("tiny-llama-gqa", "tiny-qwen2-tied"):
        for method in ("lora", "qlora"):
            for i, mts in enumerate(saves):
                for ckpt in (False, True):
                    # checkpointed points take 2 x 2048 tokens: above 3072 ids CUDA's embedding backward sorts them
                    pts.append((model, dict(method=method, rank=16, target_modules=("all-linear",),
                                            seq_len=2048 if ckpt else 512, batch_size=2 if ckpt else 1 + i % 2,
                                            grad_ckpt=ckpt, recipe={"modules_to_save": mts})))
        if model == "tiny-llama-gqa":
            pts.append((model, dict(method="lora", precision="mixed", rank=16, target_modules=("q_proj", "v_proj"),
                                    seq_len=512, batch_size=2, recipe={"modules_to_save": saves[2]})))
        # short rows: the logits no longer hide the copies' gradients and state (embedding backward, optimizer step)
        method, mts = ("lora", saves[2]) if model == "tiny-llama-gqa" else ("qlora", saves[0])
        pts.append((model, dict(method=method, rank=8, target_modules=("q_proj", "v_proj"), seq_len=64, batch_size=1,
                                recipe={"modules_to_save": mts})))
    pts.append(("tiny-llama-gqa", dict(method="dora", rank=8, target_modules=("q_proj", "v_proj"), seq_len=512,
                                       batch_size=1, recipe={"modules_to_save": ("lm_head",)})))
    pts.append(("tiny-qwen2-tied", dict(method="ia3", seq_len=512, batch_size=2, grad_ckpt=True,
                                        recipe={"modules_to_save": ("embed_tokens",)})))
    # 4096 ids (CUDA sorts them), SGD and Cut Cross-Entropy: the embedding copy's backward is the peak
    pts.append(("tiny-llama-bigvocab", dict(method="lora", rank=8, target_modules=("q_proj", "v_proj"),
                                            lora_dropout=0.0, seq_len=2048, batch_size=2, grad_ckpt=True,
                                            optimizer="sgd", recipe={"loss": "cce", "modules_to_save": ("embed_tokens",)})))
    return pts


def fp16_points() -> list[tuple[str, dict, str]]:
    """`--precision fp16` (autocast fp16 + GradScaler; QLoRA refuses it): full FT and LoRA, with and without
    checkpointing, on both tiny families, on a T4 (sm75: no flash kernel, sdpa runs memory-efficient) and an A100
    (sm80: flash); plus TRL's chunked loss and eager attention on the T4
    (calibrate/reference/trace-points-fp16.jsonl). Returns (family, train dict, gpu profile)."""
    pts = []
    for model in TINY_FAMILIES:
        for gpu in ("t4-16gb", "a100-sxm-80gb"):
            for method in ("full", "lora"):
                for ckpt in (False, True):
                    d = dict(method=method, precision="fp16", seq_len=512, batch_size=1 + ckpt, grad_ckpt=ckpt)
                    if get_method(method).uses_rank:
                        d.update(rank=16, target_modules=("all-linear",))
                    pts.append((model, d, gpu))
        lora = dict(method="lora", precision="fp16", rank=16, target_modules=("all-linear",), seq_len=512)
        pts += [(model, dict(lora, batch_size=2, grad_ckpt=True, recipe={"loss": "chunked"}), "t4-16gb"),
                (model, dict(method="full", precision="fp16", seq_len=512, batch_size=1, grad_ckpt=False,
                             recipe={"loss": "chunked"}), "t4-16gb"),
                (model, dict(lora, batch_size=1, grad_ckpt=False, recipe={"attn_implementation": "eager"}), "t4-16gb"),
                (model, dict(lora, batch_size=2, grad_ckpt=True, recipe={"attn_implementation": "eager"}), "t4-16gb")]
    return pts


def model_arch(model: str):
    """The ModelArch of a catalog name or any small config of these grids (`family_arch`)."""
    return family_arch(model)


REFERENCE = Path(__file__).resolve().parent / "reference"


def read_points(name: str) -> list[dict]:
    """The traced points of `calibrate/reference/<name>`, one JSON object a line."""
    return [json.loads(line) for line in (REFERENCE / name).read_text().splitlines() if line.strip()]


def planned_error(p: dict):
    """(TrainConfig, the analytic `MemoryEstimate`, its peak's relative error against the traced peak) of a traced
    point: built from the config and on the GPU the point records when it records them (attention, fp16 and
    DeepSeek grids, families), else from the grid's named model (`model_arch`) on the H100 the grids trace for."""
    from planner.arch import arch_from_config
    from planner.memory import estimate_memory
    from planner.profiles import load_gpu

    tc = TrainConfig.from_dict(p["train"])
    arch = arch_from_config(p["config"], name=p["model"]) if "config" in p else model_arch(p["model"])
    est = estimate_memory(arch, tc, load_gpu(p["gpu"]) if "gpu" in p else None)
    traced = p["trace"]["peak_allocated_bytes"]
    return tc, est, (est.peak_allocated_bytes - traced) / traced


GRIDS = {"reference": lambda args: structured_points() + random_points(args.random, args.seed),
         "dora": lambda args: dora_points(),
         "families": lambda args: family_points(),
         "moe": lambda args: moe_points(),
         "deepseek": lambda args: deepseek_points(),
         "multigpu": lambda args: multigpu_points(),
         "zero": lambda args: zero_points(),
         "attn": lambda args: attn_points(),
         "recipe": lambda args: recipe_points(),
         "actoffload": lambda args: actoffload_points(),
         "shape": lambda args: shape_points(),
         "mts": lambda args: mts_points(),
         "cross": lambda args: cross_points(),
         "fp16": lambda args: fp16_points()}


def random_points(n: int, seed: int = 0) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    models = [m for m, w in MODELS.items() for _ in range(w)]
    pts = []
    for _ in range(n):
        method = rng.choice(["full", "full", "lora", "lora", "qlora", "qlora", "prefix", "prompt", "ia3"])
        d = dict(
            method=method,
            seq_len=rng.choice([256, 512, 1024, 2048, 4096, 8192]),
            batch_size=rng.choice([1, 1, 2, 4, 8]),
            grad_ckpt=rng.random() < 0.5,
            optimizer=rng.choice(["adamw"] * 4 + ["adamw8bit", "paged_adamw8bit", "sgd", "adafactor"]),
        )
        if d["seq_len"] * d["batch_size"] > 16384:
            d["batch_size"] = max(1, 16384 // d["seq_len"])
        name, quant = ALIASES.get(method, (method, "none"))
        spec = get_method(name)
        if quant == "none":
            d["precision"] = rng.choice(["bf16", "bf16", "mixed"] + (["fp32"] if spec.trains_base else []))
        if spec.uses_rank:
            d["rank"] = rng.choice([4, 8, 16, 32, 64, 128])
            d["target_modules"] = rng.choice([("q_proj", "v_proj"), ("all-linear",), ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")])
            d["lora_dropout"] = rng.choice([0.05, 0.05, 0.1, 0.0])
        if spec.uses_virtual_tokens:
            d["num_virtual_tokens"] = rng.choice([8, 20, 64])
        if not spec.supports_grad_ckpt:
            d["grad_ckpt"] = False  # peft refuses prefix tuning with gradient checkpointing
        pts.append((rng.choice(models), d))
    return pts


def _fix_targets(model: str, d: dict, arch) -> dict:
    if arch.fused_qkv and d.get("target_modules") and d["target_modules"] != ("all-linear",):
        names = set(arch.linear_names)
        mapped = tuple(dict.fromkeys(n if n in names else ("qkv_proj" if n in ("q_proj", "k_proj", "v_proj") else "gate_up_proj") for n in d["target_modules"]))
        d = dict(d, target_modules=mapped)
    return d


def trace_point(i: int, point: tuple, versions: dict) -> tuple:
    """Trace grid point number `i` (`GRIDS`): its record (id t{i:03d}) and the trace result."""
    from .trace import trace_step

    model, d = point[:2]
    rec = {"id": f"t{i:03d}", "model": model}
    if model in ZERO_CONFIGS:
        from planner.arch import arch_from_config

        config = dict(ZERO_CONFIGS[model])
        arch = arch_from_config(config, name=model)
        kw = dict(cuda_workspace_bytes=CUDA_WORKSPACE_H100)
        rec["config"] = config
    elif len(point) > 2 and model not in DEEPSEEK_CONFIGS:  # a tiny family (attention / fp16 grids) on the point's GPU
        from planner.arch import arch_from_config
        from planner.attention import parse_capability
        from planner.memory import cuda_workspace_bytes
        from planner.profiles import load_gpu

        gpu = load_gpu(point[2])
        config = dict(ATTN_FAMILIES.get(model) or TINY_FAMILIES[model])
        arch = arch_from_config(config, name=model)
        kw = dict(cuda_workspace_bytes=cuda_workspace_bytes(gpu), capability=parse_capability(gpu.compute_capability))
        rec.update(config=config, gpu=gpu.name)
    else:
        arch = family_arch(model)
        config = None
        kw = dict(cuda_workspace_bytes=CUDA_WORKSPACE_H100)
        if model.startswith("family:"):  # the config the point was traced from, so a test rebuilds its arch
            rec["config"] = FAMILY_CONFIGS[model.split(":", 1)[1]]
        elif model in MOE_CONFIGS:
            rec["config"] = MOE_CONFIGS[model]
        elif model in SMALL_VOCAB:
            rec["config"] = SMALL_VOCAB[model]
        elif model in DEEPSEEK_CONFIGS:
            rec["config"] = DEEPSEEK_CONFIGS[model]
            if len(point) > 2:  # another GPU than the H100: its workspace and sdpa dispatch
                from planner.attention import parse_capability
                from planner.memory import cuda_workspace_bytes
                from planner.profiles import load_gpu

                gpu = load_gpu(point[2])
                kw = dict(cuda_workspace_bytes=cuda_workspace_bytes(gpu),
                          capability=parse_capability(gpu.compute_capability))
                rec["gpu"] = gpu.name
    d = _fix_targets(model, d, arch)
    tc = TrainConfig(**d)
    if config is None:
        config = dict(arch.config, max_position_embeddings=max(16384, tc.seq_len + tc.num_virtual_tokens))
        config.pop("rope_scaling", None)
    if tc.num_gpus > 1 and tc.strategy in ("zero2", "zero3"):
        from .trace_zero import trace_zero_step

        r = trace_zero_step(config, tc, **kw)
    elif tc.num_gpus > 1:
        from .trace_multigpu import trace_sharded_step

        r = trace_sharded_step(config, tc, **kw)
    else:
        r = trace_step(config, tc, **kw)
    rec.update({"train": tc.to_dict(), "trace": r.to_dict(), "versions": versions})
    if hasattr(r, "phase_by_tag"):  # the ZeRO trace: each phase's peak by tag
        rec["trace"]["phase_by_tag"] = r.phase_by_tag
    return rec, r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="calibrate/reference/trace-points.jsonl")
    ap.add_argument("--random", type=int, default=150, help="random points on top of the structured ones")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="stop after this many points (0 = all)")
    ap.add_argument("--append", action="store_true",
                    help="keep the points already in --out (byte for byte) and trace only the grid's points after them")
    ap.add_argument("--grid", choices=tuple(GRIDS), default="reference",
                    help="reference: the main grid; dora: DoRA/rsLoRA points (calibrate/reference/trace-points-dora.jsonl); "
                         "families: issue 13's dense families (calibrate/reference/trace-points-families.jsonl), "
                         "moe: MoE families (calibrate/reference/trace-points-moe.jsonl), "
                         "deepseek: DeepSeek-V3 (calibrate/reference/trace-points-deepseek.jsonl), "
                         "multigpu: FSDP2 points (calibrate/reference/trace-points-multigpu.jsonl), "
                         "zero: DeepSpeed ZeRO-2/3, real 2-process runs (calibrate/reference/trace-points-zero.jsonl), "
                         "attn: attention implementations and kernels (calibrate/reference/trace-points-attn.jsonl), "
                         "recipe: losses x precisions x methods (calibrate/reference/trace-points-recipe.jsonl), "
                         "actoffload: activation offloading (calibrate/reference/trace-points-actoffload.jsonl), "
                         "shape: packing and padding (calibrate/reference/trace-points-shape.jsonl), "
                         "mts: peft modules_to_save (calibrate/reference/trace-points-mts.jsonl), "
                         "cross: every recipe option drawn at once (calibrate/reference/trace-points-cross.jsonl), "
                         "fp16: fp16 autocast on sm75 and sm80 (calibrate/reference/trace-points-fp16.jsonl)")
    args = ap.parse_args(argv)

    import torch
    import transformers
    import peft

    points = GRIDS[args.grid](args)
    if args.limit:
        points = points[: args.limit]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import trl

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "trl": trl.__version__}
    t0 = time.time()
    first = 0
    if args.append and out.exists():
        first = sum(1 for line in out.read_text().splitlines() if line.strip())
    with out.open("a" if args.append else "w") as f:
        for i, point in enumerate(points):
            if i < first:
                continue
            rec, r = trace_point(i, point, versions)
            tc = TrainConfig(**rec["train"])
            model = rec["model"]
            f.write(json.dumps(rec) + "\n")
            f.flush()
            el = time.time() - t0
            print(f"[{i + 1}/{len(points)}] {model} {tc.describe()}: {r.peak_allocated_bytes / 2**30:.2f} GiB "
                  f"at {r.peak_phase} ({r.seconds:.1f}s, eta {el / (i + 1 - first) * (len(points) - i - 1):.0f}s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
