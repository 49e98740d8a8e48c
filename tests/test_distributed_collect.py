"""Data-parallel collection under torchrun (2 and 4 processes, gloo, CPU) gives the very trace set one process writes,
also after one rank is killed and the run resumed; a device map is only a placement.

Byte-identical on the CPU needs the same kernels in every process: the one-process reference runs with
OMP_NUM_THREADS=1, as torchrun starts each of its processes (fp32 sums depend on the thread count).

    pytest -q tests/test_distributed_collect.py
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from collection.traces.format import TraceSet
from tests.conftest import REPO

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
PLAN = ["--datasets", "bundled", "--target_traces", "120", "--shard_size", "10", "--batch_size", "4",
        "--max_length", "48"]


def collect_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), *PLAN, "--output", str(out), *extra]


def torchrun(script: str, *args: str, nproc: int = 2) -> list[str]:
    """torchrun itself (python -m torch.distributed.run), on a free local port; `script` is in scripts/ or tools/."""
    path = REPO / "scripts" / f"{script}.py"
    if not path.is_file():
        path = REPO / "tools" / f"{script}.py"
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(path),
            *args]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_process") / "traces"
    run([sys.executable, str(REPO / "scripts" / "collect_traces.py"), *collect_args(tiny_model, out)])
    return out


@pytest.mark.parametrize("processes", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_several_processes_write_the_one_process_trace_set(tiny_model, reference, tmp_path, processes):
    """2 processes, and 4 (the code path of a 4-GPU node, here as 4 gloo processes on the CPU)."""
    out = tmp_path / f"p{processes}"
    proc = run(torchrun("collect_traces", *collect_args(tiny_model, out), nproc=processes))
    assert f"{processes} processes: shard i is collected by rank i % {processes}" in proc.stdout
    assert proc.stdout.count("done:") == 1  # rank 0 speaks for all
    ref, got = files(reference), files(out)
    # the same file names (12 shards, manifest, router weights; no partial manifest left) with the same bytes
    assert sorted(got) == sorted(ref) and len([n for n in got if n.startswith("shard_")]) == 12
    assert got == ref
    ts = TraceSet(out)
    assert ts.manifest.complete and len(ts.sequence_table()["seq_id"]) == 120


def rank_pid(torchrun_pid: int, rank: int) -> int | None:
    """The worker process torchrun started for `rank` (its environment says RANK=rank)."""
    children = []
    for task in Path(f"/proc/{torchrun_pid}/task").iterdir():
        children += (task / "children").read_text().split()
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("resume_processes", [2, 1])
def test_kill_one_rank_then_resume_gives_the_same_bytes(tiny_model, reference, tmp_path, resume_processes):
    out = tmp_path / "killed"
    proc = subprocess.Popen(torchrun("collect_traces", *collect_args(tiny_model, out)), cwd=REPO, env=ONE_THREAD,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # as soon as rank 1 has recorded a finished shard, SIGKILL it: torchrun then stops rank 0 and fails
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not (out / "manifest.rank00001.json").exists():
        time.sleep(0.005)
    victim = rank_pid(proc.pid, 1)
    assert victim is not None, "rank 1 was gone before it could be killed"
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=300) != 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and (out / "manifest.rank00001.json").exists()

    resume = collect_args(tiny_model, out, "--resume", "--stats-json", str(tmp_path / "resume.json"))
    if resume_processes == 2:
        proc = run(torchrun("collect_traces", *resume))
    else:  # the partial manifests of a 2-process run, resumed by one process
        proc = run([sys.executable, str(REPO / "scripts" / "collect_traces.py"), *resume])
    assert "resume: folded" in proc.stdout
    stats = json.loads((tmp_path / "resume.json").read_text())
    # the shards the killed run finished, rank 1's at least, were kept, not collected again
    assert 0 < stats["tokens"] < TraceSet(reference).manifest.plan["tokens"]
    assert files(out) == files(reference)  # same names and bytes; no .partial, no partial manifest left


def test_device_map_is_only_a_placement(tiny_model, reference, tmp_path):
    """An explicit module -> device map (all on the CPU here) goes through accelerate's placement and the
    per-device capture, and stores exactly what the plain run stores."""
    from scripts.collect_traces import main

    out = tmp_path / "mapped"
    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference ran with one thread
    try:
        main(collect_args(tiny_model, out, "--device-map", json.dumps(device_map)))
    finally:
        torch.set_num_threads(threads)
    assert files(out) == files(reference)


def test_capture_only_benchmark_runs_under_torchrun(tiny_model, tmp_path):
    """tools/bench_capture_parallel.py: one round per group of processes, one JSON from rank 0."""
    js = tmp_path / "capture.json"
    proc = run(torchrun("bench_capture_parallel", "--model", str(tiny_model), "--device", "cpu", "--batches", "2",
                        "--warmup", "1", "--seq-len", "16", "--json", str(js)))
    assert proc.stdout.count("capturing at once") == 2  # 1 process, then both; printed by rank 0 only
    res = json.loads(js.read_text())
    assert [r["gpus"] for r in res["rounds"]] == [1, 2]
    assert res["rounds"][1]["tokens"] == 2 * res["rounds"][0]["tokens"] == 2 * 2 * 8 * 16


LEAVER = """
import json, sys, time
from pathlib import Path
import torch.distributed as dist
from common.ranks import init_ranks

ranks = init_ranks()
if ranks.is_main:
    time.sleep(1.0)  # rank 0 still busy (writing the manifest, say) when rank 1 is done
entered = time.time()  # one clock for both processes (one host)
ranks.leave()
Path(sys.argv[1] + f".{ranks.rank}").write_text(
    json.dumps({"entered": entered, "left": time.time(), "initialized": dist.is_initialized()}))
"""


def test_ranks_leave_together_and_tear_the_group_down(tmp_path):
    """`Ranks.leave`, the last step of every torchrun script: a rank done early waits for the others, and the
    process group is gone before interpreter exit (tearing gloo down there once aborted a finished rank in CI)."""
    script = tmp_path / "leaver.py"
    script.write_text(LEAVER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "out")], cwd=REPO, env={**ONE_THREAD, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1)]
    assert not got[0]["initialized"] and not got[1]["initialized"]
    # rank 1 came first and left only once rank 0 had come too: cause and effect, not a wait measured against a
    # threshold (which would also count how far apart the two processes left init_process_group on a busy machine)
    assert got[1]["entered"] < got[0]["entered"] <= got[1]["left"]
