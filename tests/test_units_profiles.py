"""Units, profile files (schema, aliases, sources), and the plan file round trip."""

import tomllib
from pathlib import Path

import pytest

from planner.config import TrainConfig
from planner.planfile import PlanFile, Schedule, read_plan, write_plan
from planner.profiles import gpu_from_nvml_name, list_gpus, list_models, load_gpu, prices_for, profiles_dir, resolve_model
from planner.units import GB, GIB, fmt_bytes, fmt_gib, parse_count, round_up


def test_units_keep_gib_and_gb_apart():
    assert GIB == 2**30 and GB == 10**9
    assert fmt_gib(80 * GIB) == "80.00 GiB"
    assert fmt_bytes(1536) == "1.5 KiB" and fmt_bytes(3 * 2**40) == "3.00 TiB"
    assert parse_count("50M") == 50_000_000 and parse_count("1.5B") == 1_500_000_000 and parse_count("200k") == 200_000
    assert round_up(1, 512) == 512 and round_up(0, 512) == 0
    with pytest.raises(ValueError, match="50M"):
        parse_count("a lot")


def test_every_gpu_profile_has_units_and_sources():
    seen = set()
    for g in list_gpus():
        assert g.memory_bytes > 8 * GIB and g.source.startswith("http") and g.memory_source
        assert g.peak_tflops > 0 and g.hbm_bandwidth_gb_per_s > 100
        for a in g.aliases:
            assert a not in seen, f"alias {a} used twice"
            seen.add(a)
    for alias, name in {"a100-80": "a100-sxm-80gb", "a100-40": "a100-sxm-40gb", "h100-80": "h100-sxm-80gb",
                        "4090": "rtx-4090-24gb", "l4": "l4-24gb", "v100-32": "v100-sxm2-32gb", "h200": "h200-sxm-141gb"}.items():
        assert load_gpu(alias).name == name


def test_nvml_names_match_most_specific():
    assert gpu_from_nvml_name("NVIDIA L40S").name == "l40s-48gb"
    assert gpu_from_nvml_name("NVIDIA L4").name == "l4-24gb"
    assert gpu_from_nvml_name("NVIDIA H100 80GB HBM3").name == "h100-sxm-80gb"
    assert gpu_from_nvml_name("Some Future Accelerator") is None


def test_every_model_profile_has_a_source_and_resolves_by_alias_and_hf_id():
    models = list_models()
    assert {"llama-2-7b", "llama-3.1-70b", "qwen2.5-72b", "gemma-2-27b", "phi-3-mini", "mistral-7b"} <= {m.name for m in models}
    for m in models:
        assert m.hf_id and m.source
        assert resolve_model(m.hf_id)[0].name == m.name
    assert resolve_model("70b")[1] == "70b -> llama-3.1-70b"
    assert resolve_model("7b")[0].name == "llama-2-7b"


def test_prices_have_dates_and_sources():
    raw = tomllib.loads((profiles_dir() / "prices.toml").read_text())["price"]
    gpus = {g.name for g in list_gpus()}
    for row in raw:
        assert row["gpu"] in gpus and row["usd_per_gpu_hour"] > 0 and row["source"].startswith("http") and row["as_of"]
    rows = prices_for("h100-sxm-80gb")
    assert rows == sorted(rows, key=lambda p: p.usd_per_gpu_hour)


def test_plan_file_round_trip(tmp_path: Path):
    tc = TrainConfig(method="qlora", rank=32, target_modules=("all-linear",), seq_len=4096, batch_size=2, grad_accum=8,
                     grad_ckpt=True, optimizer="paged_adamw8bit")
    pf = PlanFile(model="llama-3.1-8b", train=tc, gpu="rtx-4090-24gb", schedule=Schedule(learning_rate=1e-4, epochs=2),
                  prediction={"device_bytes": 123, "tokens_per_s": 1.5}, fallback=[{"batch_size": 1, "grad_accum": 16}])
    path = tmp_path / "plan.toml"
    write_plan(pf, path)
    back = read_plan(path)
    assert back.train == tc and back.gpu == "rtx-4090-24gb" and back.schedule.learning_rate == 1e-4
    assert back.fallback_configs()[0].batch_size == 1 and back.prediction["device_bytes"] == 123
    assert "# gradient checkpointing" in path.read_text()  # a person can read what to edit


@pytest.mark.parametrize("edit, error", [
    ("method = \"qlora\"", "method"),
    ("rank = 32", None),
])
def test_plan_file_errors_name_the_field(tmp_path, edit, error):
    path = tmp_path / "plan.toml"
    write_plan(PlanFile(model="8b", train=TrainConfig(method="qlora")), path)
    text = path.read_text().replace('method = "qlora"', 'method = "qlora2"')
    path.write_text(text)
    with pytest.raises(ValueError, match="method"):
        read_plan(path)
    path.write_text(text.replace('method = "qlora2"', 'method = "lora"').replace("[schedule]", "[schedule]\nlearning_rat = 1"))
    with pytest.raises(ValueError, match="learning_rat"):
        read_plan(path)
