"""Anytime curves: the per-episode record of new bests, and the policy-based tuners that spend N."""

from pathlib import Path

import numpy as np
import pytest

from rltune.errors import RltuneError
from rltune.env import DistillCompressEnv
from rltune.scenario import parse_scenario
from rltune.stage import final_report
from rltune.tuners import anytime_curve, anytime_points, run_tuner
from experiment_loader import load_experiment

TINY = parse_scenario({
    "name": "tiny-any", "dataset": {"source": "wine", "transfer": 200},
    "teacher": {"arch": "mlp", "hidden": [32], "epochs": 30},
    "student": {"arch": "mlp", "hidden": [16], "pretrain_epochs": 5},
    "training": {"stages": 3, "epochs_per_stage": 1, "batch_size": 64, "lr": 0.005},
})
S = 3


@pytest.fixture(scope="module")
def env():
    return DistillCompressEnv(scenarios=[TINY], targets=["6x"])


@pytest.fixture(scope="module")
def agent(env, tmp_path_factory):
    from stable_baselines3 import PPO

    from rltune.agentfile import save_agent
    from rltune.env import ACTION_LAYOUT, OBS_LAYOUT

    model = PPO("MlpPolicy", env, policy_kwargs={"net_arch": [8]}, n_steps=16, batch_size=16, seed=0)
    return save_agent(model, tmp_path_factory.mktemp("agent") / "a", OBS_LAYOUT, ACTION_LAYOUT,
                      {"scenarios": ["tiny-any"]})


def test_anytime_points_and_curve_from_the_record_of_new_bests():
    assert anytime_points(1) == [1] and anytime_points(8) == [1, 2, 4, 8] and anytime_points(5) == [1, 2, 4, 5]
    rec = [{"episode": 0, "val_acc": 0.5, "val_score": 0, "test_acc": 0.4, "test_score": 0},
           {"episode": 2, "val_acc": 0.7, "val_score": 0, "test_acc": 0.6, "test_score": 0},
           {"episode": 4, "val_acc": 0.8, "val_score": 0, "test_acc": 0.5, "test_score": 0}]
    curve = anytime_curve(rec, 5)
    assert [(c["episodes"], c["best_episode"], c["test_acc"]) for c in curve] == \
        [(1, 0, 0.4), (2, 0, 0.4), (4, 2, 0.6), (5, 4, 0.5)]


def test_the_anytime_record_is_the_best_so_far_by_val(env):
    r = run_tuner("random", env, 0, "6x", 0, 5 * S)
    vals = r.episode_val_accs
    assert r.episodes == 5 and [c["episodes"] for c in r.anytime] == [1, 2, 4, 5]
    for c in r.anytime:  # best by val of the first N episodes, the first such on ties
        assert c["val_acc"] == max(vals[:c["episodes"]])
        assert c["best_episode"] == vals.index(max(vals[:c["episodes"]]))
    assert all(a["val_acc"] <= b["val_acc"] for a, b in zip(r.anytime, r.anytime[1:]))
    assert all(a["val_acc"] < b["val_acc"] for a, b in zip(r.improvements, r.improvements[1:]))
    assert r.anytime[-1]["test_acc"] == r.test["test_acc"] and r.anytime[-1]["val_acc"] == r.val_acc
    # the best student was not touched by the episodes after it: its report now is the recorded one
    assert final_report(env.context(0), r.state, latency=False)["test_acc"] == r.improvements[-1]["test_acc"]
    assert 0 < r.probe_stages < 100 and r.to_dict()["anytime"] == r.anytime


def test_a_prefix_of_a_search_is_the_search_at_that_budget(env):
    # random search draws its episodes in order, so its first 2 of 5 episodes are its 2-episode run
    big = run_tuner("random", env, 0, "6x", 1, 5 * S)
    small = run_tuner("random", env, 0, "6x", 1, 2 * S)
    at2 = next(c for c in big.anytime if c["episodes"] == 2)
    assert big.episode_val_accs[:2] == small.episode_val_accs
    assert at2["val_acc"] == small.val_acc and at2["test_acc"] == small.test["test_acc"]


def test_ppo_best_of_n_replays_the_policy_within_budget_best_by_val(env, agent):
    counted = []
    real = env.advance
    env.advance = lambda *a, **k: (counted.append(1), real(*a, **k))[1]  # every stage goes through it
    try:
        r = run_tuner("ppo-best-of-n", env, 0, "6x", 0, 4 * S + 2, agent=agent)
    finally:
        del env.advance
    counted = len(counted)
    assert counted == r.stages_used == 4 * S and r.episodes == 4
    assert r.val_acc == max(r.episode_val_accs)
    assert r.config["replay"] == r.episode_val_accs.index(r.val_acc)
    one = run_tuner("ppo-replay", env, 0, "6x", 0, 4 * S, agent=agent)
    assert r.episode_val_accs[0] == one.val_acc  # its first episode is ppo-replay's
    assert len(set(r.episode_val_accs)) > 1  # each replay trains with its own seed


