"""`planner.configfile`: a TRL, an Axolotl and a LLaMA-Factory YAML, each of its framework's real shape, mapped to
ftplan options; the keys read, the defaults applied, the keys ignored; bad files and values.

These test the mapping itself (the options it produces), not whether this build's planner models every value yet;
tests/test_cli_config.py takes the same files through the commands."""

from __future__ import annotations

import textwrap

import pytest

from planner.configfile import ConfigFileError, build_values, detect_framework, load_config, map_config

# the shape `trl sft --config` takes: ScriptArguments + SFTConfig + ModelConfig keys in one file
# (trl/scripts/sft.py; examples/cli_configs/example_config.yaml)
TRL = """\
model_name_or_path: Qwen/Qwen2.5-0.5B
dataset_name: trl-lib/Capybara
output_dir: Qwen2.5-0.5B-SFT
use_peft: true
lora_r: 32
lora_alpha: 16
lora_target_modules: [q_proj, k_proj, v_proj, o_proj]
max_length: 4096
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
learning_rate: 2.0e-4
num_train_epochs: 1
packing: true
report_to: none
eval_strategy: "no"
"""

# Axolotl's examples/llama-3/qlora.yml, with sample packing, FlashAttention 2 and the Cut Cross-Entropy plugin
AXOLOTL = """\
base_model: NousResearch/Meta-Llama-3.1-8B
load_in_4bit: true
adapter: qlora
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
sequence_len: 4096
sample_packing: true
pad_to_sequence_len: true
flash_attention: true
plugins:
  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin
cut_cross_entropy: true
micro_batch_size: 2
gradient_accumulation_steps: 4
gradient_checkpointing: true
optimizer: paged_adamw_8bit
bf16: auto
datasets:
  - path: mlabonne/FineTome-100k
    type: chat_template
output_dir: ./outputs/qlora-out
num_epochs: 1
learning_rate: 0.0002
lr_scheduler: cosine
wandb_project:
special_tokens:
  pad_token: <|end_of_text|>
"""

