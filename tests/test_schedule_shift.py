"""experiments/schedule_shift.py: the shift read from a search's best configurations, the cells, the summary."""

import json
import signal
from types import SimpleNamespace

import numpy as np
import pytest
from experiment_loader import load_experiment


def _script():
    return load_experiment("schedule_shift")


def _folder(tmp_path, rows):
    d = tmp_path / "any"
    (d / "cells").mkdir(parents=True)
    (d / "cells" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _best(seed, action, budget=192, tuner="optuna-tpe", scenario="x/c.yaml", **kw):
    return {"tuner": tuner, "scenario": scenario, "target": "8x", "seed": seed, "budget_stages": budget,
            "config": {"action": action}, **kw}


def test_shift_is_the_mean_best_configuration_at_the_largest_budget(tmp_path):
    mod = _script()
    d = _folder(tmp_path, [
        _best(0, [0, 0, -0.4, -0.2, 0]), _best(1, [0, 0, -0.2, 0.0, 0], scenario="x/d.yaml"),
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
    d = _folder(tmp_path, [_best(0, [0] * 5), _best(1, [0.1] * 5, scenario="x/d.yaml")])
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


def test_a_tie_counts_in_cells_ge_and_the_means_are_over_every_row():
    mod = _script()
    s = mod.summarize([_row("a", 0, 0.80, 0.80), _row("a", 1, 0.60, 0.60)])
    assert s["cells_ge"] == 1 and s["zero_test_pct"] == pytest.approx(70.0)


def test_train_tasks_stop_when_the_families_run_out():
    mod = _script()
    from rltune.tasks import TaskSpec, generate_tasks

    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("train_tasks did not stop"))
    signal.alarm(20)
    try:
        got = mod.train_tasks(10 ** 6, 0, 30)
    finally:
        signal.alarm(0)
    assert len(got) == sum(not t.held_out for t in generate_tasks(TaskSpec(seed=0, n_tasks=30)))


def test_play_cell_plays_zero_then_the_shift_in_the_layout_order(monkeypatch):
    mod = _script()
    import rltune.env
    import rltune.env_v1
    import rltune.stage
    import rltune.train

    assert list(mod.ENTRIES) == list(rltune.env.ACTION_LAYOUT)
    made, played = [], []

    class Env:
        plan = {"final_bits": 4}
        state = SimpleNamespace(history=[SimpleNamespace(val_acc=0.25), SimpleNamespace(val_acc=0.5)])

        def context(self, i):
            return None

    monkeypatch.setattr(rltune.env, "DistillCompressEnv", lambda **kw: kw)
    monkeypatch.setattr(rltune.env_v1.DistillCompressEnvV1, "like",
                        classmethod(lambda cls, base, **kw: made.append(kw) or Env()))
    monkeypatch.setattr(rltune.train, "run_episode",
                        lambda env, p, seed=0, options=None: played.append((p.predict(None).copy(), seed, options)) or {"val_acc": 0.5})
    monkeypatch.setattr(rltune.stage, "final_report", lambda ctx, st, latency=False: {"test_acc": 0.5})
    rows = mod.play_cell({"scenario": "s", "name": "c", "target": "8x", "family": "f", "seeds": [2],
                          "shift": {"alpha": -0.2}, "zero_rule": "plus1"})
    assert made == [{"zero_rule": "plus1"}] and len(rows) == 1
    assert rows[0]["zero"]["val_by_stage"] == rows[0]["shifted"]["val_by_stage"] == [0.25, 0.5]
    (a0, s0, o0), (a1, s1, o1) = played
    assert not a0.any() and a1[3] == pytest.approx(-0.2) and np.count_nonzero(a1) == 1
    assert s0 == s1 == 2 * 100_003 and o0 == o1 == {"scenario": 0, "target": "8x", "float_seed": 2}


def test_shift_from_plays_only_the_entries_and_reuse_needs_the_same_zero_rule(tmp_path, monkeypatch):
    mod = _script()
    played = []
    monkeypatch.setattr(mod, "play_cell", lambda job: played.append(job) or
                        [_row(job["name"], s, 0.5, 0.6) for s in job["seeds"]])
    d = _folder(tmp_path, [_best(0, [0.5, 0.1, -0.4, -0.2, 0.3]), _best(1, [0.5, 0.1, -0.2, 0.0, 0.3], scenario="x/d.yaml")])
    out = tmp_path / "o.json"
    args = ["--shift-from", str(d), "--entries", "temperature", "--cells", "digits-mlp=8x", "--seeds", "1", "--out", str(out)]
    assert mod.main(args) == 0
    assert played[0]["shift"] == {"temperature": pytest.approx(-0.3)}
    assert mod.main([*args, "--zero-rule", "plus1"]) == 0 and len(played) == 2


def _stub(mod, monkeypatch, played):
    def fake(job):
        played.append((job["name"], list(job["seeds"])))
        return [_row(job["name"], s, 0.5, 0.6) for s in job["seeds"]]

    monkeypatch.setattr(mod, "play_cell", fake)


def test_out_is_never_an_input_nor_a_folder(tmp_path, capsys, monkeypatch):
    mod = _script()
    played = []
    _stub(mod, monkeypatch, played)
    d = _folder(tmp_path, [_best(0, [0] * 5), _best(1, [0.1] * 5, scenario="y/d.yaml")])
    inp = d / "cells" / "results.jsonl"
    before = inp.read_bytes()
    for out in (inp, tmp_path, ""):
        assert mod.main(["--shift-from", str(d), "--entries", "alpha", "--cells", "digits-mlp=8x",
                         "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--out" in err, err
    assert inp.read_bytes() == before and not played


def test_a_torn_last_line_is_played_again_once_and_a_foreign_row_is_not_reused(tmp_path, monkeypatch):
    mod = _script()
    played = []
    _stub(mod, monkeypatch, played)
    out = tmp_path / "o.json"
    args = ["--shift", "alpha=-0.2", "--cells", "digits-mlp=8x", "--seeds", "3", "--out", str(out)]
    assert mod.main(args) == 0
    rows = out.with_name("o.json.rows.jsonl")
    lines = rows.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["zero"]["test_acc"] = "x"  # a hostile row with the same shift: not reused
    rows.write_text(lines[0] + "\n" + json.dumps(bad) + "\n" + lines[2][:20])  # seed 2 torn
    assert mod.main(args) == 0 and played[-1] == ("digits-mlp", [1, 2])
    assert mod.main(args) == 0 and len(played) == 2  # the torn line was ended: seed 2 kept this time
    assert json.loads(out.read_text())["diff_test_pt"] == pytest.approx(10.0)


def test_a_cell_named_twice_is_played_once(tmp_path, monkeypatch):
    mod = _script()
    played = []
    _stub(mod, monkeypatch, played)
    out = tmp_path / "o.json"
    assert mod.main(["--shift", "alpha=-0.2", "--cells", "digits-mlp=8x", "digits-mlp=8x", "--seeds", "2",
                     "--out", str(out)]) == 0
    assert played == [("digits-mlp", [0, 1])] and len(json.loads(out.read_text())["rows"]) == 2


def _fails_on_wine(job):  # module level: the process pool pickles it
    if job["name"] == "wine-mlp":
        raise RuntimeError("boom")
    return [_row(job["name"], s, 0.5, 0.6) for s in job["seeds"]]


def test_with_workers_a_failing_cell_loses_no_finished_one(tmp_path, monkeypatch):
    mod = _script()
    monkeypatch.setattr(mod, "play_cell", _fails_on_wine)
    out = tmp_path / "o.json"
    with pytest.raises(RuntimeError, match="boom"):
        mod.main(["--shift", "alpha=-0.2", "--cells", "wine-mlp=8x", "digits-mlp=8x", "--seeds", "1",
                  "--workers", "2", "--out", str(out)])
    kept = [json.loads(x) for x in out.with_name("o.json.rows.jsonl").read_text().splitlines()]
    assert [r["cell"] for r in kept] == ["digits-mlp"]


@pytest.mark.parametrize("args, says", [
    (["--entries", "alpha", "--shift", "alpha=-0.1"], "--shift-from"),
    (["--shift", "alpha=-0.1", "alpha=-0.2"], "alpha=-0.2"),
    (["--shift", "alpha=-0.1", "--train-tasks", "-1"], "--train-tasks"),
    (["--shift", "alpha=-0.1", "--workers", "65"], "--workers"),
])
def test_contradictory_options_are_one_line(tmp_path, capsys, args, says):
    mod = _script()
    assert mod.main([*args, "--cells", "digits-mlp=8x", "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("row, says", [
    ({"budget_stages": float("nan")}, "finite"), ({"seed": 1.5}, "whole number"), ({"seed": True}, "whole number"),
    ({"config": {"action": "00000"}}, "list of numbers")])
def test_read_shift_refuses_rows_it_would_misread(tmp_path, row, says):
    mod = _script()
    d = _folder(tmp_path, [_best(0, [0] * 5), {**_best(1, [0.1] * 5), **row}])
    with pytest.raises(ValueError, match=says):
        mod.read_shift(d, "optuna-tpe")


def test_t_is_over_cells_not_seeds(tmp_path):
    """Two cells, each with its seeds in agreement: t is over the 2 cell means, not the 6 rows."""
    mod = _script()
    rows = [_best(s, [0, 0, -0.2, 0, 0]) for s in range(3)]
    rows += [{**_best(s, [0, 0, -0.4, 0, 0]), "scenario": "x/d.yaml"} for s in range(3)]
    s = mod.read_shift(_folder(tmp_path, rows), "optuna-tpe")
    assert s["n"] == 6 and s["cells"] == 2 and s["mean"]["temperature"] == pytest.approx(-0.3)
    assert s["sd"]["temperature"] == pytest.approx(0.1414, abs=1e-4)
    assert s["t"]["temperature"] == pytest.approx(-0.3 / (0.1414 / 2 ** 0.5), rel=1e-3)


def test_cells_from_a_summary_whose_targets_are_not_a_list_is_one_line(tmp_path, capsys):
    """The shared reader (harness.anytime_cells) checks the shape: before, "8x" was read as two targets."""
    mod = _script()
    (tmp_path / "summary.json").write_text(json.dumps({"scenario_targets": {"digits-mlp": "8x"}}))
    assert mod.main(["--shift", "alpha=-0.2", "--cells-from", str(tmp_path), "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--cells-from" in err and len(err.splitlines()) == 1, err
