"""`ftplan report`: every chart is drawn for a small case, is a sensible PNG, and its CSV holds the planner's numbers.

The expected values are recomputed here from planner calls (make_plan, recommend, calibrate.validate.compare), not
read from the report code, so a chart cannot show numbers the planner does not return.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from click.testing import CliRunner  # noqa: E402

from planner.cli import cli  # noqa: E402
from planner.config import TrainConfig  # noqa: E402
from planner.cost import cost_usd  # noqa: E402
from planner.memory import TERMS  # noqa: E402
from planner.plan import Workload, make_plan  # noqa: E402
from planner.profiles import load_gpu, load_model, prices_for  # noqa: E402
from planner.recommend import Request, recommend  # noqa: E402
from planner.report import charts as C  # noqa: E402
from planner.report import data as D  # noqa: E402

MODEL, GPU = "qwen2.5-0.5b", "l4"
COND = D.Conditions(seq_lens=(256, 512, 1024), dataset_tokens=10_000_000, epochs=2.0)

# The seven methods as a user would configure them (independent of data.method_configs).
METHODS = {
    "full-mixed": dict(method="full", precision="mixed"),
    "full-bf16": dict(method="full", precision="bf16"),
    "lora": dict(method="lora", rank=16, target_modules=("all-linear",)),
    "qlora": dict(method="qlora", rank=16, target_modules=("all-linear",)),
    "prefix": dict(method="prefix", num_virtual_tokens=20),
    "prompt": dict(method="prompt", num_virtual_tokens=20),
    "ia3": dict(method="ia3"),
}


@pytest.fixture(scope="module")
def arch():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def gpu():
    return load_gpu(GPU)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header; fails unless the file is a PNG."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def assert_sensible_png(path: Path) -> None:
    w, h = png_size(path)
    assert 900 <= w <= 2400 and 450 <= h <= 1600, (w, h)
    assert Path(path).stat().st_size > 20_000  # something was drawn


def plan_for(arch, gpu, key, seq_len, ckpt, batch=1):
    tc = TrainConfig(seq_len=seq_len, batch_size=batch, grad_ckpt=ckpt, optimizer="adamw", **METHODS[key])
    return make_plan(arch, tc, gpu)


# -- 1. memory by method --------------------------------------------------------------------------------------------


def test_memory_by_method_chart_and_csv_match_planner(tmp_path, arch, gpu):
    frame = D.memory_by_method(arch, gpu, COND)
    png = C.memory_by_method_chart(frame, tmp_path / "m.png", title="t", gpu_name=gpu.display_name)
    frame.to_csv(tmp_path / "m.csv", index=False)
    assert_sensible_png(png)
    csv = pd.read_csv(tmp_path / "m.csv")
    # every method without checkpointing, every method but prefix (peft refuses) with it
    assert sorted(csv[~csv["grad_ckpt"]]["method"]) == sorted(METHODS)
    assert sorted(csv[csv["grad_ckpt"]]["method"]) == sorted(set(METHODS) - {"prefix"})
    for _, row in csv.iterrows():
        p = plan_for(arch, gpu, row["method"], COND.seq_len, bool(row["grad_ckpt"]))
        assert row["device_bytes"] == p.device_bytes
        assert row["peak_allocated_bytes"] == p.peak_allocated_bytes
        assert row["peak_reserved_bytes"] == p.peak_reserved_bytes
        assert row["gpu_memory_bytes"] == gpu.memory_bytes
        assert bool(row["fits"]) == p.fits
        for term in TERMS:
            assert row[f"breakdown_{term}_bytes"] == p.memory.breakdown.get(term, 0), term
        # the stacked categories add up to what must fit, and group the planner's terms as stated
        groups = [f"{g}_bytes" for g in D.GROUPS]
        assert row[groups].sum() == p.device_bytes
        b = p.memory.breakdown
        assert row["weights_bytes"] == b.get("weights", 0) + b.get("quant_constants", 0) + b.get("trainable_weights", 0)
        assert row["gradients_bytes"] == b.get("gradients", 0)
        assert row["logits_bytes"] == b.get("logits", 0)
        assert row["optimizer_state_bytes"] == (b.get("optimizer_state", 0) + b.get("optimizer_temporaries", 0)
                                                + p.memory.paged_bytes)


# -- 3. memory vs sequence length -----------------------------------------------------------------------------------


def test_memory_vs_seq_chart_and_csv_match_planner(tmp_path, arch, gpu):
    frame = D.memory_vs_seq(arch, gpu, COND)
    assert_sensible_png(C.memory_vs_seq_chart(frame, tmp_path / "s.png", title="t", gpu_name=gpu.display_name))
    frame.to_csv(tmp_path / "s.csv", index=False)
    csv = pd.read_csv(tmp_path / "s.csv")
    assert sorted(set(csv["seq_len"])) == [256, 512, 1024, 2048]  # the chart's lengths plus the report's
    assert len(csv) == 4 * (7 + 6)
    for _, row in csv.iterrows():
        p = plan_for(arch, gpu, row["method"], int(row["seq_len"]), bool(row["grad_ckpt"]))
        assert row["device_bytes"] == p.device_bytes
        assert row["peak_allocated_bytes"] == p.peak_allocated_bytes
        assert bool(row["fits"]) == p.fits


def test_seq_lens_stop_at_the_context_length():
    a = load_model("llama-2-7b")  # 4096 positions
    assert D.seq_lens_for(a, D.Conditions()) == [512, 1024, 2048, 4096]


# -- 2. fit map -----------------------------------------------------------------------------------------------------


def _request(arch, gpu, **kw):
    args = dict(arch=arch, gpu=gpu, seq_len=COND.seq_len, workload=Workload(COND.dataset_tokens, COND.epochs),
                effective_batch=COND.effective_batch, objective="quality", margin=COND.margin)
    args.update(kw)
    return Request(**args)


def test_fit_map_chart_and_csv_match_recommend(tmp_path, arch, gpu):
    big = load_model("70b")  # does not fit on one L4: the cell says how many GPUs
    t4 = load_gpu("t4")
    frame = D.fit_map([(MODEL, arch), ("70b", big)], [gpu, t4], COND)
    assert_sensible_png(C.fit_map_chart(frame, tmp_path / "f.png", title="t"))
    frame.to_csv(tmp_path / "f.csv", index=False)
    csv = pd.read_csv(tmp_path / "f.csv")
    assert list(zip(csv["model"], csv["gpu"])) == [(a.name, g.name) for a in (arch, big) for g in (gpu, t4)]
    for _, row in csv.iterrows():
        a = arch if row["model"] == arch.name else big
        g = gpu if row["gpu"] == gpu.name else t4
        res = recommend(_request(a, g))
        if res.best is not None:
            b = res.best
            assert row["status"] == "fits"
            assert row["config"] == b.train.describe()
            assert row["device_bytes"] == b.device_bytes
            assert (row["batch_size"], row["grad_accum"], row["seq_len"]) == (b.train.batch_size, b.train.grad_accum,
                                                                              b.train.seq_len)
            assert row["hours"] == pytest.approx(b.hours, rel=1e-12)
            assert row["cost_usd"] == pytest.approx(b.cost_usd, rel=1e-12)
        else:
            assert row["status"] == "needs"
            needs = min(nf.needs_gpus for nf in res.not_fitting if nf.needs_gpus)
            assert row["needs_gpus"] == needs
    assert (csv["status"] == "needs").any() and (csv["status"] == "fits").any()


# -- 4. time and cost -----------------------------------------------------------------------------------------------


def test_time_cost_chart_and_csv_match_planner_and_prices(tmp_path, arch, gpu):
    gpus = [gpu, load_gpu("t4"), load_gpu("h100-80")]
    frame = D.time_cost(arch, gpus, COND, "lora")
    assert_sensible_png(C.time_cost_chart(frame, tmp_path / "c.png", title="t"))
    frame.to_csv(tmp_path / "c.csv", index=False)
    csv = pd.read_csv(tmp_path / "c.csv")
    for g in gpus:
        rows = csv[csv["gpu"] == g.name]
        best = recommend(_request(arch, g, methods=("lora",))).best  # fits on one GPU of each
        assert best is not None and (rows["num_gpus"] == 1).all()
        assert (rows["config"] == best.train.describe()).all()
        assert rows["hours"].tolist() == pytest.approx([best.hours] * len(rows), rel=1e-12)
        assert rows["tokens_per_s"].tolist() == pytest.approx([best.speed.tokens_per_s] * len(rows), rel=1e-12)
        prices = prices_for(g.name)
        assert list(rows["provider"]) == [p.provider for p in prices]
        for (_, r), p in zip(rows.iterrows(), prices):
            assert r["cost_usd"] == pytest.approx(cost_usd(best.hours, 1, p.usd_per_gpu_hour), rel=1e-12)
        assert rows["cost_usd"].iloc[0] == pytest.approx(best.cost_usd, rel=1e-12)  # the cheapest = make_plan's


def test_time_cost_uses_the_fewest_gpus_that_fit(arch):
    big, l4 = load_model("70b"), load_gpu("l4")
    frame = D.time_cost(big, [l4], COND, "qlora")
    row = frame.iloc[0]
    assert row["status"] == "fits" and row["num_gpus"] > 1
    n = int(row["num_gpus"])
    assert recommend(_request(big, l4, methods=("qlora",), max_gpus=n // 2)).best is None
    best = recommend(_request(big, l4, methods=("qlora",), max_gpus=n)).best
    assert row["hours"] == pytest.approx(best.hours, rel=1e-12)


# -- 5. accuracy ----------------------------------------------------------------------------------------------------


def test_accuracy_chart_and_csv_match_validate(tmp_path):
    from calibrate.record import load_records
    from calibrate.validate import compare

    records = load_records()
    frame = D.accuracy(records)
    assert_sensible_png(C.accuracy_chart(frame, tmp_path / "a.png", title="t"))
    frame.to_csv(tmp_path / "a.csv", index=False)
    csv = pd.read_csv(tmp_path / "a.csv")
    expected = compare(records)
    assert list(csv["id"]) == [c.id for c in expected]
    for (_, row), c in zip(csv.iterrows(), expected):
        for field in ("measured_allocated_bytes", "predicted_allocated_bytes", "measured_reserved_bytes",
                      "predicted_reserved_bytes"):
            v = getattr(c, field)
            assert (pd.isna(row[field]) and v is None) or row[field] == v, field
        for field in ("error_allocated", "predicted_tokens_per_s", "error_tokens_per_s"):
            v = getattr(c, field)
            assert (pd.isna(row[field]) and v is None) or row[field] == pytest.approx(v, rel=1e-12), field
    s = D.error_stats(frame, "error_allocated")
    errs = sorted(abs(c.error_allocated) for c in expected if c.error_allocated is not None)
    assert s["n"] == len(errs) and s["max"] == pytest.approx(errs[-1])


# -- ranked plans (recommend --chart) -------------------------------------------------------------------------------


def test_recommendation_chart_shows_the_ranked_plans(tmp_path, arch, gpu):
    res = recommend(_request(arch, gpu))
    frame = C.recommendation_chart(res, tmp_path / "r.png")
    assert_sensible_png(tmp_path / "r.png")
    first = frame.iloc[0]
    assert first["position"] == 1 and first["config"] == res.best.train.describe()
    assert first["device_bytes"] == res.best.device_bytes
    assert first["hours"] == pytest.approx(res.best.hours)
    # every method family that fits appears once at least
    fitting = {D.method_key(p.train) for p in res.ranked}
    assert fitting <= set(frame["method"])


def test_recommend_chart_option_writes_png(tmp_path):
    out = tmp_path / "plan.png"
    r = CliRunner().invoke(cli, ["recommend", "--model", "70b", "--gpu", "4090", "--chart", str(out)])
    assert r.exit_code == 0, r.output
    assert_sensible_png(out)


# -- the command ----------------------------------------------------------------------------------------------------


def test_report_command_writes_charts_csvs_and_an_offline_page(tmp_path, arch, gpu):
    out = tmp_path / "rep"
    r = CliRunner().invoke(cli, ["report", "--model", MODEL, "--gpu", GPU, "--compare-gpus", "l4,t4",
                                 "--dataset-tokens", "10M", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    names = {Path(f).name for f in result["files"]}
    for stem in ("memory-by-method", "memory-vs-seq", "ranked-plans", "time-cost"):
        assert {f"{stem}.png", f"{stem}.csv"} <= names
        assert_sensible_png(out / f"{stem}.png")
    assert {"index.html", "report.md"} <= names
    assert {p.name for p in out.iterdir()} == names  # each file renamed into place: no temporary left over
    page = (out / "index.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page  # opens offline
    for stem in ("memory-by-method", "memory-vs-seq", "ranked-plans", "time-cost"):
        assert f'src="{stem}.png"' in page and f'href="{stem}.csv"' in page
    assert f"ftplan report --model {MODEL} --gpu {GPU} --dataset-tokens 10M --compare-gpus l4,t4 --out {out}" in page
    for condition in ("sdpa", "lora_dropout = 0.05", "prepare_model_for_kbit_training", "foreach",
                      "16 sequences per optimizer step", "5 % of GPU memory free"):
        assert condition in page, condition
    md = (out / "report.md").read_text()
    assert "![Memory by method](memory-by-method.png)" in md
    # the page's CSV is the planner's numbers for these inputs
    csv = pd.read_csv(out / "memory-by-method.csv")
    lora = csv[(csv["method"] == "lora") & ~csv["grad_ckpt"]].iloc[0]
    assert lora["device_bytes"] == plan_for(arch, gpu, "lora", 2048, False).device_bytes
    best = recommend(_request(arch, gpu, workload=Workload(10_000_000, 1.0))).best
    assert result["summary"]["best_plan"]["device_bytes"] == best.device_bytes
    assert result["summary"]["time_cost_method"] == best.train.method


def test_report_fit_map_and_accuracy_commands(tmp_path):
    r = CliRunner().invoke(cli, ["report", "--models", f"{MODEL},1b", "--gpus", "l4,t4", "--out", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    assert_sensible_png(tmp_path / "f" / "fit-map.png")
    assert len(pd.read_csv(tmp_path / "f" / "fit-map.csv")) == 4
    r = CliRunner().invoke(cli, ["report", "--accuracy", "--out", str(tmp_path / "a"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)["summary"]
    assert summary["records"] >= 1 and summary["allocated"]["n"] >= 1
    assert_sensible_png(tmp_path / "a" / "accuracy.png")
    assert "ftplan report --accuracy" in (tmp_path / "a" / "index.html").read_text()


@pytest.mark.parametrize("args, option, says", [
    (["--model", "nope", "--gpu", "l4"], "--model", "unknown model"),
    (["--model", MODEL, "--gpu", "nope"], "--gpu", "unknown GPU"),
    (["--model", MODEL, "--gpu", "l4", "--provider", "nope"], "--provider", "valid: "),
    (["--model", MODEL, "--gpu", "l4", "--seq-len", "0"], "--seq-len", "positive"),
    (["--model", MODEL, "--gpu", "l4", "--margin", "1.5"], "--margin", "[0, 1)"),
    (["--model", MODEL, "--gpu", "l4", "--dataset-tokens", "lots"], "--dataset-tokens", "50M"),
    (["--model", MODEL, "--gpu", "l4", "--optimizer", "adam"], "--optimizer", "adamw"),
    (["--models", MODEL, "--gpus", "l4,t4", "--compare-gpus", "t4"], "--compare-gpus", "one --model"),
    (["--model", MODEL], None, "--gpu"),
    ([], None, "--accuracy"),
    (["--accuracy", "--model", MODEL], None, "--accuracy"),
    (["--accuracy", "--records", "/no/such/folder"], "--records", "no records"),
])
def test_bad_input_is_a_usage_error(tmp_path, args, option, says):
    r = CliRunner().invoke(cli, ["report", *args, "--out", str(tmp_path / "x")])
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    if option:
        assert option in r.output
    assert says in r.output
    assert not (tmp_path / "x").exists()


def test_estimate_and_recommend_do_not_import_pandas_or_matplotlib():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from planner.cli import cli\n"
        "import planner.report\n"
        "for args in (['estimate', '--model', '8b', '--gpu', 'a100-80'], ['recommend', '--model', '8b', '--gpu', 'l4']):\n"
        "    r = CliRunner().invoke(cli, args)\n"
        "    assert r.exit_code == 0, r.output\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('pandas', 'matplotlib'))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_every_method_has_one_colour_and_the_palette_is_distinct():
    assert list(C.METHOD_COLORS) == list(D.METHOD_KEYS)
    assert len(set(C.METHOD_COLORS.values())) == len(C.METHOD_COLORS)
    assert len(set(C.GROUP_COLORS.values())) == len(D.GROUPS)
