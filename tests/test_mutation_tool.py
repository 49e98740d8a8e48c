"""tools/mutation.py: every planted bug still applies to the code as it is now (so a refactor that changes the
text fails here, at once, rather than silently switching the mutation off), and the tool's own checks work.
The kills themselves take minutes and are `make mutation`'s job."""
import pytest

from common.errors import UserError
from tests.conftest import REPO, run_script
from tools.mutation import MUTATIONS, Mutation, apply_mutation, check_mutation, copy_files


def test_every_mutation_still_applies_and_names_real_tests():
    assert len(MUTATIONS) >= 12 and len({m.name for m in MUTATIONS}) == len(MUTATIONS)
    for m in MUTATIONS:
        check_mutation(REPO, m)
        assert m.old != m.new and m.tests
    first_five = {"optimizer-never-steps", "router-reuse-own-layer", "layer-aware-ignores-lookahead",
                  "previous-token-ignores-previous", "hybrid-own-routing-zeroed"}
    assert first_five <= {m.name for m in MUTATIONS}


def test_stale_mutations_and_missing_tests_are_errors():
    stale = Mutation("stale", "collection/traces/rows.py", "text that is not there", "x", ("tests/test_metrics.py::test_x",), "")
    with pytest.raises(UserError, match="occurs 0 times in collection/traces/rows.py"):
        check_mutation(REPO, stale)
    wrong_test = Mutation("t", "collection/traces/rows.py", "np.where(pos > 0,", "x", ("tests/test_metrics.py::test_nope",), "")
    with pytest.raises(UserError, match="test_nope does not exist"):
        check_mutation(REPO, wrong_test)


def test_a_mutation_changes_only_its_copy(tmp_path):
    m = next(m for m in MUTATIONS if m.name == "recall-divided-by-k")
    copy_files(REPO, tmp_path, [m.file])
    apply_mutation(tmp_path, m)
    assert m.new in (tmp_path / m.file).read_text() and m.old not in (tmp_path / m.file).read_text()
    assert m.old in (REPO / m.file).read_text()


def test_list_and_unknown_names():
    proc = run_script("mutation", "--list")
    assert "optimizer-never-steps" in proc.stdout and "killed by tests/test_behaviour.py::" in proc.stdout
    proc = run_script("mutation", "--only", "no-such-bug", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("mutation: error: --only no-such-bug")


def test_only_mutations_that_read_the_shared_traces_get_them(tmp_path):
    """The shared tiny traces are built by the unmutated code: a mutation of how traces are written must have its
    tests build their own (with the bug in), or the bug never reaches what they read."""
    from tools.mutation import shared_traces

    reads = Mutation("r", "collection/traces/rows.py", "a", "b", ("tests/test_metrics.py::test_x",), "", traces=True)
    writes = Mutation("w", "collection/capture.py", "a", "b", ("tests/test_capture.py::test_x",), "")
    assert shared_traces(None, tmp_path) == tmp_path and shared_traces(reads, tmp_path) == tmp_path
    assert shared_traces(writes, tmp_path) is None


def test_a_mutation_runs_its_named_tests_slow_ones_included(tmp_path, monkeypatch):
    """`make test` leaves the slow tests out (-m "not slow"); a mutation's run must not: no marker expression,
    and pyproject's addopts emptied so that none can come from there."""
    import subprocess

    import tools.mutation as tool

    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "")
    monkeypatch.setattr(tool.subprocess, "run", fake_run)
    tool.run_tests(tmp_path, tmp_path, None, ("tests/test_docs_commands.py::test_x",), None, 10, [])
    [cmd] = commands
    args = cmd[cmd.index("pytest") + 1:]  # python -m pytest ARGS
    assert "-m" not in args and args[args.index("-o") + 1] == "addopts="
    assert args[-1] == "tests/test_docs_commands.py::test_x"
