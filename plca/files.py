"""Writing files so that a crash, a full disk or an interrupt never leaves half a file, and
flattening nested dicts. The lowest layer of the package: it imports nothing from plca.

An atomic write goes to a hidden temporary name in the destination's folder
(``.<name>.<random hex>.tmp``), is flushed and fsynced, renamed over the destination
(``os.replace``: readers see the old file or the new one, never a mix) and the folder is fsynced
so that the rename survives a power cut. On any failure, ``KeyboardInterrupt`` included, the
temporary file is removed and the previous file at the destination is left as it was; only a
process killed outright (SIGKILL) can leave a temporary file behind, which the next write ignores
(the trainer removes stale ones in ``checkpoints/``). New files get the usual permissions
(``0o666`` minus the umask, as ``open`` gives), not the ``0o600`` of :func:`tempfile.mkstemp`.

- :func:`atomic_open`: a handle to write to, for writers that take a file object (``torch.save``);
- :func:`atomic_path`: a temporary path, for writers that take a file name (``safetensors``), or a
  temporary folder that replaces an absent or empty destination folder as a whole;
- :func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`: the common cases.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "flatten", "temporary_name"]


def temporary_name(path: str | Path) -> Path:
    """A fresh hidden name beside ``path``: ``<folder>/.<name>.<32 hex digits>.tmp``."""
    path = Path(path)
    return path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """``with atomic_open(path) as handle: handle.write(...)``: a handle to a temporary file beside
    ``path`` that, when the block ends normally, is flushed, fsynced and renamed over ``path``.

    ``mode``: ``"wb"`` or ``"w"`` (text, ``encoding`` default UTF-8). An exception in the block or
    in the write itself removes the temporary file, leaves ``path`` as it was, and propagates.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes a new file: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if mode == "w":
            handle = os.fdopen(fd, "w", encoding=encoding or "utf-8")
        else:
            handle = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        _remove(tmp)
        raise
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_folder(path.parent)


@contextmanager
def atomic_path(path: str | Path, *, folder: bool = False) -> Iterator[Path]:
    """``with atomic_path(path) as tmp: writer(tmp)``: a temporary path beside ``path`` that, when the
    block ends normally, is fsynced and renamed over ``path``; any exception removes it and leaves
    ``path`` as it was.

    The temporary file exists (empty) when the block starts, with the usual permissions, which it
    keeps even if the writer replaces it. With ``folder=True`` the temporary path is a new empty
    folder (``0o777`` minus the umask); ``path`` must then be absent or an empty folder (what
    ``os.replace`` replaces), and the files written into it are not fsynced one by one.
    """
    path = Path(path)
    tmp = temporary_name(path)
    if folder:
        os.mkdir(tmp, 0o777)
    else:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        yield tmp
        if not folder:
            os.chmod(tmp, mode)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_folder(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w", encoding=encoding) as handle:
        handle.write(text)


def atomic_write_json(path: str | Path, data: Any, *, indent: int | None = 2, **dumps: Any) -> None:
    """``json.dumps(data, indent=indent, **dumps)`` to ``path`` atomically, with a final newline
    when indented (the whole text is built before the file is touched)."""
    text = json.dumps(data, indent=indent, **dumps)
    atomic_write_text(path, text + "\n" if indent is not None else text)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys: ``{'train': {'lr': 1}}`` -> ``{'train.lr': 1}``.

    Lists, tuples and every other value stay values (``{'a': [1, {'b': 2}]}`` -> ``{'a': [1, {'b': 2}]}``);
    an empty dict inside is a value too (``{'a': {}}`` -> ``{'a': {}}``), so it is not lost; an empty
    dict at the top flattens to ``{}``, and a value that is not a dict to ``{prefix: data}``.
    Keys are turned into strings.
    """
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat
