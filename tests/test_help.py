"""Every script's and developer tool's --help shows its whole docstring with its line breaks, so its example
commands copy.

    pytest -q tests/test_help.py
"""
import ast
import importlib
import subprocess

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


def test_bench_full_size_help():
    sh = REPO / "tools" / "gpu" / "bench_full_size.sh"
    proc = subprocess.run(["bash", str(sh), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: tools/gpu/bench_full_size.sh WORKDIR OUTDIR" in proc.stdout
    bad = subprocess.run(["bash", str(sh)], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("bench_full_size.sh: error:")
