import numpy as np
import pytest
import torch

from rltune.context import Context
from rltune.data import load_dataset
from rltune.scenario import parse_scenario


@pytest.mark.parametrize("source", ["digits", "breast_cancer", "wine", "iris"])
def test_fixed_sets_split_and_standardise(source):
    ds = load_dataset({"source": source, "seed": 0, "val_fraction": 0.2, "test_fraction": 0.2, "transfer": 50})
    n = len(ds.y_train) + len(ds.y_val) + len(ds.y_test)
    assert abs(len(ds.y_val) / n - 0.2) < 0.03 and abs(len(ds.y_test) / n - 0.2) < 0.03
    assert torch.allclose(ds.x_train.mean(0), torch.zeros(ds.n_features), atol=1e-4)
    assert ds.x_transfer.shape == (50, ds.n_features)
    again = load_dataset({"source": source, "seed": 0, "val_fraction": 0.2, "test_fraction": 0.2, "transfer": 50})
    assert torch.equal(ds.x_test, again.x_test) and torch.equal(ds.x_transfer, again.x_transfer)


def test_generators_are_seeded_and_transfer_is_fresh():
    spec = {"source": "mnist1d", "seed": 3, "n_train": 300, "n_val": 100, "n_test": 100, "transfer": 200}
    a, b = load_dataset(spec), load_dataset(spec)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_transfer, b.x_transfer)
    assert a.n_features == 40 and a.n_classes == 10 and len(a.x_transfer) == 200
    # the transfer set holds new inputs, not copies of labeled ones
    d = torch.cdist(a.x_transfer[:50], a.x_train).min(dim=1).values
    assert float(d.min()) > 1e-3
    state = np.random.get_state()[1].copy()
    load_dataset({**spec, "seed": 4})
    assert np.array_equal(state, np.random.get_state()[1])  # mnist1d's global seeding is undone


def test_synthetic_labeled_and_unlabeled_share_one_problem():
    spec = {"source": "synthetic", "seed": 0, "n_train": 200, "n_val": 100, "n_test": 100, "transfer": 300,
            "params": {"n_features": 10, "n_informative": 5, "n_classes": 3}}
    ds = load_dataset(spec)
    assert ds.n_features == 10 and ds.n_classes == 3 and len(ds.x_transfer) == 300


def test_teacher_cache_hit_on_second_build(tmp_cache):
    s = parse_scenario({"name": "t", "dataset": {"source": "iris"},
                        "teacher": {"arch": "mlp", "hidden": [16], "epochs": 20}})
    first = Context.build(s)
    second = Context.build(s)
    assert not first.teacher_cache_hit and second.teacher_cache_hit
    assert torch.equal(first.logits["test"], second.logits["test"])
    assert list(tmp_cache.glob("teacher_*.safetensors"))
    # another transfer-set size shares the teacher
    third = Context.build(s.replace(dataset={"transfer": 100}))
    assert third.teacher_cache_hit and len(third.train_set.y) == len(first.data.y_train) + 100
