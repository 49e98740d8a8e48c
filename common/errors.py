"""User-facing errors: bad input gets one clear line and a non-zero exit, never a traceback."""
from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

# a full disk or an exhausted quota: the user's environment, not a bug, so one line like any bad input
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


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


def disk_full(path: Path | str, e: OSError) -> UserError:
    """The one-line error for a write that ran out of space; the writer has already removed its `.partial`."""
    return UserError(f"{path}: {os.strerror(e.errno).lower()} while writing it (nothing partial was kept); "
                     "free some space or write elsewhere")


@contextlib.contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """Turn UserError (and its kin) into `prog: error: ...` on stderr and exit status 2.

    A full disk is the user's environment too, wherever it strikes. Anything else is a bug in this
    project and keeps its traceback.
    """
    try:
        yield
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        print(f"{prog}: error: {disk_full(e.filename or 'a file', e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # its message, if any, says what was kept and how to go on
        print(f"{prog}: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        sys.exit(130)
