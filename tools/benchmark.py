r"""Benchmark every stage against the model's own speed; prints a table and writes JSON.

a) collection: tokens/s of the bare forward pass vs forward + capture + shard writing (same model,
   same batches), and of the durable path collect_traces.py runs (every shard fsynced, hashed, renamed
   and listed) in each --hidden-format, beside the disk-bound ceiling measured on the same disk;
b) training: (token, layer) rows/s of the simple predictor's training loop reading shards from disk,
   and the seed's 20-epoch recipe's wall time on 5,000 sequences at that rate;
c) validation: rows/s of the coverage analysis, end to end from the shards and with the rows
   already on the device.
b) and c) run on a lossless trace set and on its copy in each of --read-formats.

Full size on a GPU (see docs/BENCHMARKS.md for the exact calls):
    python tools/make_random_checkpoint.py --preset qwen1.5-moe-a2.7b --device cuda --output /tmp/qwen15
    python tools/benchmark.py --model /tmp/qwen15 --quantization none --json bench_bf16.json
    python tools/benchmark.py --model /tmp/qwen15 --quantization 4bit --stages collect --json bench_4bit.json
Durable collection, compact formats and reading in one GPU command: tools/gpu/bench_io.sh
The embedded default on a CPU (about a minute):
    python tools/benchmark.py --batches 4 --train-sequences 120 --epochs 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from collection.capture import RoutingCapture, ShardFiller, hidden_moments
from collection.model import EMBEDDED_MODEL_NAME, QUANTIZATIONS, load_model, router_weights, routing_shape
from collection.traces.durable import OpenAhead, sha256_of
from collection.traces.format import ShardWriter, TraceSet, shard_specs
from collection.traces.hidden_format import FORMATS, LOSSLESS, HiddenFormat, fit_codec
from common.atomic import atomic_write_json
from common.device import device_name, pick_device, pick_dtype
from common.errors import UserError, one_line_errors
from models.moe_configs import seed_recipe_table
from tools.make_random_checkpoint import corpus_texts

SEED_TRAIN_ROWS_PER_S = 3870     # the seed's training step on an H200 (docs/platform.md)
SEED_VALIDATE_ROWS_PER_S = 2062  # the seed's validation loop on the same GPU


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def token_batches(tokenizer: Any, n: int, batch: int, seq_len: int) -> list[torch.Tensor]:
    """`n` batches of real text, every position a real token (the same batches for every variant)."""
    stream = [t for ids in tokenizer(corpus_texts("traces"), add_special_tokens=False)["input_ids"] for t in ids]
    need = n * batch * seq_len
    stream = (stream * (need // len(stream) + 1))[:need]
    return list(torch.tensor(stream, dtype=torch.long).view(n, batch, seq_len))


def disk_write_speed(directory: Path, nbytes: int) -> tuple[float, float]:
    """(bytes/s of a sequential write with fsync, as the shard writer does it; bytes/s of SHA-256 reading the
    same file back from the page cache, as a commit hashes a shard)."""
    buf = np.random.default_rng(0).integers(0, 255, size=64 << 20, dtype=np.uint8)
    path = directory / "disk_speed.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    written = 0
    while written < nbytes:
        written += os.write(fd, memoryview(buf))
    os.fsync(fd)
    os.close(fd)
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    sha256_of(path)
    hash_s = time.perf_counter() - t0
    path.unlink()
    return written / dt, written / hash_s


def wait_and_release(capture: RoutingCapture, hb: Any) -> None:
    """Wait for a captured batch's device-to-host copies, then give its host buffers back (nothing written)."""
    if hb.ready is not None:
        hb.ready.synchronize()
    capture.release(hb)


