"""Fit the latency cost model (issue 2) at batch 1 and batch 256 and report its R².

    python experiments/costmodel.py            # 120 random MLP students per batch size

Writes experiments/results/costmodel.json (degree, cross-validated and held-out R², time) and
the fitted models as JSON (never pickle) under experiments/results/.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from rltune.costmodel import CostModel, collect_samples
from rltune.shipped import recorded_command

ROOT = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=120)
    p.add_argument("--out", default=str(ROOT / "results"))
    a = p.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": recorded_command(), "samples": a.samples, "fits": {}}
    for batch in (1, 256):
        t = time.perf_counter()
        samples = collect_samples(a.samples, batch_size=batch, seed=batch)
        cm = CostModel().fit(samples)
        secs = time.perf_counter() - t
        report["fits"][f"batch_{batch}"] = {"degree": cm.degree, "r2_cv": cm.r2_cv, "r2_test": cm.r2_test,
                                            "seconds": secs}
        (out / f"costmodel_b{batch}.json").write_text(cm.to_json())
        print(f"batch {batch}: degree {cm.degree}, R² cross-validated {cm.r2_cv:.3f}, held-out {cm.r2_test:.3f} ({secs:.1f} s)")
    (out / "costmodel.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
