"""Shared by the tests: load a script of experiments/ as a module."""

import importlib.util
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_experiment(name: str, module: str | None = None):
    """``experiments/<name>.py`` as a fresh module (registered as ``module``, default ``name``, in
    sys.modules: dataclasses look their module up there)."""
    module = module or name
    spec = importlib.util.spec_from_file_location(module, EXPERIMENTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod
    spec.loader.exec_module(mod)
    return mod