def durable_collection(args: argparse.Namespace, model: Any, batches: list[torch.Tensor], mask: torch.Tensor,
                       hidden_dtype: torch.dtype, fmt: HiddenFormat, work: Path) -> dict[str, Any]:
    """Tokens/s of collect_traces.py's durable path in format `fmt`: shards of --shard-batches batches written
    from pinned memory, each fsynced, hashed, renamed and announced (as the manifest update) on background
    threads while the next is collected, timed until the last one is committed. Committed shards are deleted
    in the announcement, so the run needs the disk of a few shards only."""
    shape = routing_shape(model)
    L, E, K, H = shape.num_layers, shape.num_experts, shape.top_k, shape.hidden_size
    per_batch = args.batch_size * args.seq_len
    codec = None
    if fmt.fitted:  # fitted on the warm-up batches only: enough for speed, which does not depend on the fit
        dev = next(model.parameters()).device
        moments, _ = hidden_moments(model, list(range(L)), [(b, mask) for b in batches[:max(args.warmup, 1)]], dev)
        codec = fit_codec(fmt, moments, router_weights(model), list(range(L)))
    capture = RoutingCapture(model, list(range(L)), hidden_dtype, True, per_batch, K, shape.norm_topk_prob, E, H,
                             hidden_format=fmt, hidden_codec=codec)
    filler = ShardFiller(capture)
    for b in batches[:args.warmup]:  # the format's kernels and buffers warmed
        wait_and_release(capture, capture.forward(model, b, mask))
    timed = batches[args.warmup:args.warmup + args.durable_batches]
    committed: list[int] = []

    def open_shard(s0: int) -> ShardWriter:  # one shard ahead, on a thread, as collect_traces.py opens them
        specs = shard_specs(len(timed[s0:s0 + args.shard_batches]) * per_batch, 1, num_layers=L, top_k=K,
                            num_experts=E, hidden_size=H, hidden_layers=L,
                            hidden_dtype=str(hidden_dtype).removeprefix("torch."), store_logits=True,
                            hidden_format=fmt.name)
        return ShardWriter(work / f"durable_{s0:05d}.safetensors", specs, writeback=True)

    sync(next(model.parameters()).device)
    t0 = time.perf_counter()
    ahead = OpenAhead(open_shard, range(0, len(timed), args.shard_batches))
    for s0 in range(0, len(timed), args.shard_batches):
        group = timed[s0:s0 + args.shard_batches]
        writer = ahead.take()
        row = 0
        for b in group:
            hb = capture.forward(model, b, mask)
            filler.write_batch(writer, hb, row)
            row += hb.rows
        filler.commit(writer, lambda nbytes, sha, path=writer.path: (committed.append(nbytes), path.unlink()))
    collected_s = time.perf_counter() - t0
    filler.join()
    total_s = time.perf_counter() - t0
    ahead.close()
    filler.close()
    capture.close()
    tokens = len(timed) * per_batch
    return {"format": fmt.name, "tokens": tokens, "shards": len(committed), "bytes_per_token": sum(committed) / tokens,
            "durable_tokens_per_s": tokens / total_s, "collected_tokens_per_s": tokens / collected_s,
            "commit_tail_seconds": total_s - collected_s}


def paired_overhead(bare: Any, captured: Any, batches: list[torch.Tensor], rounds: int, tokens: int,
                    dev: torch.device) -> dict[str, Any]:
    """Capture overhead measured batch by batch: bare and captured forwards interleaved in ABBA order.

    Block timings compare two runs minutes apart, and the 4-bit forward drifts by +-20% over that span.
    Pairing each captured batch with a bare batch measured next to it cancels the drift, and the spread
    of the paired ratios is the noise. `bare(b)` / `captured(b)` each run one batch `b`.
    """
    def timed(step: Any, b: torch.Tensor) -> float:
        sync(dev)
        t = time.perf_counter()
        step(b)
        sync(dev)
        return time.perf_counter() - t

    bare_t, cap_t = [], []
    for r in range(rounds):
        b = batches[r % len(batches)]
        if r % 2 == 0:
            bare_t.append(timed(bare, b))
            cap_t.append(timed(captured, b))
        else:
            cap_t.append(timed(captured, b))
            bare_t.append(timed(bare, b))
    if not bare_t:
        return {}
    ratio = np.array(cap_t) / np.array(bare_t) - 1
    return {"rounds": len(bare_t), "bare_tokens_per_s_median": tokens / float(np.median(bare_t)),
            "capture_only_tokens_per_s_median": tokens / float(np.median(cap_t)),
            "capture_only_overhead_median": float(np.median(ratio)),
            "capture_only_overhead_p25": float(np.percentile(ratio, 25)),
            "capture_only_overhead_p75": float(np.percentile(ratio, 75)),
            "bare_seconds": bare_t, "capture_only_seconds": cap_t}


