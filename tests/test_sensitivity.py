import json
import math

import pytest
import torch
from torch import nn

import rltune
from rltune.cli import main
from rltune.scenario import parse_scenario
from rltune.layer_sensitivity import _spearman, hessian_traces

TINY = parse_scenario({
    "name": "tiny-sens", "dataset": {"source": "wine", "transfer": 200},
    "teacher": {"arch": "mlp", "hidden": [32], "epochs": 30},
    "student": {"arch": "mlp", "hidden": [16], "pretrain_epochs": 10},
    "training": {"stages": 4, "epochs_per_stage": 1, "batch_size": 64, "lr": 0.005},
})


def test_table_has_every_layer_setting_and_a_rank_correlation(tmp_cache):
    t = rltune.sensitivity(TINY, bits=[2, 8], sparsities=[0.5, 0.95], probes=4)
    assert [r["name"] for r in t["layers"]] == ["net.0", "net.2"]
    for r in t["layers"]:
        assert r["kind"] == "Linear" and r["params"] in (13 * 16, 16 * 3)
        assert set(r["bits"]) == {2, 8} and set(r["sparsity"]) == {0.5, 0.95}
        assert abs(r["bits"][8]) <= 0.02                        # 8 bits on one layer: next to nothing
        assert r["sparsity"][0.95] <= r["sparsity"][0.5] + 0.02  # more pruning, no less damage
        assert math.isfinite(r["trace"])
    assert -1.0 <= t["rank_correlation"] <= 1.0


def test_hutchinson_trace_matches_the_exact_trace_of_a_linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
    w = model[0].weight
    loss = nn.functional.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, w, create_graph=True)[0].flatten()
    exact = sum(float(torch.autograd.grad(g[i], w, retain_graph=True)[0].flatten()[i]) for i in range(g.numel()))
    est = hessian_traces(model, x, y, probes=2000)["0"]
    assert est == pytest.approx(exact, rel=0.1)


def test_spearman():
    assert _spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert _spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(_spearman([1, 1, 1], [1, 2, 3]))


def test_cli_writes_the_json_and_refuses_bad_arguments(tmp_cache, tmp_path, capsys, monkeypatch):
    import rltune.api as api

    monkeypatch.setattr(api, "as_problem", lambda p: rltune.Problem.from_scenario(TINY))
    out = tmp_path / "s.json"
    assert main(["sensitivity", "--scenario", "x", "--bits", "4", "--sparsities", "0.5", "--probes", "2",
                 "--json", str(out)]) == 0
    t = json.loads(out.read_text())
    assert {"name", "kind", "params", "bits", "sparsity", "trace"} <= set(t["layers"][0])
    assert main(["sensitivity", "--json", str(tmp_path / "no" / "s.json")]) == 2
    assert main(["sensitivity", "--bits", "32"]) == 2
    assert "error" in capsys.readouterr().err
