"""The ``rltune`` command line.

Every user error (bad scenario, bad knob, unreadable file) prints one line ``rltune: error: ...``
and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rltune.errors import RltuneError

REPO_ENVS = Path(__file__).resolve().parents[1] / "envs"


def resolve_scenario(name: str) -> Path:
    """A scenario path, or the name of a shipped one (``digits-mlp`` -> ``envs/digits-mlp.yaml``)."""
    p = Path(name)
    if p.exists():
        return p
    for base in (Path("envs"), REPO_ENVS):
        cand = base / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        if cand.exists():
            return cand
    raise RltuneError(f"{name}: no such scenario file (nor a shipped scenario of that name in envs/)")


def _fmt_bytes(n: float) -> str:
    return f"{n / 1024:.1f} KB" if n >= 10240 else f"{int(n)} B"


def before_after_table(rows: list[dict]) -> str:
    """Markdown table of teacher / float student / compressed student."""
    head = "| model | test acc | bytes | ratio | latency b1 | energy / inference |\n|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        lat = f"{r['latency_b1_s'] * 1e6:.0f} µs" if r.get("latency_b1_s") else "-"
        energy = f"{r['energy_pj'] / 1e3:.1f} nJ" if r.get("energy_pj") else "-"
        ratio = f"{r['ratio']:.1f}×" if r.get("ratio") else "-"
        lines.append(f"| {r['model']} | {100 * r['test_acc']:.2f} % | {_fmt_bytes(r['bytes'])} | {ratio} | {lat} | {energy} |")
    return head + "\n".join(lines) + "\n"


def cmd_compress(args: argparse.Namespace) -> int:
    from rltune.pipeline import compress_with_recipe

    scenario_path = resolve_scenario(args.scenario)
    report = compress_with_recipe(scenario_path, sparsity=args.sparsity, bits=args.bits,
                                  seed=args.seed, out_dir=Path(args.out))
    print(report["table"])
    print(f"artifact: {report['artifact']} ({report['compressed']['bytes']} bytes); "
          f"report: {report['report_json']}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from rltune.scenario import load_scenario

    for f in args.files:
        s = load_scenario(f)
        print(f"{f}: ok ({s.name})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rltune", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a scenario's student with the fixed gradual recipe")
    c.add_argument("--scenario", default="digits-mlp", help="scenario YAML path or shipped name")
    c.add_argument("--sparsity", type=float, default=0.8, help="final sparsity of the cubic ramp")
    c.add_argument("--bits", type=int, default=4, help="final bit-width (2..8, or 32 for float)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default="runs/compress", help="folder for the artifact and the report")
    c.set_defaults(func=cmd_compress)

    v = sub.add_parser("validate", help="check scenario files")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=cmd_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RltuneError as e:
        print(f"rltune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rltune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
