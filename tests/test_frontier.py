"""experiments/frontier.py: the allocator points join the frontier, and bad arguments end with status 2."""

import subprocess
import sys
from pathlib import Path
from experiment_loader import load_experiment

ROOT = Path(__file__).resolve().parents[1]


def _frontier():
    return load_experiment("frontier")


def _pt(acc, ratio, **kw):
    return {"test_acc": {"mean": acc, "std": 0.0}, "ratio": {"mean": ratio, "std": 0.0}, **kw}


def test_best_within_1pt_takes_the_allocator_only_where_it_goes_further():
    f = _frontier()
    c = {"float_student_acc": {"mean": 0.90, "std": 0.0},
         "recipe_points": [_pt(0.895, 10.0, sparsity=0.5, bits=4), _pt(0.85, 20.0, sparsity=0.9, bits=3)],
         "allocator_points": [_pt(0.892, 14.0, allocator="sensitivity", target="14x", sparsity={"mean": 0.7},
                                  bits={"mean": 4.2}),
                              _pt(0.80, 30.0, allocator="sensitivity", target="30x", sparsity={"mean": 0.9},
                                  bits={"mean": 3.0})]}
    f.best_within_1pt(c)
    assert c["recipe_max_ratio_within_1pt"] == 10.0
    assert c["max_ratio_within_1pt"] == 14.0 and c["max_ratio_setting"]["target"] == "14x"
    c["allocator_points"][0]["test_acc"]["mean"] = 0.88  # now more than 1 pt below the float student
    f.best_within_1pt(c)
    assert c["max_ratio_within_1pt"] == 10.0 and c["max_ratio_setting"]["bits"] == 4


def test_bad_allocator_arguments_exit_2(tmp_path):
    for args in (["--allocator", "fast"], ["--allocator-only"], ["--allocator", "8x", "--workers", "0"]):
        p = subprocess.run([sys.executable, str(ROOT / "experiments" / "frontier.py"), "--out", str(tmp_path), *args],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (args, p.stderr)
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    missing = subprocess.run([sys.executable, str(ROOT / "experiments" / "frontier.py"), "--out", str(tmp_path),
                              "--scenarios", "digits-linear", "--allocator", "8x", "--allocator-only"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no entry" in missing.stderr
    assert not (tmp_path / "frontier_allocator").exists()
