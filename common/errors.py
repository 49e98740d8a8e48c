"""User-facing errors: bad input gets one clear line and a non-zero exit, never a traceback."""
from __future__ import annotations

import contextlib
import errno
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

# a full disk or an exhausted quota: the user's environment, not a bug, so one line like any bad input
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
# a destination this user may not write (checked before work starts, common/paths.py check_writable; this
# is the last resort for one that changed meanwhile or that a permission check cannot see, e.g. a read-only mount)
NO_ACCESS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class UserError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def choices_list(flag: str, text: str, allowed: Iterable[str]) -> list[str]:
    """The comma list `text` given to --`flag`, every item one of `allowed` (else one line naming the first that
    is not, and the choices)."""
    allowed = list(allowed)
    items = [x for x in text.split(",") if x]
    for x in items:
        if x not in allowed:
            raise UserError(f"--{flag}: unknown {x!r} (choose from {', '.join(allowed)})")
    return items


def number_flag(flag: str, value: float | None, low: float, high: float, *, above_low: bool = False) -> None:
    """One line unless --`flag`'s `value` (None: unset) is a finite number in [low, high] ((low, high] with
    `above_low`): NaN, an infinity or a size no run needs would silently change a result, or exhaust memory."""
    if value is None:
        return
    ok = math.isfinite(value) and (value > low if above_low else value >= low) and value <= high
    if not ok:
        if high == math.inf:
            raise UserError(f"--{flag} {value}: must be a finite number {'>' if above_low else '>='} {_plain(low)}")
        raise UserError(f"--{flag} {value}: must be a number in {'(' if above_low else '['}{_plain(low)}, "
                        f"{_plain(high)}]")


def _plain(x: float) -> str:
    """A bound as a person writes it: 1,048,576 rather than 1.04858e+06 (an integer), else %g."""
    return f"{int(x):,}" if float(x).is_integer() and abs(x) >= 1e4 else f"{x:g}"


def disk_full(path: Path | str, e: OSError) -> UserError:
    """The one-line error for a write that ran out of space; the writer has already removed its `.partial`."""
    return UserError(f"{path}: {os.strerror(e.errno).lower()} while writing it (nothing partial was kept); "
                     "free some space or write elsewhere")


def close_progress_bars() -> None:
    """Close the progress bars a refused run left open, so its one error line starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error itself
            pass


@contextlib.contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """Turn UserError (and its kin) into `prog: error: ...` on stderr and exit status 2.

    A full disk, or a path this user may not write, is the user's environment too, wherever it strikes.
    Anything else is a bug in this project and keeps its traceback.
    """
    try:
        yield
    except UserError as e:
        close_progress_bars()
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        close_progress_bars()
        if e.errno in NO_ACCESS:
            print(f"{prog}: error: {e.filename or 'a file'}: {os.strerror(e.errno).lower()}; choose a path this user "
                  "may write", file=sys.stderr)
            sys.exit(2)
        if e.errno not in DISK_FULL:
            raise
        print(f"{prog}: error: {disk_full(e.filename or 'a file', e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # its message, if any, says what was kept and how to go on
        print(f"{prog}: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        sys.exit(130)
