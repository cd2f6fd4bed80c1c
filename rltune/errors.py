"""User-facing errors.

Anything a user can cause (a malformed scenario, an impossible knob range, a corrupt agent file)
raises :class:`RltuneError` with a one-line message that names the file and field where it can.
The command line prints that line and exits with status 2; it never shows a traceback for them.
"""


class RltuneError(Exception):
    """A problem with the user's input, explained in one line (line breaks in the message are
    folded into spaces, so a quoted value cannot spread it over several lines)."""

    def __init__(self, message: str = "", *args):
        super().__init__(" ".join(str(message).split()), *args)


class DivergedError(RltuneError):
    """Training produced a NaN or infinite loss."""


class UnsupportedArgumentError(RltuneError, TypeError):
    """An argument this environment does not take in the form given (a ``render_mode`` it has no
    renderer for). Also a ``TypeError``, what Python raises for an argument a callable does not
    take, so callers that probe an optional argument and retry without it (stable-baselines3's
    ``make_vec_env`` passes ``render_mode="rgb_array"`` to every env it makes and retries without it
    on ``TypeError``) keep working; everyone else sees the one-line :class:`RltuneError`."""


class RltuneWarning(UserWarning):
    """Something that works but is likely not what the user wants (a float student far below its teacher)."""


def write_atomic(path, data: bytes, what: str = "file") -> int:
    """Write ``data`` to ``path`` whole or not at all (a temporary file, fsync, ``os.replace``);
    returns the bytes written; one-line errors."""
    import os
    from pathlib import Path

    path = Path(path)
    try:
        special = path.exists() and not path.is_file()
    except OSError:
        special = False  # cannot tell: the write below fails with its own reason
    if special:  # a folder, a pipe, or a device such as /dev/null (as root os.replace would replace it)
        raise RltuneError(f"cannot write {what} {path}: it is there and not a regular file")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise RltuneError(f"cannot write {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    return len(data)


def write_json(path, obj, what: str = "file") -> int:
    """``obj`` as indented JSON at ``path`` (its folder made if missing), whole or not at all
    (:func:`write_atomic`); one-line errors. What the experiment scripts write their results with."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RltuneError(f"cannot write {what} {path}: {e.strerror or e}") from None
    return write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode(), what)


def check_regular_file(path, what: str = "file") -> None:
    """Refuse, in one line, a path that is there but is not a regular file (a FIFO would block the
    read forever, a device would stream without end, a folder fails with an unclear reason).
    A missing path is left to the caller's own read (which says so)."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise RltuneError(f"{path}: is {kind}, not a {what}")


def make_folder(path, what: str = "output folder"):
    """``mkdir -p`` with one-line errors (a file in the way, no permission)."""
    from pathlib import Path

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as e:
        raise RltuneError(f"cannot create the {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    if not path.is_dir():
        raise RltuneError(f"the {what} {path} is not a folder")
    return path
