"""experiments/ablate_policy.py: which part of a v1 policy's action is masked, and the summary."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from experiment_loader import load_experiment


def _script():
    return load_experiment("ablate_policy")


def test_masked_zeroes_each_variants_entries():
    from rltune.env import ACTION_LAYOUT

    mod = _script()
    n0, bits = len(ACTION_LAYOUT), ACTION_LAYOUT.index("final_bits")
    a = np.arange(1, n0 + 5, dtype=np.float32)
    assert np.array_equal(mod.masked(a, "full"), a)
    nl = mod.masked(a, "no_layers")
    assert np.array_equal(nl[:n0], a[:n0]) and not nl[n0:].any()
    ns = mod.masked(a, "no_schedule")
    assert ns[bits] == a[bits] and not np.delete(ns[:n0], bits).any() and np.array_equal(ns[n0:], a[n0:])
    bo = mod.masked(a, "bits_only")
    assert bo[bits] == a[bits] and np.count_nonzero(bo) == 1
    assert not mod.masked(a, "zero").any()
    assert np.array_equal(a, np.arange(1, n0 + 5))  # the agent's own action is left alone


def _row(sc, seed, bits=(4, 4), **acc):
    return {"scenario": sc, "target": "8x", "seed": seed,
            **{v: {"test_acc": acc.get(v, acc["full"]), "bits": bits[v == "zero"]}
               for v in ("full", "no_layers", "no_schedule", "bits_only", "zero")}}


def test_summary_counts_cells_at_or_above_every_rule():
    mod = _script()
    rows = [_row("a", 0, (3, 4), full=0.80, zero=0.70), _row("a", 1, (3, 4), full=0.90, zero=0.70),
            _row("b", 0, full=0.50, bits_only=0.60, zero=0.60)]
    rules = {("a", "8x"): {"recipe": 0.85, "recipe-plus1": 0.80, "sensitivity": 0.70},
             ("b", "8x"): {"recipe": 0.55, "recipe-plus1": 0.50, "sensitivity": 0.60}}
    s = mod.summarize(rows, rules)
    # a: full 85 (= the recipe's 85: counts), zero 70; b: full 50, bits_only and zero 60 (= sensitivity)
    assert s["ge_every_rule"] == {"full": 1, "no_layers": 1, "no_schedule": 1, "bits_only": 2, "zero": 1}
    assert s["rules_cells"] == 2
    assert s["same_as_full"] == {"full": 3, "no_layers": 3, "no_schedule": 3, "bits_only": 2, "zero": 0}
    assert s["rows_n"] == 3 and s["cells_bits_differ_from_zero"] == 1  # cells, not the 2 seeds of a
    assert [c["seeds_bits_differ_from_zero"] for c in s["by_cell"]] == [2, 0]
    assert s["mean_minus_full"]["zero"] == pytest.approx(100 * ((0.7 - 0.8) + (0.7 - 0.9) + (0.6 - 0.5)) / 3)
    by = {c["scenario"]: c for c in s["by_cell"]}
    assert by["a"]["full"] == pytest.approx(85.0) and by["a"]["seeds"] == 2 and by["a"]["rules"]["recipe"] == 85.0
    assert "ge_every_rule" not in mod.summarize(rows)
    assert mod.summarize(rows, {("a", "8x"): rules[("a", "8x")]})["rules_cells"] == 1  # b has no rules: left out


def test_rules_are_read_from_a_summary_and_bad_input_is_one_line(tmp_path, capsys):
    mod = _script()
    rows = [{"scenario": "x/tasks/a.yaml", "target": "8x", "tuner": t, "episodes": 1, "test_acc_mean": m}
            for t, m in (("recipe", 0.8), ("recipe-plus1", 0.7), ("sensitivity", 0.9), ("optuna-tpe", 1.0))]
    rows.append({"scenario": "x/tasks/b.yaml", "target": "8x", "tuner": "recipe", "episodes": 1, "test_acc_mean": 0.5})
    rows.append({"scenario": "x/tasks/a.yaml", "target": "8x", "tuner": "recipe", "episodes": 32, "test_acc_mean": 0.1})
    (tmp_path / "summary.json").write_text(json.dumps({"rows": rows, "scenario_targets": {"x/tasks/a.yaml": ["8x"]}}))
    assert mod.read_rules(tmp_path) == {("a", "8x"): {"recipe": 0.8, "recipe-plus1": 0.7, "sensitivity": 0.9}}
    assert mod.read_summary_cells(tmp_path) == {"x/tasks/a.yaml": ["8x"]}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.json").write_text('{"rows": 3, "scenario_targets": []}')
    for args in (["--cells-from", str(bad)], ["--cells", "x=8x", "--rules-from", str(bad)],
                 ["--cells", "no-target"], ["--cells-from", str(tmp_path / "nowhere")], []):
        assert mod.main([*args, "--out", str(tmp_path / "o.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ablate_policy: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "o.json").exists()


def test_cells_are_checked_before_any_episode_and_the_agent_must_be_v1(tmp_path, capsys, monkeypatch):
    mod = _script()
    import rltune.train

    monkeypatch.setattr(rltune.train, "run_episode", lambda *a, **k: pytest.fail("an episode was played"))
    rules = tmp_path / "rules"
    rules.mkdir()
    rows = [{"scenario": "x/wine-mlp.yaml", "target": "16x", "tuner": t, "episodes": 1, "test_acc_mean": 0.9}
            for t in mod.RULES]
    (rules / "summary.json").write_text(json.dumps({"rows": rows, "scenario_targets": {}}))
    out = str(tmp_path / "o.json")
    for args, says in (
            (["--agent", "agents/ppo-v0", "--cells", "wine-mlp=16x"], "not a v1 agent"),
            (["--agent", "agents/ppo-v1s-seed1", "--cells", "wine-mlp=16x", "nowhere-at-all=16x"], "nowhere-at-all"),
            (["--agent", "agents/ppo-v1s-seed1", "--cells", "wine-mlp=16x", "wine-mlp=abc"], "abc"),
            (["--agent", "agents/ppo-v1s-seed1", "--cells", "wine-mlp=24x", "--rules-from", str(rules)], "wine-mlp=24x"),
            (["--agent", "agents/ppo-v1s-seed1", "--cells", "wine-mlp=16x", "--rules-from", str(rules),
              "--out", str(rules / "summary.json")], "one of the inputs")):
        assert mod.main(args if "--out" in args else [*args, "--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.json").exists()


def test_the_agent_plays_in_the_env_ppo_replay_plays_it_in(monkeypatch, tmp_path):
    """Its trained zero rule and deadzones (training.env in agent.json), not the v1 defaults."""
    mod = _script()
    import rltune.train
    from rltune.tuners import _load_agent

    class Played(Exception):
        pass

    seen = []

    def fake(env, policy, seed=0, options=None):
        seen.append((env, seed, options))
        raise Played

    monkeypatch.setattr(rltune.train, "run_episode", fake)
    with pytest.raises(Played):
        mod.main(["--agent", "agents/ppo-v1s-seed1", "--cells", "wine-mlp=16x", "--seeds", "1", "--out", str(tmp_path / "o.json")])
    env, seed, options = seen[0]
    trained = _load_agent("agents/ppo-v1s-seed1").meta["training"]["env"]
    assert (env.zero_rule, env.tilt_deadzone, env.schedule_deadzone) == (
        trained["zero_rule"], trained["tilt_deadzone"], trained["schedule_deadzone"])
    assert trained["zero_rule"] != "plus1"  # the case the old env (v1's default zero rule) got wrong
    assert seed == 0 and options == {"scenario": 0, "target": "16x", "float_seed": 0}


def test_step0_action_keeps_the_models_layers_and_the_summary_the_margins():
    from rltune.env import ACTION_LAYOUT
    from rltune.env_v1 import ACTION_LAYOUT_V1, L_MAX

    mod = _script()
    n0 = len(ACTION_LAYOUT)
    a = np.zeros(len(ACTION_LAYOUT_V1))
    a[:n0] = [-0.27, 0.1, -0.2, 0.05, 0.3]
    a[n0:n0 + L_MAX] = 0.9  # padding slots: not the model's, dropped
    a[n0:n0 + 2] = [0.1, -0.4]
    a[n0 + L_MAX:] = -0.9
    a[n0 + L_MAX:n0 + L_MAX + 2] = [0.2, -0.3]
    s = mod.step0_action(a, 2)
    assert s["final_bits"] == pytest.approx(-0.27) and s["bits_drop"] == pytest.approx(0.3)
    assert s["bit_offsets"] == pytest.approx([0.1, -0.4]) and s["tilts"] == pytest.approx([0.2, -0.3])
    assert len(mod.step0_action(a, 12)["bit_offsets"]) == L_MAX  # more layers than slots: every slot
    b = dict(s, final_bits=-0.15, temperature=0.45, bit_offsets=[0.6], tilts=[])
    m = mod.step0_summary([s, b])
    assert (m["final_bits_min"], m["final_bits_max"]) == (pytest.approx(-0.27), pytest.approx(-0.15))
    assert m["schedule_max_abs"] == pytest.approx(0.45) and m["bits_drop_max_abs"] == pytest.approx(0.3)
    assert m["bit_offset_max_abs"] == pytest.approx(0.6) and m["tilt_max_abs"] == pytest.approx(0.3)
    rows = [dict(_row("a", 0, full=0.5), step0_action=s), dict(_row("a", 1, full=0.5), step0_action=b)]
    out = mod.summarize(rows)
    assert out["step0"] == m and out["by_cell"][0]["final_bits_action"] == pytest.approx(-0.21)
    assert "step0" not in mod.summarize([_row("a", 0, full=0.5)])  # rows from before the field: no summary


def test_main_keeps_the_full_policys_first_raw_action_and_the_agents_deadzones(tmp_path, monkeypatch):
    mod = _script()
    import rltune.compression
    import rltune.stage
    import rltune.train
    import rltune.tuners
    from rltune.env_v1 import ACTION_LAYOUT_V1

    calls = []

    def predict(obs, deterministic=True):  # every call a different action: which one was kept shows
        calls.append(obs)
        a = np.full(len(ACTION_LAYOUT_V1), 0.01 * len(calls), np.float32)
        return a

    agent = SimpleNamespace(predict=predict, meta={"training": {"env_id": rltune.tuners.V1, "env": {
        "zero_rule": "sensitivity", "tilt_deadzone": 0.3, "schedule_deadzone": 0.4}}})
    monkeypatch.setattr(rltune.tuners, "_load_agent", lambda path: agent)

    def episode(env, policy, seed=0, options=None):
        for _ in range(3):  # three steps
            policy.predict(None)
        env.plan, env.layer_plan = {"final_bits": 4}, None
        env.state = SimpleNamespace(model=None)
        env.context = lambda i: None
        return {"val_acc": 0.5}

    monkeypatch.setattr(rltune.train, "run_episode", episode)
    monkeypatch.setattr(rltune.stage, "final_report", lambda ctx, state, latency=False: {"test_acc": 0.5})
    monkeypatch.setattr(rltune.compression, "layers", lambda model: [None] * 3)
    out = tmp_path / "o.json"
    assert mod.main(["--cells", "wine-mlp=16x", "--seeds", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    s0 = r["rows"][0]["step0_action"]
    assert s0["final_bits"] == pytest.approx(0.01)  # the full variant's first call, not a later step's
    assert len(s0["bit_offsets"]) == 3 and len(s0["tilts"]) == 3  # the model's layers
    assert r["step0"]["tilt_acts_at"] == 0.3 and r["step0"]["schedule_acts_at"] == 0.4
