"""`ftplan calibrate fit` and the throughput model it fits: few named physical parameters, the error before and
after, the committed H100 file reproducible from the records, and recovery of known parameters."""

from __future__ import annotations

import json
import shutil
import statistics
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from calibrate import fit
from calibrate.record import RESULTS_DIR, load_records, new_record, write_record
from planner.arch import arch_from_config
from planner.cli import cli
from planner.config import TrainConfig
from planner.cost import (
    FITTED,
    PARTS,
    ThroughputParams,
    flops_per_token,
    gemm_seconds,
    method_key,
    throughput,
    throughput_params,
)
from planner.kernels import step_ops
from planner.memory import batch_free
from planner.profiles import load_gpu, load_model

ROOT = Path(__file__).resolve().parent.parent
H100_TOML = ROOT / "profiles" / "calibration" / "h100-sxm-80gb.toml"
PARAMETER_NAMES = set(FITTED) | {"allocator_overhead", "cuda_context_bytes"}


def run(*args, code=0, env=None):
    r = CliRunner().invoke(cli, list(args), env=env)
    assert r.exit_code == code, r.output + (repr(r.exception) if r.exception and code == 0 else "")
    assert "Traceback" not in r.output
    return r


@pytest.fixture(scope="module")
def h100_fit():
    return fit.fit_gpu(load_records([RESULTS_DIR / "h100-sxm-80gb"]), "h100-sxm-80gb")


# -- the fit on the shipped H100 records -------------------------------------------------------------------------


def test_fit_improves_on_the_priors_and_reports_held_out_error(h100_fit):
    e = h100_fit.errors
    assert e["after"]["tokens_per_s"]["n"] == 8
    assert e["after"]["tokens_per_s"]["median"] < e["defaults"]["tokens_per_s"]["median"]
    loo = e["leave_one_out"]["tokens_per_s"]
    assert loo["n"] == 8 and loo["median"] >= e["after"]["tokens_per_s"]["median"]  # the honest, larger figure
    assert loo["median"] < 0.10  # issue 14's target (its other, no record over 25%, is not met: reports/throughput-loo.md)
    assert e["after"]["reserved"]["max"] < 0.10
    x = h100_fit.expected_error
    assert x["calibrated"] == loo["median"] < x["transferred"] < x["extrapolated"]


def test_parameters_are_few_named_and_physical(h100_fit):
    names = [p.name for p in h100_fit.parameters]
    assert set(names) == PARAMETER_NAMES and len(names) == len(set(names))
    fitted = [p for p in h100_fit.parameters if p.how == "fitted"]
    assert len(fitted) == len(FITTED) < len(h100_fit.record_ids)  # fewer than the records, none per method
    p = h100_fit.params
    for k in FITTED:
        lo, hi = fit.BOUNDS[k]
        assert lo <= getattr(p, k) <= hi, k
    assert p.architecture == "hopper"
    ratios = [r["measured"]["peak_reserved_bytes"] / r["measured"]["peak_allocated_bytes"] - 1
              for r in load_records([RESULTS_DIR / "h100-sxm-80gb"])]
    assert p.allocator_overhead == pytest.approx(statistics.median(ratios))
    assert p.cuda_context_bytes == ThroughputParams().cuda_context_bytes  # no NVML in the imported records
    assert {q.name: q.how for q in h100_fit.parameters}["cuda_context_bytes"] == "default"


def test_the_committed_h100_file_is_what_the_fit_writes(h100_fit):
    """profiles/calibration/h100-sxm-80gb.toml is reproducible: `ftplan calibrate fit --gpu h100-sxm-80gb`."""
    text = fit.render_toml(h100_fit, "ftplan calibrate fit --gpu h100-sxm-80gb", ["calibrate/results"])
    assert H100_TOML.read_text() == text, "records changed: rerun `ftplan calibrate fit --gpu h100-sxm-80gb`"
    d = tomllib.loads(text)
    assert d["gpu"] == "h100-sxm-80gb" and d["architecture"] == "hopper" and set(FITTED) <= set(d)
    assert set(d["expected_error"]) == {"calibrated", "transferred", "extrapolated"}
    assert "leave-one-out" in text and "after (this fit)" in text and "Written by `ftplan calibrate fit" in text


