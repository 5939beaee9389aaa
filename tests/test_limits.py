"""`ftplan limits` and `planner.fitlimits`: the longest sequence, largest micro-batch and largest rank that fit are
exact (the answer fits at recommend's margin, one more does not, computed independently with `make_plan`), bounded
by the position cap and the layer sizes; estimate says them only for configurations that do not fit."""

import json

import pytest
from click.testing import CliRunner

from planner.cli import cli
from planner.config import TrainConfig
from planner.fitlimits import MAX_BATCH, fit_limits, largest_fitting
from planner.limits import position_cap
from planner.plan import DEFAULT_MARGIN, make_plan
from planner.profiles import load_gpu, resolve_model

from conftest import TINY_LLAMA_CONFIG


def run(*args, code=0):
    r = CliRunner().invoke(cli, list(args))
    assert r.exit_code == code, r.output + (repr(r.exception) if r.exception and code == 0 else "")
    assert "Traceback" not in r.output
    return r


def fits(arch, tc, gpu) -> bool:
    return make_plan(arch, tc, gpu).device_bytes <= gpu.memory_bytes * (1 - DEFAULT_MARGIN)


CASES = [
    ("70b", dict(method="qlora", target_modules=("all-linear",), grad_ckpt=True), "a100-80"),
    ("8b", dict(method="lora", rank=64, target_modules=("all-linear",), seq_len=4096, batch_size=2), "4090"),
    ("llama-2-7b", dict(method="full", precision="mixed", optimizer="adamw8bit", grad_ckpt=True), "h100-80"),
    ("qwen2.5-1.5b", dict(method="dora", target_modules=("q_proj", "v_proj")), "l4"),
    ("gemma-2-2b", dict(method="prefix", batch_size=4), "4090"),
]


@pytest.mark.parametrize("model,kw,gpu_name", CASES, ids=[c[0] + "-" + c[1]["method"] for c in CASES])
def test_each_limit_fits_and_one_more_does_not(model, kw, gpu_name):
    arch, _ = resolve_model(model)
    gpu = load_gpu(gpu_name)
    tc = TrainConfig(**kw)
    res = fit_limits(arch, tc, gpu)
    for field, lim in (("seq_len", res.seq_len), ("batch_size", res.batch_size), ("rank", res.rank)):
        if lim.value is None:
            assert field == "rank" and not tc.spec.uses_rank
            continue
        if lim.value:
            assert fits(arch, tc.replace(**{field: lim.value}), gpu), field
            assert lim.device_bytes == make_plan(arch, tc.replace(**{field: lim.value}), gpu).device_bytes
        if lim.value < lim.bound:
            nxt = tc.replace(**{field: lim.value + 1})
            assert not fits(arch, nxt, gpu), field
            assert lim.next_device_bytes == make_plan(arch, nxt, gpu).device_bytes > res.limit_bytes
        # memory grows with the searched value around the answer (the monotonicity bisection relies on)
        if 1 < lim.value < lim.bound:
            a, b, c = (make_plan(arch, tc.replace(**{field: n}), gpu).device_bytes for n in
                       (lim.value - 1, lim.value, lim.value + 1))
            assert a <= b <= c, field


def test_the_70b_example_is_limited_by_memory_in_all_three():
    arch, _ = resolve_model("70b")
    tc = TrainConfig(method="qlora", target_modules=("all-linear",), grad_ckpt=True)
    res = fit_limits(arch, tc, load_gpu("a100-80"))
    assert 2048 < res.seq_len.value < position_cap(arch)
    assert 1 <= res.batch_size.value < MAX_BATCH
    assert 16 < res.rank.value < 1024
    assert not (res.seq_len.at_bound or res.batch_size.at_bound or res.rank.at_bound)


def test_position_cap_and_layer_size_bound_the_search(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_LLAMA_CONFIG))
    arch, _ = resolve_model(str(cfg))
    res = fit_limits(arch, TrainConfig(method="lora", seq_len=64), load_gpu("h100-80"))
    assert res.seq_len.value == 4 * 128 and res.seq_len.at_bound and res.seq_len.next_device_bytes is None
    assert "position cap" in res.seq_len.bound_reason
    assert res.rank.value == 32 and res.rank.at_bound  # v_proj is 64 x 32 (2 kv heads of 16)
    prefix = fit_limits(arch, TrainConfig(method="prefix", seq_len=64, num_virtual_tokens=20), load_gpu("h100-80"))
    assert prefix.seq_len.value == 4 * 128 - 20 and "20 virtual tokens" in prefix.seq_len.bound_reason


@pytest.mark.parametrize("method", ["full", "ia3", "prompt"])
def test_rank_is_not_applicable_without_a_rank(method):
    arch, _ = resolve_model("qwen2.5-0.5b")
    res = fit_limits(arch, TrainConfig(method=method, seq_len=512), load_gpu("h100-80"))
    assert res.rank.value is None and res.to_dict()["max_rank"] is None
    r = run("limits", "--model", "qwen2.5-0.5b", "--method", method, "--seq-len", "512", "--gpu", "h100-80")
    assert "n/a" in r.output and f"{method} has no rank" in r.output


def test_nothing_fits_is_zero():
    arch, _ = resolve_model("70b")
    res = fit_limits(arch, TrainConfig(method="full"), load_gpu("4090"))
    assert res.seq_len.value == res.batch_size.value == 0
    assert res.seq_len.device_bytes is None and res.seq_len.next_device_bytes > res.limit_bytes


