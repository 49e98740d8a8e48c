"""Capture-only throughput of data-parallel collection: every GPU runs forward + capture at once, nothing is written.

Each torchrun process loads the model on its GPU (LOCAL_RANK) and feeds the same 8 x 256-token batches of real
text through RoutingCapture exactly as collect_traces.py does (every MoE layer's ids, weights, logits and MoE
input into pinned host memory, two buffers in flight), but writes no shard: what data-parallel collection
reaches when the disk does not cap it. Measured in rounds, each started by a barrier: rank 0 alone (one GPU),
then the first 2, 4, ... ranks together, all ranks last. A round's throughput is its ranks' tokens over its
slowest rank's time. Rank 0 prints the table and writes the JSON.

Full size on 2 GPUs (docs/BENCHMARKS.md, "Several GPUs"; tools/bench_multi_gpu.py runs it):
    torchrun --standalone --nproc_per_node 2 tools/bench_capture_parallel.py --model /tmp/w/qwen15 --json out.json
Seconds on a CPU (checks the script; measures nothing worth keeping):
    torchrun --standalone --nproc_per_node 2 tools/bench_capture_parallel.py --device cpu --batches 2 --seq-len 32
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from collection.capture import HostBatch, RoutingCapture
from collection.model import EMBEDDED_MODEL_NAME, load_model, routing_shape
from collection.traces.format import bytes_per_token
from common.atomic import atomic_write_json
from common.device import device_name, pick_device, pick_dtype
from common.errors import UserError, one_line_errors
from common.ranks import init_ranks, rank_device
from tools.benchmark import sync, token_batches


def capture_batches(capture: RoutingCapture, model: Any, batches: list[torch.Tensor]) -> None:
    """Forward + capture of every batch, releasing each batch's buffers once its copies are done, one batch
    behind (as collect_traces.py's writer thread does): the copies of batch i overlap the forward of i + 1."""
    mask = torch.ones_like(batches[0])
    pending: HostBatch | None = None
    for b in batches:
        hb = capture.forward(model, b, mask)
        if pending is not None:
            pending.ready.synchronize()
            capture.release(pending)
        pending = hb
        if hb.ready is None:  # CPU: the copies are already done, and there is a single set of buffers
            capture.release(hb)
            pending = None
    if pending is not None:
        pending.ready.synchronize()
        capture.release(pending)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_MODEL_NAME, help="model directory (default: the embedded model)")
    p.add_argument("--device", default="auto", help="auto (GPU LOCAL_RANK, else CPU) or cpu")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float16, bfloat16, float32")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (256)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per rank and round (20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (3)")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    args = p.parse_args(argv)
    if args.batches < 1 or args.warmup < 0 or args.batch_size < 1 or args.seq_len < 1:
        raise UserError("--batches, --batch-size and --seq-len must be >= 1, --warmup >= 0")

    ranks = init_ranks()
    dev = pick_device(*rank_device(ranks, args.device, None))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dtype = pick_dtype(args.dtype, dev)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dev, dtype)
    load_s = time.perf_counter() - t0
    s = routing_shape(model)
    L, E, K, H = s.num_layers, s.num_experts, s.top_k, s.hidden_size
    capture = RoutingCapture(model, list(range(L)), dtype, True, args.batch_size * args.seq_len, K, s.norm_topk_prob, E, H)
    batches = token_batches(tokenizer, args.warmup + args.batches, args.batch_size, args.seq_len)
    capture_batches(capture, model, batches[:args.warmup])
    sync(dev)

    sizes = sorted({g for g in (1, 2, 4, 8, 16, 32, 64) if g < ranks.world} | {ranks.world})
    rounds = []
    for g in sizes:
        ranks.barrier()
        seconds = 0.0
        if ranks.rank < g:
            t = time.perf_counter()
            capture_batches(capture, model, batches[args.warmup:])
            sync(dev)
            seconds = time.perf_counter() - t
        tokens = args.batches * args.batch_size * args.seq_len if ranks.rank < g else 0
        per_rank = ranks.all_gather({"rank": ranks.rank, "tokens": tokens, "seconds": seconds})[:g]
        total, slowest = sum(r["tokens"] for r in per_rank), max(r["seconds"] for r in per_rank)
        rounds.append({"gpus": g, "tokens": total, "seconds": slowest, "tokens_per_s": total / slowest,
                       "per_rank": per_rank})
        print(f"{g} process(es) capturing at once, one {device_name(dev)} each: {total / slowest:,.0f} tokens/s "
              f"({rounds[-1]['tokens_per_s'] / rounds[0]['tokens_per_s']:.2f}x one GPU)")
    capture.close()
    res = {"model": args.model, "device": device_name(dev), "dtype": str(dtype).removeprefix("torch."),
           "processes": ranks.world, "batch": f"{args.batch_size}x{args.seq_len}", "hidden_layers": L,
           "bytes_per_token": bytes_per_token(num_layers=L, top_k=K, num_experts=E, hidden_size=H, hidden_layers=L,
                                              hidden_dtype=str(dtype).removeprefix("torch."), store_logits=True),
           "load_seconds": load_s, "rounds": rounds}
    if args.json and ranks.is_main:
        atomic_write_json(Path(args.json), res)
        print(f"wrote {args.json}")
    ranks.leave()


if __name__ == "__main__":
    with one_line_errors("bench_capture_parallel"):
        main()
