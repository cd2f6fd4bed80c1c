"""Which bit-widths each tuner played, cell by cell: the widths behind an anytime folder's figures.

    python experiments/cell_widths.py experiments/results/anytime-v1-replay20 \\
        --out experiments/results/anytime-v1-replay20/widths.json

Reads ``DIR/cells/results.jsonl`` (the harness's records; each run's best student's ``test.layers``)
and writes, per cell (scenario file name and target) and tuner, at the largest budget of each
seed: ``seeds``, ``widths`` (each distinct per-layer width tuple, as "4,4,3", and on how many seeds
it was played), ``mean_bits`` (the mean over seeds of the layers' mean width), ``test_pct`` (mean
test %) and ``sparsity`` (mean). ``--tuners`` keeps only those. Bad input: one line, status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def read(folder: Path, tuners: set[str] | None) -> dict:
    path = folder / "cells" / "results.jsonl"
    best: dict[tuple, tuple[float, dict]] = {}
    from rltune.harness import strict_results

    for n, r in strict_results(path):
        if "part" in r or (tuners and r.get("tuner") not in tuners):
            continue
        try:
            t = r["test"]
            bits = tuple(int(x["bits"]) for x in t["layers"])
            acc, sp, budget = float(t["test_acc"]), float(t["sparsity"]), float(r["budget_stages"])
            seed = r["seed"]
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"seed {seed!r} is not a whole number")
            key = (Path(str(r["scenario"])).name, str(r["target"]), str(r["tuner"]), seed)
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
            raise ValueError(f"{path}:{n}: not a result row of the harness ({type(e).__name__}: {e})") from None
        if not bits or not all(math.isfinite(x) for x in (acc, sp, budget)):
            raise ValueError(f"{path}:{n}: a row without layers or with a non-finite number")
        if key not in best or budget > best[key][0]:
            best[key] = (budget, {"bits": bits, "acc": acc, "sparsity": sp})
    cells: dict[str, dict[str, list[dict]]] = {}
    for (scenario, target, tuner, _), (_, v) in sorted(best.items()):
        cells.setdefault(f"{scenario}@{target}", {}).setdefault(tuner, []).append(v)
    out = {}
    for cell, by in cells.items():
        out[cell] = {}
        for tuner, vs in by.items():
            widths: dict[str, int] = {}
            for v in vs:
                k = ",".join(map(str, v["bits"]))
                widths[k] = widths.get(k, 0) + 1
            out[cell][tuner] = {"seeds": len(vs), "widths": widths,
                                "mean_bits": round(statistics.fmean(statistics.fmean(v["bits"]) for v in vs), 3),
                                "test_pct": round(100 * statistics.fmean(v["acc"] for v in vs), 3),
                                "sparsity": round(statistics.fmean(v["sparsity"] for v in vs), 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--tuners", nargs="+")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    from rltune.errors import RltuneError, write_atomic
    from rltune.shipped import recorded_command

    try:
        out_path = Path(a.out)
        if not a.out.strip():
            raise ValueError("--out: give the JSON file to write")
        if out_path.resolve() == (Path(a.folder) / "cells" / "results.jsonl").resolve():
            raise ValueError(f"--out {out_path}: that is the input")
        cells = read(Path(a.folder), set(a.tuners) if a.tuners else None)
        if not cells:
            raise ValueError(f"{a.folder}: no rows" + (f" of {', '.join(a.tuners)}" if a.tuners else ""))
        write_atomic(out_path, (json.dumps({"command": recorded_command(), "cells": cells}, indent=1) + "\n").encode(),
                     "--out")
    except (OSError, UnicodeDecodeError, ValueError, RltuneError) as e:
        print("cell_widths: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    for cell, by in cells.items():
        print(cell, "  ".join(f"{t} {v['widths']} {v['test_pct']:.2f}" for t, v in by.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
