"""The evaluation harness: every tuner × scenario × target × seed cell on equal stage budgets.

Cells run in parallel processes; each finished cell is appended to ``results.jsonl`` at once (one
JSON line, flushed and fsynced), so an interrupted evaluation resumes where it stopped and loses
no finished cell. From the lines it writes ``summary.json`` (one record per scenario × target ×
tuner × budget), a generated ``benchmark.md``, a Pareto plot per scenario (test accuracy against
packed bytes) and score-versus-budget curves.

Final numbers are on the test split; every choice a tuner makes is on val.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import uuid
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from rltune.errors import RltuneError, make_folder, write_atomic

_ENVS: dict[tuple, Any] = {}
ONE_EPISODE = ("recipe", "recipe-plus1", "sensitivity", "sensitivity-pick", "owl", "fixed-8bit", "adaptive-tau", "ppo-replay")


@dataclass(frozen=True)
class Cell:
    scenario: str
    target: str
    tuner: str
    seed: int
    budget_stages: int
    part: int = 0  # an Optuna cell split over `parts` workers sharing one study
    parts: int = 1

    @property
    def key(self) -> str:
        key = f"{self.scenario}|{self.target}|{self.tuner}|{self.seed}|{self.budget_stages}"
        return key if self.parts == 1 else f"{key}|part{self.part}of{self.parts}"

    @property
    def whole(self) -> "Cell":
        return Cell(self.scenario, self.target, self.tuner, self.seed, self.budget_stages)


def split_episodes(episodes: int, parts: int, part: int) -> int:
    """Episodes of part ``part`` when ``episodes`` are split as evenly as possible over ``parts``."""
    return episodes // parts + (1 if part < episodes % parts else 0)


def part_sampler_seed(seed: int, part: int) -> int:
    """The Optuna sampler seed of part ``part`` of a cell of seed ``seed`` split over workers (each
    part draws its own trials; ``sampler_seed_offset`` is added to it)."""
    return seed * 1000 + part + 1


def run_cell(cell: Cell, agent: str | None = None, storage: str | None = None,
             study: dict[str, Any] | None = None, batch: int = 1) -> dict[str, Any]:
    """Run one cell in this process (environments are cached per process)."""
    import torch

    from rltune.shipped import resolve_scenario
    from rltune.env import DistillCompressEnv
    from rltune.tuners import run_tuner

    torch.set_num_threads(1)
    key = (cell.scenario,)
    if key not in _ENVS:
        _ENVS[key] = DistillCompressEnv(scenarios=[str(resolve_scenario(cell.scenario))], targets=[cell.target])
    env = _ENVS[key]
    if cell.parts > 1:  # one part of a study shared through the storage, its own sampler seed
        S = env.scenarios[0].training["stages"]
        episodes = cell.budget_stages // S
        r = run_tuner(cell.tuner, env, 0, cell.target, cell.seed, S * split_episodes(episodes, cell.parts, cell.part),
                      storage=storage, sampler_seed=part_sampler_seed(cell.seed, cell.part), study_episodes=episodes,
                      study=study, batch=batch)
    else:
        r = run_tuner(cell.tuner, env, 0, cell.target, cell.seed, cell.budget_stages, agent=agent, storage=storage,
                      study=study, batch=batch)
    out = r.to_dict()
    out["scenario"] = cell.scenario
    out["key"] = cell.key
    if cell.parts > 1:
        out.update(part=cell.part, parts=cell.parts)
    trained_on: list[str] = []
    if agent:
        from rltune.agentfile import load_policy

        trained_on = [Path(s).stem for s in load_policy(agent).meta.get("training", {}).get("scenarios", [])]
    out["in_agent_training_set"] = Path(cell.scenario).stem in trained_on
    return out


def merge_improvements(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The record of new bests of a cell split over parts that ran side by side, in one episode
    order: part ``p``'s episode ``i`` counted as the study's episode ``i * parts + p`` (the parts
    take their trials in turn; with the split of :func:`split_episodes` these indices are exactly
    0 .. episodes − 1). Each part's own record holds every episode that could be a new best of the
    whole, so the running maximum over them (the earlier on ties) is the whole's record."""
    events = sorted(({**e, "episode": e["episode"] * r["parts"] + r["part"], "part": r["part"]}
                     for r in rows for e in r.get("improvements", [])), key=lambda e: e["episode"])
    merged: list[dict[str, Any]] = []
    for e in events:
        if not merged or e["val_acc"] > merged[-1]["val_acc"]:
            merged.append(e)
    return merged


