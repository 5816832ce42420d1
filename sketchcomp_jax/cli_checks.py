"""Checks of command-line flags and inputs, run by the `launch/*.py` tools before any expensive work.

Every user-causable problem becomes a `UsageError` (a `ValueError`) whose message is one line naming the
flag, the value and the fix; `run` turns it, and absl's flag-parsing errors, into the single stderr line
`<tool>: error: <message>` with exit status 2 (no traceback). Nothing here imports JAX: a bad flag is
reported in well under a second.

Output files are refused when they exist (unless `--overwrite`), when a directory sits where a file is
wanted (or the reverse), when the parent folder is missing or not writable. `gs://` paths skip the local
checks (the libraries that write them report their own errors).
"""
from __future__ import annotations

import math
import os
import pathlib
import re
import sys
from typing import Callable, Iterable, Sequence

from sketchcomp_jax import paths


class UsageError(ValueError):
    """A bad flag value or input file; the message alone explains it (one line, names the fix)."""


def one_line(message: object) -> str:
    """The message with its lines joined by '; ' (a multi-line library message must still be one line)."""
    parts = [p.strip() for p in str(message).strip().splitlines() if p.strip()]
    return "; ".join(parts) if parts else type(message).__name__


def first_and_last_line(message: object) -> str:
    """A library's multi-line error (ml_collections wraps a config file's exception in its whole traceback, or
    lists every path it tried) cut to its first and last lines: what failed, and why."""
    lines = [p.strip() for p in str(message).strip().splitlines() if p.strip()]
    if len(lines) <= 2:
        return "; ".join(lines)
    return f"{lines[0].rstrip(':')}: {lines[-1]}"


def report(prog: str, error: BaseException | str) -> int:
    """Prints `<prog>: error: <one line>` to stderr; returns 2, the tools' exit status for usage errors."""
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
    return 2


def _flags_parser(prog: str):
    from absl import flags

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            sys.exit(report(prog, f"{first_and_last_line(e)} (see --helpshort)"))
        except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
            # ml_collections config overrides (`--config.no_such_key=1`, overrides of a config file that failed
            # to load) raise plain exceptions from inside absl's parser.
            why = first_and_last_line(e)
            dotted = [a.split("=")[0] for a in argv[1:] if a.startswith("--") and "." in a.split("=")[0]]
            quoted = re.findall(r"'([^']+)'", why)
            named = [a for a in dotted if quoted and a.endswith("." + quoted[0])]  # the override with that key
            bad = named[0] if named else (dotted[0] if len(dotted) == 1 else "value")
            if isinstance(e, (KeyError, AttributeError)):
                why = f"the config has no such key ({why.strip(chr(34))}); check the name in the config file"
            sys.exit(report(prog, f"bad flag {bad}: {why}"))

    return parse


def run(main: Callable[[list[str]], int]) -> None:
    """`absl.app.run(main)` with one-line reports: flag-parsing errors and any `UsageError` escaping `main`
    print `<prog>: error: ...` and exit 2. `main` returns the exit status."""
    from absl import app

    prog = os.path.basename(sys.argv[0])

    def wrapped(argv):
        try:
            status = main(argv)
        except UsageError as e:
            status = report(prog, e)
        sys.exit(status)

    app.run(wrapped, flags_parser=_flags_parser(prog))


# ------------------------------------------------------------------------------------------------ numbers


def number(flag: str, value: float | int | None, *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False, allow_none: bool = False):
    """`value` if finite and in [lo, hi] (open ends with `lo_open`/`hi_open`), else a `UsageError`."""
    if value is None:
        if allow_none:
            return value
        raise UsageError(f"--{flag} needs a value")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"--{flag}={value} is not a finite number; give a finite value")
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    high_bad = hi is not None and (value >= hi if hi_open else value > hi)
    if low_bad or high_bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise UsageError(f"--{flag}={value} is out of range: it must be in {left}{lo_s}, {hi_s}{right}")
    return value


# ------------------------------------------------------------------------------------------------ paths


def _not_empty(flag: str, path) -> None:
    if path is None or not os.fspath(path).strip():
        raise UsageError(f"--{flag} is empty; give a path")


def input_file(flag: str, path: str | os.PathLike, what: str = "file") -> pathlib.Path | object:
    """An existing regular file (remote paths pass unchecked)."""
    _not_empty(flag, path)
    if paths.is_remote(path):
        return paths.as_path(path)
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"--{flag} {p} is a directory, not a {what}; give the {what}'s path")
    if not p.exists():
        raise UsageError(f"--{flag} {p} not found; check the path")
    if not os.access(p, os.R_OK):
        raise UsageError(f"--{flag} {p} is not readable (permissions)")
    return p


def input_dir(flag: str, path: str | os.PathLike, what: str = "directory") -> pathlib.Path | object:
    """An existing directory (remote paths pass unchecked)."""
    _not_empty(flag, path)
    if paths.is_remote(path):
        return paths.as_path(path)
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"--{flag} {p} is not a directory (not found); give an existing {what}")
    if not p.is_dir():
        raise UsageError(f"--{flag} {p} is a file, not a {what}")
    return p


