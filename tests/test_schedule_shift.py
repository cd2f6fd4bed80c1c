"""experiments/schedule_shift.py: the shift read from a search's best configurations, the cells, the summary."""

import json

import pytest
from experiment_loader import load_experiment


def _script():
    return load_experiment("schedule_shift")


def _folder(tmp_path, rows):
    d = tmp_path / "any"
    (d / "cells").mkdir(parents=True)
    (d / "cells" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _best(seed, action, budget=192, tuner="optuna-tpe", **kw):
    return {"tuner": tuner, "scenario": "x/c.yaml", "target": "8x", "seed": seed, "budget_stages": budget,
            "config": {"action": action}, **kw}


def test_shift_is_the_mean_best_configuration_at_the_largest_budget(tmp_path):
    mod = _script()
    d = _folder(tmp_path, [
        _best(0, [0, 0, -0.4, -0.2, 0]), _best(1, [0, 0, -0.2, 0.0, 0]),
        _best(0, [0, 0, 0.9, 0.9, 0], budget=6),  # a smaller run of the same seed: not its best
        _best(2, [1, 1, 1, 1, 1], tuner="random"),  # another tuner
        _best(3, [1, 1, 1, 1, 1], part=0),  # a part of a split cell
    ])
    s = mod.read_shift(d, "optuna-tpe")
    assert s["n"] == 2
    assert s["mean"]["temperature"] == pytest.approx(-0.3) and s["mean"]["alpha"] == pytest.approx(-0.1)
    assert s["t"]["temperature"] == pytest.approx(-0.3 / (0.1414 / 2 ** 0.5), rel=1e-3)
    assert s["t"]["final_bits"] is None  # no spread: no t
    with pytest.raises(ValueError, match="fewer than 2"):
        mod.read_shift(d, "random")


@pytest.mark.parametrize("action, says", [([0, 0, 0, 0], "5 numbers"), ([0, 0, 2, 0, 0], "in \\[-1, 1\\]"),
                                          ("abc", "config.action")])
def test_a_bad_configuration_is_named_by_line(tmp_path, action, says):
    mod = _script()
    d = _folder(tmp_path, [_best(0, [0] * 5), _best(1, action)])
    with pytest.raises(ValueError, match=says):
        mod.read_shift(d, "optuna-tpe")


def test_train_tasks_take_the_families_in_turn_and_never_a_held_out_one():
    mod = _script()
    picked = mod.train_tasks(10, 0, 240)
    assert len(picked) == 10 and not any(t.held_out for t in picked)
    from rltune.tasks import TaskSpec, generate_tasks

    trained = {t.family for t in generate_tasks(TaskSpec(seed=0, n_tasks=240)) if not t.held_out}
    k = len(trained)
    assert k >= 3 and set(t.family for t in picked[:k]) == trained  # one of each family first, then again
    assert len({t.name for t in picked}) == 10


def _row(cell, seed, zero, shifted, family="f"):
    return {"cell": cell, "target": "8x", "family": family, "seed": seed,
            "zero": {"test_acc": zero, "val_acc": zero}, "shifted": {"test_acc": shifted, "val_acc": shifted + 0.01}}


def test_summary_is_per_cell_paired_differences():
    mod = _script()
    rows = [_row("a", 0, 0.80, 0.82), _row("a", 1, 0.80, 0.84),  # a: +3 pt
            _row("b", 0, 0.60, 0.59, family="g"), _row("b", 1, 0.60, 0.59, family="g")]  # b: -1 pt
    s = mod.summarize(rows)
    assert s["cells"] == 2 and s["cells_ge"] == 1
    assert s["diff_test_pt"] == pytest.approx(1.0) and s["diff_val_pt"] == pytest.approx(2.0)
    assert s["diff_test_sd_pt"] == pytest.approx(2 * 2 ** 0.5, abs=1e-3)
    assert s["diff_test_se_pt"] == pytest.approx(2.0, abs=1e-3)
    assert s["by_family"]["g"]["diff_test_pt"] == pytest.approx(-1.0) and s["by_family"]["f"]["cells"] == 1
    assert s["zero_test_pct"] == pytest.approx(70.0)


@pytest.mark.parametrize("args, says", [
    (["--shift", "temperature=-2"], "VALUE in [-1, 1]"),
    (["--shift", "tau=-0.2"], "ENTRY of"),
    (["--shift", "temperature=0"], "no shift"),
    (["--shift", "temperature=-0.2", "--seeds", "0"], "--seeds"),
    (["--shift", "temperature=-0.2"], "no cells"),
    (["--shift", "temperature=-0.2", "--cells", "nope"], "SCENARIO=TARGET"),
    (["--shift-from", "/nonexistent"], "--shift-from"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, args, says):
    mod = _script()
    out = tmp_path / "o.json"
    assert mod.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_shift_from_needs_entries(tmp_path, capsys):
    mod = _script()
    d = _folder(tmp_path, [_best(0, [0] * 5), _best(1, [0.1] * 5)])
    assert mod.main(["--shift-from", str(d), "--cells", "digits-mlp=8x", "--out", str(tmp_path / "o.json")]) == 2
    assert "--entries" in capsys.readouterr().err


def test_finished_rows_are_reused_for_the_same_shift_only(tmp_path, monkeypatch):
    mod = _script()
    played = []

    def fake(job):
        played.append(list(job["seeds"]))
        return [_row(job["name"], s, 0.5, 0.6) for s in job["seeds"]]

    monkeypatch.setattr(mod, "play_cell", fake)
    out = tmp_path / "r" / "o.json"
    args = ["--cells", "digits-mlp=8x", "--seeds", "2", "--out", str(out)]
    assert mod.main(["--shift", "alpha=-0.2", *args]) == 0
    assert mod.main(["--shift", "alpha=-0.2", *args]) == 0  # all reused
    assert mod.main(["--shift", "alpha=-0.3", *args]) == 0  # another shift: played again
    assert played == [[0, 1], [0, 1]]
    r = json.loads(out.read_text())
    assert r["shift"] == {"alpha": -0.3} and r["cells"] == 1 and r["diff_test_pt"] == pytest.approx(10.0)