@pytest.mark.parametrize("answer,hi", [(0, 100), (1, 100), (37, 100), (99, 100), (100, 100), (5, 1), (1, 1),
                                       (123_456, 1 << 20)])
def test_bracket_search_is_exact_for_any_monotone_value(answer, hi):
    plateau = lambda n: n // 7  # noqa: E731 (equal values: the answer is the plateau's end)
    for shape in (lambda n: n, lambda n: n * n, lambda n: n ** 3 + 10 ** 6, plateau):
        seen = []

        def value(n):
            seen.append(n)
            return shape(n)

        got = largest_fitting(value, shape(answer) if answer else -1, hi)
        end = answer // 7 * 7 + 6 if shape is plateau else answer
        expected = min(hi, end) if answer else 0
        assert got == expected, (answer, hi, got)
        assert len(seen) <= 2 * hi.bit_length() + 4


def test_cli_human_and_json():
    args = ["limits", "--model", "70b", "--method", "qlora", "--target-modules", "all-linear", "--grad-ckpt",
            "--gpu", "a100-80"]
    d = json.loads(run(*args, "--json").output)
    arch, _ = resolve_model("70b")
    res = fit_limits(arch, TrainConfig(method="qlora", target_modules=("all-linear",), grad_ckpt=True),
                     load_gpu("a100-80"))
    assert (d["max_seq_len"], d["max_batch_size"], d["max_rank"]) == (res.seq_len.value, res.batch_size.value,
                                                                      res.rank.value)
    for k in ("seq_len", "batch_size", "rank"):
        assert isinstance(d[k]["value"], int) and isinstance(d[k]["device_bytes"], int)
        assert d[k]["device_bytes"] <= d["limit_bytes"] < d[k]["next_device_bytes"]
        assert d[k]["limited_by"] == "memory"
    assert d["margin"] == DEFAULT_MARGIN and d["gpu"] == "a100-sxm-80gb"
    out = run(*args).output
    assert f"{d['max_seq_len']:,} tokens" in out and f"{d['max_batch_size']} sequences" in out
    assert "memory (batch 1, rank 16)" in out


def test_cli_says_when_the_cap_not_memory_limits():
    out = run("limits", "--model", "llama-2-7b", "--method", "ia3", "--seq-len", "512", "--grad-ckpt",
              "--gpu", "h100-80").output
    assert "position cap" in out and "not memory" in out


@pytest.mark.parametrize("args,field", [
    (["--model", "no-such-model", "--gpu", "a100-80"], "--model"),
    (["--model", "8b", "--gpu", "no-such-gpu"], "--gpu"),
    (["--model", "8b"], "--gpu"),
    (["--model", "8b", "--gpu", "a100-80", "--rank", "0"], "--rank"),
    (["--model", "8b", "--gpu", "a100-80", "--rank", "5000"], "--rank"),
    (["--model", "8b", "--gpu", "a100-80", "--target-modules", "nope"], "--target-modules"),
    (["--model", "8b", "--gpu", "a100-80", "--seq-len", "10000000"], "--seq-len"),
    (["--model", "8b", "--gpu", "a100-80", "--batch-size", "0"], "--batch-size"),
    (["--model", "8b", "--gpu", "a100-80", "--method", "ia3", "--target-modules", "q_proj"], "--target-modules"),
])
def test_bad_input_exits_2_naming_the_field(args, field):
    r = run("limits", *args, code=2)
    assert field in r.output
    j = run("limits", *args, "--json", code=2)
    assert "error" in json.loads(j.output)


def test_estimate_says_what_fits_only_when_it_does_not_fit():
    base = ["estimate", "--model", "70b", "--method", "qlora", "--target-modules", "all-linear", "--gpu", "a100-80"]
    over = run(*base, "--batch-size", "4").output
    d = json.loads(run(*base, "--batch-size", "4", "--json").output)
    assert d["fits"] is False
    arch, _ = resolve_model("70b")
    res = fit_limits(arch, TrainConfig(method="qlora", target_modules=("all-linear",), batch_size=4),
                     load_gpu("a100-80"))
    assert d["max_seq_len_that_fits"] == res.seq_len.value > 0 and d["max_batch_that_fits"] == res.batch_size.value
    assert f"fits up to {res.seq_len.value:,} tokens per sequence at this batch" in over
    ok = ["estimate", "--model", "8b", "--method", "qlora", "--gpu", "a100-80"]
    fine = run(*ok).output
    dj = json.loads(run(*ok, "--json").output)
    assert dj["fits"] is True and "max_seq_len_that_fits" not in dj and "max_batch_that_fits" not in dj
    assert "fits up to" not in fine and "fits at no" not in fine
    nogpu = json.loads(run("estimate", "--model", "70b", "--method", "full", "--json").output)
    assert "max_seq_len_that_fits" not in nogpu


def test_limits_command_is_light():
    from test_imports import HEAVY, _modules_after

    code = ("from click.testing import CliRunner\nfrom planner.cli import cli\n"
            "r = CliRunner().invoke(cli, ['limits', '--model', '8b', '--gpu', 'a100-80', '--json'])\n"
            "assert r.exit_code == 0, r.output\n")
    mods = _modules_after(code)
    assert not mods & set(HEAVY), mods & set(HEAVY)
