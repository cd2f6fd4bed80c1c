"""rltune: a reinforcement-learning tuner for distillation, pruning and quantization.

The public API (see :mod:`rltune.api`)::

    import rltune
    p = rltune.Problem(teacher, student, train=(x, y), val=(x_val, y_val), test=(x_test, y_test))
    r = rltune.compress(p, target="16x", tuner="recipe", seed=0)
    r = rltune.replay("ppo-v0", p, target="16x", seed=0)
    r.model, r.report, r.save("m.rlt"), r.export_onnx("m.onnx")
    m = rltune.load_artifact("m.rlt", skeleton=MyStudent())

Importing rltune registers the Gymnasium ids ``rltune/DistillCompress-v0`` and
``rltune/DistillCompressTradeoff-v0``.
"""

__version__ = "0.2.0"

from rltune.errors import RltuneError, RltuneWarning  # noqa: E402

_LAZY = {
    "Problem": ("rltune.problem", "Problem"),
    "Result": ("rltune.api", "Result"),
    "compress": ("rltune.api", "compress"),
    "replay": ("rltune.api", "replay"),
    "load_artifact": ("rltune.export", "load_artifact"),
    "sensitivity": ("rltune.layer_sensitivity", "sensitivity"),
}

__all__ = ["Problem", "Result", "compress", "replay", "load_artifact", "sensitivity", "RltuneError", "RltuneWarning",
           "__version__"]


def __getattr__(name: str):
    """The public names load on first use, so ``import rltune`` (and ``rltune --version``) stay fast."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rltune' has no attribute {name!r}")


try:  # registering the Gymnasium ids; the compression ops themselves never import gymnasium
    from rltune.registration import register_envs

    register_envs()
except ImportError:  # pragma: no cover - gymnasium is a dependency; tolerate its absence
    pass
