"""experiments/cut_effect.py: what the one-bit cut paid per task in training episodes."""

import importlib.util
import json
from pathlib import Path

import pytest


def _script():
    spec = importlib.util.spec_from_file_location("cut_effect", Path(__file__).resolve().parents[1] / "experiments" / "cut_effect.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _monitor(path, effects, reps=4):
    """A training monitor: per task, ``reps`` episodes at the recipe's width (reward = effect, in
    points, ×20 / 100) and ``reps`` one bit above (reward 0), then a diverged episode."""
    lines = ['#{"t_start": 0}', "r,l,t,scenario,target,float_val_acc,ratio,plan_final_bits,recipe_bits,reward_accuracy"]
    for i, (task, eff) in enumerate(effects.items()):
        rb = 3 + i % 3
        for k in range(reps):
            noise = 0.01 * (k % 2)
            lines.append(f"0,8,{k},{task},10x,0.9,10.0,{rb},{rb},{0.2 * eff + noise}")
            lines.append(f"0,8,{k},{task},10x,0.9,10.0,{rb + 1},{rb},{noise}")
        lines.append(f"-1,3,9,{task},10x,0.9,10.0,{rb},{rb},")
    path.write_text("\n".join(lines) + "\n")


def test_cut_effect_per_task_split_half_and_groups(tmp_path):
    effects = {f"gen0-{i:04d}-{'synthetic' if i % 2 else 'mnist1d'}": float(e)
               for i, e in enumerate([-3, -1, 0.5, 1, 2, 4, -2, 3, 1.5, -0.5, 2.5, -4])}
    _monitor(tmp_path / "m.csv", effects, reps=6)
    out = tmp_path / "cut.json"
    assert _script().main(["--monitors", str(tmp_path / "m.csv"), "--out", str(out), "--folds", "3"]) == 0
    res = json.loads(out.read_text())
    got = {r["task"]: r["effect_pt"] for r in res["rows"]}
    assert got == pytest.approx(effects, abs=1e-6)  # the diverged episodes (no reward) are left out
    assert res["tasks"] == 12 and res["episodes"] == 12 * 12
    assert res["split_half"]["pearson"] > 0.99  # odd and even episodes give the same per-task effect
    assert res["oracle_gain_pt"] == pytest.approx(sum(max(e, 0) for e in effects.values()) / 12, abs=1e-3)
    assert set(res["by_family"]) == {"synthetic", "mnist1d"} and set(res["by_recipe_bits"]) == {"3", "4", "5"}
    assert {"r2", "sign_accuracy", "gain_pt"} <= set(res["predicted"])


def test_cut_effect_refuses_too_few_tasks_and_missing_files(tmp_path):
    _monitor(tmp_path / "m.csv", {"gen0-0000-synthetic": 1.0})
    with pytest.raises(SystemExit) as e:
        _script().main(["--monitors", str(tmp_path / "m.csv"), "--out", str(tmp_path / "c.json")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        _script().main(["--monitors", str(tmp_path / "nothing.csv"), "--out", str(tmp_path / "c.json")])
    assert e.value.code == 2 and not (tmp_path / "c.json").exists()
