"""Where a trace set is written: one writer at a time, and an old set replaced only by a complete new one.

Rules every writer of trace sets follows (collect_traces.py, import_specmoe_shards.py):

- `OutputLock`: an exclusive, non-blocking `flock` on the output directory for the whole run, so two
  writers never interleave; the second one gets one line naming the first one's pid. No lock file.
- Nothing in the output directory is touched before every input has been checked (`inspect_output`
  only reads). Files that no manifest lists belong to the user: never deleted, moved or overwritten.
- A fresh directory (no manifest) is written in place. An existing set is replaced through the
  staging directory `<out>/.incoming/`: the new set is written there, and only once its manifest says
  complete does `swap_in` replace the old one: the old manifest goes first (the old set is then
  invalid, never half-valid), then the files it listed, then the new files move in, manifest last.
  Every step can be repeated, so a swap cut short is finished by the next --resume or --overwrite.
- The swap waits for the old set's readers (an exclusive lock on its manifest against their shared ones,
  collection/traces/locks.py): a set being read is never replaced underneath its reader.
- Every file name comes from a checked manifest or this code, and becomes a path only through
  `common.paths.set_file`; nothing is followed through a symbolic link (`.incoming`, the files of either
  set): a link is refused before anything changes.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from collection.traces.format import (
    MANIFEST,
    REPLACED,
    ROUTER_WEIGHTS,
    SHARD_NAME,
    STAGING,
    Manifest,
    TraceFormatError,
    listed_file_entries,
    manifest_json,
    read_manifest,
)
from collection.traces.hidden_format import CODEC_FILE
from collection.traces.locks import lock_holders, locked_manifest, read_fd
from common.atomic import PARTIAL_SUFFIX, fsync_dir
from common.errors import UserError
from common.paths import check_writable, is_link, refuse_symlink, set_file


def human_size(n: float) -> str:
    """Bytes for a person: 812 B, 3.4 MiB, 2.41 GiB (never "0.0 GiB" for a small collection)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.{2 if unit in ('GiB', 'TiB') else 1}f} {unit}"
    return f"{int(n)} B"


def check_free_space(out: Path, need: int, advice: str) -> str:
    """Refuse a write of `need` bytes that the file system of `out` (or its nearest existing parent) cannot
    hold; returns "<need> to write, <free> free" for the log."""
    where = Path(out).absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > 0.98 * free:
        raise UserError(f"{out}: needs {human_size(need)} but only {human_size(free)} are free; {advice}")
    return f"{human_size(need)} to write, {human_size(free)} free"


# ----------------------------------------------------------------------------------------------
# one writer at a time


def _lock_holder(path: Path) -> str:
    """'script (pid N)' of whoever holds a flock on `path`."""
    return (lock_holders(path) or ["process (pid unknown)"])[0]


