"""How early in an episode does a shift's final sign show (issue 12)? Read off schedule_shift's rows.

    python experiments/stage_sign.py --rows experiments/results/schedule_shift/cut_train40_stages.json \\
        --out experiments/results/schedule_shift/stage_sign.json

The policy commits the bit-width cut at step 0, and nothing in the step-0 observation tells its sign
(``cut_predict.json``, ``cut_predict_relative.json``). Would it know later? ``schedule_shift.py``
plays each cell-seed twice, the zero action and the shifted one, and keeps each play's val accuracy
after every stage (``val_by_stage``). Per stage k, the paired difference (shifted − zero) of val
accuracy after stage k is compared with the final test difference:

* ``r_seed``: Pearson r over cell-seeds; ``r_cell``: over cells, each the mean over its seeds;
* ``sign_agree_cell``: how often the stage-k difference's sign is the final test difference's, over
  cells whose final mean difference is not 0;
* ``gain_pt``: the mean over cells of the final test difference where the stage-k mean difference is
  > 0 (shifting where stage k favours it; never shifting is 0, ``oracle_gain_pt`` shifting where it
  paid). Knowing stage k's difference costs playing both variants to stage k.

Stage k covers the cells whose episodes have k stages (tasks differ: ``stages`` lists the lengths
met); ``"last"`` is each episode's last stage, the val accuracy its reward reads. A play that
collapsed (the env ended it early, ``diverged``) keeps its last val accuracy for the stages after,
and its test accuracy is its final one, as the harness counts it.

Writes ``{"command", "rows_from", "cells", "cell_seeds", "collapsed_cell_seeds", "stages",
"oracle_gain_pt", "always_gain_pt", "by_stage": [{"stage", "cells", "r_seed", "r_cell",
"sign_agree_cell", "gain_pt"}]}``. Rows without both plays' ``val_by_stage`` are left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def pearson(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3 or statistics.pstdev(a) == 0 or statistics.pstdev(b) == 0:
        return None
    return round(statistics.correlation(a, b), 3)


def read_rows(path: Path) -> list[dict]:
    """schedule_shift's rows: its JSON's ``rows`` or its ``.rows.jsonl`` (one object a line)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = json.loads(text)["rows"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("rows is not a list of objects")
    return rows


def analyse(rows: list[dict]) -> dict:
    usable = []
    for r in rows:
        z, s = r.get("zero"), r.get("shifted")
        if not isinstance(z, dict) or not isinstance(s, dict):
            continue
        vz, vs = z.get("val_by_stage"), s.get("val_by_stage")
        if not vz or not vs:
            continue
        n = max(len(vz), len(vs))  # a play that collapsed ended early: it stays where it ended
        vz, vs = list(vz) + [vz[-1]] * (n - len(vz)), list(vs) + [vs[-1]] * (n - len(vs))
        final = 100 * (float(s["test_acc"]) - float(z["test_acc"]))
        usable.append({"cell": f"{r['cell']}@{r['target']}", "final": final,
                       "collapsed": bool(z.get("diverged")) or bool(s.get("diverged")),
                       "by_stage": [100 * (float(b) - float(a)) for a, b in zip(vz, vs)]})
    if not usable:
        raise ValueError("no row with both plays' val_by_stage")
    cells: dict[str, list[dict]] = {}
    for u in usable:
        cells.setdefault(u["cell"], []).append(u)
    cell_final = {c: statistics.fmean(u["final"] for u in us) for c, us in cells.items()}

    def entry(stage, pick) -> dict:
        """``pick(u)``: a row's stage difference, None where its episode has no such stage."""
        got = [(u, pick(u)) for u in usable]
        got = [(u, d) for u, d in got if d is not None]
        by_cell: dict[str, list[float]] = {}
        for u, d in got:
            by_cell.setdefault(u["cell"], []).append(d)
        cell_k = {c: statistics.fmean(v) for c, v in by_cell.items()}
        decided = [c for c in cell_k if cell_final[c] != 0]
        agree = [(cell_k[c] > 0) == (cell_final[c] > 0) for c in decided]
        return {"stage": stage, "cells": len(cell_k),
                "r_seed": pearson([d for _, d in got], [u["final"] for u, _ in got]),
                "r_cell": pearson([cell_k[c] for c in cell_k], [cell_final[c] for c in cell_k]),
                "sign_agree_cell": round(sum(agree) / len(agree), 3) if agree else None,
                "gain_pt": round(statistics.fmean(cell_final[c] if cell_k[c] > 0 else 0.0 for c in cell_k), 3)}

    longest = max(len(u["by_stage"]) for u in usable)
    out = [entry(k + 1, lambda u, k=k: u["by_stage"][k] if k < len(u["by_stage"]) else None) for k in range(longest)]
    out.append(entry("last", lambda u: u["by_stage"][-1]))
    return {"cells": len(cells), "cell_seeds": len(usable),
            "collapsed_cell_seeds": sum(u["collapsed"] for u in usable),
            "stages": sorted({len(u["by_stage"]) for u in usable}),
            "oracle_gain_pt": round(statistics.fmean(max(v, 0.0) for v in cell_final.values()), 3),
            "always_gain_pt": round(statistics.fmean(cell_final.values()), 3), "by_stage": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", required=True, help="schedule_shift.py's JSON (or its .rows.jsonl)")
    p.add_argument("--out", required=True, help="JSON file to write")
    a = p.parse_args(argv)
    try:
        result = analyse(read_rows(Path(a.rows)))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        p.error(f"--rows {a.rows}: {e}")
    from rltune.errors import RltuneError, write_json
    from rltune.shipped import recorded_command

    result = {"command": recorded_command(), "rows_from": a.rows, **result}
    try:
        write_json(a.out, result, "--out")
    except RltuneError as e:
        p.error(str(e))
    for s in result["by_stage"]:
        print(json.dumps(s))
    print(json.dumps({k: v for k, v in result.items() if k not in ("by_stage", "command")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
