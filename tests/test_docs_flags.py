"""Every `python scripts/NAME.py --flag` (or tools/NAME.py) written in the README and docs is a flag the script has."""
import importlib
import re

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", REPO / "REPRODUCIBILITY.md", *sorted((REPO / "docs").glob("*.md"))]


def documented_commands() -> dict[str, set[str]]:
    flags: dict[str, set[str]] = {}
    for doc in DOCS:
        text = doc.read_text().replace("\\\n", " ")
        for m in re.finditer(r"\b(scripts|tools)/(\w+)\.py([^\n`|]*)", text):
            if (REPO / m.group(1) / f"{m.group(2)}.py").is_file():  # not placeholders such as NAME.py
                flags.setdefault(f"{m.group(1)}.{m.group(2)}", set()).update(
                    re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group(3)))
    return flags


COMMANDS = documented_commands()


def test_docs_name_the_main_scripts():
    assert {"scripts.collect_traces", "scripts.train_simple_predictor", "scripts.validate_coverage_analysis",
            "scripts.train_hybrid_predictor", "tools.train_proxy_moe", "scripts.compare_predictors", "tools.benchmark",
            "tools.make_random_checkpoint"} <= set(COMMANDS)


@pytest.mark.parametrize("script", sorted(COMMANDS))
def test_documented_flags_exist(script, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    missing = sorted(f for f in COMMANDS[script] if not re.search(rf"{re.escape(f)}\b", help_text))
    assert not missing, f"{script.replace('.', '/')}.py lacks documented flags {missing}"