def merge_parts(cell: Cell, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The cell's result from its parts: the best student by val accuracy (the harness's envs are in
    budget mode, where the tuners also pick by val accuracy; on a tie the one found first in the
    order of :func:`merge_improvements`); stages and episodes summed; the anytime curve over the
    merged record."""
    from rltune.tuners import anytime_curve

    episodes = sum(r["episodes"] for r in rows)
    merged = merge_improvements(rows) if all(r.get("improvements") for r in rows) else []
    if merged:
        best = next(r for r in rows if r["part"] == merged[-1]["part"])
    else:  # rows written before the record existed
        best = max(rows, key=lambda r: r["val_acc"])
    out = {**{k: v for k, v in best.items() if k not in ("part", "parts")},
           "key": cell.key, "budget_stages": cell.budget_stages,
           "stages_used": sum(r["stages_used"] for r in rows), "episodes": episodes,
           "episode_val_accs": [a for r in sorted(rows, key=lambda r: r["part"]) for a in r["episode_val_accs"]],
           "seconds": max(r["seconds"] for r in rows), "trial_workers": len(rows),
           "config": {**best["config"], "best_part": best["part"]}}
    if merged:
        out["improvements"] = merged
        out["anytime"] = anytime_curve(merged, episodes)
    return out


def read_results(path: Path) -> list[dict[str, Any]]:
    """The finished cells; a line cut short by an interruption is ignored (it will be rerun). A
    file that cannot be read, or a line that is JSON but not one of this harness's rows (a list,
    a row without its key, scenario, target, tuner or test figures), is a one-line RltuneError:
    the summary would otherwise fail on it with a traceback after every cell had run."""
    path = Path(path)
    rows = []
    try:
        if not path.exists():
            return rows
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RltuneError(f"{path}: cannot read the results ({getattr(e, 'strerror', None) or type(e).__name__}); "
                          "move it away") from None
    for n, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not _is_result_row(row):
            raise RltuneError(f"{path}:{n}: not one of this harness's result rows; move the file away")
        rows.append(row)
    return rows


def _is_result_row(row: Any) -> bool:
    return (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("key", "scenario", "target", "tuner"))
            and isinstance(row.get("test"), dict))


def strict_results(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each record of a ``results.jsonl`` with its line number, for scripts that read results
    strictly (:func:`read_results` skips a torn line on purpose: the harness reruns that cell).
    Blank lines are skipped; a line that is not a JSON object is a ValueError naming the file and
    line. Opening errors (OSError, UnicodeDecodeError) are the caller's to tell."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{path}:{n}: not a result row ({type(e).__name__}: {e})") from None
            if not isinstance(r, dict):
                raise ValueError(f"{path}:{n}: not a result row (not an object)")
            yield n, r


def anytime_cells(folder: str | Path) -> dict[str, list[str]]:
    """``{scenario: [targets]}`` of an ``experiments/anytime.py`` folder (its top-level
    ``summary.json``, ``scenario_targets``): the cells a script plays again. Not such a record: an
    OSError, UnicodeDecodeError, ValueError, KeyError or TypeError, for the caller to tell in one line."""
    d = json.loads((Path(folder) / "summary.json").read_text(encoding="utf-8"))
    st = d["scenario_targets"]
    if not isinstance(st, dict) or not all(isinstance(v, list) and all(isinstance(t, str) for t in v)
                                           for v in st.values()):
        raise ValueError("scenario_targets is not {scenario: [targets]}")
    return st


def _append(path: Path, row: dict[str, Any]) -> None:
    """One row appended and synced; a symlink planted at ``path`` is not followed (the write would
    land outside the output folder)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        raise RltuneError(f"cannot append to {path}: {e.strerror or e}"
                          + (" (it is a symbolic link)" if os.path.islink(path) else "")) from None
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


MAX_SAMPLER_SEED = 2**32 - 1  # numpy's and so Optuna's samplers take seeds in [0, 2**32)