def test_estimate_and_recommend_say_they_use_the_calibration():
    throughput_params.cache_clear()
    p = throughput_params("h100-sxm-80gb")
    assert p.source.startswith("profiles/calibration/h100-sxm-80gb.toml, calibrated, expected error ")
    d = json.loads(run("estimate", "--model", "llama-2-7b", "--gpu", "h100", "--json").output)
    assert d["calibration"] == p.source
    assert d["tokens_per_s_provenance"] == "calibrated" and 0 < d["tokens_per_s_expected_error"] < 1
    assert "[profiles/calibration/h100-sxm-80gb.toml, calibrated" in run("estimate", "--model", "7b", "--gpu", "h100").output
    out = run("recommend", "--model", "7b", "--gpu", "a100-80").output
    assert "profiles/calibration/h100-sxm-80gb.toml, extrapolated to a100-sxm-80gb, expected error" in out


def test_each_gpu_says_calibrated_transferred_or_extrapolated():
    """Hopper GPUs without records take the H100's per-architecture values (transferred); others extrapolate,
    with a wider expected error; a transferred GPU is timed from its own peaks and SM count."""
    throughput_params.cache_clear()
    h100, h200, a100 = (throughput_params(g) for g in ("h100-sxm-80gb", "h200-sxm-141gb", "a100-sxm-80gb"))
    assert (h100.provenance, h200.provenance, a100.provenance) == ("calibrated", "transferred", "extrapolated")
    assert h100.expected_error < h200.expected_error < a100.expected_error
    assert h200.gemm_efficiency == h100.gemm_efficiency
    arch, tc = load_model("llama-3.1-8b"), TrainConfig(method="lora", batch_size=4)
    t100 = throughput(arch, tc, load_gpu("h100"))
    t200 = throughput(arch, tc, load_gpu("h200"))
    tpcie = throughput(arch, tc, load_gpu("h100-pcie-80gb"))
    assert tpcie.tokens_per_s < t100.tokens_per_s < t200.tokens_per_s  # fewer SMs / less bandwidth; more bandwidth
    assert t200.provenance == "transferred" and t200.expected_error == h200.expected_error


def test_fit_cli_prints_before_and_after_and_dry_run_writes_nothing():
    before = H100_TOML.read_bytes()
    r = run("calibrate", "fit", "--gpu", "h100", "--dry-run")
    for needle in ("before (in effect)", "after (this fit)", "leave-one-out", "launch_seconds", "held out",
                   "dry run"):
        assert needle in r.output
    assert H100_TOML.read_bytes() == before
    d = json.loads(run("calibrate", "fit", "--dry-run", "--json").output)
    assert [x["gpu"] for x in d] == ["h100-sxm-80gb"] and d[0]["written"] is None
    assert d[0]["errors"]["after"]["tokens_per_s"]["median"] < d[0]["errors"]["defaults"]["tokens_per_s"]["median"]


def test_fit_writes_the_file_where_profiles_live(tmp_path):
    prof = tmp_path / "profiles"
    shutil.copytree(ROOT / "profiles", prof)
    (prof / "calibration" / "h100-sxm-80gb.toml").unlink()
    try:
        r = run("calibrate", "fit", "--gpu", "h100-sxm-80gb", env={"FTPLAN_PROFILES": str(prof)})
        written = prof / "calibration" / "h100-sxm-80gb.toml"
        assert f"wrote {written}" in r.output
        assert written.read_text() == H100_TOML.read_text()
        assert "before (in effect)" in r.output
    finally:
        throughput_params.cache_clear()


@pytest.mark.parametrize("args, hint", [
    (["--gpu", "no-such-gpu"], "--gpu"),
    (["--gpu", "a100-80"], "GPUs with records: h100-sxm-80gb"),
    (["--results", "/nonexistent"], "--results"),
])
def test_fit_usage_errors(args, hint):
    assert hint in run("calibrate", "fit", *args, code=2).output


def test_fit_without_cuda_records_is_a_usage_error(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300}
    write_record(new_record(kind="calibrate", model_name="tiny", model_config=cfg, train=TrainConfig(seq_len=32).to_dict(),
                            measured={"device": "cpu", "tokens_per_s": 100.0}), tmp_path)
    assert "no CUDA records" in run("calibrate", "fit", "--results", str(tmp_path), code=2).output


# -- the fit recovers what generated the data ----------------------------------------------------------------------


