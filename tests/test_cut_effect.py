"""experiments/cut_effect.py: what the one-bit cut paid per task in training episodes."""

import json

import pytest
from experiment_loader import load_experiment


def _script():
    return load_experiment("cut_effect")


def _monitor(path, effects, reps=4, noise=None, bits=None):
    """A training monitor: per task, ``reps`` episodes at the recipe's width (accuracy reward =
    effect in points × 20 / 100, plus ``noise(k)``) and ``reps`` one bit above (reward 0 plus noise),
    then a diverged episode (the env leaves its reward_accuracy at 0; its return carries the -20
    divergence penalty)."""
    noise = noise or (lambda k: 0.01 * ((k // 2) % 2))  # the same small wobble in both arms
    lines = ['#{"t_start": 0}', "r,l,t,scenario,target,float_val_acc,ratio,plan_final_bits,recipe_bits,reward_accuracy,reward_action"]
    for i, (task, eff) in enumerate(effects.items()):
        rb = bits[i] if bits else 3 + i % 3
        for k in range(reps):
            a, b = 0.2 * eff + noise(2 * k), noise(2 * k + 1)
            lines.append(f"{a - 0.01},8,{k},{task},10x,0.9,10.0,{rb},{rb},{a},-0.01")
            lines.append(f"{b - 0.01},8,{k},{task},10x,0.9,10.0,{rb + 1},{rb},{b},-0.01")
        lines.append(f"-20.02,3,9,{task},10x,0.9,10.0,{rb},{rb},0.0,-0.01")
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
    assert res["below_recipe_by_recipe_bits"] == {}  # no episode under the recipe's width


def test_cut_effect_split_half_sees_noise_and_the_ridge_sees_a_width_rule(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    draws = rng.normal(0.0, 0.4, 100_000)  # accuracy-reward noise, 2 pt sd; no per-task effect
    tasks = {f"gen0-{i:04d}-synthetic": 0.0 for i in range(40)}
    _monitor(tmp_path / "noise.csv", tasks, reps=6, noise=lambda k, it=iter(draws): float(next(it)))
    out = tmp_path / "noise.json"
    assert _script().main(["--monitors", str(tmp_path / "noise.csv"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert abs(res["split_half"]["pearson"]) < 0.4 and res["tasks"] == 40
    # an effect that is a function of the recipe's width alone: the cross-validated ridge finds it
    bits = [2 + i % 5 for i in range(40)]
    _monitor(tmp_path / "rule.csv", {t: 2.0 * (b - 4) + 0.5 for t, b in zip(tasks, bits)}, reps=4, bits=bits)
    assert _script().main(["--monitors", str(tmp_path / "rule.csv"), "--out", str(out)]) == 0
    pred = json.loads(out.read_text())["predicted"]
    assert pred["r2"] > 0.9 and pred["sign_accuracy"] == 1.0


def test_cut_effect_refuses_too_few_tasks_and_missing_files(tmp_path):
    _monitor(tmp_path / "m.csv", {"gen0-0000-synthetic": 1.0})
    with pytest.raises(SystemExit) as e:
        _script().main(["--monitors", str(tmp_path / "m.csv"), "--out", str(tmp_path / "c.json")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        _script().main(["--monitors", str(tmp_path / "nothing.csv"), "--out", str(tmp_path / "c.json")])
    assert e.value.code == 2 and not (tmp_path / "c.json").exists()
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage\n\x81")
    with pytest.raises(SystemExit) as e:  # not UTF-8: one clear line, no traceback
        _script().main(["--monitors", str(tmp_path / "bin.csv"), "--out", str(tmp_path / "c.json")])
    assert e.value.code == 2 and not (tmp_path / "c.json").exists()


def test_below_the_recipe_is_its_own_arm_pair():
    """A cut under the recipe's width (db -1) against the recipe's (db 0), not against plus one."""
    mod = _script()
    rows = ([{"task": "t8", "acc": a, "db": db, "recipe_bits": 8, "float_val_acc": 0.9, "ratio": 5.0}
             for db, a in ((-1, -0.3), (-1, -0.1), (0, 0.0), (0, 0.2))]
            + [{"task": "t4", "acc": a, "db": db, "recipe_bits": 4, "float_val_acc": 0.9, "ratio": 9.0}
               for db, a in ((0, 0.5), (1, 0.1), (-1, 2.0))])
    below = mod.effects(rows, 1, arms=(-1, 0))
    assert below["t8"]["effect_pt"] == pytest.approx(-0.2 - 0.1) and below["t8"]["cut"] == 2
    assert below["t4"]["effect_pt"] == pytest.approx(2.0 - 0.5)
    cut = mod.effects(rows, 1)
    assert set(cut) == {"t4"} and cut["t4"]["effect_pt"] == pytest.approx(0.4)  # t8 has no plus-one arm
    assert mod._group(below, "recipe_bits")["8"]["mean_pt"] == pytest.approx(-0.3)
