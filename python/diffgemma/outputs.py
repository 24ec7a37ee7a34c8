"""Output files: never replace a user's file unasked, appear only when complete, leave nothing on SIGTERM.

Every writer (GGUF models, imatrix files, conversions) writes to `.NAME.tmp-PID` next to the output and
renames it when done. An exception, Ctrl-C or SIGTERM removes the temporary file; one left behind by a killed
process (SIGKILL, power loss) is removed by the next write of the same output once that process is gone.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import threading
from collections.abc import Iterator

from .errors import Error


def check_new(path: str | os.PathLike, overwrite: bool, *, cli: str = "--force") -> pathlib.Path:
    """`path` as a Path; Error if it exists and `overwrite` is false (nothing a user owns is replaced unasked)."""
    p = pathlib.Path(path)
    if p.is_dir():
        raise Error(f"{p}: is a directory, not an output file name")
    if p.exists() and not overwrite:
        raise Error(f"{p} already exists: pass overwrite=True to replace it",
                    cli=f"{p} already exists: add {cli} to replace it")
    return p


def temp_path(path: str | os.PathLike) -> pathlib.Path:
    """This process's temporary name for `path` (`.NAME.tmp-PID`); stale ones of dead processes are removed."""
    p = pathlib.Path(path)
    remove_stale(p)
    return p.with_name(f".{p.name}.tmp-{os.getpid()}")


def remove_stale(path: str | os.PathLike) -> list[pathlib.Path]:
    """Remove temporary files of `path` left by processes that no longer run; returns what was removed."""
    p = pathlib.Path(path)
    prefix = f".{p.name}.tmp-"
    removed = []
    try:
        candidates = [c for c in p.parent.iterdir() if c.name.startswith(prefix)]
    except OSError:  # the directory is missing or unreadable: the writer itself will say so
        return removed
    for c in candidates:
        pid = c.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                c.unlink()
                removed.append(c)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C, so every `finally`/`except BaseException` cleans up


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While inside, SIGTERM raises SystemExit(143) in the main thread instead of killing the process outright,
    so temporary files are removed on the way out. Does nothing off the main thread or when the program
    already handles SIGTERM itself."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields the temporary path to write; renames it onto `path` on success, removes it on any exit else."""
    p = pathlib.Path(path)
    tmp = temp_path(p)
    with sigterm_unwinds():
        try:
            yield tmp
            os.replace(tmp, p)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
