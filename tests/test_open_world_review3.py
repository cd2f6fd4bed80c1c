"""The command line and file entry points on a user's files (the open-world review, round 3).

Each test gives the CLI (or the function behind it) what a user's machine holds: a storage URL
that does not open, a results file that is not the harness's, a data file that is a pipe, a CSV
saved with a byte-order mark. The contract: one ``rltune: error: ...`` line and status 2, never
a traceback or a hang, and no write outside the output folder.
"""

import json
import os

import numpy as np
import pytest

from rltune.cli import main


def run_cli(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


# -- shared Optuna studies: a storage that does not open is one line --------------------------

@pytest.mark.parametrize("url, why", [
    ("foo://bar", "NoSuchModuleError"),
    ("notaurl", "not a database URL"),
    ("postgresql://u:secret@127.0.0.1:1/db", "cannot open"),
])
def test_evaluate_storage_that_does_not_open_is_one_line(tmp_path, capsys, url, why):
    rc, err = run_cli(["-q", "evaluate", "--scenarios", "wine-mlp", "--tuners", "optuna-tpe", "--seeds", "1",
                       "--workers", "1", "--no-progress", "--storage", url, "--out", str(tmp_path / "ev")], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("rltune: error: --storage") and why in err[0]
    assert "secret" not in err[0]  # the password is not printed


@pytest.mark.parametrize("content", [b"hello, not sqlite\n", bytes(range(256)) * 4])
def test_evaluate_storage_file_that_is_not_sqlite(tmp_path, capsys, content):
    db = tmp_path / "study.db"
    db.write_bytes(content)
    rc, err = run_cli(["-q", "evaluate", "--scenarios", "wine-mlp", "--tuners", "optuna-tpe", "--seeds", "1",
                       "--workers", "1", "--no-progress", "--storage", f"sqlite:///{db}",
                       "--out", str(tmp_path / "ev")], capsys)
    assert rc == 2 and len(err) == 1 and "not a database" in err[0]


def test_evaluate_corrupt_optuna_db_in_the_folder(tmp_path, capsys):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "optuna.db").write_bytes(b"\x00garbage" * 50)
    rc, err = run_cli(["-q", "evaluate", "--scenarios", "wine-mlp", "--tuners", "optuna-tpe", "--seeds", "1",
                       "--workers", "1", "--no-progress", "--out", str(out)], capsys)
    assert rc == 2 and len(err) == 1 and "optuna.db" in err[0]


# -- results.jsonl that is not the harness's ---------------------------------------------------

@pytest.mark.parametrize("line", ["[]", '{"key": 5}', '"text"', '{"key": "a", "scenario": 1}'])
def test_evaluate_results_file_with_foreign_rows(tmp_path, capsys, line):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "results.jsonl").write_text(line + "\n")
    rc, err = run_cli(["-q", "evaluate", "--scenarios", "wine-mlp", "--tuners", "recipe", "--seeds", "1",
                       "--workers", "1", "--no-progress", "--out", str(out)], capsys)
    assert rc == 2 and len(err) == 1 and "results.jsonl:1: not one of this harness's result rows" in err[0]


def test_evaluate_results_path_that_is_a_folder(tmp_path, capsys):
    out = tmp_path / "ev"
    (out / "results.jsonl").mkdir(parents=True)
    rc, err = run_cli(["-q", "evaluate", "--scenarios", "wine-mlp", "--tuners", "recipe", "--seeds", "1",
                       "--workers", "1", "--no-progress", "--out", str(out)], capsys)
    assert rc == 2 and len(err) == 1 and "cannot read the results" in err[0]


def test_read_results_still_skips_a_torn_line(tmp_path):
    from rltune.harness import read_results

    row = {"key": "k", "scenario": "s", "target": "8x", "tuner": "recipe", "test": {"test_acc": 0.5}}
    p = tmp_path / "results.jsonl"
    p.write_text(json.dumps(row) + "\n" + json.dumps(row)[:20])
    assert read_results(p) == [row]


# -- a user's data files through a scenario ----------------------------------------------------

