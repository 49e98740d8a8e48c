"""Making finished shards durable in the background, so collection never waits for the disk it doesn't need.

A shard is *committed* when its bytes are on disk (fsync), its SHA-256 is known, it has been renamed from
`NAME.partial` to `NAME`, the directory entry is on disk, and the manifest lists it. Done in line, a commit
stalls the writer queue for the fsync and a full read of the shard, and with it the GPU. `ShardCommitter`
runs each commit on background threads while the next shard is collected:

    submit(writer)  ->  fsync (one thread)  |  SHA-256 read back from the page cache (a helper process)
                    ->  rename + directory fsync + manifest update, strictly in submission order

so the manifest only ever lists a prefix of the shards, each intact. At most `max_pending` shards wait to be
committed: `submit` blocks beyond that, which bounds the dirty page cache and the `.partial` files that a
crash can leave (all removed and redone by `--resume`).

While a shard is written, `start_writeback` asks the kernel to start writing each range to disk at once
(Linux `sync_file_range`), so the disk stays busy during collection and the fsync at commit has little left.

The SHA-256 runs in helper processes (`HashProcesses`), not on this process's threads: a thread that hashes
takes the GIL back between chunks from the main thread, whose forward is host-bound (measured on an H200: a
hashing thread beside the full-size forward cost it 14%, a hashing process 1%).

`OpenAhead` creates each shard's file one shard early, on a thread: creating and sizing a file are metadata
operations, which can wait for the filesystem's journal while another shard's fsync holds it, and the loop
that feeds the GPU must not wait for them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Generic, Iterable, TypeVar

from common.atomic import commit_file
from common.errors import DISK_FULL, disk_full

_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of dirty pages in the range, do not wait for it
_libc = None
try:  # Linux only; elsewhere writeback starts when the kernel decides, and fsync does the rest
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
except (OSError, AttributeError):
    _sync_file_range = None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing `nbytes` at `offset` of `fd` to disk without waiting (a hint: failures are ignored,
    since the fsync at commit is what guarantees durability)."""
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def sha256_of(path: Path, chunk: int = 8 << 20) -> str:
    """SHA-256 of a file, read into one reused buffer (hashlib releases the GIL on large updates, so
    several hashes run in parallel on worker threads)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


# the helper's whole program: one JSON path per line in, "ok HEX" or "err ERRNO MESSAGE" per line out; it ends when
# its stdin closes (also when this process dies), and imports nothing but the standard library (-I -S)
_HASHER = """\
import hashlib, json, sys
buf = bytearray(8 << 20)
view = memoryview(buf)
for line in sys.stdin:
    try:
        h = hashlib.sha256()
        with open(json.loads(line), "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
        print("ok", h.hexdigest(), flush=True)
    except Exception as e:  # one line whatever the message: a reply is exactly one line
        print("err", getattr(e, "errno", None) or 0, " ".join(str(getattr(e, "strerror", None) or e).split()),
              flush=True)
"""


class HashProcesses:
    """SHA-256 of files computed by `n` helper processes, one file each at a time; `sha256` blocks (without the
    GIL) until one is free and has answered. Where no helper can be started, or once every helper has died (killed
    by the out-of-memory killer, say), files are hashed in this process: slower for the GPU, never wrong."""

    def __init__(self, n: int):
        self.procs: list[subprocess.Popen] = []
        self.idle: queue.Queue[subprocess.Popen] = queue.Queue()
        self.lock = threading.Lock()
        try:
            for _ in range(n):
                # outside the terminal's foreground process group: Ctrl-C, sent to that whole group, reaches
                # the collector only (which prints "interrupted" and closes the helpers), never a helper mid-start
                p = subprocess.Popen([sys.executable, "-I", "-S", "-c", _HASHER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, encoding="utf-8", start_new_session=True)
                self.procs.append(p)
                self.idle.put(p)
        except (OSError, ValueError):  # no usable interpreter to start (embedded Python): hash in threads
            self.close()

    def sha256(self, path: Path) -> str:
        while True:  # wait for an idle helper, re-checking that one is still alive (others may die meanwhile)
            with self.lock:
                if not self.procs:
                    return sha256_of(path)
            try:
                p = self.idle.get(timeout=1.0)
                break
            except queue.Empty:
                continue
        try:
            p.stdin.write(json.dumps(os.fspath(path)) + "\n")
            p.stdin.flush()
            answer = p.stdout.readline()
        except OSError:  # the helper is gone: its pipe is closed
            answer = ""
        kind, _, rest = answer.rstrip("\n").partition(" ")
        code, _, message = rest.partition(" ")
        if kind == "ok" and len(rest) == 64:
            self.idle.put(p)
            return rest
        if kind == "err" and code.isdigit():
            self.idle.put(p)
            raise OSError(int(code), message, os.fspath(path))
        self._drop(p)  # it died (or answered nonsense): the others carry on, and this file is hashed here
        return sha256_of(path)

    def _drop(self, p: subprocess.Popen) -> None:
        with self.lock:
            if p in self.procs:
                self.procs.remove(p)
        p.kill()
        p.wait()
        for pipe in (p.stdin, p.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def close(self) -> None:
        with self.lock:
            procs, self.procs = self.procs, []
        for p in procs:
            try:
                p.stdin.close()
                p.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()
                p.wait()
            p.stdout.close()


class ShardCommitter:
    """Commits shards on background threads, in order; `on_commit(bytes, sha256)` of each runs there too.

    Errors are raised in the caller at the next `submit` or at `join`. After an error nothing more is
    committed: the manifest keeps listing the shards committed before it.
    """

    def __init__(self, max_pending: int = 3, hash_threads: int = 3):
        self.pool = ThreadPoolExecutor(max_workers=hash_threads + max_pending, thread_name_prefix="commit")
        self.hasher = HashProcesses(hash_threads)
        self.slots = threading.Semaphore(max_pending)
        self.order = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit-order")
        self.error: BaseException | None = None
        self.pending: list[Future] = []

    def submit(self, tmp: Path, path: Path, fd: int, nbytes: int, on_commit: Callable[[int, str], None]) -> None:
        """Commit the finished file `tmp` (open as `fd`, which this closes) to `path`."""
        self._check()
        self.slots.acquire()
        synced = self.pool.submit(_fsync_close, fd)
        digest = self.pool.submit(self.hasher.sha256, tmp)

        def finish() -> None:
            try:
                synced.result()
                sha = digest.result()
                if self.error is None:
                    commit_file(tmp, path)  # fsync again (nothing left), rename, fsync the directory
                    on_commit(nbytes, sha)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                tmp.unlink(missing_ok=True)  # never left looking like a shard in progress
                if isinstance(e, OSError) and e.errno in DISK_FULL:
                    e = disk_full(path, e)
                if self.error is None:
                    self.error = e
            finally:
                self.slots.release()
        self.pending = [f for f in self.pending if not f.done()] + [self.order.submit(finish)]

    def _check(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def join(self) -> None:
        """Wait until every submitted shard is committed (or failed)."""
        for f in self.pending:
            f.result()
        self.pending = []
        self._check()

    def close(self) -> None:
        self.order.shutdown(wait=True)
        self.pool.shutdown(wait=True)
        self.hasher.close()


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


W = TypeVar("W")


class OpenAhead(Generic[W]):
    """`open_one(key)` for each key in order, one key ahead of `take()`, on a background thread.

    `opened` lists everything opened so far, taken or not, so that a caller stopping on an error can abort
    them all (after `close()`, which waits for an open in progress). An error of `open_one` is raised by the
    `take()` that would have returned its result.
    """

    def __init__(self, open_one: Callable[[int], W], keys: Iterable[int]):
        self.open_one, self.keys = open_one, iter(keys)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="open-ahead")
        self.opened: list[W] = []
        self.lock = threading.Lock()
        self.next = self._start()

    def _open(self, key: int) -> W:
        item = self.open_one(key)
        with self.lock:
            self.opened.append(item)
        return item

    def _start(self) -> Future | None:
        key = next(self.keys, None)
        return None if key is None else self.pool.submit(self._open, key)

    def take(self) -> W:
        """The next key's item (waits if it is still being opened), and starts opening the one after."""
        if self.next is None:
            raise StopIteration("no key left to open")
        item = self.next.result()
        self.next = self._start()
        return item

    def close(self) -> None:
        self.pool.shutdown(wait=True)
