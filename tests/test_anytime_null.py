"""experiments/anytime_null.py (a search against itself at every N) and the harness's sampler seed offset."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from experiment_loader import load_experiment


def _script():
    return load_experiment("anytime_null")


def _write(root: Path, name: str, rows: list) -> Path:
    """An anytime folder ``root/name`` whose cells/results.jsonl holds ``rows``."""
    d = root / name
    (d / "cells").mkdir(parents=True)
    (d / "cells" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


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
    return _write(root, name, rows)


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


def _curves(diffs_pt: list[float], n: int = 1) -> tuple[dict, dict]:
    """Two series of one cell whose per-seed paired differences at N = ``n`` are ``diffs_pt``."""
    a = {("c", s): [0.5 + (d / 100 if k == n else 0.0) for k in (1, 2, 4)] for s, d in enumerate(diffs_pt)}
    b = {("c", s): [0.5, 0.5, 0.5] for s in range(len(diffs_pt))}
    return a, b


@pytest.mark.parametrize("mean, sd, clearly", [(-1.0, 0.9, True), (-0.6, 0.9, False), (-1.0, 1.2, False)])
def test_clearly_below_is_two_standard_errors(tmp_path, mean, sd, clearly):
    """4 seeds: clearly below when mean < -2 sd / sqrt(4) = -sd (not -2 sd, not -sd / 2)."""
    mod = _script()
    c = sd * (3 / 4) ** 0.5  # four values mean +- c have sd = sd
    a, b = _curves([mean - c, mean - c, mean + c, mean + c])
    fa, fb = _folder(tmp_path, "a", "t", a), _folder(tmp_path, "b", "t", b)
    out = tmp_path / "n.json"
    assert mod.main(["--series", f"a={fa}:t", f"b={fb}:t", "--pairs", "a:b", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["pairs"]["a:b"]
    assert r["paired_sd_pt"]["1"] == pytest.approx(sd, abs=1e-3)
    assert r["by_cell"][0]["clearly_below_at"] == ([1] if clearly else [])


def test_from_2_parts_ties_and_missing_n(tmp_path):
    mod = _script()
    a, b = _curves([-1.0, -1.0], n=2)  # below at N = 2 only
    fa, fb = _folder(tmp_path, "a", "t", a), _folder(tmp_path, "b", "t", b)
    # a part row of a split cell, far above: never read as the cell's
    rows = (fa / "cells" / "results.jsonl").read_text()
    part = {"tuner": "t", "scenario": "x/c.yaml", "target": "8x", "seed": 0, "budget_stages": 99, "part": 0,
            "anytime": [{"episodes": n, "test_acc": 1.0} for n in (1, 2, 4)]}
    (fa / "cells" / "results.jsonl").write_text(rows + json.dumps(part) + "\n")
    # y: the same means as a, but its seeds spread; x|y and y|x pick the first on the tie
    y = _folder(tmp_path, "y", "t", {("c", 0): [0.49, 0.49, 0.49], ("c", 1): [0.51, 0.49, 0.51]})
    fx = _folder(tmp_path, "x", "t", {("c", s): [0.5, 0.49, 0.5] for s in range(2)})
    # one N short: a curve that stops at N = 2
    short = _folder(tmp_path, "s", "t", {("c", s): [0.6, 0.6] for s in range(2)})
    out = tmp_path / "n.json"
    assert mod.main(["--series", f"a={fa}:t", f"b={fb}:t", f"x={fx}:t", f"y={y}:t", f"s={short}:t",
                     "--pairs", "a:b", "x|y:b", "y|x:b", "s:b", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["pairs"]
    assert r["a:b"]["ge_every_n"] == 0 and r["a:b"]["ge_every_n_from_2"] == 0 and r["a:b"]["mean_diff_pt"]["1"] == 0
    assert r["x|y:b"]["paired_sd_pt"]["1"] == pytest.approx(0.0)  # x's seeds agree
    assert r["y|x:b"]["paired_sd_pt"]["1"] == pytest.approx(100 * 0.02 / 2 ** 0.5, abs=1e-3)  # y's do not
    assert r["s:b"]["by_cell"][0]["compared_at"] == [1, 2] and r["s:b"]["by_cell"][0]["not_compared_at"] == [4]


@pytest.mark.parametrize("line, says", [
    ('{"tuner": "t", "scenario": "c", "target": "8x", "seed": 1.9, "budget_stages": 6, '
     '"anytime": [{"episodes": 1, "test_acc": 0.5}]}', "not a whole number"),
    ('{"tuner": "t", "scenario": "c", "target": "8x", "seed": 0, "budget_stages": 6, '
     '"anytime": [{"episodes": true, "test_acc": 0.5}]}', "not a whole number"),
    ('{"tuner": "t", "scenario": "c", "target": "8x", "seed": 0, "budget_stages": 6, '
     '"anytime": [{"episodes": 1, "test_acc": "0.5"}]}', "not a number"),
    ('{"tuner": "t", "scenario": "c", "target": "8x", "seed": 0, "budget_stages": Infinity, '
     '"anytime": [{"episodes": 1, "test_acc": 0.5}]}', "finite"),
    ('{"tuner": "t", "scenario": "c", "target": "8x", "seed": 0, "budget_stages": 6, '
     '"anytime": [{"episodes": 1e400, "test_acc": 0.5}]}', "not a whole number"),
    ('[1, 2]', "not an object"),
    ('[' * 100000, "not a result row"),
])
def test_hostile_rows_are_one_line_and_status_2(tmp_path, capsys, line, says):
    mod = _script()
    d = tmp_path / "d" / "cells"
    d.mkdir(parents=True)
    (d / "results.jsonl").write_text(line + "\n")
    out = tmp_path / "n.json"
    assert mod.main(["--series", f"a={d.parent}:t", "--pairs", "a:a", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and not out.exists()


def test_out_never_overwrites_an_input_and_no_common_cell_is_an_error(tmp_path, capsys):
    mod = _script()
    a = _folder(tmp_path, "a", "t", {("c", 0): [0.5, 0.5, 0.5]})
    b = _folder(tmp_path, "b", "t", {("other", 0): [0.5, 0.5, 0.5]})
    before = (a / "cells" / "results.jsonl").read_bytes()
    assert mod.main(["--series", f"a={a}:t", "--pairs", "a:a", "--out", str(a / "cells" / "results.jsonl")]) == 2
    assert (a / "cells" / "results.jsonl").read_bytes() == before
    assert mod.main(["--series", f"a={a}:t", f"b={b}:t", "--pairs", "a:b", "--out", str(tmp_path / "n.json")]) == 2
    assert mod.main(["--series", "a\nb=x:t", "--pairs", "a:a", "--out", " "]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 3 and "one of the series" in errs[0] and "no cell" in errs[1] and "--out" in errs[2]


def _fake_cells(monkeypatch):
    import rltune.harness as H

    seen = []

    def fake(c, agent, storage, study, batch):
        seen.append(dict(study))
        return {"key": c.key, "scenario": c.scenario, "target": c.target, "tuner": c.tuner, "seed": c.seed,
                "test": {"test_acc": 0.5}}

    monkeypatch.setattr(H, "run_cell", fake)
    monkeypatch.setattr(H, "write_summary", lambda out: [])
    return seen


def test_evaluate_hands_the_offset_to_every_cell_and_a_folder_keeps_one(tmp_path, monkeypatch):
    from rltune.errors import RltuneError
    from rltune.harness import evaluate

    seen = _fake_cells(monkeypatch)
    run = lambda out, **k: evaluate(["wine-mlp"], ["8x"], ["optuna-tpe"], [16], k.pop("seeds", 2), out,  # noqa: E731
                                    progress=False, **k)
    k_dir, zero_dir = tmp_path / "k", tmp_path / "zero"
    run(k_dir, sampler_seed_offset=1000)
    assert [s.get("sampler_seed_offset") for s in seen] == [1000, 1000]
    assert json.loads((k_dir / "evaluation.json").read_text())["runs"][-1]["sampler_seed_offset"] == 1000
    seen.clear()
    run(zero_dir)
    assert seen and all("sampler_seed_offset" not in s for s in seen)
    for folder, offset, other in ((k_dir, 0, 1000), (zero_dir, 1000, 0)):
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        with pytest.raises(RltuneError, match=f"offset {other}, not {offset}"):
            run(folder, sampler_seed_offset=offset)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # refused before any write
    old = tmp_path / "old"  # results from before offsets were recorded: they ran with 0
    old.mkdir()
    (old / "results.jsonl").write_text('{"key": "k"}\n')
    with pytest.raises(RltuneError, match="offset 0, not 1000"):
        run(old, sampler_seed_offset=1000)
    with pytest.raises(RltuneError, match="maps"):
        run(tmp_path / "n1", seeds=5, sampler_seed_offset=3)  # seed 0 + 3 is seed 3's sampler
    with pytest.raises(RltuneError, match="maps"):  # split cells: seed 0 part 0 + 1000 is seed 1 part 0
        run(tmp_path / "n2", seeds=2, trial_workers=2, sampler_seed_offset=1000)
    with pytest.raises(RltuneError, match="largest"):
        run(tmp_path / "n3", sampler_seed_offset=2**32)
    bad = tmp_path / "bad"
    bad.mkdir()
    for text in ('{"runs": [{"sampler_seed_offset": "x"}, {}]}', '{"runs": 3}', "[" * 100000, "\xff"):
        (bad / "evaluation.json").write_text(text, encoding="latin-1")
        with pytest.raises(RltuneError, match="evaluation.json"):
            run(bad, sampler_seed_offset=1000)
    assert not (tmp_path / "n1").exists() and not (tmp_path / "n3").exists()


def test_anytime_refuses_another_offset_before_rerun_drops_rows(tmp_path):
    from rltune.errors import RltuneError

    script = load_experiment("anytime", "anytime_script")
    cells = tmp_path / "out" / "cells"
    cells.mkdir(parents=True)
    (cells / "evaluation.json").write_text(json.dumps({"run_id": "r", "runs": [{"tuners": ["optuna-tpe"]}]}))
    rows = json.dumps({"key": "k", "scenario": "s.yaml", "target": "8x", "tuner": "optuna-tpe", "seed": 0}) + "\n"
    (cells / "results.jsonl").write_text(rows)
    with pytest.raises(RltuneError, match="--sampler-seed-offset: .*offset 0, not 1000"):
        script.main(["--scenario-targets", "s.yaml=8x", "--tuners", "optuna-tpe", "--sampler-seed-offset", "1000",
                     "--rerun", "s.yaml=optuna-tpe", "--out", str(tmp_path / "out"), "--no-progress"])
    assert (cells / "results.jsonl").read_text() == rows and sorted(p.name for p in cells.iterdir()) == [
        "evaluation.json", "results.jsonl"]
    with pytest.raises(RltuneError, match="whole number"):
        script.main(["--scenario-targets", "s.yaml=8x", "--sampler-seed-offset", "-1", "--out", str(tmp_path / "o2")])


def test_a_cell_compared_at_n_1_only_does_not_count_from_2(tmp_path):
    mod = _script()
    a = _folder(tmp_path, "a", "t", {("c", 0): [0.6]})
    b = _folder(tmp_path, "b", "t", {("c", 0): [0.5]})
    out = tmp_path / "n.json"
    assert mod.main(["--series", f"a={a}:t", f"b={b}:t", "--pairs", "a:b", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["pairs"]["a:b"]
    assert r["ge_every_n"] == 1 and r["ge_every_n_from_2"] == 0 and r["by_cell"][0]["compared_at"] == [1]


def test_b_may_be_several_series_the_larger_mean_each_n(tmp_path):
    """``r:p|q`` is "r >= every one of p and q": against the larger of their means at each N, paired
    against that series' seeds."""
    mod = _script()
    r = _folder(tmp_path, "r", "t", {("c1", 0): [0.60], ("c1", 1): [0.60], ("c2", 0): [0.60], ("c2", 1): [0.60]})
    # c1: p 0.55, q 0.65 (q the larger, so r is below); c2: p 0.50 and q 0.58 (r is >= both)
    p = _folder(tmp_path, "p", "t", {("c1", 0): [0.55], ("c1", 1): [0.55], ("c2", 0): [0.50], ("c2", 1): [0.50]})
    q = _folder(tmp_path, "q", "t", {("c1", 0): [0.64], ("c1", 1): [0.66], ("c2", 0): [0.58], ("c2", 1): [0.58]})
    out = tmp_path / "n.json"
    assert mod.main(["--series", f"r={r}:t", f"p={p}:t", f"q={q}:t",
                     "--pairs", "r:p|q", "r:p", "r:q|p", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["pairs"]
    assert res["r:p"]["ge_every_n"] == 2
    for k in ("r:p|q", "r:q|p"):
        assert res[k]["cells"] == 2 and res[k]["ge_every_n"] == 1
        assert [c["below_at"] for c in res[k]["by_cell"]] == [[1], []]
        assert res[k]["mean_diff_pt"]["1"] == pytest.approx(100 * (-0.05 + 0.02) / 2)
        # paired with q's seeds in both cells: c1 spread 0.02 / sqrt 2, c2 none
        assert res[k]["paired_sd_pt"]["1"] == pytest.approx(100 * 0.02 / 2 ** 0.5 / 2, abs=1e-3)
    # an unknown name on the right is refused like one on the left
    assert mod.main(["--series", f"r={r}:t", f"p={p}:t", "--pairs", "r:p|nope", "--out", str(out)]) == 2


def test_b_ties_pair_with_the_first_name(tmp_path):
    mod = _script()
    r = _folder(tmp_path, "r", "t", {("c", s): [0.50] for s in range(3)})
    p = _folder(tmp_path, "p", "t", {("c", s): [0.52] for s in range(3)})  # mean 0.52, agrees every seed
    q = _folder(tmp_path, "q", "t", {("c", 0): [0.42], ("c", 1): [0.62], ("c", 2): [0.52]})  # mean 0.52, noisy
    out = tmp_path / "n.json"
    assert mod.main(["--series", f"r={r}:t", f"p={p}:t", f"q={q}:t", "--pairs", "r:p|q", "r:q|p", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["pairs"]
    assert res["r:p|q"]["clearly_below_somewhere"] == 1 and res["r:q|p"]["clearly_below_somewhere"] == 0


def test_a_b_series_missing_a_cell_seed_or_n_only_narrows_the_comparison(tmp_path):
    mod = _script()
    r = _folder(tmp_path, "r", "t", {(c, s): [0.6, 0.6, 0.6] for c in ("c1", "c2") for s in (0, 1)})
    p = _folder(tmp_path, "p", "t", {(c, s): [0.5, 0.5, 0.5] for c in ("c1", "c2") for s in (0, 1)})
    q = _folder(tmp_path, "q", "t", {("c1", 0): [0.5, 0.5]})  # q: only c1, seed 0, N = 1 and 2
    out = tmp_path / "n.json"
    assert mod.main(["--series", f"r={r}:t", f"p={p}:t", f"q={q}:t", "--pairs", "r:p|q", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["pairs"]["r:p|q"]
    assert res["cells"] == 1
    c = res["by_cell"][0]
    assert c["seeds"] == 1 and c["compared_at"] == [1, 2] and c["not_compared_at"] == [4]


def test_an_n_only_a_later_b_series_has_is_not_compared(tmp_path):
    mod = _script()
    r = _folder(tmp_path, "r", "t", {("c", s): [0.6, 0.6] for s in (0, 1)})
    p = _folder(tmp_path, "p", "t", {("c", s): [0.5, 0.5] for s in (0, 1)})
    q = _folder(tmp_path, "q", "t", {("c", s): [0.5, 0.5, 0.5] for s in (0, 1)})  # q alone has N = 4
    out = tmp_path / "n.json"
    assert mod.main(["--series", f"r={r}:t", f"p={p}:t", f"q={q}:t", "--pairs", "r:p|q", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["pairs"]["r:p|q"]["by_cell"][0]["not_compared_at"] == [4]


def test_clearly_below_any_sees_a_shortfall_a_near_tie_in_b_hides(tmp_path):
    """p beats r on every seed; q's mean is a hair higher but noisy: against the larger mean (q) the
    shortfall is not resolved, against p it is."""
    mod = _script()
    r = _folder(tmp_path, "r", "t", {("c", s): [0.50] for s in range(3)})
    p = _folder(tmp_path, "p", "t", {("c", s): [0.52] for s in range(3)})
    q = _folder(tmp_path, "q", "t", {("c", 0): [0.42], ("c", 1): [0.62], ("c", 2): [0.5201]})
    out = tmp_path / "n.json"
    assert mod.main(["--series", f"r={r}:t", f"p={p}:t", f"q={q}:t", "--pairs", "r:p|q", "r:q", "r:p",
                     "--out", str(out)]) == 0
    res = json.loads(out.read_text())["pairs"]
    assert res["r:p|q"]["clearly_below_somewhere"] == 0 and res["r:p|q"]["clearly_below_any_somewhere"] == 1
    assert res["r:p|q"]["by_cell"][0]["clearly_below_any_at"] == [1]
    for k in ("r:q", "r:p"):  # one series on the right: the two counts agree
        assert res[k]["clearly_below_somewhere"] == res[k]["clearly_below_any_somewhere"]
    assert res["r:p"]["clearly_below_any_somewhere"] == 1 and res["r:q"]["clearly_below_any_somewhere"] == 0


def _one(root, name, tuner, accs: dict):
    """A one-episode tuner's folder: ``accs[(cell, seed)]`` its test accuracy (N = 1 only)."""
    rows = [{"tuner": tuner, "scenario": f"x/{cell}.yaml", "target": "8x", "seed": seed, "budget_stages": 6,
             "anytime": [{"episodes": 1, "test_acc": a}]} for (cell, seed), a in accs.items()]
    return _write(root, name, rows)


def test_oracle_plays_the_member_with_the_best_mean_and_blocks_choose_it_elsewhere(tmp_path):
    mod = _script()
    # cell c: x is better on seeds 0, 1 and 4, y on seeds 2, 3
    x = _one(tmp_path, "x", "t", {("c", 0): 0.6, ("c", 1): 0.6, ("c", 2): 0.5, ("c", 3): 0.5, ("c", 4): 0.9})
    y = _one(tmp_path, "y", "t", {("c", 0): 0.5, ("c", 1): 0.5, ("c", 2): 0.7, ("c", 3): 0.7, ("c", 4): 0.1})
    # cell d: the two tie everywhere; the oracle is the first named
    for name, folder in (("x", x), ("y", y)):
        with (folder / "cells" / "results.jsonl").open("a") as f:
            for s in range(5):
                f.write(json.dumps({"tuner": "t", "scenario": "x/d.yaml", "target": "8x", "seed": s, "budget_stages": 6,
                                    "anytime": [{"episodes": 1, "test_acc": 0.4}]}) + "\n")
    out = tmp_path / "o.json"
    args = ["--series", f"x={x}:t", f"y={y}:t", "--oracle", "best=x|y", "--pairs", "best:x|y", "x:best",
            "--blocks", "2", "--out", str(out)]
    assert mod.main(args) == 0
    r = json.loads(out.read_text())
    assert r["oracles"] == {"best": {"members": ["x", "y"], "cells": 2}}
    full = r["pairs"]["best:x|y"]
    # in-sample over seeds 0-4 (x 0.62, y 0.50 in c): the oracle is x, so it ties the better member
    assert full["ge_every_n"] == 2 and full["mean_diff_pt"]["1"] == pytest.approx(0.0)
    # blocks of 2 of seeds 0..4: [0, 1] and [2, 3] (seed 4 is a short block, dropped). On [0, 1] the
    # choice reads seeds 2, 3, 4 (x 0.633, y 0.5: x), right; on [2, 3] it reads 0, 1, 4 (x 0.7, y 0.367:
    # x), wrong in the block (x 0.5 against y 0.7). d ties in both.
    b = full["blocks"]
    assert b["size"] == 2 and b["seeds"] == [[0, 1], [2, 3]]
    assert b["ge_every_n"] == [2, 1] and b["ge_every_n_mean"] == pytest.approx(1.5)
    assert b["clearly_below_somewhere"] == [0, 1]  # 0.5 against 0.7 on both seeds of the block
    assert r["pairs"]["x:best"]["blocks"]["ge_every_n"] == [2, 2]  # the oracle chose x in both blocks


@pytest.mark.parametrize("extra, says", [(["--blocks", "0"], "--blocks 0"),
                                         (["--oracle", "best=x|z"], "unknown ['z']"),
                                         (["--oracle", "best=x|x"], "distinct"),
                                         (["--oracle", "x=x|y"], "named twice"),
                                         (["--oracle", "b|c=x|y"], "expected NAME=X|Y"),
                                         (["--oracle", "best=x|"], "expected NAME=X|Y"),
                                         (["--blocks", "9"], "no block of 9 seeds")])
def test_oracle_and_blocks_bad_input_is_one_line(tmp_path, capsys, extra, says):
    mod = _script()
    x = _one(tmp_path, "x", "t", {("c", 0): 0.6, ("c", 1): 0.5})
    y = _one(tmp_path, "y", "t", {("c", 0): 0.5, ("c", 1): 0.7})
    out = tmp_path / "o.json"
    assert mod.main(["--series", f"x={x}:t", f"y={y}:t", "--pairs", "x:y", *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("anytime_null: ") and says in err and "\n" not in err
    assert not out.exists()
