"""`ftplan validate`: predicted vs measured over every committed record, summaries per GPU and per method, the
exit code, and how odd records (CPU, OOM, unknown families, malformed files) are handled."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from calibrate.record import RESULTS_DIR, RecordError, load_records, new_record, records_frame, write_record
from calibrate.validate import METRICS, compare, exceeding, report, summarize
from planner.cli import cli
from planner.config import TrainConfig
from planner.cost import ThroughputParams

SHIPPED = RESULTS_DIR / "h100-sxm-80gb"


def run(*args, code=0):
    r = CliRunner().invoke(cli, list(args))
    assert r.exit_code == code, r.output + (repr(r.exception) if r.exception and code == 0 else "")
    assert "Traceback" not in r.output
    return r


def test_every_committed_record_loads_and_is_compared():
    records = load_records()
    assert len(records) >= 8
    rows = compare(records)
    assert len(rows) == len(records)
    df = records_frame(records)
    assert len(df) == len(records) and {"measured.peak_allocated_bytes", "prediction.tokens_per_s"} <= set(df.columns)


def test_shipped_measurements_peak_allocated_within_half_a_percent():
    rows = compare(load_records([SHIPPED]))
    assert len(rows) == 8
    for c in rows:
        assert c.status == "ok" and c.gpu == "h100-sxm-80gb"
        assert abs(c.error_allocated) < 0.005, (c.id, c.error_allocated)
        assert abs(c.error_reserved) < 0.10, (c.id, c.error_reserved)


def test_validate_cli_prints_every_metric_and_exits_zero():
    r = run("validate")
    for needle in ("alloc GiB", "reserved", "tokens/s", "h100-sxm-80gb", "qlora", "records  alloc median"):
        assert needle in r.output
    assert "allocated: all" in r.output and "within 5%" in r.output


def test_validate_json_is_machine_readable():
    d = json.loads(run("validate", "--results", str(SHIPPED), "--json").output)
    assert d["ok"] is True and d["metric"] == "allocated" and d["max_error"] == 0.05
    assert d["records"] == 8 and d["compared"] == {"allocated": 8, "reserved": 8, "tokens_per_s": 8}
    assert set(d["by_gpu"]) == {"h100-sxm-80gb"}
    assert set(d["by_method"]) == {"full", "lora", "qlora", "prefix", "ia3"}
    e = d["by_gpu"]["h100-sxm-80gb"]
    assert e["allocated"]["max"] < 0.005 and e["tokens_per_s"]["median"] is not None
    row = d["rows"][0]
    for key in ("id", "measured_allocated_bytes", "predicted_allocated_bytes", "error_allocated",
                "error_reserved", "error_tokens_per_s", "predicted_fits", "note"):
        assert key in row


def test_the_exit_code_follows_the_chosen_metric():
    r = run("validate", "--results", str(SHIPPED), "--metric", "tokens_per_s", "--max-error", "0.001", code=1)
    assert "tokens_per_s:" in r.output and "above 0.1%" in r.output
    run("validate", "--results", str(SHIPPED), "--metric", "reserved", "--max-error", "0.5")
    d = json.loads(run("validate", "--results", str(SHIPPED), "--max-error", "0.0001", "--json", code=1).output)
    assert d["ok"] is False and d["exceeding"]


@pytest.mark.parametrize("args, hint", [
    (["--max-error", "0"], "--max-error"),
    (["--metric", "speed"], "--metric"),
    (["--results", "/nonexistent/records"], "--results"),
    (["--gpu", "not-a-gpu"], "--gpu"),
])
def test_bad_options_are_usage_errors(args, hint):
    assert hint in run("validate", *args, code=2).output


def test_gpu_filter(tmp_path):
    d = json.loads(run("validate", "--gpu", "h100", "--json").output)
    assert {r["gpu"] for r in d["rows"]} == {"h100-sxm-80gb"}


def _record(tmp_path, **kw):
    cfg = {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True,
           "max_position_embeddings": 16384}
    tc = TrainConfig(method="lora", seq_len=2048, batch_size=2)
    args = dict(kind="calibrate", model_name="llama-3.2-1b", model_config=cfg, train=tc.to_dict(),
                measured={"device": "cuda", "peak_allocated_bytes": 15 * 2**30, "peak_reserved_bytes": 16 * 2**30,
                          "tokens_per_s": 30000.0},
                meta_info={"gpu_profile": "h100-sxm-80gb", "gpu_name": "NVIDIA H100 80GB HBM3"})
    args.update(kw)
    return write_record(new_record(**args), tmp_path)


def test_odd_records_are_listed_not_fatal(tmp_path):
    _record(tmp_path, status="oom", measured={"device": "cuda"}, error="OutOfMemoryError at step1")
    _record(tmp_path, model_name="mystery", model_config={"model_type": "mamba", "hidden_size": 8})
    _record(tmp_path, measured={"device": "cpu", "process_peak_rss_bytes": 2**30, "tokens_per_s": 900.0},
            meta_info={})
    rows = compare(load_records([tmp_path]))
    by_status = {(c.status, c.gpu, c.model): c for c in rows}
    oom = by_status[("oom", "h100-sxm-80gb", "llama-3.2-1b")]
    assert oom.error_allocated is None and oom.predicted_fits is True and "planner says it fits" in oom.note
    mystery = by_status[("ok", "h100-sxm-80gb", "mystery")]
    assert mystery.note.startswith("cannot predict") and mystery.error_allocated is None
    cpu = by_status[("ok", "cpu", "llama-3.2-1b")]
    assert cpu.error_allocated is None and cpu.error_tokens_per_s is None
    r = run("validate", "--results", str(tmp_path))
    assert "cannot predict" in r.output and "out of memory although the planner says it fits" in r.output
    assert "allocated: no record has a comparable figure" in r.output


def test_an_unreadable_record_is_skipped_and_named(tmp_path):
    """A truncated, non-UTF-8 or off-schema file is named and left out; the other records are still compared."""
    shutil.copytree(SHIPPED, tmp_path / "h100")
    whole = next((tmp_path / "h100").glob("*.json")).read_bytes()
    (tmp_path / "h100" / "truncated.json").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "h100" / "latin1.json").write_bytes(b'{"schema": "ftplan.record/1", "id": "caf\xe9"}')
    (tmp_path / "h100" / "other.json").write_text('{"schema": "something/2"}')
    r = run("validate", "--results", str(tmp_path))
    for name, why in (("truncated.json", "invalid JSON"), ("latin1.json", "not UTF-8"), ("other.json", "schema")):
        assert re.search(rf"skipped \S*{name}: .*{why}", r.output), (name, r.output)
    assert "allocated: all 8 compared records within 5%" in r.output
    d = json.loads(CliRunner().invoke(cli, ["validate", "--results", str(tmp_path), "--json"]).stdout)
    assert d["records"] == 8 and d["ok"] is True
    assert sorted(Path(s["path"]).name for s in d["skipped"]) == ["latin1.json", "other.json", "truncated.json"]
    # without the skip list (the library default), the first bad file is an error naming it
    with pytest.raises(RecordError, match="truncated.json|latin1.json|other.json"):
        load_records([tmp_path])


def test_records_are_written_whole_once_and_never_replaced(tmp_path, monkeypatch):
    """write_record goes through a temporary name (fsync, then a rename that refuses an existing name): a write
    that fails leaves neither a partial record nor a temporary file, and a second write of the same record fails."""
    rec = new_record(kind="import", model_name="llama-3.2-1b", model_config={"model_type": "llama"},
                     train=TrainConfig(seq_len=64).to_dict(), measured={"device": "cpu"})
    path = write_record(rec, tmp_path)
    assert json.loads(path.read_text())["id"] == rec["id"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    with pytest.raises(FileExistsError):
        write_record(rec, tmp_path)
    assert json.loads(path.read_text())["id"] == rec["id"]

    import planner.fileio as fileio

    def crash(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fileio.os, "fsync", crash)
    rec2 = dict(rec, id=rec["id"] + "-2")
    with pytest.raises(OSError):
        write_record(rec2, tmp_path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial record, no temporary file


def test_errors_are_signed_and_summaries_absolute(tmp_path):
    _record(tmp_path, measured={"device": "cuda", "peak_allocated_bytes": 10 * 2**30, "peak_reserved_bytes": 11 * 2**30,
                                "tokens_per_s": 1e9})
    (c,) = compare(load_records([tmp_path]))
    assert c.error_allocated > 0.5 and c.error_tokens_per_s < -0.99  # over-predicted memory, under-predicted speed
    s = summarize([c], by="method")["lora"]
    assert s["allocated"]["max"] == pytest.approx(abs(c.error_allocated)) and s["tokens_per_s"]["median"] > 0.99
    assert exceeding([c], "allocated", 0.05) == [c] and exceeding([c], "allocated", 10.0) == []
    rep = report([c], "tokens_per_s", 0.05)
    assert rep["ok"] is False and rep["exceeding"] == [c.id]
    with pytest.raises(ValueError, match="metric must be one of"):
        exceeding([c], "speed", 0.1)
    assert METRICS == ("allocated", "reserved", "tokens_per_s")


def test_params_by_gpu_override_the_calibration():
    records = load_records([SHIPPED])
    slow = ThroughputParams(gemm_efficiency=0.01, fp32_efficiency=0.01, allocator_overhead=0.5)
    base = {c.id: c for c in compare(records)}
    for c in compare(records, {"h100-sxm-80gb": slow}):
        assert c.predicted_tokens_per_s < base[c.id].predicted_tokens_per_s
        assert c.predicted_reserved_bytes == int(c.predicted_allocated_bytes * 1.5)
        assert c.predicted_allocated_bytes == base[c.id].predicted_allocated_bytes  # memory model untouched


def test_validate_reads_a_measurements_jsonl_directly(tmp_path):
    """Rows in the shared measurement format (named after their GPU) validate without importing them first."""
    import json

    from click.testing import CliRunner

    from calibrate.record import load_records
    from planner.cli import cli

    recs = [r for r in load_records() if r["kind"] == "import"]
    rows = []
    for r in recs:
        t = r["train"]
        rows.append({"name": r["source"].split("#")[-1], "model": r["model"]["name"], "model_config": r["model"]["config"],
                     "method": t["method"], "precision": t["precision"], "rank": t["rank"],
                     "num_virtual_tokens": t["num_virtual_tokens"],
                     "target_modules": ",".join(t["target_modules"]), "seq_len": t["seq_len"],
                     "batch_size": t["batch_size"], "grad_ckpt": t["grad_ckpt"], "optimizer": t["optimizer"],
                     "peak_allocated_gib": round(r["measured"]["peak_allocated_bytes"] / 2**30, 2),
                     "peak_reserved_gib": round(r["measured"]["peak_reserved_bytes"] / 2**30, 2),
                     "tokens_per_s": r["measured"]["tokens_per_s"]})
    path = tmp_path / "h100-sxm-80gb.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    res = CliRunner().invoke(cli, ["validate", "--results", str(path), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    errors = [abs(r["error_allocated"]) for r in d["rows"]]
    assert len(errors) == len(rows) and max(errors) < 0.05
    path.write_text(path.read_text() + "{not json\n")
    bad = CliRunner().invoke(cli, ["validate", "--results", str(path)])
    assert bad.exit_code != 0 and f"h100-sxm-80gb.jsonl:{len(rows) + 1}" in bad.output