def test_ppo_best_of_n_in_batches_plays_the_same_episodes(env, agent):
    seq = run_tuner("ppo-best-of-n", env, 0, "6x", 2, 4 * S, agent=agent)
    bat = run_tuner("ppo-best-of-n", DistillCompressEnv(scenarios=[TINY], targets=["6x"]), 0, "6x", 2, 4 * S,
                    agent=agent, batch=3)
    assert bat.episodes == seq.episodes == 4 and bat.stages_used == 4 * S
    # the same episodes (within a val sample or two: a batched matmul sums in another order)
    assert np.allclose(seq.episode_val_accs, bat.episode_val_accs, atol=0.02)


@pytest.mark.parametrize("batch", [1, 2])
def test_ppo_warm_tpe_first_trial_is_the_policys_replay(env, agent, tmp_path, batch):
    import optuna

    storage = f"sqlite:///{tmp_path / 'o.db'}"
    r = run_tuner("ppo-warm-tpe", env, 0, "6x", 0, 4 * S, agent=agent, storage=storage, batch=batch)
    one = run_tuner("ppo-replay", env, 0, "6x", 0, S, agent=agent)
    assert r.episodes == 4 and r.stages_used == 4 * S
    assert r.episode_val_accs[0] == one.val_acc and r.anytime[0]["test_acc"] == one.test["test_acc"]
    trials = optuna.load_study(study_name="rltune-ppo-warm-tpe-tiny-any-6x-0-4ep", storage=storage).trials
    assert len(trials) == 4 and trials[0].value == one.val_acc
    assert len(trials[0].user_attrs["policy_actions"]) == S
    assert all(-1 <= v <= 1 for v in trials[0].params.values()) and len(trials[0].params) == 5
    assert [t.value for t in trials] == r.episode_val_accs


def _anytime_script():
    return load_experiment("anytime", "anytime_script")


def test_the_anytime_script_writes_its_summary_and_plots_and_resumes(agent, tmp_path, monkeypatch):
    import json

    import yaml

    import rltune.harness as H

    f = tmp_path / "tiny-any.yaml"
    f.write_text(yaml.safe_dump(TINY.to_dict()))
    out = tmp_path / "any"
    argv = ["--scenario-targets", f"{f}=6x", "--seeds", "1", "--max-episodes", "4", "--workers", "1",
            "--batch", "2", "--no-progress", "--agent", str(agent), "--out", str(out),
            "--tuners", "recipe", "ppo-replay", "random", "optuna-tpe", "ppo-best-of-n", "ppo-warm-tpe"]
    script = _anytime_script()
    assert script.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    fields = {"scenario", "target", "tuner", "episodes", "budget_stages", "n_seeds", "test_acc_mean",
              "test_acc_std", "in_agent_training_set"}
    rows = summary["rows"]
    assert rows and all(fields <= set(r) for r in rows)
    eps = {t: sorted(r["episodes"] for r in rows if r["tuner"] == t) for t in {r["tuner"] for r in rows}}
    assert eps["recipe"] == eps["ppo-replay"] == [1]
    assert eps["random"] == eps["optuna-tpe"] == eps["ppo-best-of-n"] == eps["ppo-warm-tpe"] == [1, 2, 4]
    cells = H.read_results(out / "cells" / "results.jsonl")
    rnd = next(c for c in cells if c["tuner"] == "random")
    at4 = next(r for r in rows if r["tuner"] == "random" and r["episodes"] == 4)
    assert at4["test_acc_mean"] == rnd["test"]["test_acc"] and at4["n_seeds"] == 1
    assert at4["budget_stages"] == pytest.approx(4 * S + rnd["probe_stages"], abs=1e-3)
    # ppo-warm-tpe's and ppo-best-of-n's N = 1 is the policy's replay
    at1 = {r["tuner"]: r["test_acc_mean"] for r in rows if r["episodes"] == 1}
    assert at1["ppo-warm-tpe"] == at1["ppo-best-of-n"] == at1["ppo-replay"]
    (ans,) = summary["answers"]
    assert ans["best_zero_search_rule"] == "recipe" and ans["compared_at"] == [1, 2, 4]
    assert isinstance(ans["policy_search_below_tpe_at"], list) and "tpe_first_beats_zero_search_at" in ans
    assert (out / "anytime_tiny-any.png").stat().st_size > 1000
    # rerunning resumes: no cell runs again, the same summary
    monkeypatch.setattr(H, "run_cell", lambda *a, **k: pytest.fail("a finished cell was rerun"))
    assert script.main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["rows"] == rows
    # --rerun drops one tuner's cells and runs only those again; a run of another scenario keeps this one
    monkeypatch.undo()
    ran = []
    real = H.run_cell
    monkeypatch.setattr(H, "run_cell", lambda c, *a, **k: ran.append(c.tuner) or real(c, *a, **k))
    assert script.main([*argv, "--rerun", f"{f}=recipe"]) == 0
    assert ran == ["recipe"]
    g = tmp_path / "tiny-other.yaml"
    g.write_text(yaml.safe_dump({**TINY.to_dict(), "name": "tiny-other"}))
    assert script.main(["--scenario-targets", f"{g}=6x", "--seeds", "1", "--max-episodes", "4", "--workers", "1",
                        "--no-progress", "--out", str(out), "--tuners", "recipe"]) == 0
    both = json.loads((out / "summary.json").read_text())
    assert list(both["scenario_targets"]) == [str(f), str(g)] and both["commands"]
    assert {r["scenario"] for r in both["rows"]} == {str(f), str(g)}
    assert [r for r in both["rows"] if r["scenario"] == str(f)] == [r for r in rows]  # the first kept whole
    with pytest.raises(RltuneError, match="--rerun"):  # one line and status 2 from the command line
        script.main([*argv, "--rerun", f"{g}=recipe"])  # not a scenario of this run


