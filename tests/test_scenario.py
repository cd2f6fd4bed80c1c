import subprocess
import sys
from pathlib import Path

import pytest

from rltune.cli import main
from rltune.errors import RltuneError
from rltune.scenario import load_scenario, parse_scenario

ENVS = sorted(Path(__file__).resolve().parents[1].joinpath("envs").glob("*.yaml"))
GOOD = {"name": "t", "dataset": {"source": "iris"}}


def test_every_shipped_scenario_validates():
    assert len(ENVS) >= 5
    for path in ENVS:
        s = load_scenario(path)
        assert s.name == path.stem


@pytest.mark.parametrize("patch, field", [
    ({"dataset": {"source": "imagenet"}}, "dataset.source"),
    ({"dataset": {}}, "dataset.source"),
    ({"dataset": {"source": "mnist1d"}}, "dataset.n_train"),
    ({"knobs": {"sparsity": [0.9, 0.1]}}, "knobs.sparsity"),
    ({"knobs": {"bits": [1, 8]}}, "knobs.bits"),
    ({"knobs": {"bits": [4, 16]}}, "knobs.bits"),
    ({"teacher": {"arch": "resnet"}}, "teacher.arch"),
    ({"student": {"hidden": [32, -1]}}, "student.hidden"),
    ({"training": {"stages": 0}}, "training.stages"),
    ({"training": {"stagse": 4}}, "training.stagse"),
    ({"reward": {"w_size": "big"}}, "reward.w_size"),
])
def test_bad_fields_name_file_and_field(patch, field):
    raw = {**GOOD, **patch}
    with pytest.raises(RltuneError) as e:
        parse_scenario(raw, "bad.yaml")
    msg = str(e.value)
    assert msg.startswith("bad.yaml: ") and field in msg and "\n" not in msg


def test_missing_name_and_non_mapping():
    with pytest.raises(RltuneError, match="name"):
        parse_scenario({"dataset": {"source": "iris"}}, "f.yaml")
    with pytest.raises(RltuneError, match="top level"):
        parse_scenario([1, 2], "f.yaml")


def test_cli_bad_file_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndataset: {source: digits\n  oops: [")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rltune: error: ") and str(bad) in err and "YAML" in err
    assert len(err.splitlines()) == 1
    range_bad = tmp_path / "range.yaml"
    range_bad.write_text("name: x\ndataset: {source: iris}\nknobs: {sparsity: [0.8, 0.2]}\n")
    assert main(["validate", str(range_bad)]) == 2
    err = capsys.readouterr().err
    assert "knobs.sparsity" in err and "greater than max" in err


def test_cli_subprocess_no_traceback(tmp_path):
    bad = tmp_path / "missing.yaml"
    r = subprocess.run([sys.executable, "-m", "rltune.cli", "validate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "cannot read" in r.stderr
