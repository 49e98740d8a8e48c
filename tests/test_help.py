"""Every script's and developer tool's --help shows its whole docstring with its line breaks, so its example
commands copy.

    pytest -q tests/test_help.py
"""
import ast
import importlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

# (folder, name): the pipeline's entry points and the developer tools, each a module with a main()
SCRIPTS = sorted((p.parent.name, p.stem) for folder in ("scripts", "tools") for p in (REPO / folder).glob("*.py")
                 if p.stem != "__init__")


def docstring_source_lines(folder: str, script: str) -> list[str]:
    """The docstring's lines as written in the file (not as Python evaluates them: a backslash at a line's
    end in a non-raw string joins two lines, which is the defect this guards against)."""
    src = (REPO / folder / f"{script}.py").read_text()
    node = ast.parse(src).body[0]
    assert isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant), f"{script}.py has no docstring"
    literal = ast.get_source_segment(src, node)
    body = literal[literal.index('"""') + 3: literal.rindex('"""')]
    return [line.rstrip() for line in body.splitlines() if line.strip()]


@pytest.mark.parametrize("folder,script", SCRIPTS, ids=[f"{f}/{s}" for f, s in SCRIPTS])
def test_help_shows_every_docstring_line_verbatim(folder, script, capsys):
    module = importlib.import_module(f"{folder}.{script}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    shown = {line.rstrip() for line in capsys.readouterr().out.splitlines()}
    missing = [line for line in docstring_source_lines(folder, script) if line not in shown]
    assert not missing, f"{folder}/{script}.py --help lost these docstring lines: {missing}"


def test_every_script_gives_a_copyable_command():
    for folder, script in SCRIPTS:
        commands = [l for l in docstring_source_lines(folder, script)
                    if l.lstrip().startswith((f"python {folder}/", "torchrun "))]  # torchrun: the multi-GPU scripts
        assert commands, f"{folder}/{script}.py: its docstring gives no `python {folder}/...` command"


# every shell script of the pipeline and the developer tools (the GPU run scripts of tools/gpu/)
SHELL_SCRIPTS = sorted(p.relative_to(REPO).as_posix() for folder in ("scripts", "tools")
                       for p in (REPO / folder).rglob("*.sh"))


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True,
                          text=True).stdout


def test_the_shell_scripts_are_found():
    assert {"tools/gpu/bench_full_size.sh", "tools/gpu/bench_io.sh", "tools/gpu/prefetch_gpu.sh",
            "tools/gpu/quality_gpu.sh"} <= set(SHELL_SCRIPTS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("sh", SHELL_SCRIPTS)
def test_shell_help_prints_usage_and_does_nothing_else(sh, flag, tmp_path):
    """--help (a 2.36 GiB collection once started where usage was due) prints the header and writes nothing: not in
    the working directory, not in TMPDIR or HOME, not in the repository."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir(), tmp.mkdir()
    before = git_status()
    proc = subprocess.run(["bash", str(REPO / sh), flag], cwd=cwd, capture_output=True, text=True, timeout=30,
                          env={"PATH": os.environ["PATH"], "TMPDIR": str(tmp), "HOME": str(tmp)})
    assert proc.returncode == 0, proc.stderr
    assert "Usage: " + sh in proc.stdout and proc.stderr == ""
    assert not any(cwd.iterdir()) and not any(tmp.iterdir())
    assert git_status() == before


@pytest.mark.parametrize("sh", SHELL_SCRIPTS)
def test_shell_refuses_an_option_as_output_and_wrong_arity(sh, tmp_path):
    for argv in (["--out"], ["-o", "x"], ["x", "-"], ["a", "b", "c"]):
        proc = subprocess.run(["bash", str(REPO / sh), *argv], cwd=tmp_path, capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert proc.stderr.strip().splitlines()[-1].startswith(f"{Path(sh).name}: error:"), (argv, proc.stderr)
        assert not any(tmp_path.iterdir()), argv