def bench_collect(args: argparse.Namespace, model: Any, tokenizer: Any, dev: torch.device, work: Path) -> dict[str, Any]:
    shape = routing_shape(model)
    L, E, K, H = shape.num_layers, shape.num_experts, shape.top_k, shape.hidden_size
    batches = token_batches(tokenizer, args.warmup + max(args.batches, args.durable_batches), args.batch_size,
                            args.seq_len)
    mask = torch.ones_like(batches[0])
    hidden_dtype = model.get_input_embeddings().weight.dtype if args.quantization == "none" else pick_dtype("auto", dev)
    if hidden_dtype == torch.float32 and dev.type == "cuda":
        hidden_dtype = torch.float16

    def bare(b: torch.Tensor) -> None:
        with torch.no_grad():
            model(input_ids=b.to(dev, non_blocking=True), attention_mask=mask.to(dev, non_blocking=True), use_cache=False)

    def bare_seconds() -> float:
        """Seconds of the bare forward over the timed batches."""
        sync(dev)
        t0 = time.perf_counter()
        for b in batches[args.warmup:args.warmup + args.batches]:
            bare(b)
        sync(dev)
        return time.perf_counter() - t0

    for b in batches[:args.warmup]:
        bare(b)
    bare_s = bare_seconds()

    # forward + capture + writing: exactly what collect_traces.py runs, into a shard on local disk
    rows = args.batches * args.batch_size * args.seq_len
    hname = str(hidden_dtype).removeprefix("torch.")
    specs = shard_specs(rows, 1, num_layers=L, top_k=K, num_experts=E, hidden_size=H, hidden_layers=L,
                        hidden_dtype=hname, store_logits=True)
    capture = RoutingCapture(model, list(range(L)), hidden_dtype, True, args.batch_size * args.seq_len, K,
                             shape.norm_topk_prob, E, H)
    filler = ShardFiller(capture)

    def captured(b: torch.Tensor) -> None:
        """Forward + capture into pinned host memory, waiting for the copies; no disk."""
        wait_and_release(capture, capture.forward(model, b, mask))

    for b in batches[:args.warmup]:  # warm the hooks and pinned buffers too
        captured(b)
    # capture alone: hooks, gathers, casts and asynchronous copies into pinned host memory, no disk; the copies
    # are waited for on the writer's thread, as in collection (waiting on this thread would also stop the host
    # from queueing the next forward while the GPU runs this one: a third more time per batch, not capture's)
    sync(dev)
    t0 = time.perf_counter()
    for b in batches[args.warmup:args.warmup + args.batches]:
        hb = capture.forward(model, b, mask)
        filler.submit(lambda hb=hb: wait_and_release(capture, hb))
    filler.join()
    sync(dev)
    capture_only_s = time.perf_counter() - t0

    paired = paired_overhead(bare, captured, batches[args.warmup:], args.paired_rounds, args.batch_size * args.seq_len, dev)
    writer = ShardWriter(work / "bench_shard.safetensors", specs)
    sync(dev)
    t0 = time.perf_counter()
    row = 0
    for b in batches[args.warmup:args.warmup + args.batches]:
        hb = capture.forward(model, b, mask)
        filler.write_batch(writer, hb, row)
        row += hb.rows
    filler.join()
    forward_capture_s = time.perf_counter() - t0
    nbytes, _ = writer.commit()  # in line, as collection committed before commit 1fdc8cd: one shard's latency
    total_s = time.perf_counter() - t0
    filler.close()
    capture.close()
    (work / "bench_shard.safetensors").unlink()
    disk, hash_rate = disk_write_speed(work, max(nbytes, 2 << 30))
    per_token = nbytes / rows
    durable = {}
    for name in args.formats:
        # the bare forward again, just before: the forward's speed drifts by more than the targets' margins over
        # the minutes this loop takes, so each format is held against the bare forward measured beside it
        bare_here = rows / bare_seconds()
        d = durable_collection(args, model, batches, mask, hidden_dtype, FORMATS[name], work)
        d["bare_tokens_per_s"] = bare_here
        d["disk_bound_tokens_per_s"] = disk / d["bytes_per_token"]
        d["bound_tokens_per_s"] = min(bare_here, d["disk_bound_tokens_per_s"])
        d["vs_bound"] = d["durable_tokens_per_s"] / d["bound_tokens_per_s"]
        durable[name] = d
    return {"tokens": rows, "batch": f"{args.batch_size}x{args.seq_len}", "bare_tokens_per_s": rows / bare_s,
            "capture_only_tokens_per_s": rows / capture_only_s, "capture_only_overhead": capture_only_s / bare_s - 1,
            "capture_tokens_per_s": rows / forward_capture_s, "capture_overhead": forward_capture_s / bare_s - 1,
            "with_commit_tokens_per_s": rows / total_s, "bytes_per_token": per_token, "hidden_dtype": hname,
            "hidden_layers": L, "disk_write_bytes_per_s": disk, "disk_bound_tokens_per_s": disk / per_token,
            "sha256_bytes_per_s": hash_rate, "durable": durable, "shard_batches": args.shard_batches,
            "durable_batches": args.durable_batches,
            "paired": paired}


