import os
import tempfile

import pytest
import torch

# keep the test suite's caches out of the user's home and away from other runs
os.environ.setdefault("RLTUNE_CACHE", os.path.join(tempfile.gettempdir(), "rltune-test-cache"))
# the tests that drive SB3 directly (PPO(...).learn without a logger) log into one folder, not a new
# SB3-<time> folder in the temp folder per call (rltune's own paths pass a logger or a run folder)
os.environ.setdefault("SB3_LOGDIR", os.path.join(tempfile.gettempdir(), "rltune-test-sb3"))
# the first torch optimizer of a process imports torch._dynamo, which makes an empty
# torchinductor_<user> folder in the temp folder: the CLI points it into rltune's cache, the tests too
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.environ["RLTUNE_CACHE"], "torchinductor"))
# onnxruntime's telemetry writes under ~/.cache/Microsoft and into the temp folder once imported
# (the tests import it directly; rltune's own imports turn it off the same way)
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
torch.set_num_threads(1)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A fresh, empty cache folder for tests that count cache hits."""
    monkeypatch.setenv("RLTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