def _scenario(tmp_path, path, **dataset):
    from rltune.scenario import parse_scenario

    raw = {"name": "mine", "dataset": {"source": "file", "path": str(path), **dataset},
           "teacher": {"hidden": [8], "epochs": 1}, "student": {"hidden": [4], "pretrain_epochs": 1},
           "training": {"stages": 2, "epochs_per_stage": 1}}
    return parse_scenario(raw, str(tmp_path / "mine.yaml"))


def _load(tmp_path, path, **dataset):
    from rltune.data import load_dataset

    return load_dataset(_scenario(tmp_path, path, **dataset).dataset)


@pytest.fixture
def alarm():
    """A read that blocks fails the test after 10 s instead of hanging the suite."""
    import signal

    def boom(*_):
        raise TimeoutError("blocked")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _xy(n=120, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


@pytest.mark.parametrize("name", ["data.npz", "data.csv"])
def test_data_path_that_is_a_fifo_is_refused_not_read(tmp_path, alarm, name):
    from rltune.errors import RltuneError

    fifo = tmp_path / name
    os.mkfifo(fifo)
    with pytest.raises(RltuneError, match="named pipe"):
        _load(tmp_path, fifo)


def test_validate_a_scenario_that_is_a_fifo(tmp_path, alarm, capsys):
    fifo = tmp_path / "s.yaml"
    os.mkfifo(fifo)
    rc, err = run_cli(["validate", str(fifo)], capsys)
    assert rc == 2 and len(err) == 1 and "named pipe" in err[0]


def test_train_hyperparams_that_is_a_fifo(tmp_path, alarm, capsys):
    fifo = tmp_path / "hp.yml"
    os.mkfifo(fifo)
    for flag in ("--config", "--hyperparams"):
        rc, err = run_cli(["train", flag, str(fifo), "--run-dir", str(tmp_path / "run")], capsys)
        assert rc == 2 and len(err) == 1 and "named pipe" in err[0]


def test_csv_with_a_byte_order_mark(tmp_path):
    x, y = _xy()
    p = tmp_path / "data.csv"
    p.write_text("label,a,b,c,d\n" + "".join(f"{l}," + ",".join(map(str, r)) + "\n" for r, l in zip(x, y)),
                 encoding="utf-8-sig")  # what a spreadsheet saves as "CSV UTF-8"
    d = _load(tmp_path, p)
    assert d.input_shape == (4,) and d.n_classes == 2


@pytest.mark.parametrize("arrays, match", [
    (lambda x, y: {"x": x[:, :0], "y": y}, "at least one feature"),
    (lambda x, y: {"x": x, "y": y * 10 ** 9}, "at most 10000 classes"),
    (lambda x, y: {"x": x, "y": np.where(y > 0, np.inf, 0.0)}, "class numbers"),
    (lambda x, y: {"x": x, "y": np.zeros_like(y)}, "single class"),
    (lambda x, y: {"x": x.astype(np.complex64), "y": y}, "not real numbers"),
])
def test_npz_that_cannot_make_a_classifier(tmp_path, arrays, match):
    from rltune.errors import RltuneError

    p = tmp_path / "data.npz"
    np.savez(p, **arrays(*_xy()))
    with pytest.raises(RltuneError, match=match):
        _load(tmp_path, p)


def test_csv_with_only_the_label_column(tmp_path):
    from rltune.errors import RltuneError

    p = tmp_path / "data.csv"
    p.write_text("label\n" + "".join(f"{i % 2}\n" for i in range(50)))
    with pytest.raises(RltuneError, match="at least one feature column"):
        _load(tmp_path, p)


# -- no write outside the output folder through a link planted in it ---------------------------

def test_compress_and_evaluate_do_not_write_through_planted_symlinks(tmp_path, capsys):
    from rltune.harness import _append, write_summary

    outside = tmp_path / "outside"
    outside.mkdir()
    # rltune compress: NAME.md was written with Path.write_text, through a link at that name
    out = tmp_path / "out"
    out.mkdir()
    for ext in ("rlt", "json", "md"):
        (out / f"wine-mlp.{ext}").symlink_to(outside / f"victim.{ext}")
    rc, err = run_cli(["-q", "replay", "--recipe", "--scenario", "wine-mlp", "--budget", "4x", "--out", str(out)],
                      capsys)
    assert rc == 0, err
    assert list(outside.iterdir()) == []
    assert not any((out / f"wine-mlp.{ext}").is_symlink() for ext in ("rlt", "json", "md"))
    # rltune evaluate: results.jsonl is appended to without following a link; the summaries replace links
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "results.jsonl").symlink_to(outside / "victim.jsonl")
    from rltune.errors import RltuneError

    with pytest.raises(RltuneError, match="symbolic link"):
        _append(ev / "results.jsonl", {"key": "k"})
    (ev / "results.jsonl").unlink()
    for name in ("summary.json", "benchmark.md", "table.md"):
        (ev / name).symlink_to(outside / name)
    write_summary(ev)
    assert list(outside.iterdir()) == []


