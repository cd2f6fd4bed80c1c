"""experiments/stage_sign.py: how early a shift's final sign shows, from schedule_shift's rows."""

import json

import pytest
from experiment_loader import load_experiment


def _row(cell, seed, zero_stages, shifted_stages, zero_test, shifted_test, diverged=""):
    return {"cell": cell, "target": "8x", "family": "f", "seed": seed,
            "zero": {"test_acc": zero_test, "val_acc": zero_stages[-1], "bits": 5, "diverged": "",
                     "val_by_stage": zero_stages},
            "shifted": {"test_acc": shifted_test, "val_acc": shifted_stages[-1], "bits": 4, "diverged": diverged,
                        "val_by_stage": shifted_stages}}


def test_stage_differences_against_the_final_test_difference(tmp_path):
    mod = load_experiment("stage_sign")
    rows = [  # cell a: stage 1 says shift, the end says keep; b: both say shift; c: both keep
        _row("a", 0, [0.5, 0.6], [0.6, 0.55], 0.60, 0.58), _row("a", 1, [0.5, 0.6], [0.55, 0.6], 0.62, 0.60),
        _row("b", 0, [0.5, 0.6], [0.52, 0.7], 0.60, 0.70), _row("b", 1, [0.5, 0.6], [0.51, 0.65], 0.60, 0.66),
        _row("c", 0, [0.5, 0.6], [0.4, 0.5], 0.60, 0.50), _row("c", 1, [0.5, 0.6], [0.45, 0.58], 0.60, 0.58),
        _row("d", 0, [0.5], [0.52, 0.7, 0.8], 0.10, 0.80, diverged="collapsed"),  # zero collapsed after stage 1
        {"cell": "e", "target": "8x", "seed": 0, "zero": {"test_acc": 0.5}, "shifted": {"test_acc": 0.6}},  # no stages
    ]
    r = mod.analyse(rows)
    assert (r["cells"], r["cell_seeds"], r["collapsed_cell_seeds"], r["stages"]) == (4, 7, 1, [2, 3])
    s1, s2, s3, last = r["by_stage"]
    assert [s["stage"] for s in r["by_stage"]] == [1, 2, 3, "last"] and [s["cells"] for s in r["by_stage"]] == [4, 4, 1, 4]
    # cell means of the final test difference (pt): a -2, b +8, c -6, d +70; stage 1: a +7.5, b +1.5,
    # c -7.5, d +2; stage 2: a -2.5, b +7.5, c -6, d +20 (zero stays at 0.5 after its collapse)
    assert s1["sign_agree_cell"] == 0.75 and s2["sign_agree_cell"] == 1.0 and last["sign_agree_cell"] == 1.0
    assert s1["gain_pt"] == pytest.approx((-2 + 8 + 70) / 4, abs=1e-3) and s2["gain_pt"] == pytest.approx(78 / 4, abs=1e-3)
    assert s3["gain_pt"] == 70.0 and last["gain_pt"] == pytest.approx(78 / 4, abs=1e-3)
    assert r["oracle_gain_pt"] == pytest.approx(78 / 4, abs=1e-3) and r["always_gain_pt"] == pytest.approx(70 / 4, abs=1e-3)
    assert s2["r_cell"] > 0.9


def test_bad_rows_are_one_line(tmp_path, capsys):
    mod = load_experiment("stage_sign")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": {"a": 1}}))
    with pytest.raises(SystemExit) as e:
        mod.main(["--rows", str(bad), "--out", str(tmp_path / "o.json")])
    assert e.value.code == 2 and "not a list of objects" in capsys.readouterr().err
    none = tmp_path / "none.jsonl"
    none.write_text(json.dumps({"cell": "a", "target": "8x", "seed": 0, "zero": {}, "shifted": {}}) + "\n")
    with pytest.raises(SystemExit) as e:
        mod.main(["--rows", str(none), "--out", str(tmp_path / "o.json")])
    assert e.value.code == 2 and "no row" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
