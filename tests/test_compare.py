"""`ftplan recommend` over several GPU types (planner/compare.py): the ranking, prices with source and date, the GPUs
that cannot run the model and why, and bad GPU lists."""

import json

from click.testing import CliRunner

from planner.cli import cli
from planner.profiles import list_gpus, prices_for


def run(*args, code=0):
    r = CliRunner().invoke(cli, list(args))
    assert r.exit_code == code, r.output + (repr(r.exception) if r.exception and code == 0 else "")
    assert "Traceback" not in r.output
    return r


def test_all_gpus_rank_by_the_jobs_cost_with_prices_and_reasons():
    d = json.loads(run("recommend", "--model", "70b", "--gpu", "all", "--dataset-tokens", "20M", "--epochs", "2",
                       "--top", "50", "--json").output)
    assert d["objective"] == "cost" and d["gpus"] == [g.name for g in list_gpus()]
    plans = d["plans"]
    assert len({p["gpu"] for p in plans}) >= 3
    costs = [p["job_cost_usd"] for p in plans]
    assert costs == sorted(costs)
    for p in plans:  # the job's cost is hours x GPUs x the cheapest price of that GPU
        price = prices_for(p["gpu"])[0]
        assert p["hours"] * 3600 * p["tokens_per_s"] == pytest_approx(40_000_000)
        assert p["job_cost_usd"] == pytest_approx(p["hours"] * p["config"]["num_gpus"] * price.usd_per_gpu_hour)
        assert p["device_bytes"] <= 0.95 * p["gpu_memory_bytes"]
    verdicts = {v["gpu"]: v for v in d["gpu_verdicts"]}
    t4 = verdicts["t4-16gb"]
    assert not t4["runs"] and t4["needs_gpus"] > 1 and "> --max-gpus 1" in t4["reason"]
    assert verdicts["h100-sxm-80gb"]["runs"]
    for v in d["gpu_verdicts"]:
        assert v["price"] is None or (v["price"]["as_of"] and v["price"]["source"].startswith("http"))


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-3)


def test_more_gpus_let_a_gpu_run_the_model_and_time_orders_by_hours():
    one = json.loads(run("recommend", "--model", "70b", "--gpu", "l40s,a100-40", "--json").output)
    assert not any(v["runs"] for v in one["gpu_verdicts"]) and one["plans"] == []
    four = json.loads(run("recommend", "--model", "70b", "--gpu", "l40s", "--gpu", "a100-40", "--max-gpus", "4",
                          "--objective", "time", "--top", "20", "--json").output)
    assert all(v["runs"] for v in four["gpu_verdicts"])
    assert max(p["config"]["num_gpus"] for p in four["plans"]) > 1
    secs = [p["seconds_per_million_tokens"] for p in four["plans"]]
    assert secs == sorted(secs)


def test_several_gpus_text_table_lists_prices_and_what_cannot_run():
    out = run("recommend", "--model", "70b", "--gpu", "h100,t4").output
    assert "rank   by cost" in out and "$ / 1M tok" in out
    assert "cannot run the model at all:\n  t4-16gb: needs" in out
    h100 = prices_for("h100-sxm-80gb")[0]
    assert f"h100-sxm-80gb: ${h100.usd_per_gpu_hour:g}/GPU-h {h100.provider}, as of {h100.as_of}, {h100.source}" in out


def test_unknown_gpu_in_the_list_names_it_and_the_valid_ones():
    out = run("recommend", "--model", "8b", "--gpu", "h100,bogus-gpu", code=2).output
    assert "bogus-gpu" in out and "valid: all, a100-pcie-80gb" in out and "t4-16gb" in out
    assert "one GPU type" in run("recommend", "--model", "8b", "--gpu", "all", "--verify", code=2).output


def test_save_over_several_gpus_writes_the_picked_plan_on_its_gpu(tmp_path):
    from planner.planfile import read_plan

    d = json.loads(run("recommend", "--model", "8b", "--gpu", "l4,h100", "--methods", "qlora", "--json").output)
    second = d["plans"][1]
    path = tmp_path / "plan.toml"
    run("recommend", "--model", "8b", "--gpu", "l4,h100", "--methods", "qlora", "--save", str(path), "--pick", "2")
    pf = read_plan(path)
    assert pf.gpu == second["gpu"] and pf.train.batch_size == second["config"]["batch_size"]
    assert pf.prediction["device_bytes"] == second["device_bytes"]
