"""Files written for the user: to a temporary name in the same folder, then renamed over the final name.

A reader (or a crash) therefore sees the old file or the whole new one, never half of it. `fsync=True` also flushes
the file and its folder to the disk before returning (records: a power loss must not leave an empty record behind).
The temporary name starts with '.' and ends with `.tmp` (or `.tmp<suffix>` where the writer needs the suffix, e.g.
matplotlib choosing the image format), so globs for `*.json` records never pick one up. No torch here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def temp_name(path: str | Path, keep_suffix: bool = False) -> Path:
    """`.name.tmp-<pid>-<random>` next to `path` (with `keep_suffix`: `.stem.tmp-<pid>-<random><suffix>`)."""
    p = Path(path)
    tag = f"tmp-{os.getpid()}-{secrets.token_hex(3)}"
    if keep_suffix and p.suffix:
        return p.with_name(f".{p.stem}.{tag}{p.suffix}")
    return p.with_name(f".{p.name}.{tag}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path, exclusive: bool) -> None:
    """Rename `tmp` to `path`; with `exclusive`, FileExistsError if `path` exists (a hard link is atomic and fails
    on an existing name; file systems without hard links fall back to a check then a rename)."""
    if not exclusive:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network and FAT file systems)
        if path.exists():
            raise FileExistsError(f"{path} exists") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False, exclusive: bool = False, keep_suffix: bool = False):
    """Yield a temporary path next to `path`; on success it is renamed to `path`, on an exception removed.

        with atomic_path("chart.png", keep_suffix=True) as tmp:
            fig.savefig(tmp)
    """
    path = Path(path)
    tmp = temp_name(path, keep_suffix)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        _publish(tmp, path, exclusive)
        if fsync:
            _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(path: str | Path, text: str, *, fsync: bool = False, exclusive: bool = False,
               encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (see the module docstring); `exclusive`: never replace an existing file."""
    path = Path(path)
    with atomic_path(path, fsync=fsync, exclusive=exclusive) as tmp:
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)
    return path


def writable_dir_problem(path: str | Path) -> str | None:
    """None when a folder can be created at (or already is) `path` and written into; else what is wrong."""
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            return f"{p} is a file, not a folder"
        if not os.access(p, os.W_OK | os.X_OK):
            return f"{p} is not writable"
        return None
    parent = p
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        return f"{p} cannot be created: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{p} cannot be created: {parent} is not writable"
    return None


def writable_file_problem(path: str | Path) -> str | None:
    """None when a file can be written at `path` (its folder exists or can be created); else what is wrong."""
    p = Path(path).expanduser()
    if p.is_dir():
        return f"{p} is a directory, not a file"
    if p.exists() and not os.access(p, os.W_OK):
        return f"{p} is not writable"
    problem = writable_dir_problem(p.parent)
    return f"{p} cannot be written: {problem}" if problem else None