def _synthetic(tmp_path, truth: ThroughputParams, gpu, context=None) -> list[dict]:
    """Records whose tokens/s and reserved memory are exactly what `truth` predicts, over sizes and methods."""
    from planner.plan import make_plan

    out = []
    grid = [("qwen2.5-0.5b", dict(method="full", batch_size=4, seq_len=1024)),
            ("llama-3.2-1b", dict(method="full", batch_size=1)),
            ("llama-2-7b", dict(method="full", grad_ckpt=True)),
            ("qwen2.5-0.5b", dict(method="lora", batch_size=4, seq_len=1024)),
            ("llama-3.2-1b", dict(method="lora", target_modules=("all-linear",), batch_size=2)),
            ("llama-2-7b", dict(method="lora", batch_size=4)),
            ("llama-3.1-8b", dict(method="qlora", target_modules=("all-linear",), grad_ckpt=True, batch_size=2)),
            ("llama-3.2-1b", dict(method="qlora", target_modules=("all-linear",), grad_ckpt=True, batch_size=4,
                                  seq_len=1024)),
            ("llama-3.2-1b", dict(method="ia3", batch_size=4, seq_len=1024)),
            ("llama-2-7b", dict(method="ia3", batch_size=2)),
            ("llama-3.2-1b", dict(method="prefix", batch_size=4, seq_len=1024)),
            ("llama-2-7b", dict(method="prefix", batch_size=1)),
            ("llama-2-7b", dict(method="prompt", batch_size=2)),
            ("qwen2.5-0.5b", dict(method="prompt", batch_size=8, seq_len=512)),
            ("qwen2.5-0.5b", dict(method="lora", batch_size=1, seq_len=256)),  # host-bound: sets launch_seconds
            ("llama-3.2-1b", dict(method="full", batch_size=1, seq_len=512)),
            ("qwen2.5-0.5b", dict(method="full", precision="mixed", batch_size=4, seq_len=1024)),
            ("llama-3.2-3b", dict(method="full", precision="mixed", grad_ckpt=True, batch_size=2))]
    for name, kw in grid:
        arch = load_model(name)
        tc = TrainConfig(**{"seq_len": 2048, **kw})
        alloc = make_plan(arch, tc, gpu).peak_allocated_bytes
        config = dict(arch.config, model_type=arch.model_type)
        rec = new_record(kind="calibrate", model_name=name, model_config=config, train=tc.to_dict(),
                         measured={"device": "cuda", "peak_allocated_bytes": alloc,
                                   "peak_reserved_bytes": int(alloc * (1 + truth.allocator_overhead)),
                                   "cuda_context_bytes": context,
                                   "tokens_per_s": throughput(arch, tc, gpu, truth).tokens_per_s},
                         meta_info={"gpu_profile": gpu.name, "gpu_name": gpu.display_name})
        write_record(rec, tmp_path)
    out = load_records([tmp_path])
    return out


def test_fit_recovers_known_parameters(tmp_path):
    gpu = load_gpu("a100-80")
    # frozen-base methods run full fine-tuning's GEMMs: physically within ~10% of its efficiency (the fit's prior)
    truth = ThroughputParams(gemm_efficiency=0.62, bandwidth_efficiency=0.75, launch_seconds=40e-6,
                             fp32_efficiency=0.5, allocator_overhead=0.08)
    res = fit.fit_gpu(_synthetic(tmp_path, truth, gpu, context=600 * 2**20), gpu.name, loo=False)
    p = res.params
    for k in FITTED:
        assert getattr(p, k) == pytest.approx(getattr(truth, k), rel=0.08), k
    assert p.allocator_overhead == pytest.approx(0.08, abs=1e-6)
    assert p.cuda_context_bytes == 600 * 2**20  # the NVML-measured context replaces the default
    assert res.errors["after"]["tokens_per_s"]["max"] < 0.03


def test_paged_optimizer_records_do_not_set_the_context():
    recs = [{"measured": {"cuda_context_bytes": 500}, "train": {"optimizer": "adamw"}},
            {"measured": {"cuda_context_bytes": 700}, "train": {"optimizer": "adamw"}},
            {"measured": {"cuda_context_bytes": 9000}, "train": {"optimizer": "paged_adamw8bit"}}]
    assert fit.cuda_context(recs) == (600, 2)


# -- the throughput model's named parts ----------------------------------------------------------------------------


