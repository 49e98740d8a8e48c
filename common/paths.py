"""Paths a run reads or writes: plain file names inside a trace directory, no symbolic link followed that this
project did not create, and every destination checked before any work starts.

- `plain_name_problem` is the one rule for a file name that a manifest (or a partial manifest, or a writer)
  puts inside a trace directory: a non-empty string, not `.` or `..`, without `/` or NUL, at most 255 bytes.
  `set_file(directory, name)` is the one way such a name becomes a path; it refuses any other name.
- `refuse_symlink` / `open_nofollow`: a file or directory of a set (the staging directory `.incoming`, shards,
  manifest, router weights, codec) that is a symbolic link is refused with one line, never followed: a link
  could lead a reader to another set's bytes, or a writer to delete or move files outside the directory.
  The directory a user names on the command line may itself be a link (the user made it).
- `check_writable(flag, path, kind)`: an output the run will write is a directory (or file) that exists and is
  writable, or can be created; checked before the run reads or computes anything, so a long run never fails
  at its end for a destination it could have refused at its start. A report file replaces only an earlier
  report (`not_a_report`): never a link, a trace set's file, a checkpoint or a training run's file, nor, for a
  JSON or image report, a file that holds something else.
"""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from common.errors import UserError

NAME_MAX = 255  # bytes in one file name (Linux, ext4, xfs)
# the files a training run writes into its --output (training/trainer.py replaces these and nothing else)
TRAINING_RUN_FILES = ("best_checkpoint.pth", "best_checkpoint.json", "latest_checkpoint.pth",
                      "latest_checkpoint.json", "results.json")
TRACE_MANIFEST = "manifest.json"  # a trace set's manifest (collection/traces/format.py reads and writes it)
# a predictor checkpoint's "format" is this and a version (models/checkpoint.py)
CHECKPOINT_FAMILY = "expert-predictor/"
IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
IMAGE_MAGIC = (b"\x89PNG", b"%PDF", b"<?xml", b"<svg", b"\xff\xd8")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive (a .pth checkpoint)
REPORT_READ_MAX = 256 * 2**20  # an earlier JSON report larger than this is not read to be recognised


def plain_name_problem(name: object) -> str | None:
    """Why `name` is not a plain file name inside a directory, or None when it is one."""
    if not isinstance(name, str):
        return f"is not a string ({type(name).__name__})"
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "names a directory"
    if "/" in name:
        return "contains '/' (a path, not a file name)"
    if "\0" in name:
        return "contains a NUL byte"
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        return f"is longer than {NAME_MAX} bytes"
    return None


def set_file(directory: Path | str, name: object, what: str = "file name") -> Path:
    """`directory / name` for a plain file name; any other name is one line naming it (never a path outside)."""
    if (why := plain_name_problem(name)) is not None:
        raise UserError(f"{directory}: {what} {name!r} {why}; only a plain file name inside the directory is allowed")
    return Path(directory) / name


def is_link(path: Path | str) -> bool:
    """Whether `path` is a symbolic link (lstat: the link itself, never its target)."""
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def refuse_symlink(path: Path | str, what: str, error: type[UserError] = UserError) -> None:
    """One line (`error`) if `path` is a symbolic link: this project follows none it did not create."""
    if is_link(path):
        raise error(f"{path}: the {what} is a symbolic link, which is never followed; remove the link (or put "
                    "the real file or directory there)")