def test_the_anytime_answers():
    rows = [{"scenario": "s", "target": "8x", "tuner": t, "episodes": n, "test_acc_mean": m}
            for t, n, m in [("recipe", 1, 0.80), ("sensitivity", 1, 0.82), ("optuna-tpe", 1, 0.70),
                            ("optuna-tpe", 2, 0.81), ("optuna-tpe", 4, 0.83), ("ppo-best-of-n", 1, 0.80),
                            ("ppo-best-of-n", 2, 0.80), ("ppo-warm-tpe", 2, 0.82), ("ppo-best-of-n", 4, 0.82)]]
    (a,) = _anytime_script().answers(rows)
    assert a["best_zero_search_rule"] == "sensitivity" and a["tpe_first_beats_zero_search_at"] == 4
    assert a["policy_search_ge_tpe_at_every_n"] is False and a["policy_search_below_tpe_at"] == [4]
    assert "replay_acc" not in a


def test_the_replay_targets_and_their_count():
    script = _anytime_script()
    rows = [{"scenario": s, "target": "8x", "tuner": t, "episodes": n, "test_acc_mean": m, "test_acc_std": sd}
            for s, reps in (("a", 0.81), ("b", 0.77), ("c", 0.84))
            for t, n, m, sd in [("recipe", 1, 0.80, 0.02), ("recipe-plus1", 1, 0.79, 0.01), ("optuna-tpe", 1, 0.70, 0.0),
                                ("optuna-tpe", 32, 0.83, 0.01), ("ppo-replay", 1, reps, 0.01),
                                ("ppo-warm-tpe", 1, reps, 0.01), ("ppo-warm-tpe", 32, 0.83, 0.01)]]
    ans = script.answers(rows)
    a, b, c = ans
    assert a["replay_ge_every_zero_search"] and not a["replay_below_recipe_by_more_than_its_std"]
    assert a["replay_minus_best_zero_search"] == pytest.approx(0.01) and not a["replay_ge_tpe_at_max_n"]
    assert not b["replay_ge_every_zero_search"] and b["replay_below_recipe_by_more_than_its_std"]
    assert c["replay_ge_tpe_at_max_n"] and c["moonshot_tpe_episodes"] == 32
    o = script.overall(ans)
    assert o["replay_cells"] == 3 and o["replay_ge_every_zero_search"] == 2
    assert o["replay_below_recipe_by_more_than_its_std"] == 1 and o["replay_ge_tpe_at_max_n"] == 1
    assert o["policy_search_ge_tpe_at_every_n"] == 3 and o["policy_search_cells"] == 3  # ties count


