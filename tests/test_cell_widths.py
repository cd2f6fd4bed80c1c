"""experiments/cell_widths.py: the widths each tuner played per cell."""

import json

import pytest
from experiment_loader import load_experiment


def _row(tuner, seed, bits, acc, budget=6, **kw):
    return {"tuner": tuner, "scenario": "x/tasks/c.yaml", "target": "8x", "seed": seed, "budget_stages": budget,
            "test": {"test_acc": acc, "sparsity": 0.5, "layers": [{"bits": b} for b in bits]}, **kw}


def _folder(tmp_path, rows):
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_widths_per_cell_and_tuner_at_the_largest_budget(tmp_path):
    mod = load_experiment("cell_widths")
    d = _folder(tmp_path, [_row("recipe", 0, [3, 3], 0.9), _row("recipe", 1, [4, 4], 0.8),
                           _row("recipe", 1, [8, 8], 0.1, budget=3),  # a smaller run: not the seed's
                           _row("recipe", 2, [3, 3], 0.7), _row("recipe", 0, [2, 2], 0.0, part=0),
                           _row("other", 0, [5, 4], 0.6)])
    out = tmp_path / "w.json"
    assert mod.main([str(d), "--out", str(out)]) == 0
    c = json.loads(out.read_text())["cells"]["c.yaml@8x"]
    assert c["recipe"]["widths"] == {"3,3": 2, "4,4": 1} and c["recipe"]["seeds"] == 3
    assert c["recipe"]["mean_bits"] == pytest.approx(10 / 3, abs=1e-3) and c["recipe"]["test_pct"] == pytest.approx(80.0)
    assert c["other"]["mean_bits"] == pytest.approx(4.5)
    assert mod.main([str(d), "--tuners", "other", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["cells"]["c.yaml@8x"]) == {"other"}


@pytest.mark.parametrize("line, says", [("[1]", "not a result row"), ('{"tuner": "recipe"}', "not a result row"),
                                        (json.dumps(_row("recipe", 1.5, [3], 0.5)), "whole number"),
                                        (json.dumps(_row("recipe", 0, [], 0.5)), "without layers")])
def test_bad_rows_and_outs_are_one_line(tmp_path, capsys, line, says):
    mod = load_experiment("cell_widths")
    d = _folder(tmp_path, [])
    (d / "cells" / "results.jsonl").write_text(line + "\n")
    assert mod.main([str(d), "--out", str(tmp_path / "w.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
    assert mod.main([str(d), "--out", str(d / "cells" / "results.jsonl")]) == 2
    assert "the input" in capsys.readouterr().err
