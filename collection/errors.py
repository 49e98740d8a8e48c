"""User-facing errors: bad input gets one clear line and a non-zero exit, never a traceback."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator


class UserError(Exception):
    """A problem with the user's input or environment, explained in one line."""


@contextlib.contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """Turn UserError (and its kin) into `prog: error: ...` on stderr and exit status 2.

    Anything else is a bug in this project and keeps its traceback.
    """
    try:
        yield
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
