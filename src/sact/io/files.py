"""Writing into the user's folders safely.

* :func:`atomic_write_bytes`: a file is written to a temporary name in the same folder
  and renamed into place, so a reader (or a crash) never sees half a file. The
  temporary name is recognisable (``.NAME.sact-tmp.<host>.<pid>.<random>.tmp``).
* :func:`remove_stale_temp_files`: at the start of a command writing into a folder,
  temporary files left there by a killed sact process (same host, PID no longer
  running) are removed -- and nothing else.
* :class:`OutputLock`: one sact command at a time writes a multi-file output folder.
* :func:`check_output_file` / :func:`check_output_folder`: an ``--out`` that clashes
  with an existing file or folder is reported before any work.
* :func:`prepare_outputs`: the above together, as every command writing outputs uses them.
* :func:`dumps_json`: strict JSON (non-finite floats become ``null``).
* :func:`loads_json`: JSON from a file made by someone else, nesting bounded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError

__all__ = [
    "atomic_write_bytes",
    "remove_stale_temp_files",
    "is_temp_file",
    "OutputLock",
    "check_output_file",
    "check_output_folder",
    "prepare_outputs",
    "finite_or_none",
    "dumps_json",
    "loads_json",
    "MAX_JSON_DEPTH",
]

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40] or "host"
_TEMP_RE = re.compile(r"^\..+\.sact-tmp\.(?P<host>[A-Za-z0-9]+)\.(?P<pid>\d+)\.[a-z0-9_]+\.tmp$")
_LOCK_RE = re.compile(r"^\.sact-[a-z0-9-]+\.lock$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_temp_file(name: str) -> bool:
    """True for the temporary names :func:`atomic_write_bytes` uses."""
    return _TEMP_RE.match(name) is not None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``.

    The temporary file ``.NAME.sact-tmp.<host>.<pid>.<random>.tmp`` sits next to
    ``path``; it is removed on any error, and by :func:`remove_stale_temp_files` if the
    process is killed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.sact-tmp.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove temporary files and locks of sact processes that no longer run.

    Only names written by :func:`atomic_write_bytes` / :class:`OutputLock` on this host
    whose process is gone are removed; every other file is left alone.

    Returns:
        The removed paths.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TEMP_RE.match(entry.name)
        if m is not None:
            stale = m["host"] == _HOST and not _pid_alive(int(m["pid"]))
        elif _LOCK_RE.match(entry.name):
            owner = _read_lock(entry)
            stale = owner is not None and owner[0] == _HOST and not _pid_alive(owner[1])
        else:
            continue
        if stale and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _read_lock(path: Path) -> tuple[str, int] | None:
    try:
        host, pid = path.read_text().split()[:2]
        return host, int(pid)
    except (OSError, ValueError):
        return None


class OutputLock:
    """Held while one sact command writes a multi-file output folder.

    ``folder/.sact-<command>.lock`` is created exclusively with this host and PID; a
    second command finds it and refuses. A lock whose process is gone (same host) is
    stale and taken over.

    Args:
        folder: the output folder (created; removed again on release if this lock
            created it and it is still empty).
        command: the command's name (``train``, ``demo``, ``ponder-map``...).

    Raises:
        OutputExistsError: another live process holds the folder.
    """

    def __init__(self, folder: str | Path, command: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / f".sact-{command}.lock"
        self.command = command
        self._held = False
        self._created: list[Path] = []

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self._created = _missing_folders(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._take()
        except BaseException:
            _remove_empty(self._created)
            raise

    def _take(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read_lock(self.path)
                if owner is not None and owner[0] == _HOST and not _pid_alive(owner[1]):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                who = f"process {owner[1]} on {owner[0]}" if owner else "another process"
                raise OutputExistsError(
                    f"{self.folder} is being written by another `sact {self.command}` ({who}); wait for it to "
                    f"finish or choose another output folder (remove {self.path} if no such process runs)"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{_HOST} {os.getpid()}\n")
            self._held = True
            return
        raise OutputExistsError(f"cannot take the lock {self.path}")

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False
            _remove_empty(self._created)


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    p = Path(path)
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Removes each of ``folders`` (deepest first) that is empty; ``rmdir`` never removes content."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (something was written), or already gone
            pass


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_folder(path: str | Path, what: str = "--out") -> Path:
    """``path`` must be a folder or creatable as one (no file in the way).

    Raises:
        OutputExistsError: ``path`` or one of its parents is an existing file.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{what} {path} is an existing file, not a folder")
    anchor = _first_existing(path)
    if not anchor.is_dir():
        raise OutputExistsError(f"{what} {path}: {anchor} is a file, so the folder cannot be created")
    return path


