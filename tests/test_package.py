"""The wheel: built from this checkout, installed in a fresh virtual environment, used from another
folder. Shipped scenarios, agents and ppo.yml must resolve by name there.

The fresh venv gets the wheel with ``pip install --no-deps``; its third-party dependencies (torch,
scikit-learn, SB3, ...) come from the test interpreter's site-packages through a ``.pth`` path
line (a path added that way is not a site dir, so the checkout's editable-install hook in it does
not run): ``import rltune`` in the venv finds only the wheel's copy, which the test checks.
"""

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, timeout=600):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(base / "dist"),
          str(ROOT)], cwd=base)
    wheels = list((base / "dist").glob("rltune-*.whl"))
    assert len(wheels) == 1
    env = base / "venv"
    _run([sys.executable, "-m", "venv", str(env)], cwd=base)
    py = env / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheels[0])], cwd=base)
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=base).stdout.strip()
    deps = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    (Path(purelib) / "_test_deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return env, elsewhere


def test_the_installed_package_is_the_wheel_not_the_checkout(venv):
    env, elsewhere = venv
    out = _run([str(env / "bin" / "python"), "-c", "import rltune; print(rltune.__file__)"], cwd=elsewhere)
    assert out.stdout.strip().startswith(str(env)), out.stdout
    out = _run([str(env / "bin" / "rltune"), "--version"], cwd=elsewhere)
    assert out.stdout.startswith("rltune ")


def test_shipped_scenarios_and_agents_resolve_from_another_folder(venv):
    env, elsewhere = venv
    code = ("from rltune.shipped import resolve_scenario, resolve_agent, hyperparams_file, shipped_scenarios;"
            "import gymnasium as gym, rltune;"
            "print(resolve_scenario('wine-mlp'), resolve_agent('ppo-v0'), hyperparams_file().is_file(), "
            "len(shipped_scenarios()));"
            "env = gym.make('rltune/DistillCompress-v0');"
            "print(type(env.unwrapped).__name__)")
    out = _run([str(env / "bin" / "python"), "-c", code], cwd=elsewhere)
    assert str(env) in out.stdout and "True" in out.stdout and "DistillCompressEnv" in out.stdout
    assert "digits-linear" not in os.listdir(elsewhere)


def test_replay_of_a_shipped_agent_on_a_shipped_scenario_by_name(venv):
    env, elsewhere = venv
    out = _run([str(env / "bin" / "rltune"), "replay", "ppo-v0", "--scenario", "wine-mlp", "--budget", "8x",
                "--out", "out"], cwd=elsewhere)
    assert "ppo-replay at 8x" in out.stdout
    assert (elsewhere / "out" / "wine-mlp.rlt").is_file()
    out = _run([str(env / "bin" / "python"), "-m", "rltune", "train", "--set", "smoke", "--run-dir", "run",
                "--quiet", "--total-timesteps", "8"], cwd=elsewhere)
    assert (elsewhere / "run" / "agent" / "agent.json").is_file()
