"""The README's Python example runs as written (in a scratch folder) and does what it says."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_python_api_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    text = README.read_text()
    section = text[text.index("## Your own model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    r, m = scope["r"], scope["m"]
    assert r.report["ratio"] >= 16 and r.report["test_acc"] > 0.8
    assert os.path.getsize("my-model.rlt") == r.report["packed_bytes"]
    assert os.path.getsize("my-model.onnx") == r.report["onnx_bytes"]
    x = scope["torch"].tensor(scope["test"][0])
    assert bool((m(x).argmax(1) == r.model(x).argmax(1)).all())