def bench_train_validate(args: argparse.Namespace, dev: torch.device, work: Path,
                         stages: set[str]) -> dict[str, dict[str, Any]]:
    """Collect a trace set with collect_traces.py itself (8 shards), copy it into each of --read-formats with the
    collection encoder, then time training and validation on each copy, read from the page cache."""
    from scripts.collect_traces import main as collect_main
    from scripts.transcode_traces import main as transcode_main

    lossless = work / "traces" / LOSSLESS
    collect_main(["--model", args.model, "--quantization", args.quantization, "--datasets", "bundled",
                  "--target_traces", str(args.train_sequences), "--shard_size", str(max(1, args.train_sequences // 8)),
                  "--batch_size", str(args.batch_size), "--max_length", str(args.seq_len), "--output", str(lossless),
                  "--overwrite", "--hidden-dtype", "float16" if dev.type == "cuda" else "auto",
                  *(["--device", str(dev)])])
    out = {}
    for name in args.read_formats:
        traces = lossless if name == LOSSLESS else work / "traces" / name
        if name != LOSSLESS:
            transcode_main(["--traces", str(lossless), "--hidden-format", name, "--output", str(traces),
                            "--device", str(dev), "--overwrite"])
        out[name] = bench_reading(args, dev, traces, work / f"ckpt-{name}", stages)
        if name != LOSSLESS:
            shutil.rmtree(traces, ignore_errors=True)
    return out


def bench_reading(args: argparse.Namespace, dev: torch.device, traces: Path, ckpt: Path,
                  stages: set[str]) -> dict[str, Any]:
    """Training and validation rows/s on one trace set."""
    from training.trainer import add_training_args, run_training
    from validation.coverage.evaluate import epoch_validation

    ts = TraceSet(traces)
    out: dict[str, Any] = {"trace_sequences": args.train_sequences, "hidden_format": ts.manifest.hidden_format,
                           "trace_bytes": sum(s.bytes for s in ts.manifest.shards), "shards": len(ts)}
    if "train" in stages:
        p = argparse.ArgumentParser()
        add_training_args(p, kind="simple", shards_per_group=4, batch_size=8, lr=5e-5, epochs=args.epochs,
                          lookahead=0, output=str(ckpt))
        targs = p.parse_args(["--traces", str(traces), "--device", str(dev), "--overwrite",
                              "--val-fraction", "0.05", "--test-fraction", "0.05", "--no-verify"])
        res = run_training(targs, validate=epoch_validation)
        table = ts.sequence_table()
        mean_tokens = float(table["length"].mean())
        seed_rows = 5000 * mean_tokens * ts.manifest.num_layers * 20
        per_epoch = [h["epoch_rows_per_s"] for h in res["history"]]
        resident = float(np.mean(per_epoch[1:])) if len(per_epoch) > 1 else per_epoch[0]
        # 5000 sequences at full width do not fit in GPU memory: every epoch then reads its shards again,
        # at the first epoch's rate (page cache here; a cold disk is slower still)
        out.update({"train_rows_per_s": resident, "train_rows_per_s_first_epoch": per_epoch[0],
                    "train_seconds": res["train/seconds"], "train_epochs": args.epochs, "seed_recipe_rows": seed_rows,
                    "seed_recipe_seconds_resident": seed_rows / resident,
                    "seed_recipe_seconds_reloading": seed_rows / per_epoch[0],
                    "codec_load_seconds": res.get("codec_load_seconds", 0.0),
                    "warmup_seconds": res.get("warmup_seconds", 0.0),
                    "vs_seed_training_loop": resident / SEED_TRAIN_ROWS_PER_S})
    if "validate" in stages:
        from collection.traces.rows import SplitBlocks, input_layers, row_batches, targets
        from models.checkpoint import load_checkpoint
        from validation.coverage.evaluate import evaluate
        from validation.coverage.metrics import CoverageAccumulator, true_expert_ranks
        from validation.coverage.scorers import predictor_scorer

        if (ckpt / "best_checkpoint.pth").exists():
            model, cfg, _ = load_checkpoint(ckpt / "best_checkpoint.pth", dev)
        else:
            from models.predictors import PredictorConfig, build_predictor
            m = ts.manifest
            cfg = PredictorConfig("simple", m.hidden_size, m.num_experts, m.top_k, m.num_layers)
            model = build_predictor(cfg).to(dev).eval()
        amp = torch.bfloat16 if dev.type == "cuda" else torch.float32
        scorer = predictor_scorer(model, 0, ts.manifest.num_experts, amp)
        ids = ts.sequence_table()["seq_id"]
        evaluate(scorer, ts, ids[:8], 0, dev, progress=False)  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        acc = evaluate(scorer, ts, ids, 0, dev, batch_rows=args.validate_batch_rows, progress=False)
        sync(dev)
        e2e = acc.summary()["tokens"] / (time.perf_counter() - t0)
        # the same evaluation loop with the rows already on the device: what the vectorized scoring and metric
        # code costs once reading is out of the way (the first pass loads the blocks and keeps them)
        resident_blocks = SplitBlocks(ts, ids, dev, shards_per_group=len(ts), keep=True)
        evaluate(scorer, ts, ids, 0, dev, batch_rows=args.validate_batch_rows, progress=False, blocks=resident_blocks)
        sync(dev)
        t0 = time.perf_counter()
        n = evaluate(scorer, ts, ids, 0, dev, batch_rows=args.validate_batch_rows, progress=False,
                     blocks=resident_blocks).summary()["tokens"]
        sync(dev)
        resident = n / (time.perf_counter() - t0)
        block = next(iter(resident_blocks))
        layers = input_layers(ts, 0)
        acc2 = CoverageAccumulator(ts.manifest.num_layers, len(ts.manifest.sources), ts.manifest.num_experts,
                                   ts.manifest.top_k, device=dev)
        # the coverage analysis itself (ranks + metric sums) on precomputed scores
        with torch.no_grad():
            tok, layer = next(row_batches(block, layers, args.validate_batch_rows))
            scores, true = scorer(block, tok, layer), targets(block, tok, layer, 0)
            src, pred = block.source[tok], scores.topk(ts.manifest.top_k, 1).indices
            reps = 5
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(reps):
                acc2.update(true_expert_ranks(scores, true), layer, src, true, pred)
            sync(dev)
            metrics_only = reps * tok.shape[0] / (time.perf_counter() - t0)
        out.update({"validate_rows_per_s_metrics_only": metrics_only,"validate_rows_per_s_end_to_end": e2e, "validate_rows_per_s_device_resident": resident,
                    "validate_batch_rows": args.validate_batch_rows,
                    "vs_seed_validation_loop": resident / SEED_VALIDATE_ROWS_PER_S})
    return out


def print_table(res: dict[str, Any]) -> None:
    print(f"\n=== benchmark: {res['model']} ({res['quantization']}) on {res['device']} ===")
    print(f"torch {res['versions']['torch']}, transformers {res['versions']['transformers']}, "
          f"bitsandbytes {res['versions'].get('bitsandbytes')}, python {res['versions']['python']}")
    if "gpu_memory_after_load_bytes" in res:
        print(f"GPU memory after load: {res['gpu_memory_after_load_bytes'] / 2**30:.2f} GiB allocated, "
              f"max allocated {res['gpu_max_memory_after_load_bytes'] / 2**30:.2f} GiB; groups: " +
              ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in res["parameter_bytes"].items()))
    c = res.get("collect")
    if c:
        head = f"collection ({c['batch']}, all {c['hidden_layers']} layers' hidden in {c['hidden_dtype']})"
        print(f"\n{head:<60} {'tokens/s':>12} {'vs bare':>9}")
        print(f"{'  bare forward':<60} {c['bare_tokens_per_s']:>12,.0f} {1.0:>9.2f}")
        print(f"{'  forward + capture to pinned host memory (no disk)':<60} {c['capture_only_tokens_per_s']:>12,.0f} "
              f"{c['capture_only_tokens_per_s'] / c['bare_tokens_per_s']:>9.2f}")
        print(f"{'  forward + capture + shard writes (page cache)':<60} {c['capture_tokens_per_s']:>12,.0f} "
              f"{c['capture_tokens_per_s'] / c['bare_tokens_per_s']:>9.2f}")
        print(f"{'  ... + fsync + SHA-256 in line (one shard; the path before #14)':<60} "
              f"{c['with_commit_tokens_per_s']:>12,.0f} {c['with_commit_tokens_per_s'] / c['bare_tokens_per_s']:>9.2f}")
        for name, d in c.get("durable", {}).items():
            label = f"  durable, as collect_traces.py writes ({name})"
            print(f"{label:<60} {d['durable_tokens_per_s']:>12,.0f} "
                  f"{d['durable_tokens_per_s'] / c['bare_tokens_per_s']:>9.2f}")
        disk = (f"  disk-bound ceiling ({c['disk_write_bytes_per_s'] / 1e9:.2f} GB/s fsync write, "
                f"{c['bytes_per_token'] / 1024:.1f} KiB/token)")
        print(f"{disk:<60} {c['disk_bound_tokens_per_s']:>12,.0f} "
              f"{c['disk_bound_tokens_per_s'] / c['bare_tokens_per_s']:>9.2f}")
        print(f"  capture overhead over the bare forward: {c['capture_only_overhead'] * 100:+.1f}% to host memory, "
              f"{c['capture_overhead'] * 100:+.1f}% with shard writes")
        q = c.get("paired")
        if q:
            print(f"  interleaved, {q['rounds']} batch pairs (ABBA): bare {q['bare_tokens_per_s_median']:,.0f} vs capture "
                  f"{q['capture_only_tokens_per_s_median']:,.0f} tokens/s (medians); paired capture overhead "
                  f"{q['capture_only_overhead_median'] * 100:+.1f}% (median; quartiles "
                  f"{q['capture_only_overhead_p25'] * 100:+.1f}% to {q['capture_only_overhead_p75'] * 100:+.1f}%)")
    if c and c.get("durable"):
        print(f"\ndurable collection: shards of {c['shard_batches']} batches, each fsynced + SHA-256 + renamed + announced "
              f"on background threads\n(disk {c['disk_write_bytes_per_s'] / 1e9:.2f} GB/s fsync write, SHA-256 "
              f"{c['sha256_bytes_per_s'] / 1e9:.2f} GB/s from the page cache; bare forward "
              f"{c['bare_tokens_per_s']:,.0f} tokens/s)")
        print(f"  {'--hidden-format':<18} {'KiB/token':>10} {'durable tok/s':>14} {'bare beside':>12} "
              f"{'disk ceiling':>13} {'min(bare, ceil)':>16} {'durable / min':>14} {'tail s':>7}")
        for name, d in c["durable"].items():
            print(f"  {name:<18} {d['bytes_per_token'] / 1024:>10.1f} {d['durable_tokens_per_s']:>14,.0f} "
                  f"{d.get('bare_tokens_per_s', c['bare_tokens_per_s']):>12,.0f} "
                  f"{d['disk_bound_tokens_per_s']:>13,.0f} {d['bound_tokens_per_s']:>16,.0f} {d['vs_bound']:>14.2f} "
                  f"{d['commit_tail_seconds']:>7.2f}")
        print(f"  (target: durable / min >= 0.80; {c.get('durable_batches', '?')} batches per format, timed until the "
              "last shard is committed; bare beside: the bare forward timed just before that format's run; tail: "
              "seconds from the last batch's forward to its shard committed)")
    print_format_table(res)
    for name, t in res.get("train_validate", {}).items():
        print_reading(name, t)


def print_format_table(res: dict[str, Any]) -> None:
    """Per hidden format: bytes per token (seed recipe and this run), durable collection tokens/s, and the
    recall@4 of predictors trained on it (from compare_hidden_formats.py's formats.json, if given)."""
    c = res.get("collect", {})
    quality = res.get("quality", {}).get("formats", {})
    reading = res.get("train_validate", {})
    print("\nformats (seed recipe: 5,000 x 256 tokens, all layers, Qwen1.5-MoE dims, with logits)")
    print(f"  {'--hidden-format':<18} {'seed B/token':>12} {'x smaller':>10} {'seed GB':>8} {'durable tok/s':>14} "
          f"{'val e2e rows/s':>15} {'worst recall loss':>18}")
    for r in seed_recipe_table():
        name = r["format"]
        d = c.get("durable", {}).get(name)
        q = quality.get("bf16" if name == LOSSLESS else name)
        loss = max((v for k, v in q["loss_vs_bf16"].items() if not k.startswith("router")), default=0.0) if q else None
        e2e = reading.get(name, {}).get("validate_rows_per_s_end_to_end")
        durable = f"{d['durable_tokens_per_s']:,.0f}" if d else "-"
        val = f"{e2e:,.0f}" if e2e else "-"
        worst = "(reference)" if q and name == LOSSLESS else f"{loss:+.4f}" if loss is not None else "-"
        print(f"  {name:<18} {r['record_bytes_per_token']:>12,} {r['record_vs_bf16']:>10.2f} {r['seed_recipe_gb']:>8.1f} "
              f"{durable:>14} {val:>15} {worst:>18}")
    if quality:
        ref = quality["bf16"]
        k = next(key for key in ref if key.startswith("recall@"))
        keys = list(ref[k])
        print(f"\n{k} of predictors trained on each format (embedded default, test split; "
              f"compare_hidden_formats.py, device {ref['device']})")
        print("  " + f"{'format':<18}" + "".join(f"{key:>18}" for key in keys))
        for name, q in quality.items():
            print("  " + f"{name:<18}" + "".join(f"{q[k][key]:>18.4f}" for key in keys))


def print_reading(name: str, t: dict[str, Any]) -> None:
    if "train_rows_per_s" in t:
        head = f"training (simple predictor, seed recipe, shards on disk; hidden {name})"
        print(f"\n{head:<60} {'rows/s':>12} {'vs seed':>9}")
        print(f"{'  this loop, shard group resident on the device (epochs 2+)':<60} {t['train_rows_per_s']:>12,.0f} "
              f"{t['vs_seed_training_loop']:>9,.0f}x")
        print(f"{'  this loop, first epoch (reads the shards from page cache)':<60} "
              f"{t['train_rows_per_s_first_epoch']:>12,.0f} {t['train_rows_per_s_first_epoch'] / SEED_TRAIN_ROWS_PER_S:>9,.0f}x")
        if t.get("codec_load_seconds"):
            print(f"  (before it, once per run: the fitted format's codec read, verified and moved to the device in "
                  f"{t['codec_load_seconds']:.2f} s)")
        if "warmup_seconds" in t:
            print(f"  (before it, once per run: one training step, undone: pinned buffers, CUDA kernels loaded: "
                  f"{t['warmup_seconds']:.2f} s)")
        print(f"{'  the seed loop (H200, docs/platform.md)':<60} {SEED_TRAIN_ROWS_PER_S:>12,} {1:>9}x")
        print(f"  seed recipe (20 epochs, 5000 sequences = {t['seed_recipe_rows'] / 1e6:,.0f}M rows): "
              f"{t['seed_recipe_seconds_resident']:,.0f} s if resident, {t['seed_recipe_seconds_reloading']:,.0f} s "
              f"reloading every epoch (the seed: ~40 min on an RTX 3090)")
    if "validate_rows_per_s_end_to_end" in t:
        head = f"validation (coverage analysis, simple predictor; hidden {name})"
        print(f"\n{head:<60} {'rows/s':>12} {'vs seed':>9}")
        print(f"{'  end to end (shards -> device -> metrics)':<60} {t['validate_rows_per_s_end_to_end']:>12,.0f} "
              f"{t['validate_rows_per_s_end_to_end'] / SEED_VALIDATE_ROWS_PER_S:>9,.0f}x")
        print(f"{'  rows on the device (scoring + ranks + metric sums)':<60} "
              f"{t['validate_rows_per_s_device_resident']:>12,.0f} {t['vs_seed_validation_loop']:>9,.0f}x")
        print(f"{'  metrics only (ranks + sums on given scores)':<60} "
              f"{t['validate_rows_per_s_metrics_only']:>12,.0f} "
              f"{t['validate_rows_per_s_metrics_only'] / SEED_VALIDATE_ROWS_PER_S:>9,.0f}x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_MODEL_NAME, help="model directory or hub id (embedded default)")
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS, help="none | 4bit | 8bit")
    p.add_argument("--dtype", default="auto", help="compute dtype (auto: bf16 on GPU, fp32 on CPU; fp16 for 4-bit)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda:N")
    p.add_argument("--gpu", type=int, default=None, help="CUDA GPU index (overrides --device)")
    p.add_argument("--stages", default="collect,train,validate", help="comma list of collect, train, validate")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (256)")
    p.add_argument("--batches", type=int, default=10, help="timed forward batches (10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up batches (2)")
    p.add_argument("--paired-rounds", type=int, default=20,
                   help="bare/capture batch pairs timed interleaved, ABBA order (20; 0 skips)")
    p.add_argument("--train-sequences", type=int, default=400, help="sequences collected for train/validate (400)")
    p.add_argument("--epochs", type=int, default=3, help="timed training epochs (3)")
    p.add_argument("--validate-batch-rows", type=int, default=262144, help="rows per validation batch (262144)")
    p.add_argument("--formats", default=f"{LOSSLESS},pca-3.5bit",
                   help="--hidden-format(s) whose durable collection is timed (lossless,pca-3.5bit; 'all')")
    p.add_argument("--durable-batches", type=int, default=96,
                   help="batches of the durable collection per format (96: long enough that the last shard's commit, "
                        "which no later batch hides, is a small part of the time)")
    p.add_argument("--shard-batches", type=int, default=8,
                   help="batches per shard in the durable collection (8; collect_traces.py's default shard, 500 "
                        "sequences, is 63 batches of 8)")
    p.add_argument("--read-formats", default=f"{LOSSLESS},pca-3.5bit",
                   help="formats of the trace set training and validation read (lossless,pca-3.5bit; 'all')")
    p.add_argument("--quality", default=None,
                   help="formats.json of compare_hidden_formats.py: adds recall@4 per format to the format table")
    p.add_argument("--workdir", default=None, help="scratch directory on the disk to measure (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    stages = set(args.stages.split(","))
    if stages - {"collect", "train", "validate"}:
        raise UserError(f"--stages: unknown stage(s) {', '.join(sorted(stages - {'collect', 'train', 'validate'}))}")
    if args.batches < 1 or args.warmup < 0 or args.paired_rounds < 0:
        raise UserError("--batches must be >= 1, --warmup and --paired-rounds >= 0")
    if args.durable_batches < 1 or args.shard_batches < 1:
        raise UserError("--durable-batches and --shard-batches must be >= 1")
    for flag in ("formats", "read_formats"):
        names = list(FORMATS) if getattr(args, flag) == "all" else [f for f in getattr(args, flag).split(",") if f]
        if not set(names) <= set(FORMATS):
            raise UserError(f"--{flag.replace('_', '-')}: unknown format(s) {', '.join(sorted(set(names) - set(FORMATS)))}"
                            f" (choose from {', '.join(FORMATS)})")
        setattr(args, flag, names)

    dev = pick_device(args.device, args.gpu)
    dtype = pick_dtype("float16" if args.quantization != "none" and args.dtype == "auto" else args.dtype, dev)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="moe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    res: dict[str, Any] = {"model": args.model, "quantization": args.quantization, "device": device_name(dev),
                           "versions": versions, "args": vars(args)}
    if dev.type == "cuda":
        res["gpu_total_bytes"] = torch.cuda.get_device_properties(dev).total_memory
    if args.quality:
        try:
            res["quality"] = json.loads(Path(args.quality).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"--quality {args.quality}: cannot read ({e})") from None
    try:
        if "collect" in stages:
            t0 = time.perf_counter()
            model, tokenizer = load_model(args.model, dev, dtype, args.quantization)
            res["load_seconds"] = time.perf_counter() - t0
            if dev.type == "cuda":
                res["gpu_memory_after_load_bytes"] = torch.cuda.memory_allocated(dev)
                res["gpu_max_memory_after_load_bytes"] = torch.cuda.max_memory_allocated(dev)
            if args.quantization == "4bit":
                from collection.quantize import quantized_bytes

                res["parameter_bytes"] = quantized_bytes(model)
            else:
                res["parameter_bytes"] = {"all_parameters": sum(q.numel() * q.element_size() for q in model.parameters())}
            res["collect"] = bench_collect(args, model, tokenizer, dev, work)
            if dev.type == "cuda":
                res["gpu_max_memory_collect_bytes"] = torch.cuda.max_memory_allocated(dev)
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if stages & {"train", "validate"}:
            res["train_validate"] = bench_train_validate(args, dev, work, stages)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(res)
    if args.json:
        atomic_write_json(Path(args.json), res)
        print(f"\nwrote {args.json}")
    else:
        print("\nno --json FILE: the numbers above are not saved"
              + (f"; scratch files kept in {args.workdir}" if args.workdir else ""))


if __name__ == "__main__":
    with one_line_errors("benchmark"):
        main()
