"""Atomic writes: a reader never sees a half-written file, and a failed run leaves no partial output folder.

Every file promptkit writes is written to a temporary name beside its target and renamed into place, with the
mode a plain ``open(path, "w")`` would give it (0o666 minus the umask). A write that fails for lack of space or
permission raises ``OutputError``: one line naming the path, no traceback on the command line.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from promptkit.errors import UserError

_UMASK_LOCK = threading.Lock()


class OutputError(UserError, ValueError, OSError):
    """An output file or folder could not be written (full disk, no permission, a file in the way)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot write {self.path}: {reason}")


def _reason(error: OSError) -> str:
    """The human part of an OS error (``No space left on device``), without the temporary file's name."""
    if isinstance(error, OutputError):
        return error.reason
    return error.strerror or str(error) or type(error).__name__


def _make_folder(folder: Path, target: Path) -> None:
    """``mkdir -p folder``; an ``OutputError`` about ``target`` when it cannot be made (a file in the way names it)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        raise OutputError(target, f"{blocker} is a file, not a folder" if blocker else _reason(error)) from error
    except OSError as error:
        raise OutputError(target, _reason(error)) from error


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: ``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere os.umask is the only reader and it must set a value; the lock keeps our own threads from
    # creating files during that instant.
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a new file under the current umask (0o644 under umask 022, 0o600 under 077)."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    The temporary file lives in the same folder so that ``os.replace`` is a rename on one file system. Before
    the rename it gets mode 0o666 minus the umask, whatever the writer created it with (safetensors and
    ``tempfile`` create 0o600 files). An ``OSError`` while writing becomes an ``OutputError`` naming ``path``.
    """
    target = Path(path)
    _make_folder(target.parent, target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as error:
        raise OutputError(target, _reason(error)) from error
    try:
        try:
            yield tmp
            os.chmod(tmp, file_mode())
            os.replace(tmp, target)
        except OSError as error:
            raise OutputError(target, _reason(error)) from error
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging folder whose files become ``path``'s when the block succeeds; on error nothing moves.

    How a run's output folder is made atomic (this is the one strategy promptkit uses, not a manifest):

    - ``path`` absent: the staging folder is a sibling, ``.<name>.<pid>.<random>.tmp``, renamed to ``path`` in
      one ``os.rename`` at the end, so ``path`` appears complete or not at all.
    - ``path`` an existing folder (a rerun, or ``eval`` writing beside the prompts): the staging folder is a
      hidden folder inside ``path``, and each staged file is renamed over its namesake at the end. Every byte is
      written before the first rename, so a full disk or a failed run leaves the previous files untouched;
      files the new run does not write are kept. The folder itself is never swapped out, so it may be the
      current directory or hold other files. A crash during the renames (microseconds, no writes) can mix old
      and new files; the prompts checksum, recorded in both prompts files, then refuses the pair.

    Only the block's ``OSError`` is translated (to ``OutputError`` naming the file under ``path``); any other
    exception propagates unchanged, after the staging folder is removed.
    """
    target = Path(path).absolute()
    exists = target.is_dir()
    if target.exists() and not exists:
        raise OutputError(target, "it exists and is not a folder")
    name = f".{target.name if not exists else 'promptkit-staging'}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    staging = (target if exists else target.parent) / name
    _make_folder(staging.parent, target)
    try:
        staging.mkdir()  # mode 0o777 minus the umask, like any folder the user makes
    except OSError as error:
        raise OutputError(target, _reason(error)) from error
    try:
        try:
            yield staging
            if exists:
                for entry in sorted(staging.iterdir()):
                    os.replace(entry, target / entry.name)
                staging.rmdir()
            else:
                os.rename(staging, target)
        except OSError as error:
            where = getattr(error, "path", None) or error.filename or target
            raise OutputError(_staged_name(Path(os.fspath(where)), staging, target), _reason(error)) from error
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _staged_name(path: Path, staging: Path, target: Path) -> Path:
    """Where a file of the staging folder would have landed (errors name the output, not the staging folder)."""
    try:
        return target / path.absolute().relative_to(staging)
    except ValueError:
        return path
