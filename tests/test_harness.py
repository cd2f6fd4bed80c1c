import json

import pytest
import yaml

import rltune.harness as H
from rltune.harness import evaluate, read_results

TINY = {"name": "tiny-h", "dataset": {"source": "wine", "transfer": 200},
        "teacher": {"arch": "mlp", "hidden": [32], "epochs": 30},
        "student": {"arch": "mlp", "hidden": [16], "pretrain_epochs": 5},
        "training": {"stages": 3, "epochs_per_stage": 1, "batch_size": 64, "lr": 0.005}}
SUMMARY_FIELDS = {"scenario", "tuner", "target", "budget_stages", "n_seeds", "score_mean", "score_std",
                  "test_acc_mean", "test_acc_std", "bytes_mean", "in_agent_training_set"}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    p = tmp_path_factory.mktemp("h") / "tiny-h.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return str(p)


def test_tiny_evaluation_writes_summary_tables_and_plots(scenario, tmp_path):
    out = evaluate([scenario], ["6x"], ["recipe", "random"], [3, 6], 2, tmp_path, progress=False)
    rows = read_results(out / "results.jsonl")
    # recipe runs once (at the smallest budget), random at both budgets: (1 + 2) tuners x 2 seeds
    assert len(rows) == 6 and len({r["key"] for r in rows}) == 6
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 3 and all(SUMMARY_FIELDS <= set(s) for s in summary)
    assert all(s["n_seeds"] == 2 for s in summary)
    md = (out / "benchmark.md").read_text()
    assert "| tuner |" in md and "**" in md and "n seeds" in md
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| tuner (episodes) | tiny-h @ 6x |" and len(table) == 2 + 3 + 2  # a row per tuner x budget
    assert (out / "pareto_tiny-h.png").stat().st_size > 1000
    assert (out / "budget_tiny-h.png").stat().st_size > 1000


def test_interrupted_evaluation_resumes_without_duplicates_or_losses(scenario, tmp_path, monkeypatch):
    evaluate([scenario], ["6x"], ["random"], [3], 3, tmp_path, progress=False)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3
    # an interruption: the last cell's line was cut short, the cell after it never ran
    (tmp_path / "results.jsonl").write_text(lines[0] + "\n" + lines[1][:40])
    ran = []
    real = H.run_cell
    monkeypatch.setattr(H, "run_cell", lambda c, *a, **k: ran.append(c.key) or real(c, *a, **k))
    evaluate([scenario], ["6x"], ["random"], [3], 3, tmp_path, progress=False)
    rows = read_results(tmp_path / "results.jsonl")
    keys = [r["key"] for r in rows]
    assert len(ran) == 2 and json.loads(lines[0])["key"] not in ran
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 3
    assert rows[0] == json.loads(lines[0])  # the finished cell was kept, not rerun


def test_parallel_workers_give_the_same_cells(scenario, tmp_path):
    evaluate([scenario], ["6x"], ["recipe", "random"], [3], 2, tmp_path / "two", workers=2, progress=False)
    rows = read_results(tmp_path / "two" / "results.jsonl")
    assert len(rows) == 4 and all(r["stages_used"] <= 3 for r in rows)
    evaluate([scenario], ["6x"], ["recipe", "random"], [3], 2, tmp_path / "one", workers=1, progress=False)
    alone = {r["key"]: r for r in read_results(tmp_path / "one" / "results.jsonl")}
    assert set(alone) == {r["key"] for r in rows}
    for r in rows:  # the same cell gives the same student whichever process ran it
        assert r["val_acc"] == alone[r["key"]]["val_acc"]
        assert r["test"]["test_acc"] == alone[r["key"]]["test"]["test_acc"]
        assert r["test"]["packed_bytes"] == alone[r["key"]]["test"]["packed_bytes"]


