"""Writing files so that readers see the old file or the new one, never a mix, and a failure leaves no trace.

Every file this project writes (shards, manifests, router weights, checkpoints, JSON reports, figures) goes
through `atomic_path`: the content is written under `<name>.partial` beside the target, fsynced, given the
normal file mode, renamed over the target, and the directory entry is fsynced. If writing fails (a full disk,
an interrupt), the `.partial` file is removed and the target is untouched; a full disk is then one line
naming the target (`errors.disk_full`). A folder written as a whole (a saved model) goes through
`staged_folder`: written in a fresh sibling and swapped in complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from common.errors import DISK_FULL, UserError, disk_full
from common.paths import is_link

PARTIAL_SUFFIX = ".partial"  # files being written; never listed in a manifest, never read


def _default_mode(base: int) -> int:
    # the mode open() (0o666) or mkdir() (0o777) would give: base under the process umask (reading it means setting it)
    umask = os.umask(0o022)
    os.umask(umask)
    return base & ~umask


FILE_MODE, DIR_MODE = _default_mode(0o666), _default_mode(0o777)


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
    # the temporary file is made here, never through a link planted under its name (writing through it would
    # truncate whatever the link points to); a regular file left by an interrupted write is ours to replace
    if is_link(tmp) or tmp.is_dir():
        raise UserError(f"{tmp}: a {'symbolic link' if is_link(tmp) else 'directory'} where this run writes its "
                        "temporary file (never followed or removed): move it away")
    try:
        tmp.unlink(missing_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        yield tmp
        commit_file(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            raise disk_full(path, e) from None
        if isinstance(e, OSError) and e.filename in (str(tmp), str(path)):  # a place the pre-flight could not judge
            raise UserError(f"{path}: cannot write it ({(e.strerror or type(e).__name__).lower()}; nothing partial "
                            "was kept); write elsewhere") from None
        raise


@contextlib.contextmanager
def staged_folder(dest: Path) -> Iterator[Path]:
    """Yields a new, empty folder to fill in place of `dest` (a saved model: config, weights, tokenizer); when the
    block ends without error it is swapped in. The old `dest` is moved aside first and deleted only once the new
    one is in place, so a crash leaves the old folder or the new one, never neither (at worst both: one under a
    hidden `.<name>.old-*` or `.<name>.partial-*` name beside it). Both siblings are made here under fresh names,
    so nothing this did not create is deleted; on error the new folder is removed and `dest` is untouched."""
    dest = Path(dest)
    if is_link(dest) or (dest.exists() and not dest.is_dir()):
        raise UserError(f"{dest}: a {'symbolic link' if is_link(dest) else 'file'} where a folder is saved "
                        "(never followed or removed): move it away")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    aside = None
    try:
        os.chmod(tmp, DIR_MODE)  # mkdtemp makes 0700; the mode mkdir would give instead
        yield tmp
        if dest.exists():
            aside = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
            os.replace(dest, aside)  # an empty folder of ours is replaced by the old dest
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException as e:
        if aside is not None and not dest.exists():
            os.replace(aside, dest)  # the swap failed between its two renames: the old folder goes back
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            raise disk_full(dest, e) from None
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def finite_or_none(obj: Any) -> Any:
    """`obj` with every NaN or infinite float made None: for results where a value is undefined by design (a replay
    on the CPU measures no host-to-device copy), written as JSON null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    """`obj` as JSON. NaN and infinities are refused (allow_nan=False): JSON has no such values, and a file holding
    `NaN` is not JSON to any other reader; a result that can be undefined writes null (`finite_or_none`)."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    except ValueError as e:
        raise UserError(f"{path}: not written: a value to write is NaN or infinite ({e}); "
                        "check the flags that feed it") from None
    atomic_write_bytes(path, (text + "\n").encode())


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_fd(fd: int, chunk: int = 16 << 20) -> str:
    """SHA-256 of the whole file behind an open descriptor (positional reads: its offset is left alone)."""
    h = hashlib.sha256()
    at = 0
    while block := os.pread(fd, chunk, at):
        h.update(block)
        at += len(block)
    return h.hexdigest()