def read_meta(out_dir: str | Path) -> dict[str, Any]:
    """An evaluation folder's ``evaluation.json`` (``{"run_id", "runs": [...]}``), ``{}`` when it
    has none; a file that is not such a record is a one-line RltuneError."""
    path = Path(out_dir) / "evaluation.json"
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RltuneError(f"{path}: not this harness's record ({type(e).__name__}); move it away") from None
    runs = meta.get("runs", []) if isinstance(meta, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs) \
            or not isinstance(meta.get("run_id", ""), str):
        raise RltuneError(f"{path}: not this harness's record (expected {{\"run_id\": ..., \"runs\": [...]}}); "
                          "move it away")
    return meta


def _redact(url: str) -> str:
    """A storage URL without its password (it goes into an error line)."""
    import re

    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)


STORAGE_CONNECT_TIMEOUT = 10  # seconds a network database gets to answer the first connection


def open_storage(url: str):
    """Optuna's RDB storage at ``url`` (creating its schema), or one RltuneError line: an unknown
    scheme, a missing database driver, a file that is not SQLite, a server that does not answer
    (they escaped as SQLAlchemy / ImportError tracebacks)."""
    import optuna

    if not isinstance(url, str) or "://" not in url:
        raise RltuneError(f"--storage {_redact(str(url))[:200]!r}: not a database URL (e.g. sqlite:///study.db, "
                          "postgresql://user@host/db)")
    # a server that drops packets would hold the first connection for the TCP timeout (minutes):
    # the network databases' drivers (psycopg2, pymysql, mysqlclient) take a connect timeout
    kw = ({"engine_kwargs": {"connect_args": {"connect_timeout": STORAGE_CONNECT_TIMEOUT}}}
          if url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres", "mysql", "mariadb") else {})
    try:
        return optuna.storages.RDBStorage(url, **kw)
    except RltuneError:
        raise
    except Exception as e:  # SQLAlchemy's errors, ImportError of a driver, optuna's own
        why = " ".join(str(e).split()).split(" (Background on this error")[0].split("[SQL:")[0].strip()
        raise RltuneError(f"--storage {_redact(url)[:200]}: cannot open the Optuna storage "
                          f"({type(e).__name__}: {why[:200] or 'no reason given'})") from None


def check_sampler_seed_offset(out_dir: str | Path, offset: int, seeds: int, trial_workers: int = 1) -> None:
    """Refuse, before anything is written, a ``sampler_seed_offset`` that is not a whole number
    >= 0, that maps one of the run's sampler seeds (a cell's seed, or :func:`part_sampler_seed`
    for the parts of a split cell) onto another of them (the fresh draws would repeat some of the
    unshifted run's), or past the largest seed a sampler takes; and one other than the folder's:
    a folder keeps one offset (a folder with results and no record of one ran with 0)."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise RltuneError(f"sampler_seed_offset must be a whole number >= 0, got {offset!r}")
    if offset:
        bases = set(range(seeds))
        if trial_workers > 1:
            bases |= {part_sampler_seed(s, p) for s in range(seeds) for p in range(trial_workers)}
        if max(bases) + offset > MAX_SAMPLER_SEED:
            raise RltuneError(f"sampler seed offset {offset}: the largest sampler seed would pass {MAX_SAMPLER_SEED}")
        clash = sorted({b + offset for b in bases} & bases)
        if clash:
            raise RltuneError(f"sampler seed offset {offset}: it maps this run's sampler seeds onto others of them "
                              f"(e.g. {clash[0]}), so its draws would repeat the unshifted run's; pick one above "
                              f"{max(bases)}")
    out = Path(out_dir)
    if not out.is_dir():
        return
    offsets = {r.get("sampler_seed_offset", 0) for r in read_meta(out).get("runs", [])}
    if not offsets and (out / "results.jsonl").is_file() and (out / "results.jsonl").stat().st_size:
        offsets = {0}
    for o in offsets:
        if isinstance(o, bool) or not isinstance(o, int):
            raise RltuneError(f"{out / 'evaluation.json'}: a sampler_seed_offset of {o!r} is not this harness's")
    if offsets and offsets != {offset}:
        raise RltuneError(f"{out}: its searches ran with sampler seed offset {sorted(offsets)[0]}, not "
                          f"{offset}; use another folder")


def check_scenarios(scenarios: Iterable[Any]) -> list[str]:
    """The harness's scenarios as strings (names or YAML files; a path object becomes its string),
    each one found, before any folder is made: one RltuneError line otherwise. Its cells run in
    worker processes and are recorded as JSON, so an in-memory ``rltune.Problem`` cannot be one
    (it escaped as a TypeError from the JSON encoder)."""
    from rltune.shipped import resolve_scenario

    if isinstance(scenarios, (str, os.PathLike)):
        scenarios = [scenarios]
    out = []
    for s in scenarios:
        if isinstance(s, os.PathLike):
            s = os.fspath(s)
        if not isinstance(s, str):
            raise RltuneError(f"evaluate: a scenario is a shipped scenario's name or a scenario YAML file, got a "
                              f"{type(s).__name__}; for an rltune.Problem run rltune.compress(problem, tuner=...) per "
                              "tuner, or describe its data in a scenario file (dataset: {source: file, path: data.npz})")
        resolve_scenario(s)
        out.append(s)
    return out


def check_budgets(scenarios: list[str], budgets: Iterable[int]) -> None:
    """One RltuneError line, before any folder is made, for a stage budget smaller than one episode
    of a scenario (its ``training.stages``): every tuner of such a cell stopped at its first episode
    with 'stage budget exhausted', after the folder and its Optuna database were made."""
    from rltune.scenario import load_scenario
    from rltune.shipped import resolve_scenario

    budgets = list(budgets)
    if not budgets:
        raise RltuneError("evaluate: give at least one stage budget")
    for s in scenarios:
        stages = load_scenario(resolve_scenario(s)).training["stages"]
        if min(budgets) < stages:
            raise RltuneError(f"budget {min(budgets)} is less than one episode of {s} ({stages} stages of training): "
                              f"give --budget {stages} or more (budgets are stages, not episodes)")


def evaluate(
    scenarios: Iterable[str],
    targets: dict[str, list[str]] | list[str],
    tuners: Iterable[str],
    budgets: Iterable[int],
    seeds: int,
    out_dir: str | Path,
    agent: str | None = None,
    workers: int = 1,
    backend: str = "process",
    address: str | None = None,
    progress: bool = True,
    trial_workers: int = 1,
    storage: str | None = None,
    study_prefix: str = "rltune",
    batch: int = 1,
    sampler_seed_offset: int = 0,
) -> Path:
    """Run every missing cell, then write the summary, tables and plots. Returns ``out_dir``.

    ``trial_workers`` > 1 splits each Optuna cell's episodes over that many tasks that share one
    study through ``storage`` (default: SQLite in ``out_dir``; give a server URL such as
    ``postgresql://...`` when the tasks run on several machines); the cell's result is the best of
    its parts by val, and its stage count their sum.

    ``sampler_seed_offset`` is added to every Optuna sampler's seed (the cells' training seeds,
    data splits and float students stay the same): the same searches drawn afresh, e.g. to measure
    how often a tuner beats itself. A folder keeps one offset."""
    if trial_workers < 1:
        raise RltuneError(f"trial_workers must be at least 1, got {trial_workers}")
    scenarios = check_scenarios(scenarios)
    if isinstance(targets, dict):
        targets = {os.fspath(k) if isinstance(k, os.PathLike) else k: v for k, v in targets.items()}
    if agent:  # a shipped agent's name, as rltune.compress takes it, or a folder
        from rltune.shipped import resolve_agent

        agent = str(resolve_agent(agent))
    check_sampler_seed_offset(out_dir, sampler_seed_offset, seeds, trial_workers)
    check_budgets(scenarios, budgets)
    out = Path(out_dir)
    make_folder(out)
    results = out / "results.jsonl"
    tuners = list(tuners)
    for t in tuners:
        if t.startswith("ppo") and not agent:
            raise RltuneError(f"the {t} tuner needs --agent")
    per_target = targets if isinstance(targets, dict) else {s: list(targets) for s in scenarios}
    cells = [Cell(s, t, tu, seed, b) for s in scenarios for t in per_target[s] for tu in tuners
             for b in budgets for seed in range(seeds)]
    # a one-episode tuner's result does not depend on the budget: run it once, at the smallest
    smallest = min(budgets)
    cells = [c for c in cells if c.tuner not in ONE_EPISODE or c.budget_stages == smallest]
    if trial_workers > 1:
        from rltune.shipped import resolve_scenario
        from rltune.scenario import load_scenario

        loaded = {s: load_scenario(resolve_scenario(s)) for s in scenarios}
        stages = {s: sc.training["stages"] for s, sc in loaded.items()}
        names = {s: sc.name for s, sc in loaded.items()}
        split = []
        for c in cells:
            parts = min(trial_workers, c.budget_stages // stages[c.scenario])
            if c.tuner.startswith("optuna") and parts > 1:
                split += [Cell(c.scenario, c.target, c.tuner, c.seed, c.budget_stages, p, parts) for p in range(parts)]
            else:
                split.append(c)
        cells = split
    finished_rows = read_results(results)
    if results.exists():  # drop a line an interruption cut short, so appends start on a clean line
        clean = "".join(json.dumps(r) + "\n" for r in finished_rows)
        if results.read_text() != clean:
            write_atomic(results, clean.encode(), "results")
    done = {r["key"] for r in finished_rows}
    todo = [c for c in cells if c.key not in done and c.whole.key not in done]
    storage = storage or f"sqlite:///{(out / 'optuna.db').resolve()}"
    from rltune.tuners import STUDY_TUNERS

    if todo and any(t in STUDY_TUNERS for t in tuners):
        # create the schema here, once: workers creating a new database at the same moment race
        # on its version table (sqlite3.IntegrityError on alembic_version)
        open_storage(storage)
    meta_path = out / "evaluation.json"
    meta = read_meta(out)
    runs = meta.get("runs", [])
    # this evaluation folder's id: the Optuna studies it creates carry it, and it never deletes or
    # joins a study that does not
    run_id = meta.get("run_id") or uuid.uuid4().hex
    study = {"study_prefix": study_prefix, "run_id": run_id}
    if sampler_seed_offset:
        study["sampler_seed_offset"] = sampler_seed_offset
    from rltune.shipped import recorded_command

    this = {"command": recorded_command(), "scenarios": scenarios, "targets": per_target, "tuners": tuners,
            "budgets": list(budgets), "seeds": seeds, "agent": agent}
    if trial_workers > 1:
        this["trial_workers"] = trial_workers
    if sampler_seed_offset:
        this["sampler_seed_offset"] = sampler_seed_offset
    if this not in runs:  # several invocations may fill one folder; each is recorded
        runs.append(this)
    write_atomic(meta_path, json.dumps({"run_id": run_id, "runs": runs}, indent=1).encode(), "evaluation record")
    if trial_workers > 1:  # a split cell's study is made here, before its parts race to create it
        from rltune.tuners import own_study, study_name

        made = set()
        for c in todo:
            if c.parts > 1 and c.whole.key not in made and c.whole.key not in done:
                made.add(c.whole.key)
                name = study_name(study_prefix, c.tuner, names[c.scenario], c.target, c.seed,
                                  c.budget_stages // stages[c.scenario])
                # parts finished before an interruption keep their trials in the study
                resumed = any(r["key"].startswith(c.whole.key + "|part") for r in finished_rows)
                own_study(storage, name, run_id, fresh=not resumed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="cells", file=sys.stderr)
    best: dict[str, tuple[float, str]] = {}
    parts_of: dict[str, list[Cell]] = {}
    whole_of: dict[str, Cell] = {}
    for c in cells:
        if c.parts > 1:
            parts_of.setdefault(c.whole.key, []).append(c)
            whole_of[c.key] = c.whole
    part_rows: dict[str, dict[str, Any]] = {r["key"]: r for r in finished_rows if "part" in r}

    def merge_if_complete(whole: Cell) -> None:
        rows = [part_rows.get(c.key) for c in parts_of[whole.key]]
        if whole.key not in done and all(rows):
            done.add(whole.key)
            _append(results, merge_parts(whole, rows))

    for cs in parts_of.values():  # parts finished before an interruption
        merge_if_complete(cs[0].whole)

    def finished(row: dict[str, Any]) -> None:
        _append(results, row)
        if "part" in row:
            part_rows[row["key"]] = row
            merge_if_complete(whole_of[row["key"]])
        k = f"{row['scenario']}@{row['target']}"
        acc = row["test"]["test_acc"]
        if k not in best or (acc is not None and math.isfinite(acc) and acc > best[k][0]):
            best[k] = (acc, row["tuner"])  # the tuner holding the best score so far, not the last one
        if bar:
            bar.update(1)
            bar.set_postfix_str(f"best {k}: {100 * best[k][0]:.1f}% ({best[k][1]}); last: {row['tuner']}")

    if backend == "ray":
        _run_ray(todo, agent, storage, address, finished, study, batch)
    elif workers <= 1:
        for c in todo:
            finished(run_cell(c, agent, storage, study, batch))
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent) as pool:
            pending = {pool.submit(run_cell, c, agent, storage, study, batch) for c in todo}
            while pending:
                ready, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in ready:
                    finished(f.result())
    if bar:
        bar.close()
    write_summary(out)
    return out


def die_with_parent() -> None:
    """A pool worker ends when the process that started it dies (even by ``kill -9``), instead of
    living on holding its memory (Linux: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``; elsewhere nothing)."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(0)
    except (OSError, AttributeError):
        pass


def _run_ray(cells: list[Cell], agent, storage, address, finished, study=None, batch: int = 1) -> None:
    try:
        import ray
    except ImportError:
        raise RltuneError("the ray backend needs Ray: pip install 'rltune[ray]'") from None
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        from rltune.rayvec import ray_init

        ray_init(ray, address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": os.cpu_count()}))
    remote = ray.remote(num_cpus=1)(run_cell)
    pending = [remote.remote(c, agent, storage, study, batch) for c in cells]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        finished(ray.get(ready[0]))


def _ms(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["scenario"], r["target"], r["tuner"], r["budget_stages"]), []).append(r)
    out = []
    for (scenario, target, tuner, budget), rs in sorted(groups.items()):
        acc_m, acc_s = _ms([r["test"]["test_acc"] for r in rs])
        sc_m, sc_s = _ms([r["test"]["test_score"] for r in rs])
        out.append({
            "scenario": scenario, "target": target, "tuner": tuner, "budget_stages": budget,
            "episodes": statistics.fmean(r["episodes"] for r in rs), "n_seeds": len(rs),
            "score_mean": sc_m, "score_std": sc_s, "test_acc_mean": acc_m, "test_acc_std": acc_s,
            "float_test_acc_mean": _ms([r["test"]["float_test_acc"] for r in rs])[0],
            "bytes_mean": _ms([r["test"]["packed_bytes"] for r in rs])[0],
            "ratio_mean": _ms([r["test"]["ratio"] for r in rs])[0],
            "val_acc_mean": _ms([r["val_acc"] for r in rs])[0],
            "in_agent_training_set": any(r.get("in_agent_training_set") for r in rs),
        })
    return out


def to_markdown(summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    commands = [r["command"] for r in meta.get("runs", [])]
    lines = ["# Benchmark (generated by rltune evaluate; do not edit)", "",
             *[f"Command: `{c}`  " for c in commands],
             "Test accuracy (%) and efficiency score, mean ± std over n seeds; every tuner meets the same "
             "compression target; budget in stages of real training (episodes run in brackets). "
             "**Bold**: best test accuracy for the scenario and target.", ""]
    by_cell: dict[tuple, list[dict]] = {}
    for r in summary:
        by_cell.setdefault((r["scenario"], r["target"]), []).append(r)
    for (scenario, target), rs in by_cell.items():
        held = "trained on" if any(r["in_agent_training_set"] for r in rs) else "held out from the agent"
        lines += [f"## {scenario} at {target} ({held})", "",
                  "| tuner | budget (episodes) | n | test acc | score | bytes | ratio |", "|---|---|---|---|---|---|---|"]
        top = max(r["test_acc_mean"] for r in rs)
        for r in sorted(rs, key=lambda r: -r["test_acc_mean"]):
            acc = f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f}"
            if r["test_acc_mean"] == top:
                acc = f"**{acc}**"
            lines.append(f"| {r['tuner']} | {r['budget_stages']} ({r['episodes']:.0f}) | {r['n_seeds']} | {acc} | "
                         f"{r['score_mean']:.4f} ± {r['score_std']:.4f} | {r['bytes_mean']:.0f} | {r['ratio_mean']:.1f}× |")
        lines.append("")
    return "\n".join(lines) + "\n"


def compact_table(summary: list[dict[str, Any]]) -> str:
    """One table for a README: a row per tuner, a column per scenario @ target, test accuracy (%)
    mean ± std; the best of each column in bold; (h) marks scenarios held out from the agent."""
    cols = sorted({(r["scenario"], r["target"]) for r in summary},
                  key=lambda c: (c[0], float(c[1].rstrip("xX")) if c[1].rstrip("xX").replace(".", "").isdigit() else 0))
    with_agent = any(r["tuner"].startswith("ppo") for r in summary)
    held = {c: with_agent and not any(r["in_agent_training_set"] for r in summary if (r["scenario"], r["target"]) == c)
            for c in cols}
    tuners: dict[tuple, dict] = {}
    for r in summary:
        tuners.setdefault((r["tuner"], r["budget_stages"]), {})[(r["scenario"], r["target"])] = r
    top = {c: max((r["test_acc_mean"] for r in summary if (r["scenario"], r["target"]) == c
                   and math.isfinite(r["test_acc_mean"])), default=math.nan) for c in cols}
    head = " | ".join(f"{Path(sc).stem} @ {t}{' (h)' if held[(sc, t)] else ''}" for sc, t in cols)
    lines = [f"| tuner (episodes) | {head} |", "|---" * (len(cols) + 1) + "|"]

    def order(item):  # by the mean gap to each column's best, so rows with missing cells rank fairly
        gaps = [top[c] - r["test_acc_mean"] for c, r in item[1].items() if math.isfinite(r["test_acc_mean"])]
        return statistics.fmean(gaps) if gaps else math.inf

    for (tuner, budget), rs in sorted(tuners.items(), key=order):
        eps = sorted({round(r["episodes"]) for r in rs.values()})
        cells = []
        for c in cols:
            r = rs.get(c)
            if r is None:
                cells.append("–")
                continue
            v = f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f}"
            cells.append(f"**{v}**" if r["test_acc_mean"] == top[c] else v)
        lines.append(f"| {tuner} ({'/'.join(map(str, eps))}) | " + " | ".join(cells) + " |")
    n = sorted({r["n_seeds"] for r in summary})
    lines.append("")
    lines.append(f"Test accuracy (%), mean ± std over {'/'.join(map(str, n))} seeds; (h): held out from the agent's training.")
    return "\n".join(lines) + "\n"


