"""rltune: compress a model by distillation, pruning and quantization, tuned by reinforcement learning.

Verbs: ``compress`` (a scenario's student to a target with any tuner, or the fixed recipe at a
sparsity and bit-width), ``replay`` (a learned policy, one episode, no search), ``train`` (a PPO
agent), ``evaluate`` (every tuner on equal stage budgets), ``export`` (an artifact to ONNX),
``import-sb3`` (an SB3 PPO ``.zip`` into an agent folder), ``sensitivity`` (per-layer sensitivity of a
scenario's float student), ``validate`` (scenario files). Progress goes to stderr (``--quiet`` silences it). Every user error
prints one line ``rltune: error: ...`` and exits with status 2; no traceback. A user's own
``nn.Module`` goes in through the Python API (``rltune.Problem``, see the README).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import sys
from pathlib import Path

from rltune import __version__
from rltune.errors import RltuneError

TUNER_CHOICES = ("recipe", "recipe-plus1", "sensitivity", "sensitivity-pick", "owl", "fixed-8bit", "adaptive-tau", "random", "optuna-const",
                 "optuna-tpe", "ppo-replay", "ppo-best-of-n", "ppo-warm-tpe", "ppo-finetune")  # rltune.tuners.TUNERS (tested equal)
EVALUATE_DEFAULT_TUNERS = ["ppo-replay", "recipe", "fixed-8bit", "adaptive-tau", "random", "optuna-const", "optuna-tpe"]


# -- argument types: checked before any training, quoting the value typed ----------------------

def _bits(text: str) -> int:
    try:
        b = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit-width 2..8 or 32, got {text!r}") from None
    if b not in (2, 3, 4, 5, 6, 7, 8, 32):
        raise argparse.ArgumentTypeError(f"expected a bit-width 2..8 or 32, got {text!r}")
    return b


def _sparsity(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None
    if not (math.isfinite(s) and 0.0 <= s < 1.0):
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return s


def _budget(text: str) -> str:
    from rltune.budget import Budget

    try:
        b = Budget.parse(text)
    except RltuneError as e:
        raise argparse.ArgumentTypeError(f"{e} (got {text!r})") from None
    if not math.isfinite(b.value):
        raise argparse.ArgumentTypeError(f"expected a finite budget, got {text!r}")
    return text


def _whole(lo: int, hi: int = 2 ** 31 - 1):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected a whole number in {lo}..{hi}, got {text!r}")
        return v

    parse.__name__ = "whole number"
    return parse


# -- progress on stderr ------------------------------------------------------------------------

def _progress(quiet: bool) -> None:
    log = logging.getLogger("rltune")
    log.handlers[:] = []
    if not quiet:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("rltune: %(message)s"))
        log.addHandler(h)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    import warnings

    from rltune.errors import RltuneWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, RltuneWarning):
            print(f"rltune: warning: {message}", file=sys.stderr)
        else:
            _showwarning(message, category, filename, lineno, file, line)

    _showwarning = warnings.showwarning
    warnings.showwarning = show


def _print_result(report: dict, extra: str = "") -> None:
    print(report["table"])
    f = report["final"]
    where = f" at {report['budget']}" if report.get("budget") else ""
    print(f"{report['method']}{where}: {f['bits']:.0f} bits, {f['sparsity']:.1%} sparse"
          + (f" (the recipe's probe picked {f['recipe_bits']} bits)" if f.get("recipe_bits") else "") + extra)
    print(f"artifact: {report['artifact']} ({report['compressed']['bytes']} bytes); report: {report['report_json']}"
          + (f"; onnx: {report['onnx']}" if report.get("onnx") else ""))


# -- verbs -------------------------------------------------------------------------------------

def cmd_compress(args: argparse.Namespace) -> int:
    from rltune.api import as_problem, compress
    from rltune.pipeline import compress_fixed, write_outputs

    if args.budget is None and args.tuner != "recipe":
        raise RltuneError(f"--tuner {args.tuner} needs --budget (a target to meet)")
    if args.budget is not None and (args.sparsity is not None or args.bits is not None):
        raise RltuneError("give either --budget (a target the tuner meets) or --sparsity/--bits (the fixed recipe), not both")
    agent = _agent_arg(args.agent) if args.tuner.startswith("ppo") else None
    _check_outputs(args.out, args.onnx)
    problem = as_problem(args.scenario)
    if args.budget is None:
        sp = 0.8 if args.sparsity is None else args.sparsity
        bits = 4 if args.bits is None else args.bits
        result = compress_fixed(problem, sp, bits, args.seed)
        how = {"method": "recipe (fixed)", "seed": args.seed, "recipe": {"sparsity": sp, "bits": bits}}
    else:
        result = compress(problem, args.budget, tuner=args.tuner, seed=args.seed, episodes=args.episodes, agent=agent)
        how = {"method": args.tuner, "budget": args.budget, "seed": args.seed, "agent": str(agent) if agent else None}
    report = write_outputs(result, args.out, how, onnx=args.onnx)
    _print_result(report)
    return 0


def _check_outputs(out: str, onnx: str | None) -> None:
    """Where the outputs go, checked before any training (a file in the way, a missing folder)."""
    from rltune.errors import make_folder

    make_folder(out)
    if onnx:
        from rltune.shipped import is_dir

        parent = Path(onnx).resolve().parent
        if not is_dir(parent):
            raise RltuneError(f"--onnx {onnx}: the folder {parent} does not exist")
        if is_dir(onnx) or len(Path(onnx).name) > 255:
            raise RltuneError(f"--onnx {onnx}: is a folder; give a file name")
        try:
            import onnx as _  # noqa: F401
        except ImportError:
            raise RltuneError("--onnx needs the onnx package: pip install 'rltune[onnx]'") from None


def _agent_arg(name: str | None):
    from rltune.shipped import resolve_agent
    from rltune.tuners import check_agent

    path = resolve_agent(name or "ppo-v0")
    check_agent(path)  # layouts checked against the env version the agent was trained on (v0 or v1)
    return path


def cmd_sensitivity(args: argparse.Namespace) -> int:
    import json

    from rltune.api import as_problem, json_safe
    from rltune.errors import write_atomic
    from rltune.layer_sensitivity import sensitivity

    if args.json:
        from rltune.shipped import is_dir

        parent = Path(args.json).resolve().parent
        if not is_dir(parent):
            raise RltuneError(f"--json {args.json}: the folder {parent} does not exist")
        if is_dir(args.json) or len(Path(args.json).name) > 255:
            raise RltuneError(f"--json {args.json}: is a folder; give a file name")
    if any(b == 32 for b in args.bits) or any(x == 0 for x in args.sparsities):
        raise RltuneError("--bits takes 2..8 and --sparsities fractions in (0, 1)")
    t = sensitivity(as_problem(args.scenario), seed=args.seed, bits=args.bits, sparsities=args.sparsities,
                    probes=args.probes)
    print(f"{t['scenario']}: float val {100 * t['float_val_acc']:.2f} %; val accuracy change (pt) with only "
          f"that layer compressed; trace: Hutchinson, {t['probes']} probes")
    head = ["layer", "kind", "params", "trace"] + [f"{b}b" for b in t["bits"]] + [f"{s:g}sp" for s in t["sparsities"]]
    print(" | ".join(head))
    for r in t["layers"]:
        cells = [r["name"], r["kind"], str(r["params"]), f"{r['trace']:.3g}"]
        cells += [f"{100 * r['bits'][b]:+.2f}" for b in t["bits"]]
        cells += [f"{100 * r['sparsity'][s]:+.2f}" for s in t["sparsities"]]
        print(" | ".join(cells))
    print(f"rank correlation (Spearman), estimated vs measured loss change: {t['rank_correlation']:.3f}")
    if args.json:
        write_atomic(args.json, (json.dumps(json_safe(t), indent=1) + "\n").encode(), "sensitivity table")
        print(f"written: {args.json}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from rltune.api import as_problem, compress
    from rltune.pipeline import write_outputs

    agent = None if args.recipe else _agent_arg(args.agent)
    _check_outputs(args.out, args.onnx)
    problem = as_problem(args.scenario)
    if args.recipe:
        result = compress(problem, args.budget, tuner="recipe", seed=args.seed)
    else:
        result = compress(problem, args.budget, tuner="ppo-replay", seed=args.seed, agent=agent)
    trained_on = []
    if agent is not None:
        from rltune.agentfile import load_policy

        trained_on = [Path(s).stem for s in load_policy(agent).meta.get("training", {}).get("scenarios", [])]
    how = {"method": "recipe" if args.recipe else "ppo-replay", "agent": None if agent is None else str(agent),
           "budget": args.budget, "seed": args.seed, "in_agent_training_set": problem.name in trained_on}
    report = write_outputs(result, args.out, how, onnx=args.onnx)
    _print_result(report, "" if agent is None else
                  f"; trained on this scenario: {'yes' if how['in_agent_training_set'] else 'no'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import time

    from rltune.shipped import hyperparams_file
    from rltune.train import anchor_scenarios, check_config, gate, load_hyperparams, train

    if args.config:
        from rltune.errors import check_regular_file
        from rltune.scenario import safe_yaml

        check_regular_file(args.config, "config file (YAML)")
        try:
            text = Path(args.config).read_text()
        except (OSError, UnicodeDecodeError):
            raise RltuneError(f"{args.config}: cannot read a YAML config") from None
        cfg = check_config(safe_yaml(text, args.config), args.config)
        cfg = anchor_scenarios(cfg, Path(args.config).parent)  # scenario files beside the config
    else:
        cfg = load_hyperparams(args.hyperparams or hyperparams_file(), args.set)
        if args.hyperparams:
            cfg = anchor_scenarios(cfg, Path(args.hyperparams).parent)
    for key in ("total_timesteps", "n_envs", "seed", "vec_env"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.backend == "ray":
        if args.vec_env not in (None, "ray"):
            raise RltuneError(f"--backend ray steps the envs on Ray actors; it does not take --vec-env {args.vec_env}")
        cfg["vec_env"] = "ray"
    elif args.address or args.ray_workers:
        raise RltuneError("--address and --ray-workers need --backend ray")
    if args.address:
        cfg["ray_address"] = args.address
    if args.ray_workers:
        cfg["ray_workers"] = args.ray_workers
    check_config(cfg, "train")
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs/train") / f"{args.set}-{time.strftime('%Y%m%d-%H%M%S')}"
    logging.getLogger("rltune").info("training run folder %s: building the environments (teachers, float "
                                     "students, probes; cached after the first run)", run_dir)
    run = train(cfg, run_dir, resume=args.resume, progress_bar=not (args.no_progress or args.quiet))
    print(f"agent: {run / 'agent'}")
    g = None
    if cfg.get("tasks") is not None:
        from rltune.train import gate_tasks

        g = gate_tasks(run / "agent", cfg["tasks"], int(cfg.get("gate_tasks", 8)),
                       episodes=int(cfg.get("gate_episodes", 1)), env_kwargs=cfg.get("env"))
        _write_gate(run, g)
        print(f"gate ({g['tasks']} held-out generated tasks): policy − zero action val accuracy "
              f"{100 * g['mean_diff']:+.2f} ± {100 * g['std_diff']:.2f} pt over {len(g['rows'])} episodes: "
              f"{'PASSED' if g['passed'] else 'FAILED'}")
    elif cfg.get("val_scenarios"):
        g = gate(run / "agent", cfg["val_scenarios"], (cfg.get("env") or {}).get("targets", ["10x"]),
                 episodes=int(cfg.get("gate_episodes", 2)), env_kwargs=cfg.get("env"))
        _write_gate(run, g)
        print(f"gate (held-out {', '.join(cfg['val_scenarios'])}): policy − recipe val accuracy "
              f"{100 * g['mean_diff']:+.2f} ± {100 * g['std_diff']:.2f} pt over {len(g['rows'])} episodes: "
              f"{'PASSED' if g['passed'] else 'FAILED'}")
    if g is not None:
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


def _write_gate(run: Path, g: dict) -> None:
    from rltune.errors import write_atomic

    write_atomic(run / "gate.json", json.dumps(g, indent=1).encode(), "gate")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rltune.harness import evaluate
    from rltune.shipped import resolve_scenario

    targets: dict[str, list[str]] | list[str] = args.targets
    if args.scenario_targets:  # NAME=8x,16x pairs
        targets = {}
        for item in args.scenario_targets:
            name, sep, ts = item.partition("=")
            if not sep or not ts:
                raise RltuneError(f"--scenario-targets: expected NAME=T1,T2, got {item!r}")
            targets[name] = [_budget_or_error(t) for t in ts.split(",")]
        args.scenarios = list(targets)
    from rltune.scenario import load_scenario

    for s in args.scenarios:  # every file checked before the first cell starts
        load_scenario(resolve_scenario(s))
    agent = str(_agent_arg(args.agent)) if any(t.startswith("ppo") for t in args.tuners) else None
    out = evaluate(args.scenarios, targets, args.tuners, args.budget, args.seeds, args.out, agent=agent,
                   workers=args.workers, backend=args.backend, address=args.address,
                   progress=not (args.no_progress or args.quiet), trial_workers=args.trial_workers,
                   storage=args.storage, study_prefix=args.study_prefix, batch=args.batch)
    print((out / "benchmark.md").read_text())
    print(f"results: {out / 'results.jsonl'}; summary: {out / 'summary.json'}")
    return 0


def _study_prefix(text: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text):
        raise argparse.ArgumentTypeError(f"expected letters, digits, '.', '_', '-' (at most 64), got {text!r}")
    return text


def _budget_or_error(text: str) -> str:
    try:
        return _budget(text)
    except argparse.ArgumentTypeError as e:
        raise RltuneError(f"--scenario-targets: {e}") from None


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from rltune.export import load_artifact
    from rltune.onnx_export import export_onnx

    skeleton = None
    if args.skeleton:
        mod, _, attr = args.skeleton.partition(":")
        if not mod or not attr:
            raise RltuneError(f"--skeleton: expected MODULE:CALLABLE (your own code, e.g. mymodels:Student), got {args.skeleton!r}")
        sys.path.insert(0, str(Path.cwd()))
        try:
            factory = getattr(importlib.import_module(mod), attr)
            skeleton = factory()
        except Exception as e:  # the user's own code failed: say so in one line
            raise RltuneError(f"--skeleton {args.skeleton}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if not isinstance(skeleton, torch.nn.Module):
            raise RltuneError(f"--skeleton {args.skeleton}: returned a {type(skeleton).__name__}, not an nn.Module")
    codes: list = []
    model = load_artifact(args.artifact, skeleton=skeleton, codes=codes)
    if args.input_shape:
        try:
            shape = tuple(int(d) for d in args.input_shape.split(","))
        except ValueError:
            shape = ()
        if not shape or any(d < 1 or d > 1 << 20 for d in shape):
            raise RltuneError(f"--input-shape: expected positive whole numbers like 1,28,28, got {args.input_shape!r}")
    else:
        shape = _input_shape(model)
    try:
        info = export_onnx(model, args.onnx, torch.zeros(1, *shape), codes=codes)
    except RltuneError as e:
        if args.input_shape or "forward pass failed" not in str(e):
            raise
        raise RltuneError(f"{e} (the input shape {','.join(map(str, shape))} was guessed from the first layer: "
                          "pass --input-shape, e.g. 20,3 for sequences of 20 steps of 3 features)") from None
    print(f"onnx: {args.onnx} ({info['onnx_bytes']} bytes; {info['quantized_layers']} layers as int8, "
          f"{info['float_layers']} float)")
    return 0


def _input_shape(model) -> tuple[int, ...]:
    from torch import nn

    if hasattr(model, "in_shape"):
        return tuple(model.in_shape)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return (m.in_features,)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            break
    raise RltuneError("cannot tell this model's input shape: pass --input-shape (e.g. 1,28,28)")


def cmd_import_sb3(args: argparse.Namespace) -> int:
    from rltune.agentfile import import_sb3_zip
    from rltune.registration import ENV_IDS
    from rltune.train import layouts

    from rltune.shipped import is_file

    zip_path = Path(args.zip)
    if not args.zip or not is_file(zip_path):
        raise RltuneError(f"{args.zip!r}: no such file (an SB3 model .zip)")
    # rl-zoo saves VecNormalize's statistics beside the model; a policy trained on normalised
    # observations acts on the wrong numbers without them, and rltune agents carry none: refuse
    for stats in (zip_path.parent / "vecnormalize.pkl", zip_path.parent / zip_path.stem / "vecnormalize.pkl",
                  zip_path.with_name("vec_normalize.pkl")):
        if is_file(stats):
            raise RltuneError(f"{zip_path}: was trained with VecNormalize ({stats} is beside it); rltune agents "
                              "take raw observations, so it cannot be imported: retrain without normalize "
                              "(the env's observations are already normalised per scenario)")
    # v0's layouts or v1's, whichever fits the model's spaces (its env id recorded, so replay plays it there)
    out = import_sb3_zip(zip_path, args.out, trust_pickle=args.trust_pickle,
                         env_layouts={e: layouts(e) for e in (ENV_IDS[0], ENV_IDS[2])},
                         training={"imported_from": zip_path.name}, zero_rule=args.zero_rule)
    print(f"agent: {out} (replay it with: rltune replay {out} --scenario NAME --budget 16x)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from rltune.scenario import load_scenario

    for f in args.files:
        s = load_scenario(f)
        print(f"{f}: ok ({s.name})")
    return 0


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, except where the help already names its default or there is none."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.default is None or "default" in h:
            return h
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``rltune: error: ...`` and exit 2, no usage block."""

    def error(self, message: str):
        print(f"rltune: error: {self.prog.removeprefix('rltune').strip() + ': ' if self.prog != 'rltune' else ''}"
              f"{message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    fmt = _DefaultsHelp
    p = _Parser(prog="rltune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"rltune {__version__}")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="VERB", parser_class=_Parser)
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress on stderr")

    c = sub.add_parser("compress", parents=[quiet], formatter_class=fmt,
                       help="compress a scenario's student: to a target with a tuner, or the fixed recipe",
                       description="Compress a scenario's float student. With --budget a tuner meets the target "
                                   "(one episode for the recipes and ppo-replay, --episodes for searchers); "
                                   "without it, the gradual recipe at --sparsity and --bits. Writes NAME.rlt, "
                                   "NAME.json and NAME.md to --out.")
    c.add_argument("--scenario", default="digits-mlp", help="scenario YAML path or shipped name")
    c.add_argument("--budget", type=_budget, help="target: a ratio (16x), bytes (12KB) or energy (5nJ)")
    c.add_argument("--tuner", default="recipe", choices=TUNER_CHOICES, help="how to meet --budget")
    c.add_argument("--episodes", type=_whole(1, 100_000), help="episodes for a searching tuner (default 16)")
    c.add_argument("--agent", help="agent for the ppo-* tuners (shipped name or folder; default ppo-v0)")
    c.add_argument("--sparsity", type=_sparsity, help="fixed recipe: final sparsity of the cubic ramp (default 0.8)")
    c.add_argument("--bits", type=_bits, help="fixed recipe: final bit-width, 2..8 or 32 for float (default 4)")
    c.add_argument("--seed", type=_whole(0), default=0, help="training seed (and float student)")
    c.add_argument("--onnx", metavar="FILE", help="also export the student as ONNX (int8 weights)")
    c.add_argument("--out", default="runs/compress", help="folder for the artifact and the report")
    c.set_defaults(func=cmd_compress)

    t = sub.add_parser("train", parents=[quiet], formatter_class=fmt, help="train a PPO agent on scenarios (agents/ppo.yml)",
                       description="Train a PPO agent on the scenarios of a hyperparameter entry, in a run folder "
                                   "(config, command, Monitor CSVs, TensorBoard, checkpoints, agent, gate).")
    t.add_argument("--set", default="default", help="entry of the hyperparameter file")
    t.add_argument("--hyperparams", help="hyperparameter file (default: the shipped agents/ppo.yml)")
    t.add_argument("--config", help="a run folder's config.yaml (reproduces that run) or your own; "
                   "relative scenario paths are looked up from here, then beside the config")
    t.add_argument("--run-dir", help="the run folder (default runs/train/SET-TIMESTAMP)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    t.add_argument("--total-timesteps", type=_whole(1), help="override the entry's total_timesteps")
    t.add_argument("--n-envs", type=_whole(1, 256), help="override the entry's n_envs (parallel environments)")
    t.add_argument("--seed", type=_whole(0), help="override the entry's seed")
    t.add_argument("--vec-env", choices=["auto", "dummy", "subproc", "batched"],
                   help="how the --n-envs episodes run: auto (subproc when several), subproc (one process "
                        "each), dummy (one process, one after another), batched (one process, their stages "
                        "trained as one batch: several times faster for small students on one core)")
    t.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: the envs run on this machine as --vec-env says; ray: on Ray actors, each "
                        "stepping its share of the --n-envs episodes as one batch (local Ray by default)")
    t.add_argument("--address", help="with --backend ray: an existing Ray cluster to join (ray://host:10001)")
    t.add_argument("--ray-workers", type=_whole(1, 4096), help="with --backend ray: env actors (default: one per CPU)")
    t.add_argument("--ship", metavar="NAME", help="copy the agent to agents/NAME if it passes the gate")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("replay", parents=[quiet], formatter_class=fmt,
                       help="compress a scenario with a learned policy: one episode, no search",
                       description="A learned policy compresses a scenario's student to a target in one "
                                   "deterministic episode (no search). --recipe plays the zero action instead "
                                   "(needs no agent).")
    r.add_argument("agent", nargs="?", default=None, help="agent: a shipped name (ppo-v0) or a folder; default ppo-v0")
    r.add_argument("--scenario", required=True, help="scenario YAML path or shipped name")
    r.add_argument("--budget", type=_budget, default="10x", help="a ratio (20x), bytes (12KB) or energy (5nJ)")
    r.add_argument("--seed", type=_whole(0), default=0, help="training seed (and float student)")
    r.add_argument("--recipe", action="store_true", help="play the zero action (the recipe) instead")
    r.add_argument("--onnx", metavar="FILE", help="also export the student as ONNX (int8 weights)")
    r.add_argument("--out", default="runs/replay", help="folder for the artifact and the report")
    r.set_defaults(func=cmd_replay)

    e = sub.add_parser("evaluate", parents=[quiet], formatter_class=fmt,
                       help="every tuner on every scenario, target and seed, on equal stage budgets",
                       description="Run tuners × scenarios × targets × seeds on equal budgets of stages of real "
                                   "training; resumable (results.jsonl); writes summary.json, benchmark.md, "
                                   "table.md and plots.")
    e.add_argument("--scenarios", nargs="+", default=["wine-mlp", "breast-cancer-mlp"], help="shipped names or YAML paths")
    e.add_argument("--targets", nargs="+", type=_budget, default=["8x", "16x"], help="targets for every scenario")
    e.add_argument("--scenario-targets", nargs="+", metavar="NAME=T1,T2", help="targets per scenario")
    e.add_argument("--tuners", nargs="+", choices=TUNER_CHOICES, default=EVALUATE_DEFAULT_TUNERS, metavar="TUNER",
                   help=f"tuners, of: {', '.join(TUNER_CHOICES)}")
    e.add_argument("--budget", nargs="+", type=_whole(1), default=[256], help="stage budgets (several: score-vs-budget curves)")
    e.add_argument("--seeds", type=_whole(1, 10_000), default=5, help="seeds per cell (0..N-1)")
    e.add_argument("--agent", default="ppo-v0", help="agent for the ppo-* tuners (shipped name or folder)")
    e.add_argument("--workers", type=_whole(1, 1024), default=2, help="parallel processes")
    e.add_argument("--backend", choices=["process", "ray"], default="process")
    e.add_argument("--address", help="an existing Ray cluster to join (default: start Ray locally)")
    e.add_argument("--trial-workers", type=_whole(1, 1024), default=1,
                   help="split each Optuna cell's trials over this many workers sharing one study")
    e.add_argument("--storage", help="Optuna storage URL shared by the workers (default: SQLite in --out)")
    e.add_argument("--batch", type=_whole(1, 1024), default=1,
                   help="random, optuna-tpe, ppo-best-of-n and ppo-warm-tpe run this many episodes at once, their stages "
                        "trained as one batch")
    e.add_argument("--study-prefix", type=_study_prefix, default="rltune",
                   help="prefix of the Optuna study names; a study this evaluation did not create is never "
                        "deleted or joined")
    e.add_argument("--out", default="runs/evaluate", help="results folder (rerunning resumes)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", parents=[quiet], formatter_class=fmt, help="export a packed artifact to ONNX",
                       description="Export a packed artifact (.rlt) to ONNX with int8 weights. A built-in "
                                   "architecture needs nothing else; a user's own module needs --skeleton, your "
                                   "own code that returns an un-trained instance (it is imported and run).")
    x.add_argument("artifact", help="the .rlt file")
    x.add_argument("--onnx", required=True, metavar="FILE", help="the ONNX file to write")
    x.add_argument("--skeleton", metavar="MODULE:CALLABLE", help="your code returning the student module (custom models)")
    x.add_argument("--input-shape", metavar="D1,D2,...", help="one input's shape, e.g. 1,28,28 (when it cannot be read off the model)")
    x.set_defaults(func=cmd_export)

    i = sub.add_parser("import-sb3", parents=[quiet], formatter_class=fmt,
                       help="convert a stable-baselines3 PPO .zip (e.g. from rl-zoo) into an rltune agent folder",
                       description="Convert an SB3 PPO .zip trained on rltune's environment into an agent folder "
                                   "(safetensors + JSON). Reading the .zip runs pickle from it, which can execute "
                                   "code: --trust-pickle is required, for files you trust. The observation and "
                                   "action layouts are the environment's (v0's or v1's, whichever the model's "
                                   "spaces are; one of another environment is refused); a model trained with "
                                   "VecNormalize is refused.")
    i.add_argument("zip", help="the SB3 .zip")
    i.add_argument("out", help="the agent folder to write")
    i.add_argument("--trust-pickle", action="store_true", help="allow running the pickle inside the .zip")
    i.add_argument("--zero-rule", choices=("plus1", "sensitivity"), default=None,
                   help="a v1 model: what the zero action played in the env it was trained in (its "
                        "DistillCompressEnvV1(zero_rule=...)), recorded in agent.json (default: plus1); "
                        "refused for a v0 model")
    i.set_defaults(func=cmd_import_sb3)

    z = sub.add_parser("sensitivity", parents=[quiet], formatter_class=fmt,
                       help="per-layer sensitivity of a scenario's float student (bits, sparsity, Hessian trace)",
                       description="For each Linear/Conv layer: the val accuracy change when only that layer is "
                                   "quantized to each of --bits or pruned to each of --sparsities, and the "
                                   "Hutchinson estimate of its Hessian trace; prints the table, --json writes it.")
    z.add_argument("--scenario", default="digits-mlp", help="scenario YAML path or shipped name")
    z.add_argument("--bits", type=_bits, nargs="+", default=[2, 3, 4, 5, 6, 8], help="bit-widths to try (2..8)")
    z.add_argument("--sparsities", type=_sparsity, nargs="+", default=[0.5, 0.75, 0.9, 0.95],
                   help="sparsities to try, fractions in (0, 1)")
    z.add_argument("--probes", type=_whole(1, 1000), default=16, help="Hutchinson probe vectors")
    z.add_argument("--seed", type=_whole(0), default=0, help="float student seed")
    z.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    z.set_defaults(func=cmd_sensitivity)

    v = sub.add_parser("validate", parents=[quiet], help="check scenario files", description="Check scenario YAML files.")
    v.add_argument("files", nargs="+", help="scenario YAML files")
    v.set_defaults(func=cmd_validate)
    return p


class _Terminated(KeyboardInterrupt):
    """SIGTERM, taken the way Ctrl-C is: finished work is kept, one line, status 143."""


def _on_sigterm(pid: int):
    import os
    import signal

    def handler(signum, frame):
        if os.getpid() != pid:  # a forked worker inherited this handler: die as SIGTERM would
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        # remembered as well as raised: code between here and main (Ray's ray.wait / ray.get in C)
        # may turn the exception into a plain KeyboardInterrupt
        handler.received = True
        raise _Terminated()

    handler.received = False
    return handler


def _torch_cache_in_rltunes() -> None:
    """Point torch's compiler cache into rltune's cache folder unless the user set one
    (``TORCHINDUCTOR_CACHE_DIR``). The first torch optimizer a process builds imports
    ``torch._dynamo`` (``Optimizer.add_param_group`` is wrapped by ``torch._disable_dynamo``), and
    that import makes the folder ``$TMPDIR/torchinductor_$USER``: every command that trains left it
    in the temp folder. rltune compiles nothing, so the folder stays empty; a cache folder that cannot
    be made leaves torch's default. Subprocess and local Ray workers inherit the setting."""
    import os

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return
    try:
        path = Path(os.environ.get("RLTUNE_CACHE", "") or Path.home() / ".cache" / "rltune") / "torchinductor"
        path.mkdir(parents=True, exist_ok=True)
        usable = path.is_dir() and os.access(path, os.W_OK | os.X_OK)
    except (OSError, RuntimeError, ValueError):  # no home folder, not writable, a file in the way
        usable = False
    if usable:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path.absolute())


def main(argv: list[str] | None = None) -> int:
    import os
    import signal
    import threading

    args = build_parser().parse_args(argv)
    _progress(getattr(args, "quiet", False))
    _torch_cache_in_rltunes()
    old = handler = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        handler = _on_sigterm(os.getpid())
        old = signal.signal(signal.SIGTERM, handler)
    try:
        return args.func(args)
    except RltuneError as e:
        print(f"rltune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        term = isinstance(e, _Terminated) or bool(getattr(handler, "received", False))
        print(f"rltune: {'terminated' if term else 'interrupted'} (finished work is kept)", file=sys.stderr)
        return 143 if term else 130
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
