r"""How fast routing imports and how long its report takes: a synthetic vLLM dump imported, then analyzed.

The dump is what vLLM gives for Qwen3-30B-A3B's shape (48 MoE layers, top-8 of 128 experts): one .npz per request
of int16 prompt and generation rows and token ids, written by numpy as a user's script would. Routing is random
with the previous token's experts reused at each layer with probability 0.3 (cache_sim.add_locality), so the
report has locality to find. Prints ids/s of import_routing.py (files read, checked, written as shards with
checksums) and the seconds of analyze_routing.py's numbers on 10^6 (token, layer) rows; docs/BENCHMARKS.md
("Routing import and report") holds the measured numbers.

    python tools/bench_import.py --ids 10000000 --rows 1000000
Seconds on a CPU:
    python tools/bench_import.py --ids 200000 --rows 20000 --workdir /tmp/bench-import-quick
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from common.errors import one_line_errors

L, K, E, TOKENS_PER_REQUEST = 48, 8, 128, 256  # Qwen3-30B-A3B's routing shape, requests of 256 tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", type=int, default=10_000_000, help="expert ids in the imported dump (10^7)")
    p.add_argument("--rows", type=int, default=1_000_000, help="(token, layer) rows of the analyzed set (10^6)")
    p.add_argument("--repeats", type=int, default=3, help="imports timed; the best is reported (3)")
    p.add_argument("--workdir", default=None, help="where the dumps and sets go (default: a temporary directory, "
                   "removed afterwards)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    return p.parse_args(argv)


def write_dump(d: Path, tokens: int, seed: int) -> None:
    """vLLM requests of TOKENS_PER_REQUEST tokens (the last shorter), half prompt and half generation."""
    from validation.prefetch.simulator import add_locality

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, start in enumerate(range(0, tokens, TOKENS_PER_REQUEST)):
        T = min(TOKENS_PER_REQUEST, tokens - start)
        ids = np.argsort(rng.random((T, L, E), dtype=np.float32), axis=2)[:, :, :K].astype(np.int64)
        first = np.zeros(T, dtype=bool)
        first[0] = True
        ids = add_locality(ids, first, 0.3, seed + i).astype(np.int16)
        np.savez(d / f"request_{i}.npz", prompt_routed_experts=ids[:T // 2], routed_experts=ids[T // 2:],
                 prompt_token_ids=rng.integers(0, 150000, T // 2), token_ids=rng.integers(0, 150000, T - T // 2 + 1))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from scripts.analyze_routing import main as analyze_main
    from scripts.import_routing import main as import_main

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-import-"))
    try:
        # --- the import: 10^7 ids of one dump, timed end to end (read, check, write shards, hash, manifest)
        tokens = -(-args.ids // (L * K))
        write_dump(work / "dump", tokens, 0)
        seconds, cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            import_main(["--from", "vllm", str(work / "dump"), "--output", str(work / "set"), "--overwrite",
                         "--num-experts", str(E)])
            seconds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        ids = tokens * L * K
        best = min(seconds)
        print(f"import: {ids:,} ids ({tokens:,} tokens x {L} layers x top-{K}) in {best:.2f} s wall (best of "
              f"{args.repeats}: {', '.join(f'{s:.2f}' for s in seconds)}): {ids / best / 1e6:.1f} M ids/s; "
              f"{min(cpu):.2f} CPU-s ({ids / min(cpu) / 1e6:.1f} M ids per CPU-second)")

        # --- the report on 10^6 (token, layer) rows; a first run compiles its numba kernels (cached on disk)
        write_dump(work / "dump-rows", -(-args.rows // L), 1)
        import_main(["--from", "vllm", str(work / "dump-rows"), "--output", str(work / "rows"), "--overwrite",
                     "--num-experts", str(E)])
        report, report_cpu = [], []
        for _ in range(2):
            t0, c0 = time.perf_counter(), time.process_time()
            analyze_main([str(work / "rows"), "--output-dir", str(work / "report"), "--model-config", "qwen3-30b-a3b"])
            report.append(time.perf_counter() - t0)
            report_cpu.append(time.process_time() - c0)
        rows = -(-args.rows // L) * L
        print(f"report: {rows:,} (token, layer) rows in {report[1]:.1f} s wall, {report_cpu[1]:.1f} CPU-s "
              f"({report[0]:.1f} s with the numba kernels compiled in the first run)")
        if args.json:
            Path(args.json).write_text(json.dumps({"ids": ids, "import_seconds": seconds, "import_cpu_seconds": cpu,
                                                   "ids_per_s": ids / best, "rows": rows, "report_seconds": report,
                                                   "report_cpu_seconds": report_cpu}, indent=2) + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    with one_line_errors("bench_import"):
        main()