def test_sigterm_is_one_line_and_status_143(monkeypatch, capsys):
    import os
    import signal
    import time

    import rltune.cli as cli

    def slow(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    monkeypatch.setattr(cli, "cmd_validate", slow)
    # as in a fresh `rltune` process: an earlier test (Ray, a subprocess pool) may have left another
    # handler, and main leaves a handler it did not install alone
    saved = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        assert cli.main(["validate", "x.yaml"]) == 143
        err = capsys.readouterr().err.strip()
        assert err == "rltune: terminated (finished work is kept)"
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back
    finally:
        signal.signal(signal.SIGTERM, saved if saved is not None else signal.SIG_DFL)


def test_a_scenario_path_that_is_a_fifo_or_folder_is_named_as_such(tmp_path):
    import os

    from rltune.errors import RltuneError
    from rltune.shipped import resolve_scenario

    fifo = tmp_path / "s.yaml"
    os.mkfifo(fifo)
    with pytest.raises(RltuneError, match="named pipe"):
        resolve_scenario(str(fifo))
    (tmp_path / "d.yaml").mkdir()
    with pytest.raises(RltuneError, match="is a folder"):
        resolve_scenario(str(tmp_path / "d.yaml"))


def test_a_file_that_is_not_an_npz_or_holds_object_arrays_says_so(tmp_path):
    import numpy as np

    from rltune.data import _read_npz
    from rltune.errors import RltuneError

    (tmp_path / "t.npz").write_text("x,y\n1,2\n")
    with pytest.raises(RltuneError, match="not an .npz archive"):
        _read_npz(tmp_path / "t.npz")
    np.savez(tmp_path / "o.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(RltuneError, match="object arrays"):
        _read_npz(tmp_path / "o.npz")


def test_values_beyond_float32_are_named_as_such_not_a_diverged_run(tmp_path):
    import numpy as np

    import rltune
    from rltune.data import _read_file
    from rltune.errors import RltuneError
    from open_world import FAST, MLP, split, trained_teacher

    (x, y), val = split()
    big = x.astype(np.float64)
    big[0, 0] = 1e300
    with pytest.raises(RltuneError, match="beyond float32's range"):
        rltune.Problem(trained_teacher(split()), MLP(), train=(big, y), val=val, name="ow3-big", **FAST)
    np.savez(tmp_path / "big.npz", x=big, y=y)
    with pytest.raises(RltuneError, match="beyond float32's range"):
        _read_file({"path": str(tmp_path / "big.npz")})
    np.savez(tmp_path / "ok.npz", x=x.astype(np.float64), y=y)
    assert _read_file({"path": str(tmp_path / "ok.npz")})["x"].shape == x.shape


def test_a_network_storage_gets_a_connect_timeout_and_sqlite_none(monkeypatch):
    import optuna

    from rltune import harness

    seen = []
    monkeypatch.setattr(optuna.storages, "RDBStorage", lambda url, **kw: seen.append((url, kw)) or "storage")
    harness.open_storage("postgresql+psycopg2://u:secret@db.example:5432/studies")
    harness.open_storage("mysql://u@db.example/studies")
    harness.open_storage("sqlite:///study.db")
    timeout = {"engine_kwargs": {"connect_args": {"connect_timeout": harness.STORAGE_CONNECT_TIMEOUT}}}
    assert [kw for _, kw in seen] == [timeout, timeout, {}]