def test_parts_are_named_and_sum_to_the_step():
    gpu = load_gpu("h100")
    arch = load_model("llama-2-7b")
    for tc in (TrainConfig(method="full"), TrainConfig(method="lora", target_modules=("all-linear",)),
               TrainConfig(method="qlora", target_modules=("all-linear",), grad_ckpt=True), TrainConfig(method="ia3"),
               TrainConfig(method="lora", precision="fp32")):
        t = throughput(arch, tc, gpu)
        assert tuple(t.parts_seconds) == PARTS
        assert t.step_seconds == pytest.approx(sum(t.parts_seconds.values()))
        assert all(v >= 0 for v in t.parts_seconds.values())


def test_small_models_wait_for_the_host_and_large_ones_do_not():
    """max(GPU work, kernels x launch_seconds): Qwen2.5-0.5B at 256 tokens is host-bound, Llama-2-7B at 2048 not."""
    gpu = load_gpu("h100")
    small = throughput(load_model("qwen2.5-0.5b"), TrainConfig(method="lora", seq_len=256, batch_size=1), gpu)
    big = throughput(load_model("llama-2-7b"), TrainConfig(method="lora", batch_size=4), gpu)
    assert small.parts_seconds["launch"] > 0.5 * small.step_seconds
    assert big.parts_seconds["launch"] == 0


def test_qlora_runs_lm_head_and_attention_in_fp32():
    """After `prepare_model_for_kbit_training` the lm_head is fp32 (an fp32 GEMM on the CUDA cores) and
    `Linear4bit` returns fp32, so sdpa gets fp32 operands (the memory-efficient kernel)."""
    arch = load_model("llama-2-7b")
    ops = step_ops(arch, batch_free(TrainConfig(method="qlora", target_modules=("all-linear",))))
    fp32 = {(g.n, g.k) for g in ops.gemms if g.dtype == 4 and g.phase == "forward"}
    assert (arch.vocab_size, arch.hidden_size) in fp32
    assert [a[0] for a in ops.attention] == ["efficient_fp32"]
    lora = step_ops(arch, batch_free(TrainConfig(method="lora")))
    assert [a[0] for a in lora.attention] == ["flash"] and (arch.vocab_size, arch.hidden_size) not in {
        (g.n, g.k) for g in lora.gemms if g.dtype == 4}
    f32 = step_ops(arch, batch_free(TrainConfig(method="lora", precision="fp32")))
    assert all(g.dtype == 4 for g in f32.gemms)


def test_fp32_precision_is_much_slower_than_bf16():
    gpu, arch = load_gpu("h100"), load_model("llama-3.2-1b")
    bf16 = throughput(arch, TrainConfig(method="lora"), gpu).tokens_per_s
    fp32 = throughput(arch, TrainConfig(method="lora", precision="fp32"), gpu).tokens_per_s
    assert fp32 < bf16 / 4


def test_adapter_traffic_comes_from_the_graph():
    """peft's wrapper ops (fp32 cast, dropout, scale, add, cast back) move bytes: more modules, more bytes;
    dropout and checkpointing add theirs; none of it for full fine-tuning's linears."""
    arch = load_model("llama-3.2-1b")

    def per_seq(**kw):
        return step_ops(arch, batch_free(TrainConfig(**kw))).memory_bytes[0]

    qv = per_seq(method="lora")
    assert per_seq(method="lora", lora_dropout=0.0) < qv < per_seq(method="lora", target_modules=("all-linear",))
    assert per_seq(method="lora", grad_ckpt=True) > qv
    assert per_seq(method="ia3") > per_seq(method="prefix")


def test_method_keys():
    assert method_key(TrainConfig(method="full")) == "full"
    assert method_key(TrainConfig(method="full", precision="mixed")) == "full-mixed"
    assert method_key(TrainConfig(method="lora", precision="mixed")) == "lora"


def test_gemm_tiles_and_waves():
    """Wave quantization: one more tile than the SMs hold takes a second wave; a skinny GEMM (LoRA's rank 16)
    is not timed as a wide one; a large GEMM runs near the fitted efficiency."""
    peak, bw = 989e12, 3.35e12 * 0.8
    one = gemm_seconds(128 * 132, 256, 4096, 2, 132, peak, 0.8, bw)
    more = gemm_seconds(128 * 132 + 128, 256, 4096, 2, 132, peak, 0.8, bw)
    assert 1.1 * one < more < 2 * one  # a second wave, softened by a smaller tile (as cuBLAS picks)
    thin, wide = (gemm_seconds(4096, n, 4096, 2, 132, peak, 0.8, bw) for n in (16, 4096))
    assert thin < wide / 8  # not a 4096-wide GEMM, though more than 16/4096 of one (a wave of small tiles)
    assert gemm_seconds(8192, 8192, 8192, 2, 132, peak, 0.8, bw) == pytest.approx(2 * 8192 ** 3 / (peak * 0.8), rel=0.1)