def open_nofollow(path: Path | str, what: str, flags: int = os.O_RDONLY, error: type[UserError] = UserError) -> int:
    """A descriptor of `path` opened without following a symbolic link at its last component (one line if it is
    a link), and without blocking (a FIFO planted under a set's name would hang a plain open; the caller checks
    that it holds a regular file). FileNotFoundError passes through for the caller to word."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno in (errno.ENOTDIR, errno.EMLINK) and is_link(path)):
            refuse_symlink(path, what, error)
        raise


def _nearest_existing(path: Path) -> Path:
    where = path
    while not os.path.lexists(where):
        if where.parent == where:
            break
        where = where.parent
    return where


def check_writable(flag: str, path: Path | str | None, kind: str) -> None:
    """Refuse (one line naming `flag` and `path`) an output this run could not write: `kind` "dir" is a directory
    the run writes files into, "file" a file it writes atomically (a `.partial` beside it, then a rename). Either
    must exist as that kind and be writable, or be creatable: its nearest existing ancestor is a writable
    directory. Nothing is created here."""
    if path is None:
        return
    if not str(path).strip():  # Path("") is "." (wherever the run started): an unset variable, never a choice
        raise UserError(f"{flag} is empty; give the path to write")
    path = Path(path)
    name = f"{flag} {path}"
    if kind not in ("dir", "file"):
        raise ValueError(kind)
    if kind == "file" and is_link(path):
        raise UserError(f"{name} is a symbolic link; a report is never written through one: remove the link or "
                        f"choose another {flag}")
    if os.path.lexists(path):
        if kind == "file" and not path.is_dir() and (why := not_a_report(path, flag)) is not None:
            raise UserError(f"{name} {why}; a report replaces only an earlier report: choose another {flag}")
        if kind == "dir" and not path.is_dir():
            what = "a file, not a directory" if path.is_file() else "not a directory"
            raise UserError(f"{name} is {what}; choose another {flag}")
        if kind == "file" and path.is_dir():
            raise UserError(f"{name} is a directory, not a file; choose another {flag}")
        where = path if kind == "dir" else path.parent
        if not os.access(where, os.W_OK | os.X_OK):
            raise UserError(f"{name}: {where} is not writable; choose another {flag}")
        return
    parent = _nearest_existing(path.parent)
    if not parent.is_dir():
        raise UserError(f"{name} cannot be created: {parent} is a file, not a directory; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{name} cannot be created: {parent} is not writable; choose another {flag}")


def _strings(node: object) -> set[str]:
    if isinstance(node, str):
        return {node}
    if isinstance(node, dict):
        return set().union(*(_strings(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_strings(v) for v in node)) if node else set()
    return set()


def _json_of(path: Path) -> tuple[bool, object]:
    """(whether `path` holds JSON, its value)."""
    try:
        if path.stat().st_size > REPORT_READ_MAX:
            return False, None
        return True, json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False, None


def not_a_report(path: Path, flag: str) -> str | None:
    """Why the existing file `path` is not an earlier report that `flag` may replace, or None when it is one:
    it is not a regular file; it belongs to a trace set (its manifest, or a file a manifest beside it names); it
    is a predictor checkpoint (a torch archive, a sidecar of format expert-predictor/...) or a training run's
    file beside one; or, for a JSON report (`--*json`, or a .json name), it does not hold JSON; for an image
    (`--plot`, or an image's name), it is not an image."""
    if not path.is_file():
        return "is not a regular file"
    parent, name = path.parent, path.name
    manifest = parent / TRACE_MANIFEST
    if manifest.is_file():  # a trace manifest (it has a format_version) protects itself and every name it holds
        ok, value = _json_of(manifest)
        if ok and isinstance(value, dict) and "format_version" in value and (
                name == TRACE_MANIFEST or name in _strings(value)):
            return f"is a file of the trace set in {parent}"
    if name in TRAINING_RUN_FILES and any((parent / n).is_file() for n in TRAINING_RUN_FILES if n.endswith(".pth")):
        return f"is a file of the training run in {parent}"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if head.startswith(ZIP_MAGIC):
        return "is an archive (a torch checkpoint?), not a report"
    is_json = "json" in flag or path.suffix.lower() == ".json"
    is_image = flag == "--plot" or path.suffix.lower() in IMAGE_SUFFIXES
    if is_json or (not is_image and head[:1] in (b"{", b"[")):
        ok, value = _json_of(path)
        if isinstance(value, dict) and str(value.get("format", "")).startswith(CHECKPOINT_FAMILY):
            return "is a predictor checkpoint's description, not a report"
        if is_json and not ok:
            return "does not hold JSON, so it is no earlier report"
    if is_image and not head.startswith(IMAGE_MAGIC):
        return "is not an image, so it is no earlier plot"
    return None
