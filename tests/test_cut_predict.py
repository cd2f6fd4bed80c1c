"""experiments/cut_predict.py: can the step-0 observation predict the one-bit cut's value."""

import json
from pathlib import Path

import numpy as np
import pytest
from experiment_loader import load_experiment


def _script():
    return load_experiment("cut_predict")


def test_cv_scores_find_a_signal_and_not_noise():
    mod = _script()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 6))
    y = 2.0 * X[:, 0] + 0.2 * rng.normal(size=120)  # the effect is the first feature
    s = mod.cv_scores(X, y, "ridge", folds=5, repeats=2)
    assert s["r2"] > 0.9 and s["sign_accuracy"] > 0.9
    assert s["gain_pt"] == pytest.approx(np.clip(y, 0, None).mean(), rel=0.1)  # cuts about where it pays
    # the gain is the labels' where the prediction is > 0, not the predictions': a label the features
    # see only as a sign (its size is noise) predicts as about +-1 but pays what it measured
    big = np.sign(X[:, 0]) * rng.choice([0.1, 10.0], size=120)
    g = mod.cv_scores(X, big, "ridge", folds=5, repeats=2)
    from sklearn.model_selection import KFold, cross_val_predict

    preds = [cross_val_predict(mod.make_model("ridge", r), X, big, cv=KFold(5, shuffle=True, random_state=r)) for r in range(2)]
    assert g["gain_pt"] == pytest.approx(np.mean([np.where(q > 0, big, 0.0).mean() for q in preds]), abs=1e-3)
    assert abs(g["gain_pt"] - np.mean([np.clip(q, 0, None).mean() for q in preds])) > 0.2  # not the predictions'
    noise = rng.normal(size=120)
    for m in mod.MODELS:
        n = mod.cv_scores(X, noise, m, folds=5, repeats=2)
        assert n["r2"] < 0.1 and n["sign_accuracy"] < 0.65


def test_layer_summary_ignores_slot_order_and_padding():
    mod = _script()
    feats = ["present", "param_share", "is_head", "dacc"]
    rows = [[1, 0.2, 0, -0.1], [1, 0.7, 0, -0.5], [1, 0.1, 1, -0.9]]
    pad = [0, 0, 0, 0]
    a = [9.0] + sum(rows + [pad], [])  # one global feature, 4 slots
    b = [9.0] + sum([rows[1], pad, rows[2], rows[0]], [])
    sa, sb = mod.layer_summary([a], 1, 4, feats), mod.layer_summary([b], 1, 4, feats)
    assert np.allclose(sa, sb)
    # dacc: weighted mean, min, max over present layers (padding's 0 is neither a min nor a max), the head's
    dacc = sa[0, -4:]
    assert np.allclose(dacc, [0.2 * -0.1 + 0.7 * -0.5 + 0.1 * -0.9, -0.9, -0.1, -0.9])
    # a model cut to its first layers and head: the covered shares are renormalised to sum to 1
    half = [9.0] + sum([[1, 0.1, 0, 0.3], [1, 0.1, 1, 0.5], pad, pad], [])
    assert np.allclose(mod.layer_summary([half], 1, 4, feats)[0, -4:], [0.4, 0.3, 0.5, 0.5])


def test_held_out_cells_pair_the_two_tuners(tmp_path):
    mod = _script()
    rows = [{"scenario": "x/tasks/gen0-0001-digits.yaml", "target": "8x", "tuner": "sensitivity", "episodes": 1, "test_acc_mean": 0.9},
            {"scenario": "x/tasks/gen0-0001-digits.yaml", "target": "8x", "tuner": "sensitivity-pick", "episodes": 1, "test_acc_mean": 0.92},
            {"scenario": "x/tasks/gen0-0002-digits.yaml", "target": "8x", "tuner": "sensitivity", "episodes": 1, "test_acc_mean": 0.8},
            {"scenario": "x/tasks/gen0-0001-digits.yaml", "target": "8x", "tuner": "optuna-tpe", "episodes": 4, "test_acc_mean": 0.95}]
    pick_rows = [rows.pop(1), {**rows[0], "tuner": "sensitivity-pick", "episodes": 2, "test_acc_mean": 0.5}]
    for folder, rs in (("a", rows), ("b", pick_rows)):  # the two tuners in two result folders
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "summary.json").write_text(json.dumps({"rows": rs}))
    cells = mod.held_out_cells([tmp_path / "a", tmp_path / "b"], "sensitivity", "sensitivity-pick")
    # one-episode rows only; 0002 has one arm only
    assert cells == {("gen0-0001-digits", "8x"): pytest.approx({"keep": 90.0, "cut": 92.0})}
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "summary.json").write_text(json.dumps({"rows": [{**rows[0], "test_acc_mean": 0.7}]}))
    with pytest.raises(ValueError):  # the same cell and tuner with another figure in another folder
        mod.held_out_cells([tmp_path / "a", tmp_path / "c"], "sensitivity", "sensitivity-pick")


def test_bad_input_is_one_error_line_and_status_2(tmp_path, capsys):
    mod = _script()
    out = tmp_path / "o.json"
    with pytest.raises(SystemExit) as e:
        mod.main(["--effects", str(tmp_path / "missing.json"), "--out", str(out)])
    assert e.value.code == 2
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(SystemExit) as e:
        mod.main(["--effects", str(tmp_path / "bad.json"), "--out", str(out)])
    assert e.value.code == 2
    few = tmp_path / "few.json"
    few.write_text(json.dumps({"rows": [{"task": "gen0-0001-digits", "effect_pt": 1.0}]}))
    with pytest.raises(SystemExit) as e:
        mod.main(["--effects", str(few), "--out", str(out)])
    assert e.value.code == 2
    varied = tmp_path / "varied.json"
    varied.write_text(json.dumps({"rows": [{"task": f"gen0-{i:04d}-digits", "effect_pt": float(i)} for i in range(12)]}))
    many = tmp_path / "many.json"
    many.write_text(json.dumps({"rows": [{"task": f"gen0-{i:04d}-digits", "effect_pt": 1.0} for i in range(12)]}))
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "summary.json").write_text("{not json")
    with pytest.raises(SystemExit) as e:
        mod.main(["--effects", str(varied), "--held-out", str(tmp_path / "h"), "--out", str(out)])
    assert e.value.code == 2
    for bad in ({"rows": [1, 2]}, {"rows": {"a": 1}}):  # malformed rows
        (tmp_path / "h" / "summary.json").write_text(json.dumps(bad))
        with pytest.raises(SystemExit) as e:
            mod.main(["--effects", str(varied), "--held-out", str(tmp_path / "h"), "--out", str(out)])
        assert e.value.code == 2
    with pytest.raises(SystemExit) as e:  # every effect the same: nothing to predict
        mod.main(["--effects", str(many), "--out", str(out)])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:  # a set that is not v1 generated tasks
        mod.main(["--effects", str(varied), "--set", "smoke", "--out", str(out),
                  "--hyperparams", str(Path(__file__).resolve().parents[1] / "agents" / "ppo.yml")])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    # each failure: argparse's usage line, then one error line
    errors = [l for l in err if "error:" in l]
    assert len(errors) == 8 and all(l.split("error:")[1].strip() for l in errors)
    assert not [l for l in err if l and not l.startswith(("usage:", " ")) and "error:" not in l]
    assert not out.exists()
