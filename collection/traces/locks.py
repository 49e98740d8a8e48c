"""Readers and the swap: a trace set being read is never replaced underneath its reader.

Locks are `flock`s on files that exist anyway (no lock file is ever created):

- a writer (collect, transcode, import) holds an exclusive lock on the output *directory* for its whole run
  (`collection.traces.output.OutputLock`): two writers never interleave;
- a reader (`TraceSet`) holds a shared lock on the set's *manifest.json* from opening the set until it is
  closed or the process ends, and reads the manifest through that same descriptor;
- the swap that replaces a set (`collection.traces.output.swap_in`) takes an exclusive lock on the old manifest
  before it moves anything, and waits for the readers to finish (it says who they are); readers that open the
  set meanwhile wait for the swap and then read the new set. The manifest is replaced by rename, so a lock
  taken on a manifest that is no longer the directory's is dropped and taken again on the current one.
"""
from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from common.errors import UserError
from common.paths import open_nofollow


def lock_holders(path: Path | str) -> list[str]:
    """'script (pid N)' of every process holding a flock on `path` (its inode), from /proc/locks."""
    return [f"{script} (pid {pid})" for pid, script in _holders(path)]


def _holders(path: Path | str) -> list[tuple[str, str]]:
    """(pid, script or 'process') of every holder of a flock on `path`."""
    found = []
    try:
        ino = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        parts = line.split()
        if "->" in parts:  # a waiter, not a holder
            continue
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].endswith(f":{ino}"):
            pid = parts[4]
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                script = next((Path(a.decode()).stem for a in args if a.endswith(b".py")), None)
            except OSError:
                script = None
            found.append((pid, script or "process"))
    return found


def _same_file(fd: int, path: Path) -> bool:
    """Whether `fd` is still the file at `path` (not renamed away or replaced since it was opened)."""
    try:
        a, b = os.fstat(fd), os.lstat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def locked_manifest(path: Path, exclusive: bool, waiting: str) -> int:
    """A descriptor of the manifest at `path` with a shared (reader) or exclusive (swap) flock on it, once it is
    certainly the directory's current manifest. Waits while a conflicting lock is held, first printing `waiting`
    (with the holders named) to stderr. FileNotFoundError when there is no manifest."""
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    while True:
        fd = open_nofollow(path, "manifest")
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if str(os.getpid()) in {pid for pid, _ in _holders(path)}:  # waiting would be waiting for itself
                    raise UserError(f"{path}: this process still has the set open for reading; close it "
                                    "(TraceSet.close) before replacing it") from None
                holders = ", ".join(lock_holders(path)) or "another process"
                print(f"{path}: {waiting.format(holders=holders)}", file=sys.stderr, flush=True)
                fcntl.flock(fd, mode)
            if _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if not os.path.lexists(path):
            raise FileNotFoundError(path)


def read_fd(fd: int) -> bytes:
    """The whole file behind `fd`, read from its start whatever its offset."""
    size = os.fstat(fd).st_size
    parts, at = [], 0
    while True:
        chunk = os.pread(fd, max(size - at, 1 << 16), at)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        at += len(chunk)


class SetReadLock:
    """A reader's shared lock on a trace set's manifest: held until `close` (or the object's or process's end)."""

    WAITING = "waiting for {holders}, which is replacing this trace set"

    def __init__(self, manifest_path: Path):
        self.path = Path(manifest_path)
        self.fd = locked_manifest(self.path, exclusive=False, waiting=self.WAITING)

    def read(self) -> bytes:
        return read_fd(self.fd)

    def close(self) -> None:
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            os.close(fd)  # closing the descriptor drops the lock

    def __del__(self) -> None:
        self.close()