def write_summary(out: Path) -> list[dict[str, Any]]:
    rows = [r for r in read_results(out / "results.jsonl") if "part" not in r]  # parts are merged
    meta = read_meta(out)
    summary = summarize(rows)
    write_atomic(out / "summary.json", json.dumps(summary, indent=1).encode(), "summary")
    write_atomic(out / "benchmark.md", to_markdown(summary, meta).encode(), "summary")
    write_atomic(out / "table.md", compact_table(summary).encode(), "summary")
    _plots(rows, summary, out)
    return summary


def _savefig(fig, path: Path) -> None:
    """A plot written whole, replacing (never writing through) whatever is at ``path``."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(path, buf.getvalue(), "plot")


def _plots(rows: list[dict], summary: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for scenario in sorted({r["scenario"] for r in rows}):
        fig, ax = plt.subplots(figsize=(6, 4))
        rs = [r for r in rows if r["scenario"] == scenario]
        for i, tuner in enumerate(sorted({r["tuner"] for r in rs})):
            pts = [(r["test"]["packed_bytes"], 100 * r["test"]["test_acc"]) for r in rs if r["tuner"] == tuner]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=tuner, s=18, alpha=0.75, marker="os^vDP*X"[i % 8])
        ax.set_xscale("log")
        ax.set_xlabel("packed bytes (log)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{scenario}: every tuner's students")
        ax.legend(fontsize=7)
        fig.tight_layout()
        _savefig(fig, out / f"pareto_{Path(scenario).stem}.png")
        plt.close(fig)
    budgets = sorted({s["budget_stages"] for s in summary})
    if len(budgets) > 1:
        for scenario in sorted({s["scenario"] for s in summary}):
            fig, ax = plt.subplots(figsize=(6, 4))
            ss = [s for s in summary if s["scenario"] == scenario]
            for tuner in sorted({s["tuner"] for s in ss}):
                for target in sorted({s["target"] for s in ss}):
                    pts = sorted((s["budget_stages"], s["score_mean"]) for s in ss if s["tuner"] == tuner and s["target"] == target)
                    if len(pts) == 1:  # one-episode tuners: a flat line across the budgets
                        pts = [(budgets[0], pts[0][1]), (budgets[-1], pts[0][1])]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{tuner} @ {target}")
            ax.set_xscale("log")
            ax.set_xlabel("budget (stages of training)")
            ax.set_ylabel("test efficiency score")
            ax.set_title(f"{scenario}: score against budget")
            ax.legend(fontsize=6)
            fig.tight_layout()
            _savefig(fig, out / f"budget_{Path(scenario).stem}.png")
            plt.close(fig)
