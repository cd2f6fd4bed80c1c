"""rltune: a reinforcement-learning tuner for distillation, pruning and quantization."""

__version__ = "0.1.0"
