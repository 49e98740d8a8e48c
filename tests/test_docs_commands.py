"""Every command the README, REPRODUCIBILITY.md and docs/*.md show runs as written.

A command is a line in a code block (backslash continuations joined) or an inline code span that starts with
`python scripts/`, `python tools/`, `make `, `torchrun ` or a GPU run script (`tools/gpu/NAME.sh`, perhaps after
`VAR=value`). Each is dry-run: its script exists and answers --help, and every flag it uses is in that help; a
make target is in the Makefile. The seconds-long CPU commands of the scripts' docstrings (under a "Seconds on a
CPU" line) really run, in order, in a temporary directory, and must reach a sane result (slow).

    pytest -q tests/test_docs_commands.py            # the dry runs (seconds)
    pytest -q -m slow tests/test_docs_commands.py    # the seconds-long CPU commands, really run
"""
from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", REPO / "REPRODUCIBILITY.md", *sorted((REPO / "docs").glob("*.md"))]
STARTS = ("python scripts/", "python tools/", "make ", "torchrun ", "tools/gpu/")
ENV = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+")  # VAR=value prefixes of a command


def command_of(text: str) -> str | None:
    """`text` (one joined line) as a command, without its VAR=value prefix, or None if it is not one."""
    text = ENV.sub("", text.strip())
    if text.startswith("tools/gpu/") and not text.split()[0].endswith(".sh"):
        return None  # the folder named in prose, not a command
    if text.startswith(("scripts/", "tools/")) and text.split()[0].endswith(".py") and len(text.split()) > 1:
        text = "python " + text  # a script named with its flags in prose: the same command
    return text if text.startswith(STARTS) else None


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every command in the documents' code blocks (fenced or indented) and inline code spans."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        blocks = re.findall(r"^ *```[a-z]*\n(.*?)^ *```", text, flags=re.M | re.S)
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                if (cmd := command_of(line)) is not None:
                    found.append((doc.name, cmd))
        prose = re.sub(r"^ *```[a-z]*\n.*?^ *```", "", text, flags=re.M | re.S)
        for line in prose.replace("\\\n", " ").splitlines():  # indented code blocks (4 spaces)
            if line.startswith("    ") and (cmd := command_of(line)) is not None:
                found.append((doc.name, cmd))
        for span in re.findall(r"`([^`]+)`", prose):
            if (cmd := command_of(span.replace("\n", " "))) is not None:
                found.append((doc.name, cmd))
    return found


def words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def program(argv: list[str]) -> tuple[str, list[str]]:
    """("make" | "script" | "shell", what it runs) and the arguments that belong to it."""
    if argv[0] == "make":
        return "make", argv[1:]
    if argv[0].endswith(".sh"):
        return "shell", argv
    script = next(i for i, w in enumerate(argv) if w.endswith(".py"))  # python X.py or torchrun [its flags] X.py
    return "script", argv[script:]


COMMANDS = documented_commands()
IDS = [f"{where}: {cmd[:90]}" for where, cmd in COMMANDS]


def help_text(script: str, capsys) -> str:
    """`script` (scripts/NAME.py or tools/NAME.py) --help, as its main prints it; it must exit 0."""
    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0, f"{script} --help exited {exit_.value.code}"
    return capsys.readouterr().out


def test_the_documents_show_the_pipeline():
    scripts = {program(words(cmd))[1][0] for _, cmd in COMMANDS if program(words(cmd))[0] == "script"}
    assert {"scripts/collect_traces.py", "scripts/train_simple_predictor.py", "scripts/train_hybrid_predictor.py",
            "scripts/train_anchored_predictor.py", "scripts/validate_coverage_analysis.py",
            "scripts/compare_predictors.py", "scripts/simulate_prefetch.py", "tools/train_proxy_moe.py",
            "tools/benchmark.py", "tools/make_random_checkpoint.py"} <= scripts
    assert ("README.md", "make demo") in {(w, c.split("#")[0].strip()) for w, c in COMMANDS}


@pytest.mark.parametrize("where,command", COMMANDS, ids=IDS)
def test_documented_command_dry_runs(where, command, capsys):
    argv = words(command)
    kind, args = program(argv)
    if kind == "make":
        targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))
        asked = [a for a in args if "=" not in a and not a.startswith("-")]
        assert asked and set(asked) <= targets, f"{where}: make {' '.join(asked)}: no such target"
        return
    if kind == "shell":
        assert (REPO / args[0]).is_file(), f"{where}: {args[0]} does not exist"
        return
    script, flags = args[0], [a.split("=")[0] for a in args[1:] if a.startswith("--")]
    assert (REPO / script).is_file(), f"{where}: {script} does not exist"
    shown = help_text(script, capsys)
    missing = sorted(f for f in set(flags) if not re.search(rf"{re.escape(f)}(?![\w-])", shown))
    assert not missing, f"{where}: {script} has no {', '.join(missing)} (command: {command})"