class OutputLock:
    """Exclusive lock on an output directory, held from `acquire` until `release` (or process exit)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.fd = -1

    def acquire(self) -> "OutputLock":
        if self.fd >= 0:
            return self
        fd = os.open(self.out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{self.out} is being written by another {_lock_holder(self.out)}; "
                            "wait for it to finish or choose another --output") from None
        self.fd = fd
        return self

    def release(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)  # closing the descriptor drops the lock

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------
# what the output directory holds, and where this run writes


@dataclass
class OutputState:
    out: Path
    manifest: Manifest | None         # the set in `out` (None: fresh directory)
    staged: Manifest | None           # the manifest in `out/.incoming` (None: no staging manifest)
    staging: bool                     # `out/.incoming` exists
    replaced: ReplacedSet | None      # a swap was cut short after moving the old manifest aside
    staging_names: frozenset[str] = frozenset()  # what `out/.incoming` holds

    @property
    def staging_dir(self) -> Path:
        return self.out / STAGING

    @property
    def swap_leftover(self) -> bool:
        """A swap cut short after its manifest moved in: the staging directory holds at most REPLACED."""
        return self.staging and self.staged is None and self.staging_names <= {REPLACED}

    @property
    def interrupted_swap(self) -> bool:
        return self.staged is not None and self.staged.complete


@dataclass(frozen=True)
class ReplacedSet:
    """What the manifest a cut-short swap moved aside says of the old set: the names of its files, all the swap
    still needs (the old set is already invalid)."""
    names: tuple[str, ...]
    unlisted_router_weights: bool  # a set written before router-weight checksums: its router weights are its own

    def files(self) -> list[str]:
        return list(self.names)

    def owned_files(self) -> list[str]:
        return self.files() + ([ROUTER_WEIGHTS] if self.unlisted_router_weights else [])


def replaced_set(staging: Path) -> ReplacedSet:
    """The old set's files, from the manifest a cut-short swap moved to `staging`/REPLACED. A name that is not a
    plain file name of its field is left out and never acted on: an older version stopped mid-swap on such
    manifests, and the swap they began must still be finishable by --resume or --overwrite."""
    path = staging / REPLACED
    try:
        d, _ = manifest_json(staging, name=REPLACED)
    except TraceFormatError as e:
        raise UserError(f"{e}; move {staging} away") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: not a JSON object; move {staging} away")
    entries = list(listed_file_entries(d))
    for _, why in entries:
        if why is not None:
            print(f"{path}: ignored, never a file of the set: {why}")
    plan = d.get("plan") if isinstance(d.get("plan"), dict) else {}
    return ReplacedSet(tuple(name for name, why in entries if why is None),
                       unlisted_router_weights=d.get("router_weights") is None and not plan.get("legacy_import"))


def _manifest_or_error(directory: Path, why: str) -> Manifest:
    try:
        return read_manifest(directory)
    except UserError as e:
        raise UserError(f"{e}; {why}, so nothing was touched: move that set away or choose another --output") from None


def inspect_output(out: Path, resume: bool, overwrite: bool, *, can_resume: bool = True) -> OutputState:
    """What `out` holds, read-only; refuses (one line) anything this run may not touch."""
    out = Path(out)
    check_writable("--output", out, "dir")
    staging = out / STAGING
    refuse_symlink(staging, "staging directory (a name reserved for the set being written)")
    if os.path.lexists(staging) and not staging.is_dir():
        raise UserError(f"{staging} is a file; this name is reserved for the set being written: move it away")
    manifest = staged = replaced = None
    if os.path.lexists(out / MANIFEST):
        manifest = _manifest_or_error(out, "which files belong to it is unknown")
        for name in manifest.owned_files():  # refused now, not when the new set is complete and the swap begins
            _regular_or_absent(set_file(out, name), "file of the set in --output")
    if os.path.lexists(staging / MANIFEST):
        staged = _manifest_or_error(staging, "it is the unfinished set of an earlier run")
    if os.path.lexists(staging / REPLACED):
        replaced = replaced_set(staging)
    names = frozenset(f.name for f in staging.iterdir()) if staging.is_dir() else frozenset()
    state = OutputState(out, manifest, staged, staging.is_dir(), replaced, names)
    flags = "--resume continues or finishes it, --overwrite replaces it" if can_resume else "--overwrite replaces it"
    if (manifest is not None or state.staging) and not (resume or overwrite):
        what = "traces" if manifest is not None else f"an unfinished replacement in {staging}"
        raise UserError(f"--output {out} already holds {what}; {flags}")
    return state


def expected_partials(names: list[str]) -> list[str]:
    """The exact temporary names a run writing `names` uses: the only `.partial` files it may remove."""
    return [n + PARTIAL_SUFFIX for n in names]


def owned_names(manifests: Iterable[Manifest | ReplacedSet | None]) -> set[str]:
    """The file names in the output that belong to trace sets: what any of `manifests` lists (each a checked plain
    name), its router weights where it owns them unlisted (`Manifest.owned_files`), and (where there is a set at
    all) the manifest. Any other file of a name this run writes is the user's."""
    found = [m for m in manifests if m is not None]
    return {name for m in found for name in m.owned_files()} | ({MANIFEST} if found else set())


def check_no_collision(directory: Path, names: list[str], owned: set[str]) -> None:
    """Refuse to write over a file that no manifest lists (a user's file that happens to bear a trace name; a
    symbolic link of that name is the user's too, whatever it points to)."""
    for name in names:
        path = set_file(directory, name)
        if name not in owned and os.path.lexists(path):
            raise UserError(f"{path} is listed by no manifest (not part of a trace set written "
                            "here); move it away or choose another --output")


