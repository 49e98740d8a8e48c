"""Every `python scripts/NAME.py --flag` written in the README and docs is a flag the script has."""
import importlib
import re

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", REPO / "REPRODUCIBILITY.md", *sorted((REPO / "docs").glob("*.md"))]


def documented_commands() -> dict[str, set[str]]:
    flags: dict[str, set[str]] = {}
    for doc in DOCS:
        text = doc.read_text().replace("\\\n", " ")
        for m in re.finditer(r"scripts/(\w+)\.py([^\n`|]*)", text):
            if (REPO / "scripts" / f"{m.group(1)}.py").is_file():  # not placeholders such as NAME.py
                flags.setdefault(m.group(1), set()).update(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group(2)))
    return flags


COMMANDS = documented_commands()


def test_docs_name_the_main_scripts():
    assert {"collect_traces", "train_simple_predictor", "validate_coverage_analysis", "train_hybrid_predictor",
            "train_proxy_moe", "compare_predictors", "benchmark", "make_random_checkpoint"} <= set(COMMANDS)


@pytest.mark.parametrize("script", sorted(COMMANDS))
def test_documented_flags_exist(script, capsys):
    module = importlib.import_module(f"scripts.{script}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    missing = sorted(f for f in COMMANDS[script] if not re.search(rf"{re.escape(f)}\b", help_text))
    assert not missing, f"scripts/{script}.py lacks documented flags {missing}"