# --- the seconds-long CPU commands of the docstrings, really run -------------------------------------------------

def seconds_commands(path: Path) -> list[str]:
    """The commands under a paragraph starting "Seconds" in `path`'s docstring (continuations joined): the indented
    command lines that follow it, up to the next unindented line."""
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree, clean=False) or ""
    lines = doc.replace("\\\n", " ").splitlines()
    commands, state = [], "out"  # out -> marker (the paragraph that says "Seconds") -> commands
    for line in lines:
        command = line.startswith("    ") and line.split()[0] in ("python", "torchrun")
        if line.startswith("Seconds"):
            state = "marker"
        elif state != "out" and command:
            commands.append(line.strip())
            state = "commands"
        elif state == "commands" or line.startswith(" "):
            state = "out"
    return commands


SCRIPTS = sorted(p for folder in ("scripts", "tools") for p in (REPO / folder).glob("*.py") if p.stem != "__init__")
# the newcomer's path, run in this order in one directory (each reads what the ones before wrote)
RUN_IN_ORDER = ["collect_traces", "train_simple_predictor", "train_hybrid_predictor", "train_anchored_predictor",
                "validate_coverage_analysis", "compare_traces", "simulate_prefetch", "transcode_traces"]
# the developer tools' seconds-long commands: run by their own tests with the same flags on smaller inputs
RUN_ELSEWHERE = {
    "compare_predictors": "tests/test_scripts_smoke.py::test_compare_predictors_writes_table_json_and_figure",
    "make_random_checkpoint": "tests/conftest.py::tiny_model",
    "benchmark_predictor_cost": "tests/test_anchored.py",
    "bench_capture_parallel": "tests/test_distributed_collect.py",
    "bench_families": "tests/test_families.py",
    "bench_multi_gpu": "its --cpu-smoke (two gloo processes, minutes)",
    "compare_hidden_formats": "tests/test_hidden_format.py",
    "mutation": "make mutation",
    "sweep_predictors": "tests/test_anchored.py",
    "train_proxy_moe": "tests/test_scripts_smoke.py::test_train_proxy_moe_smoke",
    "analyze_routing": "tests/test_routing_report.py::test_collected_and_imported_routing_give_the_same_report",
    "generate_offloaded": "tests/test_engine.py::test_the_script_prints_text_and_the_table",
    "bench_offload": "tests/test_bench_offload.py::test_a_tiny_run_writes_every_row",
    "bench_import": "tests/test_import_routing.py::test_the_import_benchmark_prints_its_rates",
    "retrain_bundle": "tests/test_retrain.py::test_pack_cuts_pieces_and_unpack_restores_every_byte",
}


def test_every_seconds_long_command_is_run_here_or_by_a_named_test():
    marked = {p.stem for p in SCRIPTS if seconds_commands(p)}
    assert marked == set(RUN_IN_ORDER) | set(RUN_ELSEWHERE), marked ^ (set(RUN_IN_ORDER) | set(RUN_ELSEWHERE))


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = words(command)
    assert argv[0] == "python", command
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / argv[1]), *argv[2:]], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


@pytest.mark.slow
def test_the_seconds_long_cpu_commands_run_as_written_and_learn(tmp_path):
    """In a fresh directory, every pipeline script's quick command in turn; each trainer's best validation
    recall@4 is well above random (4/60) and none warns it is near random; the quick checkpoint validates."""
    for name in RUN_IN_ORDER:
        for command in seconds_commands(REPO / "scripts" / f"{name}.py"):
            command = command.replace("/tmp/", f"{tmp_path}/")  # transcode's example writes to /tmp
            proc = run(command, tmp_path)
            assert "of random" not in proc.stderr, f"{command}: {proc.stderr[-500:]}"
    for kind in ("simple", "hybrid", "anchored"):
        res = json.loads((tmp_path / "models" / f"{kind}_checkpoints" / "quick" / "results.json").read_text())
        assert res["best"]["recall@4"] > 4 / 60 + 0.05, (kind, res["best"])
    coverage = json.loads((tmp_path / "models" / "simple_checkpoints" / "quick" / "coverage_metrics.json").read_text())
    assert coverage["model_type"] == "simple" and coverage["recall@4"] > 4 / 60 + 0.05
    assert json.loads((tmp_path / "results" / "prefetch-quick" / "prefetch.json").read_text())["rows"]
