"""The byte-exact snapshot of every prediction (`calibrate/snapshot.py`): a refactor keeps it identical, or the
commit that changes it says why and regenerates it with `python -m calibrate.snapshot --write`."""

import json

from calibrate.snapshot import SNAPSHOT, differences, snapshot_rows


def test_predictions_equal_the_snapshot_to_the_byte():
    expected = [json.loads(line) for line in SNAPSHOT.read_text().splitlines() if line.strip()]
    actual = snapshot_rows()
    assert len(actual) == len(expected) >= 1500
    bad = {}
    for e, a in zip(expected, actual):
        assert (e["id"], e["model"], e["gpu"]) == (a["id"], a["model"], a["gpu"])
        diff = differences(e["prediction"], a["prediction"])
        if diff:
            bad[e["id"]] = diff[:3]
    assert not bad, f"{len(bad)} predictions moved, e.g. {dict(list(bad.items())[:5])}"


def test_the_comparison_catches_a_one_byte_and_a_tiny_float_change():
    row = {"a": 10, "b": 1.0, "c": {"d": "x"}}
    assert differences(row, row) == []
    assert differences(row, {**row, "a": 11})
    assert differences(row, {**row, "b": 1.0 + 1e-8})
    assert not differences(row, {**row, "b": 1.0 + 1e-12})
    assert differences(row, {"a": 10, "b": 1.0})