def test_held_out_tasks_become_scenario_files_at_their_own_targets(tmp_path):

    from rltune.scenario import load_scenario
    from rltune.tasks import TaskSpec, generate_tasks

    mod = load_experiment("anytime", "anytime_script")
    got = mod.held_out_tasks(3, 0, 240, tmp_path / "tasks")
    held = [t for t in generate_tasks(TaskSpec(seed=0, n_tasks=240)) if t.held_out][:3]
    assert list(got.values()) == [[t.target] for t in held]
    for f, t in zip(got, held):
        assert load_scenario(f).to_dict() == t.load().to_dict()  # the same task, teacher cache key and all
    assert mod.held_out_tasks(3, 0, 240, tmp_path / "tasks") == got  # written once, read again the same


def test_train_tasks_are_trained_on_tasks_the_families_in_turn(tmp_path):
    from rltune.scenario import load_scenario
    from rltune.tasks import TaskSpec, generate_tasks, trained_on

    mod = load_experiment("anytime", "anytime_script")
    got = mod.held_out_tasks(5, 0, 240, tmp_path / "tasks", trained_on=True)
    picked = trained_on(TaskSpec(seed=0, n_tasks=240), 5)
    assert not any(t.held_out for t in picked)
    train = [t for t in generate_tasks(TaskSpec(seed=0, n_tasks=240)) if not t.held_out]
    families = {t.family for t in train}  # (seed 0 holds the one digits set out: four families)
    assert len(picked) == 5 and {t.family for t in picked[:len(families)]} == families  # each in turn
    assert [Path(f).stem for f in got] == [t.name for t in picked]
    assert list(got.values()) == [[t.target] for t in picked]
    for f, t in zip(got, picked):
        assert load_scenario(f).to_dict() == t.load().to_dict()
    assert len(trained_on(TaskSpec(seed=0, n_tasks=240), 10 ** 6)) == len(train)  # all, once each


def test_negative_task_counts_are_refused(tmp_path):
    mod = load_experiment("anytime", "anytime_script")
    with pytest.raises(RltuneError, match="whole numbers >= 0"):
        mod.main(["--train-tasks", "-1", "--tuners", "recipe", "--out", str(tmp_path / "o")])


def test_baseline_from_joins_another_folders_agent_free_cells_without_rerunning_them(agent, tmp_path, monkeypatch):
    import json

    import yaml

    import rltune.harness as H

    f = tmp_path / "tiny-any.yaml"
    f.write_text(yaml.safe_dump(TINY.to_dict()))
    base, new = tmp_path / "base", tmp_path / "new"
    common = ["--scenario-targets", f"{f}=6x", "--seeds", "1", "--max-episodes", "2", "--workers", "1", "--no-progress"]
    script = _anytime_script()
    assert script.main([*common, "--tuners", "recipe", "ppo-replay", "--agent", str(agent), "--out", str(base)]) == 0
    ran = []
    real = H.run_cell
    monkeypatch.setattr(H, "run_cell", lambda c, *a, **k: ran.append(c.tuner) or real(c, *a, **k))
    assert script.main([*common, "--tuners", "ppo-replay", "--agent", str(agent), "--out", str(new),
                        "--baseline-from", str(base)]) == 0
    assert ran == ["ppo-replay"]  # the recipe is not rerun, and the other folder's ppo-replay is not taken
    s_base = json.loads((base / "summary.json").read_text())
    s_new = json.loads((new / "summary.json").read_text())
    pick = lambda s, t: [r for r in s["rows"] if r["tuner"] == t]  # noqa: E731
    assert pick(s_new, "recipe") == pick(s_base, "recipe") and s_new["tuners"] == ["recipe", "ppo-replay"]
    assert s_new["baseline_from"]["tuners"] == ["recipe"] and s_new["baseline_from"]["commands"] == s_base["commands"]
    assert "recipe" not in {r["tuner"] for r in H.read_results(new / "cells" / "results.jsonl")}
    # a rule this folder runs itself on another scenario keeps the other folder's cells of the first
    g = tmp_path / "tiny-other.yaml"
    g.write_text(yaml.safe_dump({**TINY.to_dict(), "name": "tiny-other"}))
    assert script.main(["--scenario-targets", f"{g}=6x", *common[2:], "--tuners", "recipe", "--out", str(new),
                        "--baseline-from", str(base)]) == 0
    again = json.loads((new / "summary.json").read_text())
    assert pick(again, "recipe") and {r["scenario"] for r in pick(again, "recipe")} == {str(f), str(g)}
    with pytest.raises(RltuneError, match="--baseline-from"):
        script.main([*common, "--tuners", "ppo-replay", "--agent", str(agent), "--out", str(new),
                     "--baseline-from", str(tmp_path / "nowhere")])
