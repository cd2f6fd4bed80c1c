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
