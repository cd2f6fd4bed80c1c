"""experiments/anytime_null.py (a search against itself at every N) and the harness's sampler seed offset."""

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest


def _script():
    spec = importlib.util.spec_from_file_location(
        "anytime_null", Path(__file__).resolve().parents[1] / "experiments" / "anytime_null.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _folder(root: Path, name: str, tuner: str, curves: dict) -> Path:
    """An anytime folder whose ``tuner`` has ``curves[(cell, seed)] = [acc at N = 1, 2, 4]``."""
    rows = []
    for (cell, seed), accs in curves.items():
        rows.append({"tuner": tuner, "scenario": f"somewhere/{name}/tasks/{cell}.yaml", "target": "8x", "seed": seed,
                     "budget_stages": 24,
                     "anytime": [{"episodes": n, "test_acc": a} for n, a in zip((1, 2, 4), accs)]})
        # a smaller run of the same cell and seed, and another tuner's row: both ignored
        rows.append({**rows[-1], "budget_stages": 12, "anytime": [{"episodes": 1, "test_acc": 0.0}]})
        rows.append({**rows[-2], "tuner": "other", "anytime": [{"episodes": 1, "test_acc": 1.0}]})
    d = root / name
    (d / "cells").mkdir(parents=True)
    (d / "cells" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_pairs_count_cells_at_every_n(tmp_path):
    mod = _script()
    a = _folder(tmp_path, "a", "optuna-tpe", {("c1", 0): [0.5, 0.6, 0.7], ("c1", 1): [0.5, 0.6, 0.7],
                                              ("c2", 0): [0.5, 0.5, 0.5], ("c2", 1): [0.5, 0.5, 0.5]})
    b = _folder(tmp_path, "b", "optuna-tpe", {("c1", 0): [0.4, 0.6, 0.8], ("c1", 1): [0.4, 0.6, 0.8],
                                              ("c2", 0): [0.6, 0.4, 0.4], ("c2", 1): [0.6, 0.4, 0.4]})
    c = _folder(tmp_path, "c", "ppo-warm-tpe", {("c1", 0): [0.0, 0.0, 0.9], ("c1", 1): [0.0, 0.0, 0.9],
                                                ("c2", 0): [0.0, 0.0, 0.0], ("c2", 1): [0.0, 0.0, 0.0]})
    out = tmp_path / "null.json"
    rc = mod.main(["--series", f"a={a}:optuna-tpe", f"b={b}:optuna-tpe", f"c={c}:ppo-warm-tpe",
                   "--pairs", "a:b", "b:a", "a:a", "a|c:b", "--out", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())["pairs"]
    # c1: a is below b at N=4 only; c2: a is below b at N=1 only
    assert r["a:b"]["cells"] == 2 and r["a:b"]["ge_every_n"] == 0 and r["a:b"]["ge_every_n_from_2"] == 1
    assert [c["below_at"] for c in r["a:b"]["by_cell"]] == [[4], [1]]
    assert r["a:b"]["mean_diff_pt"] == {"1": pytest.approx(0.0), "2": pytest.approx(5.0), "4": pytest.approx(0.0)}
    assert r["a:b"]["paired_sd_pt"]["1"] == pytest.approx(0.0)
    assert r["b:a"]["ge_every_n"] == 0 and [c["below_at"] for c in r["b:a"]["by_cell"]] == [[1], [2, 4]]
    assert r["b:a"]["ge_every_n_from_2"] == 1
    assert r["a:a"]["ge_every_n"] == 2  # a search always keeps up with itself
    # a|c: the larger mean at each N (c's 0.9 at N=4 in c1), so c1 passes; c2 still fails at N=1
    assert r["a|c:b"]["ge_every_n"] == 1
    # c2: a's 0.5 against b's 0.6 at N=1, the same in both seeds: a shortfall the seeds resolve
    assert [c["clearly_below_at"] for c in r["a:b"]["by_cell"]] == [[4], [1]]
    assert r["a:b"]["clearly_below_somewhere"] == 2 and r["a:a"]["clearly_below_somewhere"] == 0


def test_paired_sd_is_the_seed_difference_spread(tmp_path):
    mod = _script()
    a = _folder(tmp_path, "a", "t", {("c", 0): [0.5, 0.5, 0.5], ("c", 1): [0.7, 0.7, 0.7], ("c", 2): [0.6, 0.6, 0.6]})
    b = _folder(tmp_path, "b", "t", {("c", 0): [0.5, 0.5, 0.5], ("c", 1): [0.5, 0.5, 0.5], ("c", 9): [0.0, 0.0, 0.0]})
    out = tmp_path / "n.json"
    assert mod.main(["--series", f"a={a}:t", f"b={b}:t", "--pairs", "a:b", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["pairs"]["a:b"]
    assert r["by_cell"][0]["seeds"] == 2  # only the seeds both have
    assert r["paired_sd_pt"]["1"] == pytest.approx(100 * 0.2 / 2 ** 0.5, abs=1e-3)  # sd of (0, 0.2)
    assert r["mean_diff_pt"]["1"] == pytest.approx(10.0)
    assert r["clearly_below_somewhere"] == 0


def test_clearly_below_needs_the_seeds_to_agree(tmp_path):
    mod = _script()
    # a is 1 pt below b on average, but the seeds disagree (-5, +3): not resolved; then 3 seeds agreeing
    a = _folder(tmp_path, "a", "t", {("c", 0): [0.45, 0.5, 0.5], ("c", 1): [0.53, 0.5, 0.5]})
    b = _folder(tmp_path, "b", "t", {("c", 0): [0.50, 0.5, 0.5], ("c", 1): [0.50, 0.5, 0.5]})
    out = tmp_path / "n.json"
    assert mod.main(["--series", f"a={a}:t", f"b={b}:t", "--pairs", "a:b", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["pairs"]["a:b"]
    assert r["by_cell"][0]["below_at"] == [1] and r["by_cell"][0]["clearly_below_at"] == []
    a2 = _folder(tmp_path, "a2", "t", {("c", s): [0.49 + 0.001 * s, 0.5, 0.5] for s in range(3)})
    b2 = _folder(tmp_path, "b2", "t", {("c", s): [0.50, 0.5, 0.5] for s in range(3)})
    assert mod.main(["--series", f"a={a2}:t", f"b={b2}:t", "--pairs", "a:b", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["pairs"]["a:b"]["by_cell"][0]["clearly_below_at"] == [1]


@pytest.mark.parametrize("args, says", [
    (["--series", "a=DIR:t", "--pairs", "a:zz"], "unknown"),
    (["--series", "a-no-colon", "--pairs", "a:a"], "NAME=DIR:TUNER"),
    (["--series", "a=DIR:t", "a=DIR:t", "--pairs", "a:a"], "twice"),
    (["--series", "a=DIR:missing", "--pairs", "a:a"], "no missing rows"),
    (["--series", "a=NOWHERE:t", "--pairs", "a:a"], "No such file"),
    (["--series", "a=BAD:t", "--pairs", "a:a"], "not a result row"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, args, says):
    mod = _script()
    d = _folder(tmp_path, "d", "t", {("c", 0): [0.5, 0.5, 0.5]})
    bad = tmp_path / "bad" / "cells"
    bad.mkdir(parents=True)
    (bad / "results.jsonl").write_text('{"tuner": "t", "anytime": "no"}\n')
    args = [x.replace("DIR", str(d)).replace("NOWHERE", str(tmp_path / "nowhere")).replace("BAD", str(bad.parent))
            for x in args]
    out = tmp_path / "o" / "n.json"
    assert mod.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_sampler_seed_offset_draws_the_search_afresh(tmp_path):
    """The offset changes the sampler's draws and nothing else; 0 is the committed behaviour."""
    import optuna

    from rltune.tuners import _optuna_study

    def draws(offset: int, seed: int = 3) -> list[float]:
        s = SimpleNamespace(seed=seed, scenario=0, budget_stages=32 * 6, stages_per_episode=6, target="8x",
                            env=SimpleNamespace(scenarios=[SimpleNamespace(name="x")]))
        study = _optuna_study(s, "optuna-tpe", None, sampler_seed_offset=offset)
        dist = optuna.distributions.FloatDistribution(-1.0, 1.0)
        return [study.ask({"a": dist}).params["a"] for _ in range(3)]

    assert draws(0) == draws(0)
    assert draws(0) != draws(1000)
    assert draws(1000, seed=0) == draws(0, seed=1000)  # the offset is added to the cell's seed


def test_harness_folder_keeps_one_sampler_seed_offset(tmp_path):
    from rltune.errors import RltuneError
    from rltune.harness import evaluate

    with pytest.raises(RltuneError, match="sampler_seed_offset"):
        evaluate(["x"], ["8x"], ["optuna-tpe"], [6], 1, tmp_path / "a", sampler_seed_offset=-1)
    out = tmp_path / "b"
    out.mkdir()
    (out / "evaluation.json").write_text(json.dumps({"run_id": "r", "runs": [{"sampler_seed_offset": 1000}]}))
    with pytest.raises(RltuneError, match="offset 1000"):
        evaluate(["x"], ["8x"], ["optuna-tpe"], [6], 1, out)
