"""Generate trace reference points: `python -m calibrate.trace_grid --out calibrate/reference/trace-points.jsonl`
(and `--grid dora --out calibrate/reference/trace-points-dora.jsonl`,
`--grid families --out calibrate/reference/trace-points-families.jsonl`, `--grid moe --out
calibrate/reference/trace-points-moe.jsonl`, `--grid multigpu --out calibrate/reference/trace-points-multigpu.jsonl`,
`--grid attn --out calibrate/reference/trace-points-attn.jsonl`, `--grid recipe --out
calibrate/reference/trace-points-recipe.jsonl`).

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
    if model in TINY_FAMILIES:
        return arch_from_config(TINY_FAMILIES[model])
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


def moe_points() -> list[tuple[str, dict]]:
    """MoE families (issue 13 item 2): full FT and LoRA on the attention projections, with and without
    checkpointing, the optimizers, dropout on and off, dense-first layers, a shared expert, Mixtral's fp32 routing
    weights; and two full-size catalog models. Small configs are named in MOE_CONFIGS (their config travels in the
    record), catalog ones by name."""
    qv, qkvo = ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")
    pts = []
    for model in [m for m in MOE_CONFIGS if not m.endswith("-v512")]:
        for ckpt in (False, True):
            pts += [
                (model, dict(method="full", precision="bf16", seq_len=1024, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="lora", rank=16, target_modules=qv, seq_len=2048, batch_size=2, grad_ckpt=ckpt)),
                (model, dict(method="lora", rank=8, target_modules=qkvo, lora_dropout=0.0, seq_len=1024, batch_size=4,
                             grad_ckpt=ckpt)),
            ]
    for model in [m for m in MOE_CONFIGS if m.endswith("-v512")]:
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
    return pts


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
    return pts + multigpu_offload_qlora_points()


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


def model_arch(model: str):
    """The ModelArch of a catalog name or any small config of these grids (`family_arch`)."""
    return family_arch(model)


GRIDS = {"reference": lambda args: structured_points() + random_points(args.random, args.seed),
         "dora": lambda args: dora_points(),
         "families": lambda args: family_points(),
         "moe": lambda args: moe_points(),
         "multigpu": lambda args: multigpu_points(),
         "attn": lambda args: attn_points(),
         "recipe": lambda args: recipe_points()}


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


def main(argv=None) -> int:
    from .trace import trace_step

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
                         "multigpu: FSDP2 points (calibrate/reference/trace-points-multigpu.jsonl), "
                         "attn: attention implementations and kernels (calibrate/reference/trace-points-attn.jsonl), "
                         "recipe: losses x precisions x methods (calibrate/reference/trace-points-recipe.jsonl)")
    args = ap.parse_args(argv)

    import torch
    import transformers
    import peft

    points = GRIDS[args.grid](args)
    if args.limit:
        points = points[: args.limit]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    t0 = time.time()
    first = 0
    if args.append and out.exists():
        first = sum(1 for line in out.read_text().splitlines() if line.strip())
    with out.open("a" if args.append else "w") as f:
        for i, point in enumerate(points):
            if i < first:
                continue
            model, d = point[:2]
            rec = {"id": f"t{i:03d}", "model": model}
            if model in ATTN_FAMILIES:  # a tiny family of the attention grid, on the point's GPU
                from planner.arch import arch_from_config
                from planner.attention import parse_capability
                from planner.memory import cuda_workspace_bytes
                from planner.profiles import load_gpu

                gpu = load_gpu(point[2])
                arch = arch_from_config(ATTN_FAMILIES[model], name=model)
                config = dict(ATTN_FAMILIES[model])
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
            d = _fix_targets(model, d, arch)
            tc = TrainConfig(**d)
            if config is None:
                config = dict(arch.config, max_position_embeddings=max(16384, tc.seq_len + tc.num_virtual_tokens))
                config.pop("rope_scaling", None)
            if tc.num_gpus > 1:
                from .trace_multigpu import trace_sharded_step

                r = trace_sharded_step(config, tc, **kw)
            else:
                r = trace_step(config, tc, **kw)
            rec.update({"train": tc.to_dict(), "trace": r.to_dict(), "versions": versions})
            f.write(json.dumps(rec) + "\n")
            f.flush()
            el = time.time() - t0
            print(f"[{i + 1}/{len(points)}] {model} {tc.describe()}: {r.peak_allocated_bytes / 2**30:.2f} GiB "
                  f"at {r.peak_phase} ({r.seconds:.1f}s, eta {el / (i + 1 - first) * (len(points) - i - 1):.0f}s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
