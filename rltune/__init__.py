"""rltune: a reinforcement-learning tuner for distillation, pruning and quantization."""

__version__ = "0.1.0"

try:  # registering the Gymnasium ids; the compression ops themselves never import gymnasium
    from rltune.registration import register_envs

    register_envs()
except ImportError:  # pragma: no cover - gymnasium is a dependency; tolerate its absence
    pass
