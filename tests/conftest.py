"""Fixtures built by the project's own code: a tiny Qwen2-MoE (same routing shape as Qwen1.5-MoE:
60 experts, top-4, shared expert) and traces collected from it on the bundled corpus.

    pytest -q                    # the whole CPU suite
    pytest -q tests/test_format.py
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import Phase, settings

# tools/mutation.py runs the suite with --hypothesis-profile=mutation: a planted bug must be found the same way
# every run (derandomized), and a failure needs only to be seen, not shrunk to its smallest example (minutes)
settings.register_profile("mutation", derandomize=True, phases=[Phase.explicit, Phase.reuse, Phase.generate])

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_script(script: str, *args: str, check: bool = True, env: dict | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `scripts/<script>.py` (or the developer tool `tools/<script>.py`) as a user would, from the repository
    root."""
    path = REPO / "scripts" / f"{script}.py"
    if not path.is_file():
        path = REPO / "tools" / f"{script}.py"
    proc = subprocess.run([sys.executable, str(path), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-moe"
    from tools.make_random_checkpoint import main

    main(["--preset", "qwen2moe-tiny", "--dtype", "float32", "--output", str(out), "--seed", "0"])
    return out


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    from collection.model import EMBEDDED_MODEL

    return EMBEDDED_MODEL


def build_tiny_traces(out: Path) -> Path:
    """The embedded default (the trained model, the default --model) on the bundled corpus: 72 sequences
    (12 per domain) in 3 shards, every layer's hidden state stored. On the CPU in fp32 on every machine:
    tests compare them with fresh fp32 forwards, and bf16 on a GPU would flip near-tied experts."""
    from scripts.collect_traces import main

    main(["--datasets", "bundled", "--target_traces", "72", "--shard_size", "24", "--batch_size", "8",
          "--max_length", "64", "--device", "cpu", "--dtype", "float32", "--output", str(out)])
    return out


@pytest.fixture(scope="session")
def tiny_traces(tmp_path_factory) -> Path:
    """`build_tiny_traces`, or a copy of $MOE_TEST_TINY_TRACES when set: a set built by it once, for tools that
    run the suite many times (tools/mutation.py). A copy, so that no test can change the shared one."""
    out = tmp_path_factory.mktemp("traces") / "tiny"
    if os.environ.get("MOE_TEST_TINY_TRACES"):
        shutil.copytree(os.environ["MOE_TEST_TINY_TRACES"], out)
        return out
    return build_tiny_traces(out)


def transcoded(tiny_traces: Path, tmp_path_factory, fmt: str) -> Path:
    out = tmp_path_factory.mktemp("traces") / fmt
    from scripts.transcode_traces import main

    main(["--traces", str(tiny_traces), "--hidden-format", fmt, "--output", str(out), "--device", "cpu"])
    return out


@pytest.fixture(scope="session")
def tiny_compact_traces(tiny_traces, tmp_path_factory) -> Path:
    """`tiny_traces` with its hidden states re-encoded in a compact format (hadamard-3.5bit), by the encoder
    collection uses."""
    return transcoded(tiny_traces, tmp_path_factory, "hadamard-3.5bit")


@pytest.fixture(scope="session")
def tiny_pca_traces(tiny_traces, tmp_path_factory) -> Path:
    """`tiny_traces` in the fitted format pca-3.5bit (its codec fitted on the first shard, as collection does)."""
    return transcoded(tiny_traces, tmp_path_factory, "pca-3.5bit")


@pytest.fixture(scope="session")
def tiny_pca_router_traces(tiny_traces, tmp_path_factory) -> Path:
    """`tiny_traces` in pca-router-3.5bit (fitted with the set's router weights; its codec file holds the
    decoding matrices too)."""
    return transcoded(tiny_traces, tmp_path_factory, "pca-router-3.5bit")
