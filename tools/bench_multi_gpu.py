"""Several GPUs in one command: data-parallel collection, a device-mapped model, DDP training, each against one GPU.

Full-size Qwen1.5-MoE-A2.7B architecture with random weights (tools/make_random_checkpoint.py), bf16, every
MoE layer's ids, weights, logits and MoE input captured, shards written to --workdir (put it on a local disk).
About 6-8 minutes on a 2- or 4-GPU H100 machine (an estimate: not yet run). The steps, in order of priority (a step
that would start after --budget seconds is skipped, and the summary says so):
  1. the checkpoint (28.6 GB) in WORKDIR/qwen15, unless one is there already;
  2. collection on 1 GPU, then under torchrun on 2 (4 last) GPUs, the same plan: tokens/s of the collection
     loop (model loading excluded) and whether the shards are byte-identical to the 1-GPU run's;
  3. capture only, nothing written: 1, 2 (and 4) GPUs at once (tools/bench_capture_parallel.py);
  4. --device-map auto over 2 GPUs with --max-memory 18GiB per GPU (the 26.7 GiB of bf16 weights fit neither
     capped GPU): tokens/s, the placement, and scripts/compare_traces.py against the uncapped 1-GPU run;
  5. DDP training of the simple predictor on the 1-GPU trace set, 1 vs 2 (and 4) GPUs, with the seed's step
     (--batch-size 8) and a large step (--batch-rows 262144), both counted over all GPUs: rows/s of the epochs
     after the first (shard groups resident on the GPUs) and the best validation recall@4.
Writes small JSON files under OUT (one per step), OUT/logs/, OUT/summary.json and OUT/summary.md (the rows
of docs/BENCHMARKS.md, "Several GPUs"). Every step runs with NCCL_NVLS_ENABLE=0 and
TORCH_SYMM_MEM_DISABLE_MULTICAST=1: NVLink multicast stays off.

On a machine with 2 or 4 GPUs:
    python tools/bench_multi_gpu.py --workdir /tmp/w --out results/multi_gpu
Seconds on a CPU (the embedded model, 2 gloo processes; checks the script, measures nothing worth keeping):
    python tools/bench_multi_gpu.py --workdir /tmp/wcpu --out /tmp/wcpu/out --cpu-smoke
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from collection.model import EMBEDDED_MODEL
from common.atomic import atomic_write_bytes, atomic_write_json
from common.errors import UserError, one_line_errors

REPO = Path(__file__).resolve().parent.parent
FIXED_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "PYTHONUNBUFFERED": "1",
             "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
SKIPPABLE = {"collect-multi", "capture-only", "device-map", "train-seed", "train-large"}
STEP_TIMEOUT = 240  # seconds; the longest step (a collection with its model load) takes about a minute


class Steps:
    """Runs each step as a subprocess with its log, inside the time budget, and records what happened."""

    def __init__(self, out: Path, budget: float):
        self.out, self.budget, self.t0 = out, budget, time.perf_counter()
        self.record: list[dict[str, Any]] = []
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, name: str, cmd: list[str], gpus: list[int] | None, processes: int = 1) -> bool:
        if self.elapsed() > self.budget:
            self.record.append({"step": name, "skipped": f"time budget of {self.budget:.0f} s spent"})
            print(f"[{self.elapsed():5.0f} s] {name}: skipped (time budget)")
            return False
        # each process gets its share of the CPU cores (torchrun would give each one thread)
        env = {**os.environ, **FIXED_ENV, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        print(f"[{self.elapsed():5.0f} s] {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        with open(self.out / "logs" / f"{name}.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=STEP_TIMEOUT)
            except subprocess.TimeoutExpired:  # a hung step must not take the whole machine's time
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
                print(f"    killed after {STEP_TIMEOUT} s", file=log)
        self.record.append({"step": name, "command": " ".join(cmd[1:]), "gpus": gpus, "seconds": time.perf_counter() - t,
                            "returncode": rc})
        if rc not in (0, 1) or (rc == 1 and "compare" not in name):
            print(f"    failed (exit {rc}); see {self.out / 'logs' / (name + '.log')}")
        return rc == 0


def script_path(name: str) -> str:
    """A pipeline script (scripts/) or a developer tool (tools/) by name."""
    path = REPO / "scripts" / f"{name}.py"
    return str(path if path.is_file() else REPO / "tools" / f"{name}.py")


def script(name: str) -> list[str]:
    return [sys.executable, script_path(name)]


def launcher(name: str, processes: int) -> list[str]:
    if processes == 1:
        return script(name)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            script_path(name)]


def read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def identical_shards(a: Path, b: Path) -> tuple[int, int]:
    ma, mb = read(a / "manifest.json"), read(b / "manifest.json")
    if not ma or not mb:
        return 0, 0
    sa, sb = {s["file"]: s["sha256"] for s in ma["shards"]}, {s["file"]: s["sha256"] for s in mb["shards"]}
    return sum(sa.get(f) == h for f, h in sb.items()), len(sa)


def training_summary(results: dict[str, Any]) -> dict[str, Any]:
    hist = results["history"]
    resident = [h["epoch_rows_per_s"] for h in hist[1:]] or [hist[0]["epoch_rows_per_s"]]
    return {"processes": results.get("processes", 1), "epochs": len(hist),
            "rows_per_s_resident_median": float(np.median(resident)),
            "rows_per_s_first_epoch": hist[0]["epoch_rows_per_s"], "rows_per_s_overall": results["train/rows_per_s"],
            "best": results["best"], "final_train_loss": hist[-1]["train_loss"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="scratch directory on the local disk to measure (~45 GB)")
    p.add_argument("--out", required=True, help="directory for the JSON results, logs and summary")
    p.add_argument("--sequences", type=int, default=480, help="sequences per collection (480: ~96k tokens, ~9.5 GB)")
    p.add_argument("--shard-size", type=int, default=60, help="sequences per shard (60: 8 shards)")
    p.add_argument("--max-memory", default="18GiB", help="per-GPU cap of the device-map run (18GiB)")
    p.add_argument("--epochs", type=int, default=12, help="training epochs per run (12)")
    p.add_argument("--large-rows", type=int, default=262144, help="rows per step of the large-step training (262144)")
    p.add_argument("--max-gpus", type=int, default=4, help="use at most this many GPUs (4)")
    p.add_argument("--budget", type=float, default=450, help="start no step after this many seconds (450)")
    p.add_argument("--skip", default="", help="comma-separated steps not to run: collect-multi (the 2- and 4-GPU "
                   "collections), capture-only, device-map, train-seed, train-large (the 1-GPU collection always runs: "
                   "training reads its traces)")
    p.add_argument("--cpu-smoke", action="store_true", help="the embedded model on the CPU, tiny sizes: checks the script")
    args = p.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - SKIPPABLE:
        raise UserError(f"--skip {','.join(sorted(skip - SKIPPABLE))}: not a step (choose from {', '.join(sorted(SKIPPABLE))})")
    work, out = Path(args.workdir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps(out, args.budget)

    if args.cpu_smoke:
        counts, gpu_names = [1, 2], ["CPU"]
        device = ["--device", "cpu"]
        plan = ["--datasets", "bundled", "--target_traces", "48", "--shard_size", "12", "--batch_size", "4",
                "--max_length", "64"]
        capture_size = ["--device", "cpu", "--batches", "2", "--seq-len", "32"]
        args.epochs, args.large_rows = 2, 4096
        model = str(EMBEDDED_MODEL)
    else:
        n = min(torch.cuda.device_count(), args.max_gpus)
        if n < 2:
            raise UserError(f"{n} CUDA GPU(s) visible: this benchmark needs at least 2 (--cpu-smoke checks it on a CPU)")
        counts = [1, 2] + ([4] if n >= 4 else [])
        gpu_names = [torch.cuda.get_device_name(i) for i in range(n)]
        device = []
        plan = ["--datasets", "bundled", "--target_traces", str(args.sequences), "--shard_size", str(args.shard_size),
                "--batch_size", "8", "--max_length", "256"]
        capture_size = ["--batches", "20"]
        model = str(work / "qwen15")
        if not (work / "qwen15" / "config.json").is_file():
            steps.run("checkpoint", [*script("make_random_checkpoint"), "--preset", "qwen1.5-moe-a2.7b", "--device",
                                     "cuda", "--output", model, "--overwrite"], [0])

    def gpus(g: int) -> list[int] | None:
        return None if args.cpu_smoke else list(range(g))
    res: dict[str, Any] = {"gpus": gpu_names, "torch": torch.__version__, "args": vars(args), "collect": {},
                           "capture_only": None, "device_map": None, "train": {}}
    if not args.cpu_smoke:
        from tools.benchmark import disk_write_speed

        res["disk_write_bytes_per_s"], _ = disk_write_speed(work, 2 << 30)  # (write, hash) speeds

    def collect(g: int) -> None:
        traces = work / f"traces_{g}gpu"
        ok = steps.run(f"collect_{g}gpu", [*launcher("collect_traces", g), "--model", model, *plan, *device,
                                           "--output", str(traces), "--overwrite",
                                           "--stats-json", str(out / f"collect_{g}gpu.json")], gpus(g), g)
        stats = read(out / f"collect_{g}gpu.json") if ok else None
        if stats and g > 1:
            same, total = identical_shards(work / "traces_1gpu", traces)
            stats["identical_shards_vs_1gpu"] = f"{same}/{total}"
            if same < total:  # not byte-identical: are they equal within tolerance?
                steps.run(f"compare_{g}gpu", [*script("compare_traces"), str(work / "traces_1gpu"), str(traces),
                                              "--no-verify", "--json", str(out / f"compare_{g}gpu.json")], None)
                stats["compare_vs_1gpu"] = read(out / f"compare_{g}gpu.json")
            shutil.rmtree(traces, ignore_errors=True)
        res["collect"][g] = stats

    def train(g: int, step: str) -> None:
        name = f"train_{step}_{g}gpu"
        rows = ["--batch-size", "8"] if step == "seed" else ["--batch-rows", str(args.large_rows)]
        ckpt = work / name
        ok = steps.run(name, [*launcher("train_simple_predictor", g), "--traces", str(work / "traces_1gpu"), *rows,
                              "--lr", "5e-5", "--epochs", str(args.epochs), "--no-verify", *device,
                              "--output", str(ckpt), "--overwrite"], gpus(g), g)
        if ok:
            summary = training_summary(read(ckpt / "results.json"))
            atomic_write_json(out / f"{name}.json", summary)
            res["train"].setdefault(step, {})[g] = summary
        shutil.rmtree(ckpt, ignore_errors=True)

    collect(1)
    if "collect-multi" not in skip:
        collect(2)
    if "capture-only" not in skip:
        steps.run("capture_only", [*launcher("bench_capture_parallel", max(counts)), "--model", model, *capture_size,
                                   "--json", str(out / "capture_only.json")], gpus(max(counts)), max(counts))
        res["capture_only"] = read(out / "capture_only.json")
    if not args.cpu_smoke and "device-map" not in skip:
        mapped = work / "traces_devmap"
        if steps.run("collect_devmap", [*script("collect_traces"), "--model", model, *plan, "--device-map", "auto",
                                        "--max-memory", args.max_memory, "--output", str(mapped), "--overwrite",
                                        "--stats-json", str(out / "collect_devmap.json")], [0, 1]):
            steps.run("compare_devmap", [*script("compare_traces"), str(work / "traces_1gpu"), str(mapped),
                                         "--no-verify", "--json", str(out / "compare_devmap.json")], None)
        res["device_map"] = {"collect": read(out / "collect_devmap.json"), "compare": read(out / "compare_devmap.json")}
        shutil.rmtree(mapped, ignore_errors=True)
    train_steps = [step for step in ("seed", "large") if f"train-{step}" not in skip]
    for step in train_steps:
        for g in (1, 2):
            train(g, step)
    if 4 in counts:
        if "collect-multi" not in skip:
            collect(4)
        for step in train_steps:
            train(4, step)

    res["steps"] = steps.record
    res["seconds"] = steps.elapsed()
    atomic_write_json(out / "summary.json", res)
    table = summary_table(res, counts)
    atomic_write_bytes(out / "summary.md", table.encode())
    print(table)


def summary_table(res: dict[str, Any], counts: list[int]) -> str:
    """The rows for docs/BENCHMARKS.md, 'Several GPUs' (a dash where a step did not run)."""
    def cell(x: float | None, fmt: str = ",.0f") -> str:
        return "-" if x is None else format(x, fmt)

    def ratio(values: dict[int, float | None], g: int) -> str:
        a, b = values.get(1), values.get(g)
        return "-" if not a or b is None else f"{b / a:.2f}x"

    rows: list[tuple[str, dict[int, float | None]]] = []
    collect = {g: (s or {}).get("tokens_per_s") for g, s in res["collect"].items()}
    rows.append(("data-parallel collection, shards written to local disk (tokens/s)", collect))
    cap = res.get("capture_only") or {"rounds": []}
    rows.append(("capture only, nothing written (tokens/s)", {r["gpus"]: r["tokens_per_s"] for r in cap["rounds"]}))
    for step, label in (("seed", "DDP training, the seed's step (batch 8 sequences overall; rows/s, epochs 2+)"),
                        ("large", f"DDP training, {res['args']['large_rows']:,} rows per step overall (rows/s, epochs 2+)")):
        per = res["train"].get(step, {})
        rows.append((label, {g: s["rows_per_s_resident_median"] for g, s in per.items()}))
        rows.append((f"  best validation recall@4 ({step} step)", {g: s["best"].get("recall@4") for g, s in per.items()}))
    head = "| | " + " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in counts) + " | " + \
        " | ".join(f"{g} vs 1" for g in counts[1:]) + " |"
    lines = [f"GPUs: {', '.join(res['gpus'])}; torch {res['torch']}", "", head,
             "|" + "---|" * (1 + len(counts) + len(counts) - 1)]
    for label, values in rows:
        fmt = ".4f" if "recall" in label else ",.0f"
        lines.append(f"| {label} | " + " | ".join(cell(values.get(g), fmt) for g in counts) + " | "
                     + " | ".join("-" if "recall" in label else ratio(values, g) for g in counts[1:]) + " |")
    for g, s in res["collect"].items():
        if s and g > 1:
            lines.append(f"\n{g}-GPU collection vs 1 GPU: {s.get('identical_shards_vs_1gpu')} shards byte-identical"
                         + (f"; compare_traces: {compact(s['compare_vs_1gpu'])}" if s.get("compare_vs_1gpu") else ""))
    dm = res.get("device_map") or {}
    if dm.get("collect"):
        c = dm["collect"]
        lines.append(f"\n--device-map auto --max-memory {c['max_memory']}: {c['tokens_per_s']:,.0f} tokens/s; "
                     f"placement {c['placement']}; vs the uncapped 1-GPU run: {compact(dm.get('compare'))}")
    if "disk_write_bytes_per_s" in res:
        lines.append(f"\nlocal disk: {res['disk_write_bytes_per_s'] / 1e9:.2f} GB/s sequential write with fsync")
    skipped = [s["step"] for s in res["steps"] if "skipped" in s]
    failed = [s["step"] for s in res["steps"] if s.get("returncode") not in (None, 0) and "compare" not in s["step"]]
    if skipped or failed:
        lines.append(f"\nnot measured: skipped {skipped or 'none'}, failed {failed or 'none'} (logs/)")
    return "\n".join(lines) + "\n"


def compact(c: dict[str, Any] | None) -> str:
    if not c:
        return "not run"
    return (f"{c['differing_rows']} of {c['rows']} rows with other experts ({c['tie_rows']} near ties, "
            f"{c['mismatch_rows']} mismatches), weights max |diff| {c['weights_max_abs_diff']:.3g}, hidden max relative "
            f"diff {c['hidden_max_rel_diff']:.3g} on {c['clean_fraction']:.2%} clean rows: "
            f"{'within' if c['within_tolerance'] else 'OUTSIDE'} tolerance")


if __name__ == "__main__":
    with one_line_errors("bench_multi_gpu"):
        main()