def test_the_step_is_timed_from_the_memory_graph():
    """The kernels come from the graph the memory model replays: LoRA's adapters add fp32 GEMMs of rank-wide
    shape per adapted module, frozen bases run no weight-gradient GEMMs, checkpointing repeats the forward."""
    arch = load_model("llama-3.2-1b")
    full = step_ops(arch, batch_free(TrainConfig(method="full")))
    lora = step_ops(arch, batch_free(TrainConfig(method="lora", rank=16)))
    assert not any(g.phase == "weight_grad" and g.dtype == 2 for g in lora.gemms)
    adapters = [g for g in lora.gemms if g.dtype == 4]
    assert {(g.n, g.k) for g in adapters if g.phase == "forward"} == {(16, 2048), (2048, 16), (512, 16)}
    assert sum(g.count for g in adapters if g.phase == "forward") == 2 * 2 * arch.num_layers
    assert lora.kernels[0] > full.kernels[0]  # peft's wrapper ops (casts, dropout, A, B, scale, add) in forward
    assert lora.kernels[1] < full.kernels[1] + 3 * 2 * 2 * arch.num_layers  # no base weight gradients
    ck = step_ops(arch, batch_free(TrainConfig(method="full", grad_ckpt=True)))
    assert sum(g.count for g in ck.gemms if g.phase == "recompute") == 7 * arch.num_layers
    assert ck.kernels[0] > 1.5 * full.kernels[0] and ck.kernels[1] == full.kernels[1]


def test_run_records_join_the_fit(tmp_path):
    """`ftplan run` on CUDA writes a `run` record into calibrate/results (trainer/measure.py); the fit reads every
    kind of record of the GPU, so a run adds a point and changes the fitted values."""
    recs = load_records([RESULTS_DIR / "h100-sxm-80gb"])
    arch = load_model("llama-3.2-3b")
    tc = TrainConfig(method="lora", batch_size=2)
    config = dict(arch.config, model_type=arch.model_type)
    write_record(new_record(kind="run", model_name="llama-3.2-3b", model_config=config, train=tc.to_dict(),
                            measured={"device": "cuda", "peak_allocated_bytes": 20 * 2**30,
                                      "tokens_per_s": 0.5 * throughput(arch, tc, load_gpu("h100")).tokens_per_s},
                            meta_info={"gpu_profile": "h100-sxm-80gb", "gpu_name": "NVIDIA H100 80GB HBM3"}), tmp_path)
    both = recs + load_records([tmp_path])
    res = fit.fit_gpu(both, "h100-sxm-80gb", loo=False)
    assert res.kinds == {"import": 8, "run": 1} and len(res.record_ids) == 9
    alone = fit.fit_gpu(recs, "h100-sxm-80gb", loo=False)
    assert res.params.gemm_efficiency != alone.params.gemm_efficiency


def test_a_fit_on_one_gpu_predicts_another_of_its_architecture(tmp_path):
    """Per-architecture values: records made by one truth on the A100-80 SXM and on the A100-80 PCIe (less
    bandwidth) are predicted by a fit on the SXM's alone; the measured transfer error replaces the assumed one."""
    truth = ThroughputParams(gemm_efficiency=0.6, bandwidth_efficiency=0.8, launch_seconds=30e-6, fp32_efficiency=0.5)
    sxm, pcie = load_gpu("a100-sxm-80gb"), load_gpu("a100-pcie-80gb")
    recs = _synthetic(tmp_path / "sxm", truth, sxm)[:6] + _synthetic(tmp_path / "pcie", truth, pcie)[:4]
    res = fit.fit_gpu(recs, sxm.name, loo=False)
    measured, counts = fit.transfer_errors(recs, sxm, res.params)
    assert counts == {"transferred": 4} and measured["transferred"] < 0.03
    e = fit.expected_errors(0.05, measured)
    assert e["transferred"] == measured["transferred"] and e["extrapolated"] > 0.35
