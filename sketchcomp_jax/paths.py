"""Paths that may be local or remote (``gs://bucket/...``, any scheme ``etils.epath`` knows).

Local paths stay ``pathlib.Path`` (behaviour exactly as before); remote ones become ``etils.epath.Path``
(backed by gcsfs for ``gs://``), which has the same API for everything used here (``/``, ``exists``,
``is_file``, ``is_dir``, ``iterdir``, ``glob``, ``mkdir``, ``read_text``, ``write_text``, ``open``,
``unlink``, ``rename``). The helpers below cover what differs on object stores:

* no atomic rename, but every object upload is atomic (a reader sees the old object or the whole new
  one), so "write a temporary then rename" becomes a single write;
* no append: :func:`append_text` reads and rewrites the object;
* libraries that open files by name with the OS (PIL, the array_record reader) need a local file:
  :func:`local_mirror` copies remote files into a local cache once.

For the local GCS emulator used by the tests see ``docs/train.md`` ("Work dirs and data on GCS").
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
from typing import Iterable


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL-style path (``gs://bucket/dir``), False for a local one."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike):
    """``pathlib.Path`` for a local path, ``etils.epath.Path`` for a remote one (``gs://...``)."""
    if isinstance(path, pathlib.Path) and not is_remote(path):
        return path
    text = os.fspath(path)
    if is_remote(text):
        from etils import epath

        return epath.Path(text)
    return pathlib.Path(text)


def expand(path: str | os.PathLike):
    """:func:`as_path` with ``~`` expanded for a local path."""
    return as_path(path) if is_remote(path) else pathlib.Path(path).expanduser()


def absolute(path: str | os.PathLike):
    """:func:`as_path` made absolute (remote paths already are)."""
    p = as_path(path)
    return p if is_remote(p) else p.absolute()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` so that a reader (or a kill) never sees a partial file: locally a temporary sibling,
    fsync and rename; remotely one object upload (atomic on GCS)."""
    p = as_path(path)
    if is_remote(p):
        p.write_bytes(data)
        return
    tmp = p.with_name(f".{p.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """:func:`write_bytes_atomic` of UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def append_text(path: str | os.PathLike, text: str) -> None:
    """Appends ``text``. Object stores cannot append: the object is read and rewritten whole (one atomic
    upload), which costs O(file size) per call -- fine for metrics files of a few MB."""
    p = as_path(path)
    if not is_remote(p):
        with open(p, "a") as f:
            f.write(text)
        return
    old = p.read_bytes() if p.exists() else b""
    p.write_bytes(old + text.encode("utf-8"))


def rmtree(path: str | os.PathLike) -> None:
    """Removes a directory tree; nothing happens when it does not exist."""
    p = as_path(path)
    if not is_remote(p):
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.rmtree()


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies one file between any two locations (local → remote uploads it, remote → local downloads it)."""
    s, d = as_path(src), as_path(dst)
    if not is_remote(s) and not is_remote(d):
        shutil.copyfile(s, d)
        return
    with s.open("rb") as fi, d.open("wb") as fo:
        shutil.copyfileobj(fi, fo, length=16 << 20)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies a directory tree into ``dst`` (created; existing files are overwritten), any locations."""
    s, d = as_path(src), as_path(dst)
    if not is_remote(s) and not is_remote(d):
        shutil.copytree(s, d, dirs_exist_ok=True)
        return
    d.mkdir(parents=True, exist_ok=True)
    for child in s.iterdir():
        if child.is_dir():
            copy_tree(child, d / child.name)
        else:
            copy_file(child, d / child.name)


def cache_root() -> pathlib.Path:
    """Where remote files that must be local are copied: ``$SKETCHCOMP_CACHE_DIR`` or
    ``~/.cache/sketchcomp_jax``."""
    root = os.environ.get("SKETCHCOMP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sketchcomp_jax")
    return pathlib.Path(root)


def local_mirror(remote_dir: str | os.PathLike, names: Iterable[str], refresh: Iterable[str] = (),
                 version: str = "") -> pathlib.Path:
    """A local directory holding copies of ``remote_dir/<name>`` for each name; returns it.

    The copy lives under :func:`cache_root` (``remote/<scheme>/<bucket>/<path>-<hash>``) and is reused while
    each file's size matches the remote one (the names in ``refresh``, small metadata files, are always
    fetched again; a different ``version``, e.g. a hash of the remote metadata, gives a fresh copy). Each
    file is downloaded to a temporary name and renamed, so several processes on one host (grain workers, JAX
    processes) may mirror the same directory at once."""
    src = as_path(remote_dir)
    text = os.fspath(src).rstrip("/")
    scheme, _, rest = text.partition("://")
    digest = hashlib.sha256(f"{text}\x00{version}".encode()).hexdigest()[:10]
    local = cache_root() / "remote" / scheme / f"{rest}-{digest}"
    local.mkdir(parents=True, exist_ok=True)
    refresh = set(refresh)
    for name in names:
        remote_file, local_file = src / name, local / name
        if name not in refresh and local_file.is_file() and local_file.stat().st_size == remote_file.stat().length:
            continue
        local_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_file.with_name(f".{local_file.name}.{os.getpid()}.tmp")
        copy_file(remote_file, tmp)
        os.replace(tmp, local_file)
    return local