def _regular_or_absent(path: Path, why: str) -> None:
    """Refuse (before anything changes) a path a swap would remove or move that is a directory or a link."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        refuse_symlink(path, why)
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path} is not a regular file ({why}); move it away, nothing was replaced")


def discard_staging(state: OutputState) -> None:
    """Remove an unfinished staged set: only regular files of names a trace set uses, then the directory itself."""
    staging = state.staging_dir
    refuse_symlink(staging, "staging directory")
    if not staging.is_dir():
        return
    ours = re.compile(rf"({SHARD_NAME.pattern}|{re.escape(MANIFEST)}|{re.escape(ROUTER_WEIGHTS)}|{re.escape(CODEC_FILE)})"
                      rf"({re.escape(PARTIAL_SUFFIX)})?|{re.escape(REPLACED)}")
    for f in staging.iterdir():
        if ours.fullmatch(f.name) and stat.S_ISREG(os.lstat(f).st_mode):  # a link or directory is not ours
            set_file(staging, f.name).unlink()
    try:
        staging.rmdir()
    except OSError:
        raise UserError(f"{staging} holds files this program did not write; move them away") from None
    state.staging, state.staged, state.replaced, state.staging_names = False, None, None, frozenset()


SWAP_WAITING = ("waiting for {holders}, which read this set: the new set replaces it when they finish (Ctrl-C leaves "
                f"the new set complete in {STAGING} for --resume)")


def swap_in(out: Path) -> Manifest:
    """Replace the set in `out` by the complete set in `out/.incoming`; repeatable after any interruption.

    Old set = the files its manifest lists (`Manifest.owned_files`). No file outside both sets is touched; a new
    file whose name a user's file holds, a link or a directory where a file of either set goes, stops the swap
    before anything changed. The swap waits for the set's readers (collection/traces/locks.py): a set being read is
    never replaced underneath its reader."""
    out = Path(out)
    staging = out / STAGING
    refuse_symlink(staging, "staging directory")
    new = read_manifest(staging)
    if not new.complete:
        raise UserError(f"{staging}: the new set is not complete; nothing was replaced")
    new_names = new.files()
    old_path, replaced = out / MANIFEST, staging / REPLACED
    for name in new_names:
        _regular_or_absent(set_file(staging, name), "file of the new set")
    held = -1
    try:
        starting = os.path.lexists(old_path)
        if starting:
            if os.path.lexists(replaced):
                raise UserError(f"{out} holds a manifest and {replaced}: an earlier swap was disturbed; "
                                "check which set you want and remove the other by hand")
            held = locked_manifest(old_path, exclusive=True, waiting=SWAP_WAITING)  # readers finish first
            try:
                old = Manifest.from_json(json.loads(read_fd(held)), old_path)
            except (ValueError, RecursionError) as e:
                raise UserError(f"{old_path}: unreadable manifest ({e}); nothing was replaced") from None
            old_names = list(dict.fromkeys(old.owned_files()))
            check_no_collision(out, [n for n in new_names if os.path.lexists(staging / n)], set(old_names))
        elif os.path.lexists(replaced):     # resuming a swap: the old list is where step 1 put it
            old_names = list(dict.fromkeys(replaced_set(staging).owned_files()))
        else:                               # nothing was here before
            old_names = []
            check_no_collision(out, [n for n in new_names if os.path.lexists(staging / n)], set())
        for name in dict.fromkeys(old_names + new_names):  # nothing below can stop half way on one of these
            _regular_or_absent(set_file(out, name), "file of the set being replaced")
        if starting:
            os.replace(old_path, replaced)  # 1. the old set is no longer valid; its file list goes with the swap
            fsync_dir(out)
            fsync_dir(staging)
        for name in old_names:              # 2. the old files, except new ones already moved in by an earlier attempt
            if name in new_names and not os.path.lexists(staging / name):
                continue
            set_file(out, name).unlink(missing_ok=True)
        fsync_dir(out)
        for name in new_names:              # 3. the new files, then the manifest that makes them a set
            if os.path.lexists(staging / name):
                os.replace(set_file(staging, name), set_file(out, name))
        fsync_dir(out)
        os.replace(staging / MANIFEST, old_path)
        fsync_dir(out)
        replaced.unlink(missing_ok=True)    # 4. the staging directory, now empty
        staging.rmdir()
        fsync_dir(out)
    finally:
        if held >= 0:
            os.close(held)                  # readers waiting on the old manifest now find the new one
    return new


def finish_swap_cleanup(state: OutputState) -> None:
    """A swap cut short after its manifest moved in leaves at most REPLACED in the staging directory."""
    if state.swap_leftover:
        refuse_symlink(state.staging_dir, "staging directory")
        _regular_or_absent(state.staging_dir / REPLACED, "manifest of a replaced set")
        (state.staging_dir / REPLACED).unlink(missing_ok=True)
        state.staging_dir.rmdir()
        state.staging, state.replaced, state.staging_names = False, None, frozenset()


def prepare_destination(state: OutputState, dest: Path, previous: Manifest | None, names: list[str]) -> None:
    """The first writes of a run: finish or drop what an earlier run left, then make `dest` and clear the
    exact `.partial` names this run writes there (cut short by an interruption: redone from their start)."""
    finish_swap_cleanup(state)
    if state.interrupted_swap:  # a replacement whose new set is complete: finished, whatever this run does next
        state.manifest = swap_in(state.out)
        state.staging, state.staged, state.replaced, state.staging_names = False, None, None, frozenset()
    if state.staging and previous is None:
        discard_staging(state)  # an unfinished replacement, which this run starts over or makes moot
    refuse_symlink(dest, "destination directory")
    dest.mkdir(parents=True, exist_ok=True)
    for name in expected_partials(names):
        _regular_or_absent(set_file(dest, name), "temporary file this run writes")
        set_file(dest, name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# a writer that builds a whole set in one run, never resumed (import_specmoe_shards.py, transcode_traces.py)


def open_output(out: Path, lock: OutputLock, overwrite: bool) -> OutputState:
    """Read what `out` holds (nothing is touched) and, where it exists, lock it: a second writer stops here."""
    state = inspect_output(out, resume=False, overwrite=overwrite, can_resume=False)
    if out.is_dir():
        lock.acquire()
    return state


@dataclass
class OneShot:
    """Where a one-run writer puts its new set (`dest`: `out` itself, or the staging directory when a set is there
    to replace), and how it ends: `finish` swaps the complete set in, `abandon` leaves `out` as it was found."""
    state: OutputState
    dest: Path
    created: bool  # `out` did not exist before: removed again on failure
    sizes: str     # the disk space line of `check_free_space`

    def finish(self) -> None:
        if self.dest != self.state.out:
            swap_in(self.state.out)  # the new set is complete: now, and only now, it replaces the old one

    def abandon(self, written: Iterable[str]) -> None:
        """After a failure: remove the files this run wrote (`written`, names in `dest`), its staging directory, and
        `out` if this run created it and it is empty."""
        for name in written:  # without a complete manifest they are no trace set
            path = set_file(self.dest, name)
            if not is_link(path):  # this run never made a link: one there is not its file
                path.unlink(missing_ok=True)
        if self.dest != self.state.out:
            discard_staging(self.state)
        if self.created:
            try:
                self.state.out.rmdir()
            except OSError:  # something else appeared in it meanwhile: not ours to delete
                pass


def start_one_shot(state: OutputState, lock: OutputLock, overwrite: bool, names: list[str], need: int,
                   advice: str) -> OneShot:
    """The first writes of a one-run writer, once every input has been checked: refuse a user's file of a name in
    `names` and a disk that cannot hold `need` bytes, make and lock `out`, check it did not change since
    `open_output`, and clear the destination's leftovers."""
    out = state.out
    dest = state.staging_dir if (state.manifest is not None or state.interrupted_swap) else out
    check_no_collision(out, names, owned_names((state.manifest, state.staged, state.replaced)))
    sizes = check_free_space(out, need, advice)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    if inspect_output(out, resume=False, overwrite=overwrite, can_resume=False) != state:
        raise UserError(f"{out} changed while this run was starting; run it again")
    prepare_destination(state, dest, None, names)
    return OneShot(state, dest, created, sizes)
