"""Writing files so that readers see the old file or the new one, never a mix, and a failure leaves no trace.

Every file this project writes (shards, manifests, router weights, checkpoints, JSON reports, figures) goes
through `atomic_path`: the content is written under `<name>.partial` beside the target, fsynced, given the
normal file mode, renamed over the target, and the directory entry is fsynced. If writing fails (a full disk,
an interrupt), the `.partial` file is removed and the target is untouched; a full disk is then one line
naming the target (`errors.disk_full`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from common.errors import DISK_FULL, disk_full

PARTIAL_SUFFIX = ".partial"  # files being written; never listed in a manifest, never read


def _default_mode() -> int:
    # the mode open() would give a new file: 0o666 under the process umask (reading the umask means setting it)
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _default_mode()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(tmp: Path, path: Path) -> None:
    """fsync `tmp`, give it the normal file mode, rename it to `path`, fsync the directory.

    The mode matters: some writers (safetensors, tempfile) create 0600 files, which other users of a shared
    trace directory could not read."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields the temporary path to write; on success commits it over `path`, on any failure removes it."""
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        yield tmp
        commit_file(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            raise disk_full(path, e) from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
