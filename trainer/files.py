"""Files a run leaves behind: written whole or not at all, and one run per output folder at a time.

- `write_text` / `write_json`: `planner.fileio`'s temp name in the same folder, fsync, rename, fsync of the folder: after a
  crash (kill -9, power loss) the file is the old one or the new one, never a torn one.
- `fsync_tree`, `fsync_dir`: what `os.replace` of a folder needs first (its files on disk) and after (the rename).
- `publish_dir(tmp, final)`: a folder saved under a temp name (`<name>.tmp-<pid>`) takes its final name.
- `publish_files(tmp, dest)`: each file of a temp folder renamed into `dest` (the run's output folder holds more than
  the final model, so the model's files are moved one by one, each atomically; `run_summary.json`, written last,
  marks the run complete).
- `OutputLock`: an exclusive `flock` on `<output>/.ftplan.lock` holding the owner's pid. The kernel drops it when
  the process dies (kill -9 included), so a stale lock never needs cleaning; a process that inherits the open file
  (the accelerate launcher) keeps it held until it exits too.

No torch here: the CLI takes the lock before anything heavy is imported.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from pathlib import Path

from planner import fileio

LOCK_NAME = ".ftplan.lock"


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under `root`, then each folder (bottom-up), so a rename of `root` publishes durable data."""
    root = Path(root)
    dirs = [root]
    for p in root.rglob("*"):
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in reversed(dirs):
        fsync_dir(d)


def write_text(path: str | Path, text: str, *, fsync: bool = True) -> None:
    """`planner.fileio.write_text` (temp name, rename), durable by default: a run's files must survive a crash."""
    fileio.write_text(path, text, fsync=fsync)


def write_json(path: str | Path, obj, *, fsync: bool = True) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n", fsync=fsync)


def temp_dir_for(final: str | Path) -> Path:
    """`<parent>/<name>.tmp-<pid>`: where a folder is written before it takes its final name."""
    final = Path(final)
    return final.with_name(f"{final.name}.tmp-{os.getpid()}")


def publish_dir(tmp: str | Path, final: str | Path) -> None:
    """Rename the complete folder `tmp` to `final` (replacing an existing `final`: it is moved aside first, then
    removed), fsyncing the data before and the parent folder after."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish_files(tmp: str | Path, dest: str | Path) -> list[Path]:
    """Move every file of the flat folder `tmp` into `dest`, each with an atomic `os.replace`; remove `tmp`."""
    tmp, dest = Path(tmp), Path(dest)
    fsync_tree(tmp)
    moved = []
    for p in sorted(tmp.iterdir()):
        target = dest / p.name
        if p.is_dir():  # save_pretrained writes flat folders; a nested one is published whole
            publish_dir(p, target)
        else:
            os.replace(p, target)
        moved.append(target)
    fsync_dir(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return moved


# what planner.fileio (`.name.tmp-<pid>-<hex>`), temp_dir_for and publish_dir leave when killed
TEMP_RE = re.compile(r"^.+\.(tmp|old)-\d+(-[0-9a-f]+)?$")


def remove_temps(folder: str | Path) -> None:
    """Remove the temp files and folders a killed writer left in `folder` (call it only while holding its lock)."""
    for p in Path(folder).iterdir():
        if TEMP_RE.match(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


class LockedError(RuntimeError):
    """The output folder is in use by another run; `pid` is what the lock file says (None when unreadable)."""

    def __init__(self, path: Path, pid: int | None, command: str = "ftplan run", option: str = "--output-dir"):
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"{path.parent} is in use by another `{command}` ({who} holds {path.name}): wait for it to "
                         f"finish or stop it, or use another {option}")
        self.path, self.pid = path, pid


_held: dict[str, list] = {}  # realpath of the lock file -> [fd, count]: the lock is re-entrant within a process


class OutputLock:
    """Exclusive lock on an output folder for this process (re-entrant: the CLI takes it, then `run()` again).

    `with OutputLock(out) as lock:` raises LockedError at once when another process holds it."""

    def __init__(self, output_dir: str | Path, command: str = "ftplan run", option: str = "--output-dir"):
        self.dir = Path(output_dir)
        self.command, self.option = command, option
        self.path = self.dir / LOCK_NAME
        self.key = ""
        self.fd: int | None = None

    def acquire(self) -> "OutputLock":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = os.path.realpath(self.path)
        if self.key in _held:
            _held[self.key][1] += 1
            self.fd = _held[self.key][0]
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise LockedError(self.path, pid, self.command, self.option) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[self.key] = [fd, 1]
        self.fd = fd
        return self

    def release(self) -> None:
        entry = _held.get(self.key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self.key]
            os.close(entry[0])  # closing the last descriptor drops the flock
        self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def held_lock_fd(output_dir: str | Path) -> int | None:
    """The descriptor of this process's lock on `output_dir` (to hand to a child that must keep it held)."""
    entry = _held.get(os.path.realpath(Path(output_dir) / LOCK_NAME))
    return entry[0] if entry else None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
