"""How often does a search keep up with *itself* at every N? The null for the per-cell target
"the best policy search >= Optuna TPE at every N" (issue 12).

    python experiments/anytime_null.py \\
        --series tpe=experiments/results/anytime-v1:optuna-tpe \\
                 tpe-afresh=experiments/results/anytime-v1-tpe2:optuna-tpe \\
                 warm-tpe=experiments/results/anytime-v1s:ppo-warm-tpe \\
                 best-of-n=experiments/results/anytime-v1s:ppo-best-of-n \\
        --pairs tpe-afresh:tpe tpe:tpe-afresh warm-tpe:tpe "warm-tpe|best-of-n:tpe" \\
                warm-tpe:tpe-afresh "warm-tpe|best-of-n:tpe-afresh" \\
        --out experiments/results/anytime-v1-tpe2/null.json

A series is an anytime folder's searcher (``NAME=DIR:TUNER``): per cell (scenario × target) and
seed, its run's best-by-val test accuracy after the first N episodes (``cells/results.jsonl``,
the records ``experiments/anytime.py`` summarises). ``tpe-afresh`` above is optuna-tpe run again
with ``--sampler-seed-offset``: the same cells, seeds, splits, float students and per-episode
training seeds, only the sampler's draws new, so it is TPE against itself.

A pair ``A:B`` asks, per cell every series named has, whether the mean over the seeds they all have of A is
>= that of B at every N of :func:`rltune.tuners.anytime_points` (``A`` may be ``X|Y``: the larger
of the two means at each N, as the harness's "best policy search"; ``B`` too, so
``replay:recipe|recipe-plus1|sensitivity`` asks "replay >= every rule", the issue's replay target,
at N = 1 for one-episode tuners). Written per pair:
``cells``, ``ge_every_n`` (N = 1 … max) and ``ge_every_n_from_2`` (N = 2 … max, the issue's
range), ``mean_diff_pt`` per N (A − B over the cells), ``paired_sd_pt`` per N (the sd over seeds
of the paired difference, A's per-seed accuracy − B's, averaged over the cells with 2 seeds or more; for ``X|Y`` the
series with the larger mean at that N, on either side; a mean of ``seeds`` carries it / sqrt(seeds)),
``clearly_below_somewhere`` (cells where at some N the mean paired difference is below −2 × that
sd / sqrt(seeds): a shortfall the seeds resolve; for ``B = X|Y`` against the one with the larger
mean, the first named on ties), ``clearly_below_any_somewhere`` (the same against each of B's
series: a near-tie in B's means cannot hide a resolved shortfall), and per cell the N where A is
below B (``below_at``), clearly below (``clearly_below_at``) and clearly below one of B's series
(``clearly_below_any_at``), at the N both have for every seed (``compared_at``; ``not_compared_at``
the N one side lacks, e.g. a scenario capped with ``--max-episodes-for`` in one folder only). A
cell counts in ``ge_every_n_from_2`` only if some N >= 2 is compared. A pair without a cell in
common is an error.

``--oracle NAME=X|Y|Z`` adds a series NAME that, per cell and N, *is* the member series with the
largest mean over the seeds all members share (the first named on ties): a policy that always plays
the best of them on that cell, known with hindsight. How often can even that be >= every rule at a
handful of seeds? ``--blocks K`` answers without the hindsight: every pair is also compared on
consecutive blocks of K seeds (of all seeds any series has, sorted; a last block short of K is
dropped), and on a block an oracle chooses its member on the seeds *outside* the block, as a policy
told the best rule per cell by other seeds' episodes would (on the full comparison it keeps the
in-sample choice). A pair then also has ``blocks``: ``size``, ``seeds`` (per block), and per block
``ge_every_n``, ``ge_every_n_from_2`` and ``clearly_below_somewhere``, with their ``_mean`` over the
blocks.

Writes ``{"command", "series", "oracles", "pairs": {"A:B": {...}}}``; bad input exits with one line
and status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def _whole(x) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{x!r} is not a whole number")
    return x


def _number(x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{x!r} is not a number")
    return float(x)


def load_series(folder: Path, tuner: str) -> dict[tuple[str, str], dict[int, dict[int, float]]]:
    """{(scenario, target): {seed: {N: test accuracy}}} of ``tuner``'s whole-cell runs in ``folder``
    (the largest budget of each cell and seed)."""
    path = folder / "cells" / "results.jsonl"
    best: dict[tuple[str, str, int], tuple[int, dict[int, float]]] = {}
    from rltune.harness import strict_results

    for n, r in strict_results(path):
        if r.get("tuner") != tuner or "part" in r:
            continue
        try:
            curve = {_whole(a["episodes"]): _number(a["test_acc"]) for a in r["anytime"]}
            key = (str(r["scenario"]), str(r["target"]), _whole(r["seed"]))
            budget = _number(r["budget_stages"])
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
            raise ValueError(f"{path}:{n}: not a result row of the harness ({type(e).__name__}: {e})") from None
        if not curve or not math.isfinite(budget) or not all(0.0 <= v <= 1.0 for v in curve.values()):
            raise ValueError(f"{path}:{n}: a {tuner} row without an anytime curve of accuracies in [0, 1] and a finite budget")
        if key not in best or budget > best[key][0]:
            best[key] = (budget, curve)
    out: dict[tuple[str, str], dict[int, dict[int, float]]] = {}
    for (scenario, target, seed), (_, curve) in best.items():
        out.setdefault((Path(scenario).name, target), {})[seed] = curve
    return out


def oracle(series: dict[str, dict], members: list[str], choose_on=None) -> dict:
    """The series that per cell and N is the member with the largest mean over the seeds all members
    share (``choose_on(cell, seeds)`` narrows the seeds the choice reads; the values are every shared
    seed's). {(scenario, target): {seed: {N: accuracy}}}, like :func:`load_series`."""
    out: dict = {}
    for cell in set.intersection(*(set(series[m]) for m in members)):
        seeds = sorted(set.intersection(*(set(series[m][cell]) for m in members)))
        pick_on = choose_on(cell, seeds) if choose_on else seeds
        if not seeds or not pick_on:
            continue
        ns = set.intersection(*(set(series[m][cell][s]) for m in members for s in seeds))
        for n in ns:
            best = max(members, key=lambda m: (statistics.fmean(series[m][cell][s][n] for s in pick_on),
                                                -members.index(m)))
            for s in seeds:
                out.setdefault(cell, {}).setdefault(s, {})[n] = series[best][cell][s][n]
    return out


def blocks_of(series: dict[str, dict], size: int) -> list[list[int]]:
    """Consecutive blocks of ``size`` seeds of all seeds any series has (sorted); a short last one dropped."""
    seeds = sorted({s for ser in series.values() for by in ser.values() for s in by})
    return [seeds[i:i + size] for i in range(0, len(seeds) - size + 1, size)]


def compare_blocks(series: dict[str, dict], oracles: dict[str, list[str]], a: str, b: str, size: int) -> dict:
    """The pair ``a:b`` on each block of ``size`` seeds, oracles choosing on the seeds outside it."""
    out: dict = {"size": size, "seeds": [], "ge_every_n": [], "ge_every_n_from_2": [], "clearly_below_somewhere": []}
    for block in blocks_of(series, size):
        inside = set(block)
        sub = {name: {cell: {s: v for s, v in by.items() if s in inside} for cell, by in ser.items()}
               for name, ser in series.items()}
        for name, members in oracles.items():
            full = oracle(series, members, choose_on=lambda cell, seeds: [s for s in seeds if s not in inside])
            sub[name] = {cell: {s: v for s, v in by.items() if s in inside} for cell, by in full.items()}
        try:
            r = compare(sub, a, b)
        except ValueError:
            continue  # no cell with seeds in this block
        out["seeds"].append(block)
        for k in ("ge_every_n", "ge_every_n_from_2", "clearly_below_somewhere"):
            out[k].append(r[k])
    if not out["seeds"]:
        raise ValueError(f"--blocks {size}: --pairs {a}:{b} has no block of {size} seeds with a cell in common")
    for k in ("ge_every_n", "ge_every_n_from_2", "clearly_below_somewhere"):
        out[k + "_mean"] = round(statistics.fmean(out[k]), 3)
    return out


def compare(series: dict[str, dict], a: str, b: str) -> dict:
    """The pair ``a:b`` (either may be ``X|Y``: the larger mean at each N) over the cells all have."""
    names, bnames = a.split("|"), b.split("|")
    everyone = [*names, *bnames]
    cells = sorted(set.intersection(*(set(series[x]) for x in everyone)))
    out_cells, ge_all, ge_from2, clearly_below, clearly_any = [], 0, 0, 0, 0
    diffs: dict[int, list[float]] = {}
    sds: dict[int, list[float]] = {}
    for cell in cells:
        seeds = sorted(set.intersection(*(set(series[x][cell]) for x in everyone)))
        ns = sorted(set.intersection(*(set(series[x][cell][s]) for x in everyone for s in seeds))) if seeds else []
        if not ns:
            continue
        every = set.union(*(set(series[x][cell][s]) for x in everyone for s in seeds))
        below, clearly, clearly_b = [], [], []
        for n in ns:
            means = {x: statistics.fmean(series[x][cell][s][n] for s in seeds) for x in everyone}
            x = max(names, key=lambda y: (means[y], -names.index(y)))  # the larger mean (the first on ties)
            y = max(bnames, key=lambda z: (means[z], -bnames.index(z)))  # likewise
            mb = means[y]
            diffs.setdefault(n, []).append(100 * (means[x] - mb))
            if means[x] < mb:
                below.append(n)
            if len(seeds) > 1:
                d = [series[x][cell][s][n] - series[y][cell][s][n] for s in seeds]
                sd = statistics.stdev(d)
                sds.setdefault(n, []).append(100 * sd)
                if statistics.fmean(d) < -2 * sd / math.sqrt(len(d)):
                    clearly.append(n)
                for z in bnames:  # against each of B's series, not only the one with the larger mean
                    dz = [series[x][cell][s][n] - series[z][cell][s][n] for s in seeds]
                    if statistics.fmean(dz) < -2 * statistics.stdev(dz) / math.sqrt(len(dz)):
                        clearly_b.append(n)
                        break
        ge_all += not below
        ge_from2 += not [n for n in below if n >= 2] and max(ns) >= 2
        clearly_below += bool(clearly)
        clearly_any += bool(clearly_b)
        out_cells.append({"scenario": cell[0], "target": cell[1], "seeds": len(seeds), "compared_at": ns,
                          "not_compared_at": sorted(every - set(ns)), "below_at": below,
                          "clearly_below_at": clearly, "clearly_below_any_at": clearly_b})
    if not out_cells:
        raise ValueError(f"--pairs {a}:{b}: no cell (scenario file name and target) with seeds and N in common")
    return {"cells": len(out_cells), "ge_every_n": ge_all, "ge_every_n_from_2": ge_from2,
            "clearly_below_somewhere": clearly_below, "clearly_below_any_somewhere": clearly_any,
            "mean_diff_pt": {str(n): round(statistics.fmean(v), 3) for n, v in sorted(diffs.items())},
            "paired_sd_pt": {str(n): round(statistics.fmean(v), 3) for n, v in sorted(sds.items())},
            "by_cell": out_cells}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--series", nargs="+", required=True, metavar="NAME=DIR:TUNER")
    p.add_argument("--pairs", nargs="+", required=True, metavar="A:B", help="A >= B at every N? (A and B may be X|Y)")
    p.add_argument("--oracle", nargs="+", default=[], metavar="NAME=X|Y",
                   help="a series that per cell is the member with the best mean (see the docstring)")
    p.add_argument("--blocks", type=int, metavar="K", help="also compare on blocks of K seeds")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    from rltune.errors import RltuneError, write_atomic
    from rltune.shipped import recorded_command

    try:
        if not a.out.strip():
            raise ValueError("--out: give the JSON file to write")
        if a.blocks is not None and a.blocks < 1:
            raise ValueError(f"--blocks {a.blocks}: give a whole number of seeds >= 1")
        specs: dict[str, tuple[Path, str]] = {}
        for s in a.series:
            name, sep, rest = s.partition("=")
            folder, sep2, tuner = rest.rpartition(":")
            if not (sep and sep2 and name and folder and tuner) or "|" in name or ":" in name:
                raise ValueError(f"--series {s!r}: expected NAME=DIR:TUNER (a NAME without '|' or ':')")
            if name in specs:
                raise ValueError(f"--series: {name!r} named twice")
            specs[name] = (Path(folder), tuner)
        oracles: dict[str, list[str]] = {}
        for o in a.oracle:
            name, sep, rest = o.partition("=")
            members = rest.split("|")
            if not (sep and name) or "|" in name or ":" in name or not all(members):
                raise ValueError(f"--oracle {o!r}: expected NAME=X|Y of --series names (a NAME without '|' or ':')")
            if name in specs or name in oracles:
                raise ValueError(f"--oracle: {name!r} named twice")
            unknown = [m for m in members if m not in specs]
            if unknown or len(set(members)) != len(members):
                raise ValueError(f"--oracle {o!r}: its members must be distinct --series names"
                                 + (f"; unknown {unknown}" if unknown else ""))
            oracles[name] = members
        pairs = []
        for q in a.pairs:
            left, sep, right = q.rpartition(":")
            unknown = [x for x in [*left.split("|"), *right.split("|")] if x not in specs and x not in oracles]
            if not sep or unknown:
                raise ValueError(f"--pairs {q!r}: expected A:B of --series names (A and B may be X|Y)"
                                 + (f"; unknown {unknown}" if sep else ""))
            pairs.append((left, right))
        series = {}
        for name, (folder, tuner) in specs.items():
            series[name] = load_series(folder, tuner)
            if not series[name]:
                raise ValueError(f"--series {name}: no {tuner} rows in {folder / 'cells' / 'results.jsonl'}")
        loaded = dict(series)
        for name, members in oracles.items():
            series[name] = oracle(loaded, members)
            if not series[name]:
                raise ValueError(f"--oracle {name}: its members have no cell and seed in common")
        result = {"command": recorded_command(),
                  "series": {n: {"folder": str(f), "tuner": t, "cells": len(series[n])} for n, (f, t) in specs.items()},
                  "oracles": {n: {"members": m, "cells": len(series[n])} for n, m in oracles.items()},
                  "pairs": {f"{x}:{y}": compare(series, x, y) for x, y in pairs}}
        if a.blocks is not None:
            for x, y in pairs:
                result["pairs"][f"{x}:{y}"]["blocks"] = compare_blocks(loaded, oracles, x, y, a.blocks)
        out = Path(a.out)
        if any(out.resolve() == (f / "cells" / "results.jsonl").resolve() for f, _ in specs.values()):
            raise ValueError(f"--out {out}: that is one of the series' results")
        write_atomic(out, (json.dumps(result, indent=1) + "\n").encode(), "--out")
    except (OSError, UnicodeDecodeError, ValueError, RltuneError) as e:
        print("anytime_null: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    for k, v in result["pairs"].items():
        print(f"{k}: >= at every N in {v['ge_every_n']} of {v['cells']} cells ({v['ge_every_n_from_2']} from N = 2); "
              f"mean diff pt {v['mean_diff_pt']}"
              + (f"; on blocks of {v['blocks']['size']} seeds {v['blocks']['ge_every_n']} (mean "
                 f"{v['blocks']['ge_every_n_mean']})" if "blocks" in v else ""))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