# LLaMA-Factory's examples/train_lora/llama3_lora_sft.yaml with Liger kernels
LLAMAFACTORY = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true
### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 16
lora_target: all
enable_liger_kernel: true
### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
"""


def _load(tmp_path, text: str, name: str = "c.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return load_config(p)


def test_trl_sft_config(tmp_path):
    m = _load(tmp_path, TRL)
    assert m.framework == "trl" and m.model == "Qwen/Qwen2.5-0.5B"
    o = m.options
    assert (o["method"], o["rank"], o["lora_alpha"], o["seq_len"], o["batch_size"], o["grad_accum"]) == (
        "lora", 32, 16, 4096, 4, 2)
    assert o["target_modules"] == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert "quant" not in o and "kbit_preparation" not in o  # a 16-bit base: nothing to prepare
    # TRL's own defaults where the file is silent (sft_config.py, base_config.py, model_config.py)
    assert o["grad_ckpt"] is True and "grad_ckpt" in m.defaults
    assert o["loss"] == "chunked" and "fused LM head" in m.defaults["loss"]  # TRL 1.16: loss_type "nll"
    assert o["precision"] == "mixed" and "float32" in m.defaults["precision"]  # fp32 weights, bf16 autocast
    assert o["attn_implementation"] == "sdpa" and o["optimizer"] == "adamw"
    assert o["lora_dropout"] == 0.05
    assert o["packing"] is True  # packing with strategy bfd (default) is padding-free
    assert m.read["packing"] is True and "use_peft" in m.read
    assert {"dataset_name", "output_dir", "report_to", "eval_strategy"} <= set(m.ignored) and not m.unknown
    assert m.schedule == {"learning_rate": 2e-4, "epochs": 1}


def test_trl_liger_and_offload_switches(tmp_path):
    m = _load(tmp_path, """\
        model_name_or_path: Qwen/Qwen2.5-0.5B
        activation_offloading: true
        gradient_checkpointing_kwargs: {use_reentrant: false, offload: true}
        dtype: bfloat16
        load_in_4bit: true
        use_peft: true
        packing: true
        packing_strategy: wrapped
        """)
    o = m.options
    assert o["loss"] == "chunked"
    assert o["activation_offload"] is True and o["offload_checkpoints"] is True
    assert o["precision"] == "bf16" and o["quant"] == "nf4"
    assert o["kbit_preparation"] is False  # SFTTrainer does not call prepare_model_for_kbit_training
    assert o["packing"] is False and any("wrapped" in n for n in m.notes)


def test_axolotl_qlora_packing_flash_cce(tmp_path):
    m = _load(tmp_path, AXOLOTL)
    assert m.framework == "axolotl" and m.model == "NousResearch/Meta-Llama-3.1-8B"
    o = m.options
    assert (o["method"], o["quant"], o["rank"], o["lora_alpha"], o["lora_dropout"]) == ("lora", "nf4", 32, 16, 0.05)
    assert o["target_modules"] == ("all-linear",)
    assert (o["seq_len"], o["batch_size"], o["grad_accum"], o["grad_ckpt"]) == (4096, 2, 4, True)
    assert o["attn_implementation"] == "flash_attention_2"  # legacy flash_attention flag
    assert o["loss"] == "cce" and o["packing"] is True
    assert o["optimizer"] == "paged_adamw8bit" and o["precision"] == "bf16"
    assert o["kbit_preparation"] is True and "prepare_model_for_kbit_training" in m.defaults["kbit_preparation"]
    assert m.source["loss"].startswith("plugins")
    assert {"datasets", "output_dir", "wandb_project", "special_tokens"} <= set(m.ignored) and not m.unknown
    assert m.schedule["lr_scheduler"] == "cosine"


def test_axolotl_defaults_and_plugin_required(tmp_path):
    m = _load(tmp_path, """\
        base_model: meta-llama/Llama-3.1-8B
        cut_cross_entropy: true
        liger_fused_linear_cross_entropy: true
        gradient_checkpointing: offload
        some_new_axolotl_key: 3
        """)
    o = m.options
    # no adapter: full fine-tuning; Axolotl's own defaults (sequence_len 512, micro_batch_size 1)
    assert (o["method"], o["seq_len"], o["batch_size"], o["grad_accum"]) == ("full", 512, 1, 1)
    assert o["loss"] == "plain" and any("plugin" in n for n in m.notes)  # options without their plugin: ignored
    assert o["grad_ckpt"] is True and o["offload_checkpoints"] is True
    assert o["attn_implementation"] == "sdpa" and o["precision"] == "bf16"
    assert m.unknown == ("some_new_axolotl_key",)


def test_llamafactory_lora_liger(tmp_path):
    m = _load(tmp_path, LLAMAFACTORY)
    assert m.framework == "llamafactory" and m.model == "meta-llama/Meta-Llama-3-8B-Instruct"
    o = m.options
    assert (o["method"], o["rank"], o["lora_alpha"], o["lora_dropout"]) == ("lora", 16, 32, 0.0)
    assert o["target_modules"] == ("all-linear",)
    assert o["loss"] == "liger" and o["precision"] == "bf16"
    assert (o["seq_len"], o["batch_size"], o["grad_accum"]) == (2048, 1, 8)
    assert o["grad_ckpt"] is True and "disable_gradient_checkpointing" in m.defaults["grad_ckpt"]
    assert o["attn_implementation"] == "sdpa" and o["packing"] is False
    assert any("use_reentrant_gc" in n for n in m.notes)
    assert {"dataset", "template", "output_dir", "ddp_timeout", "trust_remote_code"} <= set(m.ignored)
    assert not m.unknown


def test_llamafactory_qlora_full_and_offloads(tmp_path):
    m = _load(tmp_path, """\
        model_name_or_path: meta-llama/Meta-Llama-3-8B
        finetuning_type: lora
        quantization_bit: 4
        flash_attn: fa2
        neat_packing: true
        use_unsloth_gc: true
        pure_bf16: true
        """)
    o = m.options
    assert (o["quant"], o["attn_implementation"], o["packing"], o["offload_checkpoints"]) == (
        "nf4", "flash_attention_2", True, True)
    assert o["kbit_preparation"] is False and o["adapter_dtype"] == "bf16"
    full = _load(tmp_path, "model_name_or_path: x/y\nfinetuning_type: full\nbf16: true\n", "f.yaml").options
    assert full["method"] == "full" and full["precision"] == "mixed"  # trainable params upcast to fp32


def test_deepspeed_json_and_fsdp(tmp_path):
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}')
    m = _load(tmp_path, "model_name_or_path: x/y\ndeepspeed: ds.json\n")
    assert m.options["strategy"] == "zero3" and m.options["cpu_offload"] is True
    assert any("--num-gpus" in n for n in m.notes)
    m = _load(tmp_path, "base_model: x/y\ndeepspeed: deepspeed_configs/zero2.json\n")  # Axolotl's shipped name
    assert m.options["strategy"] == "zero2" and any("from its name" in n for n in m.notes)
    m = _load(tmp_path, "model_name_or_path: x/y\nfsdp: full_shard offload auto_wrap\n")
    assert m.options["strategy"] == "fsdp" and m.options["cpu_offload"] is True


@pytest.mark.parametrize("text,key", [
    ("model_name_or_path: x/y\nload_in_8bit: true\nuse_peft: true\n", "load_in_8bit"),
    ("model_name_or_path: x/y\nloss_type: dft\n", "loss_type"),
    ("model_name_or_path: x/y\nuse_liger_kernel: true\n", "use_liger_kernel"),  # TRL 1.16: Liger's layer kernels only
    ("model_name_or_path: x/y\nattn_implementation: flash_attention_3\n", "attn_implementation"),
    ("model_name_or_path: x/y\noptim: lomo\n", "optim"),
    ("model_name_or_path: x/y\ngradient_checkpointing_kwargs: {every_n_layers: 2}\n", "gradient_checkpointing_kwargs"),
    ("model_name_or_path: x/y\ntorch_compile: true\n", "torch_compile"),
    ("model_name_or_path: x/y\nper_device_train_batch_size: four\n", "per_device_train_batch_size"),
    ("base_model: x/y\nadapter: ia3\n", "adapter"),
    ("base_model: x/y\nactivation_offloading: disk\n", "activation_offloading"),
    ("base_model: x/y\ngradient_checkpointing: offload_disk\n", "gradient_checkpointing"),
    ("base_model: x/y\nxformers_attention: true\n", "xformers_attention"),
    ("base_model: x/y\ndeepspeed: my_ds.json\n", "deepspeed"),
    ("model_name_or_path: x/y\nfinetuning_type: freeze\n", "finetuning_type"),
    ("model_name_or_path: x/y\nquantization_bit: 8\n", "quantization_bit"),
    ("model_name_or_path: x/y\ncutoff_len: 2048\nflash_attn: fa3\n", "flash_attn"),
])
def test_value_ftplan_cannot_map_names_key_and_choices(tmp_path, text, key):
    with pytest.raises(ConfigFileError) as e:
        _load(tmp_path, text)
    assert e.value.key == key and str(e.value).startswith(key)
    assert "valid" in str(e.value)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n", "learning_rate: 1e-4\nseed: 3\n"])
def test_file_of_none_of_the_three_shapes(tmp_path, text):
    with pytest.raises(ConfigFileError, match="TRL SFTConfig, Axolotl or LLaMA-Factory"):
        _load(tmp_path, text)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigFileError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model_name_or_path: [unclosed\n")
    with pytest.raises(ConfigFileError, match="not valid YAML .line"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "code.yaml").write_text("model_name_or_path: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigFileError, match="not valid YAML"):  # safe_load: nothing is executed
        load_config(tmp_path / "code.yaml")


def test_detection_by_keys():
    assert detect_framework({"base_model": "x", "sequence_len": 1}) == "axolotl"
    assert detect_framework({"model_name_or_path": "x", "cutoff_len": 1}) == "llamafactory"
    assert detect_framework({"model_name_or_path": "x", "max_length": 1}) == "trl"
    assert detect_framework({"per_device_train_batch_size": 2, "use_peft": True}) == "trl"


def test_build_values_splits_fields_and_lets_overrides_win(tmp_path):
    m = _load(tmp_path, AXOLOTL)
    train, recipe = build_values(m, {"batch_size": 8, "seq_len": 1024})
    assert train["batch_size"] == 8 and train["seq_len"] == 1024 and train["method"] == "lora"
    assert recipe["loss"] == "cce" and recipe["packing"] is True and "loss" not in train
    # an option this build has no field for: dropped when it is the reference value, else named with its key
    m2 = map_config({"base_model": "x/y"}, "a.yaml")
    m2.options["adapter_dtype"] = "fp32"
    m2.options["unheard_of"] = 1
    m2.source["unheard_of"] = "some_key"
    with pytest.raises(ConfigFileError, match="some_key"):
        build_values(m2)


def test_keys_without_effect_are_listed_as_ignored(tmp_path):
    m = _load(tmp_path, "model_name_or_path: x/y\nuse_peft: false\nlora_r: 64\nlora_alpha: 128\nloss_type: nll\n")
    assert m.options["method"] == "full" and "rank" not in m.options
    assert {"lora_r", "lora_alpha"} <= set(m.ignored) and not m.unknown


@pytest.mark.parametrize("extra, padding, note", [
    ("per_device_train_batch_size: 4\n", "longest", None),  # TRL's collator pads each batch to its longest row
    ("per_device_train_batch_size: 1\n", "none", None),  # one row: nothing to pad
    ("per_device_train_batch_size: 1\npad_to_multiple_of: 64\n", "longest", None),
    ("per_device_train_batch_size: 4\npadding_free: true\n", None, None),  # padding-free: packing instead
    ("per_device_train_batch_size: 4\nattn_implementation: flash_attention_2\n", "longest", None),
])
def test_trl_rows_are_padded_to_the_longest_without_packing(tmp_path, extra, padding, note):
    m = _load(tmp_path, "model_name_or_path: Qwen/Qwen2.5-0.5B\nuse_peft: true\n" + extra)
    assert m.options.get("padding") == padding
    if padding is not None:
        assert "padding" in m.defaults
    if note:
        assert any(note in n for n in m.notes)


def test_axolotl_and_llamafactory_pad_each_batch_to_its_longest_row_unless_packing(tmp_path):
    """Axolotl's DataCollatorForSeq2Seq (padding=True, pad_to_multiple_of 64) and LLaMA-Factory's
    SFTDataCollatorWith4DAttentionMask (pad_to_multiple_of 8) pad to the longest row: an attention mask with zeros
    reaches the model even at one row per batch (the rounding); packed rows are padding-free."""
    axo = "base_model: NousResearch/Meta-Llama-3-8B\nadapter: lora\nsequence_len: 1000\nmicro_batch_size: 1\n"
    m = _load(tmp_path, axo)
    assert m.framework == "axolotl" and m.options["padding"] == "longest" and "padding" in m.defaults
    assert _load(tmp_path, axo + "pad_to_sequence_len: true\n", "p.yaml").source["padding"] == "pad_to_sequence_len"
    assert "padding" not in _load(tmp_path, axo + "sample_packing: true\n", "s.yaml").options
    lf = "model_name_or_path: meta-llama/Meta-Llama-3-8B\nfinetuning_type: lora\nstage: sft\n"
    m = _load(tmp_path, lf, "lf.yaml")
    assert m.framework == "llamafactory" and m.options["padding"] == "longest"
    assert "padding" not in _load(tmp_path, lf + "neat_packing: true\n", "n.yaml").options
    assert "padding" not in _load(tmp_path, lf + "packing: true\n", "k.yaml").options  # full-length rows