def check_output_file(path: str | Path, *, overwrite: bool = False, what: str = "--out") -> Path:
    """``path`` may be written as a file: not a folder, no file in the way of its
    folder, and not an existing file unless ``overwrite``.

    Raises:
        OutputExistsError: any of the above.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{what} {path} is an existing folder; name a file")
    check_output_folder(path.parent, what=f"{what} {path}: folder")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{what} {path} already exists; pass --overwrite to replace it, or choose another name")
    return path


@contextlib.contextmanager
def prepare_outputs(folder: str | Path | None, *, files: Iterable[str | Path] = (), overwrite: bool = False,
                    what: str = "--out file", lock: str | None = None, stale: bool = True) -> Iterator[Path]:
    """A command's output folder, made ready for the body of the ``with``; the one place
    the output rules of ``docs/trust.md`` are applied.

    On entry, in this order, before the command writes anything:

    1. ``folder`` must be a folder or creatable as one: no file in its place or in the
       place of a parent (:func:`check_output_folder`, named ``--out``).
    2. Each of ``files`` must not be a folder, and not an existing file unless
       ``overwrite`` (:func:`check_output_file`, named ``what``).
    3. With ``lock``, ``folder`` is created and ``folder/.sact-<lock>.lock`` is held for
       the body (:class:`OutputLock`): another live sact process writing it is refused.
       Without, the folder is created by the first file written into it.
    4. With ``stale``, temporary files of killed sact processes are removed from the
       folder (:func:`remove_stale_temp_files`); no other file is ever removed.

    On the way out (success, refusal or crash) the lock is released, and the folders
    that did not exist on entry and are still empty are removed: a run that wrote
    nothing leaves no folder behind; a folder that existed, or holds anything, stays.

    Args:
        folder: the output folder; None for a command whose outputs are ``files`` alone
            (``eval --out FILE``): their folders are checked with them, and are the
            folders step 4 cleans.
        files: the files the command writes, relative to ``folder``.
        overwrite: existing ``files`` may be replaced.
        what: how the error names one of ``files``.
        lock: the command's name (``train``, ``demo``...), for :class:`OutputLock`.
        stale: remove stale temporary files.

    Yields:
        The folder (with ``folder`` None, the folder of the first file).

    Raises:
        OutputExistsError: a check of steps 1-3 fails; nothing was created or removed.
    """
    paths = [Path(folder or "", f) for f in files]
    if folder is not None:
        check_output_folder(folder)
    for path in paths:
        check_output_file(path, overwrite=overwrite, what=what)
    folders = [Path(folder)] if folder is not None else list(dict.fromkeys(p.parent for p in paths))
    if not folders:
        raise ValueError("prepare_outputs needs a folder or at least one file")
    created = sorted({f for d in folders for f in _missing_folders(d)}, key=lambda f: len(f.parts), reverse=True)
    try:
        with OutputLock(folders[0], lock) if lock else contextlib.nullcontext():
            for f in folders if stale else ():
                remove_stale_temp_files(f)
            yield folders[0]
    finally:
        _remove_empty(created)


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if hasattr(obj, "item") and hasattr(obj, "dtype") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalar
        return finite_or_none(obj.item())
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always writes valid JSON: NaN / inf become ``null``."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


#: Deepest nesting of lists and objects :func:`loads_json` accepts (sact's own documents use fewer than 10).
MAX_JSON_DEPTH = 100


def loads_json(text: str | bytes) -> Any:
    """``json.loads`` for a document made by someone else: nesting is bounded.

    A document nested deeper than :data:`MAX_JSON_DEPTH` levels is refused, whether the
    decoder gives up (``RecursionError`` at about 1000 levels) or not: code walking a
    decoded document recursively (``dumps_json``, a decoder of tagged values) would
    fail on it later.

    Raises:
        ValueError: invalid JSON (``json.JSONDecodeError``) or too deeply nested.
    """
    too_deep = f"JSON nested more than {MAX_JSON_DEPTH} levels deep"
    try:
        doc = json.loads(text)
    except RecursionError:
        raise ValueError(too_deep) from None
    stack = [(doc, 1)]  # (value, its nesting level); iterative, so any depth is walked safely
    while stack:
        obj, level = stack.pop()
        if isinstance(obj, (dict, list)):
            if level > MAX_JSON_DEPTH:
                raise ValueError(too_deep)
            stack.extend((v, level + 1) for v in (obj.values() if isinstance(obj, dict) else obj))
    return doc
