"""Generated tasks: a seeded spec, hundreds of distinct valid scenarios, a held-out slice by dataset."""

import json

import pytest

from rltune.errors import RltuneError
from rltune.tasks import FAMILIES, Task, TaskSpec, generate_tasks


@pytest.fixture(scope="module")
def tasks():
    return generate_tasks(TaskSpec(seed=0, n_tasks=240))


def test_the_default_spec_gives_hundreds_of_distinct_valid_tasks(tasks):
    assert len(tasks) == 240 and len({t.key for t in tasks}) == 240
    assert sum(not t.held_out for t in tasks) >= 200
    assert {t.family for t in tasks} == set(FAMILIES)
    for t in tasks:
        s = t.load()  # every one is a scenario the env takes
        assert s.name == t.name and s.training["stages"] in (6, 8)
    kinds = {t.target[-1] for t in tasks}
    assert kinds == {"x", "B", "J"}  # ratio, bytes and energy budgets
    from rltune.budget import Budget

    ratios = [Budget.parse(t.target).value for t in tasks if t.target.endswith("x")]
    assert 4 <= min(ratios) and max(ratios) <= 48
    archs = {t.scenario["student"]["arch"] for t in tasks}
    assert archs == {"linear", "mlp", "cnn1d", "cnn2d"}
    depths = {len(t.scenario["student"].get("hidden", [])) for t in tasks if t.scenario["student"]["arch"] == "mlp"}
    assert depths == {1, 2, 3, 4}


def test_same_spec_same_tasks_another_seed_other_tasks(tasks):
    again = generate_tasks({"seed": 0, "n_tasks": 240})
    assert [t.to_dict() for t in again] == [t.to_dict() for t in tasks]
    other = generate_tasks(TaskSpec(seed=1, n_tasks=240))
    assert len({t.key for t in other} & {t.key for t in tasks}) < 10
    json.dumps([t.to_dict() for t in tasks])  # serialisable, for agent.json and the workers


def test_the_held_out_slice_is_whole_datasets(tasks):
    def data(t: Task) -> str:
        return json.dumps([t.scenario["dataset"], t.scenario["teacher"]], sort_keys=True)

    held = {data(t) for t in tasks if t.held_out}
    seen = {data(t) for t in tasks if not t.held_out}
    assert held and not held & seen
    many = generate_tasks(TaskSpec(seed=3, n_tasks=1200))
    share = sum(t.held_out for t in many) / len(many)
    assert 0.07 < share < 0.25


@pytest.mark.parametrize("bad", [
    {"families": ["imagenet"]}, {"families": []}, {"n_tasks": 0}, {"n_tasks": 2.5}, {"held_out_share": 1.0},
    {"min_ratio": 0.5}, {"min_ratio": 30, "max_ratio": 10}, {"bytes_share": 0.8, "energy_share": 0.5},
    {"students_per_dataset": 0}, {"colour": "red"},
])
def test_an_impossible_spec_is_one_clear_error(bad):
    with pytest.raises(RltuneError, match="TaskSpec"):
        generate_tasks(bad)


def test_a_generated_task_runs_an_episode_in_the_env(tasks):
    from rltune.env import DistillCompressEnv

    t = next(t for t in tasks if t.family == "tabular" and t.target.endswith("x"))
    env = DistillCompressEnv(scenarios=[t.load()], targets=[t.target])
    env.reset(seed=0)
    done, info = False, {}
    while not done:
        _, _, term, trunc, info = env.step(env.action_space.sample() * 0)
        done = term or trunc
    assert 0.0 <= info["val_acc"] <= 1.0 and info["ratio"] > 1.0


def test_the_timing_script_refuses_bad_arguments_with_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "task_episodes.py"
    for args in (["--spec", '{"colour": 1}'], ["--spec", "not json"], ["--sample", "-1"]):
        p = subprocess.run([sys.executable, str(script), *args, "--out", str(tmp_path / "t.json")],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t.json").exists()
