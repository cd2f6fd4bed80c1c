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
    evaluate([scenario], ["6x"], ["recipe", "random"], [3], 2, tmp_path, workers=2, progress=False)
    rows = read_results(tmp_path / "results.jsonl")
    assert len(rows) == 4 and all(r["stages_used"] <= 3 for r in rows)


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
