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


def cmd_replay(args: argparse.Namespace) -> int:
    from rltune.pipeline import replay

    report = replay(args.agent, resolve_scenario(args.scenario), args.budget, seed=args.seed,
                    out_dir=Path(args.out), recipe_only=args.recipe)
    print(report["table"])
    plan = report["plan"]
    print(f"{report['method']} at {args.budget}: final {plan['final_bits']} bits, "
          f"{plan['final_sparsity']:.1%} sparse (the recipe's probe picked {report['recipe_bits']} bits); "
          f"trained on this scenario: {'yes' if report['in_agent_training_set'] else 'no'}")
    print(f"artifact: {report['artifact']}; report: {report['report_json']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import time

    from rltune.train import check_config, gate, load_hyperparams, train

    if args.config:
        import yaml

        try:
            cfg = check_config(yaml.safe_load(Path(args.config).read_text()), args.config)
        except (OSError, yaml.YAMLError):
            raise RltuneError(f"{args.config}: cannot read a YAML config") from None
    else:
        cfg = load_hyperparams(args.hyperparams, args.set)
    for key in ("total_timesteps", "n_envs", "seed"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs/train") / f"{args.set}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = train(cfg, run_dir, resume=args.resume, progress_bar=not args.no_progress)
    print(f"agent: {run / 'agent'}")
    if cfg.get("val_scenarios"):
        g = gate(run / "agent", cfg["val_scenarios"], (cfg.get("env") or {}).get("targets", ["10x"]),
                 episodes=int(cfg.get("gate_episodes", 2)), env_kwargs=cfg.get("env"))
        (run / "gate.json").write_text(json.dumps(g, indent=1))
        print(f"gate (held-out {', '.join(cfg['val_scenarios'])}): policy − recipe val accuracy "
              f"{100 * g['mean_diff']:+.2f} ± {100 * g['std_diff']:.2f} pt over {len(g['rows'])} episodes: "
              f"{'PASSED' if g['passed'] else 'FAILED'}")
        if args.ship and g["passed"]:
            import shutil

            dest = Path("agents") / args.ship
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(run / "agent", dest)
            print(f"shipped to {dest}")
        elif args.ship:
            print("not shipped: the gate failed")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rltune.harness import evaluate

    targets: dict[str, list[str]] | list[str] = args.targets
    if args.scenario_targets:  # NAME=8x,16x pairs
        targets = {}
        for item in args.scenario_targets:
            name, _, ts = item.partition("=")
            targets[name] = ts.split(",")
        args.scenarios = list(targets)
    out = evaluate(args.scenarios, targets, args.tuners, args.budget, args.seeds, args.out, agent=args.agent,
                   workers=args.workers, backend=args.backend, address=args.address, progress=not args.no_progress,
                   trial_workers=args.trial_workers, storage=args.storage)
    print((out / "benchmark.md").read_text())
    print(f"results: {out / 'results.jsonl'}; summary: {out / 'summary.json'}")
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

    t = sub.add_parser("train", help="train a PPO agent on scenarios (agents/ppo.yml)")
    t.add_argument("--set", default="default", help="entry of the hyperparameter file")
    t.add_argument("--hyperparams", default=str(REPO_ENVS.parent / "agents" / "ppo.yml"))
    t.add_argument("--config", help="a run folder's config.yaml (reproduces that run)")
    t.add_argument("--run-dir", help="the run folder (default runs/train/SET-TIMESTAMP)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    t.add_argument("--total-timesteps", type=int)
    t.add_argument("--n-envs", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--ship", metavar="NAME", help="copy the agent to agents/NAME if it passes the gate")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("replay", help="compress a scenario with a learned policy: one episode, no search")
    r.add_argument("agent", help="an agent folder (policy.safetensors + agent.json)")
    r.add_argument("--scenario", required=True, help="scenario YAML path or shipped name")
    r.add_argument("--budget", default="10x", help="a ratio (20x), bytes (12KB) or energy (5nJ)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--recipe", action="store_true", help="play the zero action (the recipe) instead")
    r.add_argument("--out", default="runs/replay")
    r.set_defaults(func=cmd_replay)

    e = sub.add_parser("evaluate", help="every tuner on every scenario, target and seed, on equal stage budgets")
    e.add_argument("--scenarios", nargs="+", default=["wine-mlp", "breast-cancer-mlp"])
    e.add_argument("--targets", nargs="+", default=["8x", "16x"], help="targets for every scenario")
    e.add_argument("--scenario-targets", nargs="+", metavar="NAME=T1,T2", help="targets per scenario")
    e.add_argument("--tuners", nargs="+", default=["ppo-replay", "recipe", "fixed-8bit", "adaptive-tau", "random", "optuna-const", "optuna-tpe"])
    e.add_argument("--budget", nargs="+", type=int, default=[256], help="stage budgets (several: score-vs-budget curves)")
    e.add_argument("--seeds", type=int, default=5)
    e.add_argument("--agent", default=str(REPO_ENVS.parent / "agents" / "ppo-v0"))
    e.add_argument("--workers", type=int, default=2, help="parallel processes")
    e.add_argument("--backend", choices=["process", "ray"], default="process")
    e.add_argument("--address", help="an existing Ray cluster to join (default: start Ray locally)")
    e.add_argument("--trial-workers", type=int, default=1,
                   help="split each Optuna cell's trials over this many workers sharing one study")
    e.add_argument("--storage", help="Optuna storage URL shared by the workers (default: SQLite in --out)")
    e.add_argument("--out", default="runs/evaluate")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_evaluate)

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
