"""How well does the cheap estimate (Hutchinson Hessian trace, HAWQ-style) rank the measured
per-layer sensitivity? (allocation issue: "estimated-vs-measured sensitivity rank correlation")

For each scenario and float-student seed, :func:`rltune.sensitivity` measures the val loss change
of the float student with only one layer compressed (each bit-width, each sparsity) and predicts it
as ``tr(H_l)/n_l · ‖Δw_l‖²``. Two Spearman correlations are reported:

- ``rank_correlation``: over every layer × setting (what the table itself prints). Largely says
  that fewer bits or more sparsity hurt more, which any estimate gets right.
- ``layer_rank_correlation``: for each single setting (``b`` bits, or sparsity ``s``), over the
  layers (which layer hurts most), averaged over the settings; the figure an allocator needs.
  Only for students with at least three compressible layers.
- ``pair_agreement``: over every setting and pair of layers, the share the estimate orders as
  measured (0.5 is chance); defined for two layers too.

    python experiments/sensitivity_rank.py --seeds 3 --out experiments/results/sensitivity

writes ``summary.json`` (one row per scenario: the means and standard deviations over seeds) and
one table per scenario and seed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

HELD_OUT = ("synthetic-10class", "synthetic-8class", "mnist1d-cnn", "mnist1d-lenet", "wine-mlp",
            "breast-cancer-mlp", "mnist-cnn2d")


def layer_rank_correlation(table: dict) -> float:
    """Mean over settings of Spearman(predicted, measured Δloss) across layers; NaN under 3 layers."""
    from rltune.layer_sensitivity import _spearman

    rows = table["layers"]
    if len(rows) < 3:
        return math.nan
    out = []
    for kind, key_m, key_p in (("bits", "loss_bits", "predicted_bits"), ("sparsity", "loss_sparsity", "predicted_sparsity")):
        for k in rows[0][key_m]:
            r = _spearman([row[key_p][k] for row in rows], [row[key_m][k] for row in rows])
            if math.isfinite(r):
                out.append(r)
    return statistics.fmean(out) if out else math.nan


def pair_agreement(table: dict) -> float:
    """Over every setting and every pair of layers whose measured Δloss differ: the share the
    estimate orders the same way (1 = always picks the more sensitive layer, 0.5 = chance). Defined
    from two layers up, where a Spearman across layers is not."""
    rows = table["layers"]
    agree = total = 0
    for key_m, key_p in (("loss_bits", "predicted_bits"), ("loss_sparsity", "predicted_sparsity")):
        for k in rows[0][key_m]:
            for i in range(len(rows)):
                for j in range(i + 1, len(rows)):
                    dm = rows[i][key_m][k] - rows[j][key_m][k]
                    dp = rows[i][key_p][k] - rows[j][key_p][k]
                    if dm != 0:
                        total += 1
                        agree += (dm > 0) == (dp > 0)
    return agree / total if total else math.nan


def _ms(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.pstdev(xs) if len(xs) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", nargs="+", default=list(HELD_OUT))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("experiments/results/sensitivity"))
    args = ap.parse_args(argv)
    if not 1 <= args.seeds <= 20:
        print("sensitivity_rank: --seeds must be 1..20", file=sys.stderr)
        return 2
    import torch

    import rltune
    from rltune.errors import RltuneError
    from rltune.api import json_safe

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = []
    for name in args.scenarios:
        overall, per_layer, pairs, n_layers = [], [], [], 0
        for seed in range(args.seeds):
            try:
                t = rltune.sensitivity(name, seed=seed)
            except RltuneError as e:
                print(f"sensitivity_rank: {e}", file=sys.stderr)
                return 2
            (args.out / f"{name}-seed{seed}.json").write_text(json.dumps(json_safe(t), indent=1) + "\n")
            overall.append(t["rank_correlation"])
            per_layer.append(layer_rank_correlation(t))
            pairs.append(pair_agreement(t))
            n_layers = len(t["layers"])
        m, s = _ms(overall)
        lm, ls = _ms(per_layer)
        pm, ps = _ms(pairs)
        row = {"scenario": name, "layers": n_layers, "n_seeds": args.seeds,
               "rank_correlation_mean": m, "rank_correlation_std": s,
               "layer_rank_correlation_mean": lm, "layer_rank_correlation_std": ls,
               "pair_agreement_mean": pm, "pair_agreement_std": ps}
        summary.append(row)
        fmt = lambda a, b: "–" if a is None else f"{a:+.2f} ± {b:.2f}"  # noqa: E731
        print(f"{name:20s} {n_layers} layers  all settings {fmt(m, s)}  across layers {fmt(lm, ls)}  "
              f"layer pairs ordered right {fmt(pm, ps)}", flush=True)
    (args.out / "summary.json").write_text(json.dumps(
        {"command": "python experiments/sensitivity_rank.py " + " ".join(argv if argv is not None else sys.argv[1:]),
         "rows": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
