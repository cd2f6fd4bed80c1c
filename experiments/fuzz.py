"""Fuzz run (issue 9): mutated scenario files, mutated agent folders and random command lines.

Every input must end in a parsed object (or a finished command) or in ONE line ``rltune: error:``
with exit status 2; never a traceback, a multi-line error, a hang, or a file written outside the
output folder. Counts every outcome and writes experiments/results/fuzz.json.

    python experiments/fuzz.py                                   # 3000 + 1000 + 300 inputs, seed 0
    python experiments/fuzz.py --scenarios 200 --agents 100 --commands 30   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import yaml

from rltune.agentfile import check_layouts, load_policy
from rltune.env import ACTION_LAYOUT, OBS_LAYOUT
from rltune.errors import RltuneError
from rltune.scenario import load_scenario
from rltune.shipped import recorded_command

ROOT = Path(__file__).resolve().parents[1]
HANG_S = 10.0


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def value(rng: random.Random):
    """A hostile value: wrong types, NaN/inf, huge and negative sizes, path-like strings, nesting."""
    pool = [
        None, True, False, 0, -1, 1, 2 ** 31, 2 ** 64, 10 ** 12, 10 ** 100, -10 ** 9, 0.5, 1e308, -1e-308,
        float("nan"), float("inf"), float("-inf"), "", "x", "/etc/passwd", "../../escaped", "/tmp/abs/name",
        "a\0b", "x" * 10000, "~/", "${HOME}", "data.npz", "d.csv", "16x", "mlp", "cnn2d", "synthetic",
        [], [1], [10 ** 9], [float("nan")], [-1, 2], [1, 2, 3], ["a"], [[1]], {}, {"n_features": 10 ** 7},
        {"n_classes": 100, "n_informative": 2}, {"weights": [0.5] * 1000},
    ]
    v = rng.choice(pool)
    if rng.random() < 0.2:
        v = [copy.deepcopy(v)] * rng.randint(1, 5)
    return v


def mutate_scenario(rng: random.Random, base: dict) -> bytes:
    raw = copy.deepcopy(base)
    for _ in range(rng.randint(1, 4)):
        sec = rng.choice([None, *[k for k, v in raw.items() if isinstance(v, dict)], "bogus"])
        if sec is None:
            raw["name"] = value(rng)
        elif sec == "bogus":
            raw[rng.choice(["bogus", "extra"])] = value(rng)
        else:
            keys = list(raw[sec]) + ["n_train", "params", "path", "hidden", "channels", "epochs", "seed", "unknown"]
            raw[sec][rng.choice(keys)] = value(rng)
    try:
        text = yaml.safe_dump(raw, allow_unicode=True)
    except yaml.YAMLError:
        text = yaml.safe_dump(base)
    kind = rng.random()
    if kind < 0.08:  # a billion-laughs bomb
        text = "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n" + text
    elif kind < 0.16:
        text = text[: rng.randint(0, len(text))]
    data = text.encode("utf-8", "surrogatepass")
    if kind > 0.95:  # flipped bytes
        b = bytearray(data)
        for _ in range(rng.randint(1, 5)):
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
        data = bytes(b)
    return data


def mutate_agent(rng: random.Random, src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    meta = json.loads((src / "agent.json").read_text())
    weights = bytearray((src / "policy.safetensors").read_bytes())
    for _ in range(rng.randint(0, 3)):
        key = rng.choice(sorted(meta) + ["policy_kwargs.net_arch", "observation_space.shape", "action_space.low",
                                         "hyperparameters.n_steps", "observation_layout", "action_layout"])
        obj, parts = meta, key.split(".")
        for p in parts[:-1]:
            obj = obj.get(p) if isinstance(obj.get(p), dict) else {}
        r = rng.random()
        if r < 0.15:
            obj.pop(parts[-1], None)
        elif r < 0.3 and isinstance(obj.get(parts[-1]), list):
            obj[parts[-1]] = list(reversed(obj[parts[-1]]))
        elif r < 0.4 and isinstance(obj.get(parts[-1]), list):
            obj[parts[-1]] = obj[parts[-1]][:-1] + obj[parts[-1]][:1]  # a duplicate near the end
        else:
            obj[parts[-1]] = value(rng)
    if rng.random() < 0.3 and weights:
        for _ in range(rng.randint(1, 8)):
            weights[rng.randrange(len(weights))] = rng.randrange(256)
    if rng.random() < 0.15:
        weights = weights[: rng.randrange(len(weights) + 1)]
    if rng.random() < 0.5:  # a crafted file whose checksum matches: the parser itself must hold
        meta["weights_sha256"] = hashlib.sha256(bytes(weights)).hexdigest()
    try:
        text = json.dumps(meta)
    except (TypeError, ValueError):
        text = (src / "agent.json").read_text()
    if rng.random() < 0.1:
        text = text[: rng.randrange(len(text) + 1)]
    (dst / "agent.json").write_text(text)
    (dst / "policy.safetensors").write_bytes(bytes(weights))


def classify(fn) -> str:
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_S)
    try:
        fn()
        return "accepted"
    except RltuneError as e:
        return "refused" if "\n" not in str(e) else "multi_line"
    except Hang:
        return "hang"
    except Exception:
        return "traceback:" + traceback.format_exc().strip().splitlines()[-1][:200]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def command(rng: random.Random, scen: Path) -> list[str]:
    verbs = {
        "compress": ["--scenario", "--budget", "--tuner", "--episodes", "--sparsity", "--bits", "--seed", "--onnx", "--out"],
        "replay": ["--scenario", "--budget", "--seed", "--onnx", "--out"],
        "evaluate": ["--scenarios", "--targets", "--tuners", "--budget", "--seeds", "--workers", "--trial-workers",
                     "--out", "--study-prefix"],
        "train": ["--set", "--total-timesteps", "--n-envs", "--seed", "--run-dir", "--config"],
        "export": ["--onnx", "--skeleton", "--input-shape"],
        "validate": [],
        "import-sb3": [],
    }
    verb = rng.choice(sorted(verbs))
    junk = ["0", "-1", "1", "1.5", "nan", "inf", "0x", "1e400x", "-3x", "16x", "12KB", "5nJ", "999TB", "bogus",
            "/", "/etc/passwd", "../..", "x" * 300, "", "ppo-v0", "recipe", "optuna-tpe", str(scen), "2", "32"]
    argv = [verb]
    if verb in ("export", "import-sb3", "validate"):
        argv.append(rng.choice(junk))
    if verb == "import-sb3":
        argv.append(rng.choice(junk))
    if verb == "replay" and rng.random() < 0.5:
        argv.append("--recipe")
    for _ in range(rng.randint(0, 4)):
        if verbs[verb]:
            argv += [rng.choice(verbs[verb]), rng.choice(junk)]
    return argv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", type=int, default=3000, help="mutated scenario files")
    p.add_argument("--agents", type=int, default=1000, help="mutated agent folders")
    p.add_argument("--commands", type=int, default=300, help="random command lines (subprocesses)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "fuzz.json"))
    a = p.parse_args()
    rng = random.Random(a.seed)
    counts: dict[str, dict[str, int]] = {}
    examples: dict[str, list] = {}

    def count(kind: str, outcome: str, what) -> None:
        key = outcome if not outcome.startswith("traceback") else "traceback"
        counts.setdefault(kind, {}).setdefault(key, 0)
        counts[kind][key] += 1
        if key in ("traceback", "hang", "multi_line") and len(examples.setdefault(kind, [])) < 10:
            examples[kind].append({"outcome": outcome, "input": repr(what)[:300]})

    base = yaml.safe_load((ROOT / "envs" / "synthetic-6class.yaml").read_text())
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in range(a.scenarios):
            data = mutate_scenario(rng, base)
            f = tmp / "s.yaml"
            f.write_bytes(data)
            count("scenario_files", classify(lambda: load_scenario(f)), data[:200])
        src = ROOT / "agents" / "ppo-v0"
        for i in range(a.agents):
            d = tmp / f"agent{i}"
            mutate_agent(rng, src, d)
            count("agent_folders", classify(lambda: check_layouts(load_policy(d), OBS_LAYOUT, ACTION_LAYOUT)), d.name)
            shutil.rmtree(d, ignore_errors=True)
        scen = tmp / "tiny.yaml"
        # the fixed tiny scenario of valid command lines
        scen.write_text(yaml.safe_dump({"name": "tiny", "dataset": {"source": "iris", "transfer": 100},
                                        "teacher": {"hidden": [16], "epochs": 5},
                                        "student": {"hidden": [4], "pretrain_epochs": 2},
                                        "training": {"stages": 2, "epochs_per_stage": 1}}))
        work = tmp / "work"
        work.mkdir()
        env = {**os.environ, "RLTUNE_CACHE": str(tmp / "cache")}
        for i in range(a.commands):
            argv = command(rng, scen)
            before = set(Path("/tmp").iterdir()) if Path("/tmp").exists() else set()
            try:
                r = subprocess.run([sys.executable, "-m", "rltune", *argv], cwd=work, env=env,
                                   capture_output=True, text=True, timeout=30)
                # progress lines ("rltune: <what it does>") are not errors
                lines = r.stderr.replace("\r", "\n").strip().splitlines()
                err = [e for e in lines if not (e.startswith("rltune: ") and not e.startswith("rltune: error:"))
                       and not e.startswith("cells:") and e.strip()]
                if r.returncode == 0:
                    outcome = "accepted"
                elif r.returncode == 2 and len(err) == 1 and err[0].startswith("rltune: error:"):
                    outcome = "refused"
                elif r.returncode == 2 and len(err) > 1 and "Traceback" not in r.stderr:
                    outcome = "multi_line"
                else:
                    outcome = f"traceback: exit {r.returncode}: {err[-1][:200] if err else ''}"
            except subprocess.TimeoutExpired as e:
                # a valid command may be a long job (a default `train` runs for half an hour): it
                # counts as working if it reported progress, as a hang if it sat silent
                said = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
                outcome = "long_job_with_progress" if "rltune: " in said or "%" in said else "hang"
            escaped = [str(x) for x in (set(Path("/tmp").iterdir()) - before) if "escaped" in x.name or x.name == "abs"]
            if escaped:
                outcome = "traceback: wrote outside its folder: " + ", ".join(escaped)
            count("command_lines", outcome, argv)
    total = {k: sum(v.values()) for k, v in counts.items()}
    out = {"command": recorded_command(), "seed": a.seed,
           "hang_seconds": HANG_S, "inputs": total, "outcomes": counts, "bad_examples": examples,
           "seconds": time.time() - t0}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({"inputs": total, "outcomes": counts}, indent=1))
    for kind, ex in examples.items():
        for e in ex[:5]:
            print(kind, e)


if __name__ == "__main__":
    main()
