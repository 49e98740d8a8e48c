"""Killed at random moments (SIGKILL) and resumed, a collection ends byte-identical to an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from collection.traces.format import TraceSet
from tests.conftest import REPO


def collect_cmd(model, out, *extra):
    return [sys.executable, str(REPO / "scripts" / "collect_traces.py"), "--model", str(model), "--datasets", "bundled",
            "--target_traces", "180", "--shard_size", "15", "--batch_size", "4", "--max_length", "48",
            "--output", str(out), *extra]


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tiny_model, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(collect_cmd(tiny_model, ref), check=True, capture_output=True, cwd=REPO)
    out = tmp_path / "killed"
    rng = np.random.default_rng(1234)
    kills = 0
    for attempt in range(12):
        proc = subprocess.Popen(collect_cmd(tiny_model, out, "--resume"), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait until it is writing (a shard or manifest in progress), then kill at a random moment
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if any(p.name.endswith(".partial") or p.name.startswith("shard_") for p in out.glob("*")) if out.exists() else False:
                break
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0.0, 0.6)) if attempt else 0.0)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        manifest = out / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text())["complete"]:
            break
        if kills >= 5 and attempt >= 5:
            break
    assert kills >= 5
    subprocess.run(collect_cmd(tiny_model, out, "--resume"), check=True, capture_output=True, cwd=REPO)
    a, b = TraceSet(ref), TraceSet(out)
    assert b.manifest.complete and len(a) == len(b) == 12
    assert [s.sha256 for s in a.manifest.shards] == [s.sha256 for s in b.manifest.shards]  # identical bytes
    assert not list(out.glob("*.partial"))
    for i in range(len(b)):
        b.shard(i)  # every shard verifies against its checksum