def test_ray_backend_on_a_local_ray(scenario, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    try:
        evaluate([scenario], ["6x"], ["recipe", "random"], [3], 2, tmp_path, backend="ray", progress=False)
    finally:
        ray.shutdown()
    rows = read_results(tmp_path / "results.jsonl")
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4
    assert (tmp_path / "summary.json").exists()


def _trials(db, name):
    import optuna

    return len(optuna.load_study(study_name=name, storage=f"sqlite:///{db}").trials)


@pytest.mark.parametrize("backend", ["process", "ray"])
def test_optuna_trials_of_one_study_run_on_several_workers(scenario, tmp_path, monkeypatch, backend):
    if backend == "ray":
        ray = pytest.importorskip("ray")
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    try:
        # 5 episodes of 3 stages, split 3 + 2 over two workers sharing one SQLite study
        evaluate([scenario], ["6x"], ["optuna-tpe"], [15], 1, tmp_path, workers=2, backend=backend,
                 trial_workers=2, progress=False)
    finally:
        if backend == "ray":
            ray.shutdown()
    rows = read_results(tmp_path / "results.jsonl")
    parts = sorted((r for r in rows if "part" in r), key=lambda r: r["part"])
    merged = [r for r in rows if "part" not in r]
    assert [p["episodes"] for p in parts] == [3, 2] and len(merged) == 1
    m = merged[0]
    assert m["stages_used"] == 15 and m["episodes"] == 5 and m["budget_stages"] == 15
    assert m["val_acc"] == max(p["val_acc"] for p in parts)
    assert _trials(tmp_path / "optuna.db", "rltune-optuna-tpe-tiny-h-6x-0-5ep") == 5  # one study holds every trial
    # the anytime curve over the parts' records in one order: its last point is the merged result
    assert [a["episodes"] for a in m["anytime"]] == [1, 2, 4, 5]
    assert m["anytime"][-1]["test_acc"] == m["test"]["test_acc"] and m["anytime"][-1]["val_acc"] == m["val_acc"]
    assert all(a["val_acc"] <= b["val_acc"] for a, b in zip(m["anytime"], m["anytime"][1:]))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary) == 1 and summary[0]["episodes"] == 5


def test_parts_finished_before_an_interruption_are_merged_on_resume(scenario, tmp_path, monkeypatch):
    evaluate([scenario], ["6x"], ["optuna-const"], [6], 1, tmp_path, trial_workers=2, progress=False)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3  # two parts, then the merged cell
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:2]) + "\n")  # interrupted before the merge
    monkeypatch.setattr(H, "run_cell", lambda *a, **k: pytest.fail("a finished part was rerun"))
    evaluate([scenario], ["6x"], ["optuna-const"], [6], 1, tmp_path, trial_workers=2, progress=False)
    rows = read_results(tmp_path / "results.jsonl")
    assert len(rows) == 3 and json.loads(lines[2]) == rows[2]


def test_split_cells_merge_their_records_of_new_bests_in_turn():
    # part 0 ran episodes 0, 2, 4 of the study, part 1 episodes 1, 3
    imp = lambda e, v: {"episode": e, "val_acc": v, "val_score": v, "test_acc": v / 2, "test_score": 0.0}  # noqa: E731
    rows = [{"part": 0, "parts": 2, "episodes": 3, "improvements": [imp(0, 0.5), imp(2, 0.8)]},
            {"part": 1, "parts": 2, "episodes": 2, "improvements": [imp(0, 0.6), imp(1, 0.8)]}]
    merged = H.merge_improvements(rows)
    # global order 0 (0.5), 1 (0.6), 3 (0.8, part 1), 4 (0.8, part 0: a tie, not a new best)
    assert [(e["episode"], e["part"], e["val_acc"]) for e in merged] == [(0, 0, 0.5), (1, 1, 0.6), (3, 1, 0.8)]


def test_strict_results_numbers_lines_and_refuses_what_is_not_an_object(tmp_path):
    from rltune.harness import strict_results

    f = tmp_path / "results.jsonl"
    f.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert list(strict_results(f)) == [(1, {"a": 1}), (3, {"b": 2})]
    for bad, says in (('{"a": 1}\n[1]\n', ":2: not a result row (not an object)"), ('{"a": 1\n', ":1: not a result row"),
                      ("[" * 100_000 + "\n", ":1: not a result row")):
        f.write_text(bad)
        with pytest.raises(ValueError) as e:
            list(strict_results(f))
        assert str(e.value).startswith(str(f)) and says in str(e.value)


def test_a_budget_under_one_episode_is_one_line_before_any_folder(scenario, tmp_path, capsys):
    """Budgets are stages: one below a scenario's stages per episode stopped every tuner at its
    first episode ('stage budget exhausted', after the folder and its Optuna database were made)."""
    from rltune.cli import main
    from rltune.errors import RltuneError

    with pytest.raises(RltuneError, match=r"budget 2 is less than one episode of .*tiny-h.yaml \(3 stages"):
        evaluate([scenario], ["6x"], ["recipe", "optuna-tpe"], [2, 6], 1, tmp_path / "ev", progress=False)
    assert not (tmp_path / "ev").exists()
    with pytest.raises(RltuneError, match="at least one stage budget"):
        evaluate([scenario], ["6x"], ["recipe"], [], 1, tmp_path / "ev", progress=False)
    rc = main(["evaluate", "--scenarios", scenario, "--targets", "6x", "--tuners", "recipe", "--budget", "2",
               "--seeds", "1", "--out", str(tmp_path / "ev"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "give --budget 3 or more" in err[0]
    assert not (tmp_path / "ev").exists()
