"""Shipped scenarios and agents, found by name from any folder.

The repository's top-level ``envs/`` (scenario YAML), ``agents/`` (trained agents and
``ppo.yml``) are the source of what ships. In a source checkout (an editable install) they are
read in place; a wheel carries copies inside the package (``rltune/shipped_envs``,
``rltune/shipped_agents``, mapped by ``pyproject.toml``), so ``pip install .`` then
``rltune replay ppo-v0 --scenario wine-mlp`` works from any folder.

A name is looked up as a path first (relative to the working folder), then in ``./envs`` or
``./agents`` (a user's own project), then among the shipped ones.
"""

from __future__ import annotations

from pathlib import Path

from rltune.errors import RltuneError

_PKG = Path(__file__).resolve().parent
_REPO = _PKG.parent


def shipped_dir(kind: str) -> Path:
    """The folder of shipped ``envs`` or ``agents``: in the wheel, else the source checkout's."""
    if kind not in ("envs", "agents"):
        raise ValueError(kind)
    inside = _PKG / f"shipped_{kind}"
    if inside.is_dir() and any(inside.iterdir()):
        return inside
    return _REPO / kind


def shipped_scenarios() -> list[str]:
    """Names of the shipped scenarios."""
    return sorted(p.stem for p in shipped_dir("envs").glob("*.yaml"))


def shipped_agents() -> list[str]:
    """Names of the shipped agents (folders with an ``agent.json``)."""
    return sorted(p.name for p in shipped_dir("agents").iterdir() if (p / "agent.json").is_file()) \
        if shipped_dir("agents").is_dir() else []


def resolve_scenario(name: str) -> Path:
    """A scenario path, or the name of a shipped one (``digits-mlp`` -> ``.../envs/digits-mlp.yaml``)."""
    if not isinstance(name, (str, Path)):
        raise RltuneError(f"expected a scenario name or YAML path, got {type(name).__name__} "
                          "(a model and data go in through rltune.Problem)")
    name = str(name)
    if "\0" in name or len(name) > 4096:
        raise RltuneError(f"{name[:80]!r}: not a usable scenario name or path")
    p = Path(name)
    try:
        if p.is_file():
            return p
    except OSError:
        pass
    from rltune.errors import check_regular_file

    check_regular_file(p, "scenario file (YAML)")  # there, but a folder or a FIFO: say so
    file = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    if "/" not in file and "\\" not in file:
        for base in (Path("envs"), shipped_dir("envs")):
            cand = base / file
            if is_file(cand):
                return cand
    raise RltuneError(f"{name}: no such scenario file, nor a shipped scenario of that name "
                      f"(shipped: {', '.join(shipped_scenarios())})")


def is_file(path: str | Path) -> bool:
    """``Path.is_file`` that answers False for names the OS refuses (too long, say) instead of raising."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def is_dir(path: str | Path) -> bool:
    """``Path.is_dir`` that answers False for names the OS refuses instead of raising."""
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def resolve_agent(name: str | Path) -> Path:
    """An agent folder, or the name of a shipped agent (``ppo-v0``)."""
    name = str(name)
    if "\0" in name or len(name) > 4096:
        raise RltuneError(f"{name[:80]!r}: not a usable agent name or path")
    p = Path(name)
    if is_dir(p):
        return p
    if "/" not in name and "\\" not in name:
        for base in (Path("agents"), shipped_dir("agents")):
            cand = base / name
            if is_file(cand / "agent.json"):
                return cand
    if is_file(p):  # a file where a folder is expected: say what it is (an SB3 .zip: how to convert it)
        hint = (": convert an SB3 .zip with 'rltune import-sb3 FILE FOLDER --trust-pickle' (it runs pickle from "
                "the file), then give the folder" if p.suffix.lower() == ".zip" else "")
        raise RltuneError(f"{name}: is a file; an agent is a folder holding agent.json and "
                          f"policy.safetensors{hint}")
    raise RltuneError(f"{name}: no such agent folder, nor a shipped agent of that name "
                      f"(shipped: {', '.join(shipped_agents())})")


def hyperparams_file() -> Path:
    """The shipped ``ppo.yml``."""
    return shipped_dir("agents") / "ppo.yml"


def recorded_command(argv: list[str] | None = None) -> str:
    """The command line as results record it, with no machine's paths in it: the ``rltune`` script
    (or ``python -m rltune``) as ``rltune``, a script of this repository relative to it
    (``python experiments/frontier.py ...``), any other path by its name."""
    import os
    import shlex
    import sys

    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    head = Path(argv[0])
    if head.name in ("rltune", "__main__.py") or head.name.startswith("rltune"):
        first = ["rltune"]
    else:
        try:
            rel = os.path.relpath(head.resolve(), _REPO)
        except ValueError:
            rel = head.name
        if rel.startswith(".."):
            rel = head.name
        first = ["python", rel] if rel.endswith(".py") else [rel]
    return " ".join(shlex.quote(a) for a in [*first, *argv[1:]])