def _writable_parent(flag: str, p: pathlib.Path, create: bool) -> None:
    parent = p.parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != parent and not create:
        raise UsageError(f"--{flag} {p}: the folder {parent} does not exist; create it first")
    if not existing.is_dir():
        raise UsageError(f"--{flag} {p}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--{flag} {p}: cannot write in {existing} (permission denied); choose another location")


def output_file(flag: str, path: str | os.PathLike, *, overwrite: bool = False,
                extensions: Sequence[str] | None = None, create_parent: bool = False) -> None:
    """`path` may be written as a file: not a directory; absent unless `overwrite` (then a writable file);
    its parent exists (or may be created, `create_parent`) and is writable; its extension in `extensions`."""
    _not_empty(flag, path)
    if paths.is_remote(path):
        return
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"--{flag} {p} is a directory; give a file path in it")
    if extensions is not None and p.suffix.lower() not in extensions:
        known = sorted(set(extensions))
        if len(known) <= 6:
            hint = ", ".join(known)
        else:  # e.g. every format Pillow writes: name the common ones
            hint = ", ".join(e for e in (".png", ".jpg", ".webp") if e in known) + " or another format Pillow writes"
        raise UsageError(f"--{flag} {p}: unknown file extension {p.suffix or '(none)'!r}; use {hint}")
    if p.exists():
        if not overwrite:
            raise UsageError(f"--{flag} {p} exists; choose another path or pass --overwrite to replace it")
        if not os.access(p, os.W_OK):
            raise UsageError(f"--{flag} {p} exists and is read-only; choose another path")
    _writable_parent(flag, p, create_parent)


def output_files(flag: str, files: Iterable[str | os.PathLike], *, overwrite: bool = False,
                 extensions: Sequence[str] | None = None) -> None:
    """:func:`output_file` for each of several files one flag names (e.g. OUT_0.png, OUT_1.png)."""
    for f in files:
        output_file(flag, f, overwrite=overwrite, extensions=extensions)


def output_dir(flag: str, path: str | os.PathLike, *, create_parent: bool = True) -> None:
    """`path` may become a directory: not an existing file, and its (nearest existing) parent writable.
    Whether an existing non-empty directory may be replaced is the writer's decision (`--overwrite`)."""
    _not_empty(flag, path)
    if paths.is_remote(path):
        return
    p = pathlib.Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"--{flag} {p} is a file; give a directory path")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise UsageError(f"--{flag} {p}: cannot write in it (permission denied); choose another location")
        return
    _writable_parent(flag, p, create_parent)


# ------------------------------------------------------------------------------------------------ arrays

_NPY_MAGIC = b"\x93NUMPY"


def _describe_non_npy(head: bytes) -> str:
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (an .npz?); save one array with numpy.save"
    if head[:1] == b"\x80":
        return "pickled Python data; save the array with numpy.save"
    if not head:
        return "an empty file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"not a .npy file (it starts with {head[:8]!r}); save the array with numpy.save"
    if all(c.isprintable() or c.isspace() for c in text):
        first = (text.strip().splitlines() or [""])[0][:24]
        return f"a text file (it starts with {first!r}), not a .npy array; save the array with numpy.save"
    return f"not a .npy file (it starts with {head[:8]!r}); save the array with numpy.save"


def load_npy(flag: str, path: str | os.PathLike):
    """A numeric, all-finite array from a `.npy` file, or a `UsageError` saying what the file is instead."""
    import numpy as np

    p = input_file(flag, path, ".npy file")
    with open(p, "rb") as f:
        head = f.read(64)
    if not head.startswith(_NPY_MAGIC):
        raise UsageError(f"--{flag} {p} is {_describe_non_npy(head)}")
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as e:
        if "pickled" in str(e) or "allow_pickle" in str(e):
            raise UsageError(f"--{flag} {p} holds Python objects, not numbers; save a float array") from None
        raise UsageError(f"--{flag} {p} is a damaged .npy file ({one_line(e)})") from None
    except (OSError, EOFError) as e:
        raise UsageError(f"--{flag} {p} is a damaged or truncated .npy file ({one_line(e)})") from None
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise UsageError(f"--{flag} {p} has dtype {arr.dtype}; give a float array")
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            raise UsageError(f"--{flag} {p} holds {int(bad.sum())} NaN/Inf value(s) of {arr.size}; every value "
                             "must be finite")
    return arr


def parse_box(flag: str, text: str) -> tuple[int, int, int, int]:
    """'x0,y0,x1,y1' → four ints (exclusive ends); inverted/empty boxes are refused (the image-size check is
    :func:`sketchcomp_jax.imageio.check_box`)."""
    parts = [v.strip() for v in text.split(",")]
    try:
        box = tuple(int(v) for v in parts)
    except ValueError:
        raise UsageError(f"--{flag} {text!r}: give four integers x0,y0,x1,y1 (pixels)") from None
    if len(box) != 4:
        raise UsageError(f"--{flag} {text!r}: give four integers x0,y0,x1,y1 (pixels), got {len(box)}")
    return box  # type: ignore[return-value]
