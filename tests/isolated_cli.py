"""Run a script's CLI body in a child process forked from a server that imported it once: a crash (a
segfault, a memory bomb) ends that child, not pytest, and each run costs milliseconds, not a torch import.

Lives outside the test modules so the fork server can import it by one name however pytest names those.
The server does no torch work before forking: a process forked after torch ran parallel code can hang.
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import re
from pathlib import Path

MEMORY_LIMIT = 3 << 30  # address space a child may add: a memory bomb fails fast instead of taking the machine


def _child(module: str, argv: list[str], err_path: str) -> None:
    import resource

    from common.errors import one_line_errors

    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (used + MEMORY_LIMIT, used + MEMORY_LIMIT))
    os.dup2(os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    with one_line_errors(module.rpartition(".")[2]):
        importlib.import_module(module).main(argv)


class IsolatedCLI:
    def __init__(self, module: str):
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it at import, in the server: stderr holds only errors
        self.module = module
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload([__name__, module])

    def __call__(self, argv: list[str], err_path: Path, timeout: float = 120) -> tuple[int | None, str]:
        """(exit code, stderr) of `module.main(argv)` under `one_line_errors`; -11 is a segfault, None a hang."""
        proc = self.ctx.Process(target=_child, args=(self.module, argv, str(err_path)))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            return None, err_path.read_text() if err_path.exists() else ""
        return proc.exitcode, err_path.read_text() if err_path.exists() else ""


class Scripts:
    """One `IsolatedCLI` per script module, made when first run: `run("collect_traces", argv, err_path)`."""

    def __init__(self):
        self.clis: dict[str, IsolatedCLI] = {}

    def run(self, script: str, argv: list, err_path: Path, timeout: float = 300) -> tuple[int | None, str]:
        if script not in self.clis:
            self.clis[script] = IsolatedCLI(f"scripts.{script}")
        return self.clis[script]([str(a) for a in argv], err_path, timeout)


PROGRESS = re.compile(r".*(\d|\?)\w*/s\]\s*$")  # a tqdm bar's text ("... 384tok [00:00, 10000.08tok/s]")


def assert_refused(code: int | None, err: str, prog: str, *says: str) -> None:
    """Exit status 2 and exactly one line on stderr, `prog: error: ...`, holding each of `says`; no traceback.
    Progress bars a run drew before it was refused (tqdm, redrawn with carriage returns) are not lines."""
    assert code == 2, f"exit {code} (-11: segfault, -9: killed, None: hung)\n{err[-3000:]}"
    lines = [piece for piece in re.split(r"[\r\n]", err) if piece.strip() and not PROGRESS.match(piece)]
    assert "Traceback" not in err and len(lines) == 1 and err.endswith("\n"), err[-3000:]
    line = lines[0]
    assert line.startswith(f"{prog}: error: "), err[-3000:]
    for s in says:
        assert s in line, (s, line)
