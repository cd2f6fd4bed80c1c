"""The command line: arguments checked before any training, one-line errors, help, version, layering."""

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rltune.cli import TUNER_CHOICES, main
from rltune.tuners import TUNERS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, quoted", [
    (["compress", "--scenario", "wine-mlp", "--bits", "1"], "'1'"),
    (["compress", "--scenario", "wine-mlp", "--sparsity", "1.5"], "'1.5'"),
    (["compress", "--scenario", "wine-mlp", "--sparsity", "nan"], "'nan'"),
    (["replay", "--scenario", "wine-mlp", "--budget", "0x", "--recipe"], "'0x'"),
    (["replay", "--scenario", "wine-mlp", "--budget", "12parsecs", "--recipe"], "'12parsecs'"),
    (["evaluate", "--tuners", "bogus"], "'bogus'"),
    (["evaluate", "--seeds", "0"], "'0'"),
    (["train", "--n-envs", "0"], "'0'"),
    (["train", "--total-timesteps", "-5"], "'-5'"),
    (["compress", "--seed", "-1"], "'-1'"),
])
def test_bad_arguments_fail_fast_quoting_the_value(argv, quoted, capsys):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert time.perf_counter() - t0 < 1.0
    err = capsys.readouterr().err.strip().splitlines()
    assert quoted in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("argv, match", [
    (["replay", "--scenario", "no-such-scenario", "--recipe"], "no such scenario"),
    (["replay", "no-such-agent", "--scenario", "wine-mlp"], "no such agent"),
    (["compress", "--scenario", "wine-mlp", "--budget", "8x", "--bits", "4"], "not both"),
    (["compress", "--scenario", "wine-mlp", "--tuner", "random"], "needs --budget"),
    (["export", "/no/such.rlt", "--onnx", "x.onnx"], "cannot read artifact"),
])
def test_user_errors_are_one_line_and_exit_2(argv, match, capsys):
    t0 = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - t0 < 2.0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rltune: error:") and match in err[0]


def test_help_describes_verbs_defaults_and_tuner_choices(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "equal budgets" in out and "(default: 5)" in out
    for t in TUNERS:
        assert t in out
    assert set(TUNER_CHOICES) == set(TUNERS)


def test_help_names_a_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default 16)" in out and "(default: None)" not in out and "(default: recipe)" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(f"``{v}``" in out for v in ("import-sb3", "sensitivity", "validate"))


def test_version_and_python_dash_m(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rltune", "--version"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("rltune ")


def test_replay_recipe_needs_no_agent_and_compress_writes_onnx(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    assert main(["replay", "--scenario", "wine-mlp", "--budget", "6x", "--recipe", "--out", str(tmp_path),
                 "--onnx", str(tmp_path / "w.onnx")]) == 0
    captured = capsys.readouterr()
    assert "stage 8/8" in captured.err  # progress on stderr
    assert (tmp_path / "wine-mlp.rlt").exists() and (tmp_path / "w.onnx").exists()
    assert main(["export", str(tmp_path / "wine-mlp.rlt"), "--onnx", str(tmp_path / "again.onnx"), "--quiet"]) == 0
    assert "layers as int8" in capsys.readouterr().out
    assert main(["compress", "--scenario", "wine-mlp", "--sparsity", "0.5", "--bits", "6", "--out",
                 str(tmp_path / "c"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "6 bits" in captured.out
    assert "recipe (fixed): 6 bits" in captured.out  # no " at -" where there is no budget


def test_nothing_imports_the_cli_and_no_module_reaches_into_private_names():
    """Layering: the CLI sits on top (only rltune/__main__.py imports it); modules use each other's
    public names only."""
    for path in sorted((ROOT / "rltune").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rltune"):
                if node.module == "rltune.cli":
                    assert path.name == "__main__.py", f"{path.name} imports rltune.cli"
                for alias in node.names:
                    assert not alias.name.startswith("_") or alias.name == "__version__", \
                        f"{path.name} imports the private {node.module}.{alias.name}"
            if isinstance(node, ast.Attribute) and node.attr in ("_obs", "_float_student") \
                    and not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                pytest.fail(f"{path.name} calls the env's private {node.attr}")
