r"""Stage 1: collect routing traces from an MoE language model into shards on disk.

One trace = one text (sequence): for every real token and every MoE layer, the experts the router
chose (ids, weights, optionally all logits) and the MoE-block input hidden state (the predictors'
input), plus token ids and the source dataset. Format: docs/trace-format.md.

The seed's command (real model, CUDA GPU, Hugging Face hub access):
    python scripts/collect_traces.py --model Qwen/Qwen1.5-MoE-A2.7B --quantization 4bit --datasets seed \
        --target_traces 5000 --shard_size 500 --batch_size 8 --max_length 256
The same with hidden states stored compactly (4.1x fewer bytes per token; docs/trace-format.md):
    python scripts/collect_traces.py --model Qwen/Qwen1.5-MoE-A2.7B --quantization 4bit --datasets seed \
        --target_traces 5000 --shard_size 500 --batch_size 8 --max_length 256 --hidden-format pca-3.5bit
Seconds on a CPU, on the embedded default model and bundled corpus:
    python scripts/collect_traces.py --target_traces 120 --shard_size 60 --max_length 128 \
        --output routing_data/traces/quick --overwrite
Several GPUs (README "Several GPUs"): one process per GPU, each collecting every N-th shard of the same plan,
or one model spread over the GPUs:
    torchrun --nproc_per_node 2 scripts/collect_traces.py --model DIR --output DIR2 ...
    python scripts/collect_traces.py --model DIR --device-map auto --max-memory 40GiB ...
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from collection.collector import BUNDLED_PER_DOMAIN, collect, parse_layers
from collection.model import EMBEDDED_MODEL_NAME, QUANTIZATIONS
from collection.placement import parse_device_map, parse_max_memory
from collection.sources import MIN_CHARS
from collection.traces.hidden_format import FORMATS, LOSSLESS
from collection.traces.output import OutputLock
from common.errors import one_line_errors
from common.paths import check_writable
from common.ranks import init_ranks
from models.moe_configs import seed_recipe_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=EMBEDDED_MODEL_NAME,
                   help="hub id or local directory saved with save_pretrained (default: the embedded model)")
    g.add_argument("--quantization", default="none", choices=QUANTIZATIONS, help="bitsandbytes, CUDA only")
    g.add_argument("--device", default="auto", help="auto (GPU with most free memory, else CPU), cpu, cuda:N")
    g.add_argument("--gpu", type=int, default=None, help="CUDA GPU index (overrides --device)")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, float16, bfloat16")
    g = p.add_argument_group("data")
    g.add_argument("--datasets", default="bundled",
                   help="comma list: seed (the six hub datasets), bundled (shipped corpus), a hub id, a bundled "
                        "domain, or jsonl:/parquet:/csv:/text:PATH[:FIELD] (default: bundled)")
    g.add_argument("--target_traces", "--target-traces", type=int, default=None,
                   help="sequences to collect, split equally over the datasets (default 5000, as the seed; "
                        f"{BUNDLED_PER_DOMAIN} per domain when a bundled domain is sampled: its trace split is that small)")
    g.add_argument("--shard_size", "--shard-size", type=int, default=500, help="sequences per shard (default 500)")
    g.add_argument("--batch_size", "--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    g.add_argument("--max_length", "--max-length", type=int, default=256, help="tokens per sequence at most (256)")
    g.add_argument("--min-chars", type=int, default=MIN_CHARS, help="skip texts shorter than this (default 50)")
    g.add_argument("--seed", type=int, default=0, help="shuffling seed of every source (default 0)")
    g = p.add_argument_group("what to store")
    g.add_argument("--hidden-layers", default="all",
                   help="MoE layers whose input hidden state is stored: all, none, or e.g. 0,4,8 or 0-11")
    g.add_argument("--hidden-dtype", default="auto",
                   help="auto (the model's compute dtype: lossless), float16, bfloat16, float32")
    g.add_argument("--hidden-format", default=LOSSLESS, choices=list(FORMATS),
                   help="how hidden states are stored: lossless (default, in --hidden-dtype) or a compact format "
                        "encoded on the device (docs/trace-format.md; the table printed before collecting compares them)")
    g.add_argument("--no-logits", action="store_true", help="do not store the full router logits")
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, help="trace directory (default routing_data/traces/<model name>)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted collection in --output")
    g.add_argument("--overwrite", action="store_true", help="replace an existing trace set in --output")
    g = p.add_argument_group("several GPUs (torchrun starts one process per GPU for data parallelism: README)")
    g.add_argument("--device-map", default=None,
                   help="spread the model's layers over the visible GPUs with accelerate: auto, balanced, "
                        "balanced_low_0, sequential, or a JSON {module: device} map (inline or a file)")
    g.add_argument("--max-memory", default=None,
                   help="with a --device-map policy: weight memory per GPU, e.g. 20GiB, or JSON {\"0\": \"20GiB\", "
                        "\"cpu\": \"100GiB\"} (default: 90%% of each GPU's free memory, none of the host's)")
    g.add_argument("--stats-json", default=None, help="write this run's throughput (tokens, seconds, per rank) here")
    args = p.parse_args(argv)
    if args.device_map is not None and (args.gpu is not None or args.device != "auto"):
        p.error("--device-map places the model itself; drop --device / --gpu")
    if args.max_memory is not None and args.device_map is None:
        p.error("--max-memory needs --device-map")
    for name in ("target_traces", "shard_size", "batch_size", "max_length"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    if args.seed < 0 or args.min_chars < 0:
        p.error("--seed and --min-chars must be >= 0")
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other")
    if args.output is None:
        args.output = f"routing_data/traces/{Path(args.model.rstrip('/')).name}"
    parse_layers(args.hidden_layers, None)  # its spelling, before anything is loaded
    check_writable("--output", args.output, "dir")  # every destination, before anything is loaded
    check_writable("--stats-json", args.stats_json, "file")
    return args


def print_seed_recipe_table() -> None:
    print("disk for the seed's full recipe (5,000 x 256 tokens, all 24 layers, Qwen1.5-MoE-A2.7B dims, bf16 capture, "
          "with logits):")
    print(f"  {'--hidden-format':<18} {'hidden B/token':>14} {'record B/token':>14} {'x smaller (hidden / record)':>28} "
          f"{'GB':>7}")
    for r in seed_recipe_table():
        print(f"  {r['format']:<18} {r['hidden_bytes_per_token']:>14,} {r['record_bytes_per_token']:>14,} "
              f"{r['hidden_vs_bf16']:>14.2f} / {r['record_vs_bf16']:<11.2f} {r['seed_recipe_gb']:>7.1f}")


def resume_command(argv: list[str]) -> str:
    """The command that continues this collection after Ctrl-C: the same flags, --resume in place of --overwrite (a
    resumed replacement goes on in its staging directory). Under torchrun, any number of processes may resume."""
    given = lambda a, flag: len(a) > 3 and flag.startswith(a)  # noqa: E731 - argparse takes unambiguous prefixes
    flags = [a for a in argv if not given(a, "--overwrite")]
    flags += [] if any(given(a, "--resume") for a in flags) else ["--resume"]
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world <= 1:
        return shlex.join(["python", "scripts/collect_traces.py", *flags])
    if world == local:
        return shlex.join(["torchrun", "--nproc_per_node", str(local), "scripts/collect_traces.py", *flags])
    return ("the same torchrun command (its --nnodes and --rdzv flags) with "
            + shlex.join(["scripts/collect_traces.py", *flags]))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.device_map is not None:  # a malformed map fails now, not after the texts are read
        parse_device_map(args.device_map), parse_max_memory(args.max_memory)
    ranks = init_ranks()  # torchrun's processes share the plan below; rank 0 of 1 without torchrun
    print_seed_recipe_table()
    lock = OutputLock(Path(args.output))  # taken by rank 0 alone: the other ranks write only their own shards
    try:
        collect(args, lock, ranks)
    except KeyboardInterrupt:  # what is written stays: the same command with --resume continues it
        raise KeyboardInterrupt(f"continue with: {resume_command(argv)}") from None
    finally:
        lock.release()


if __name__ == "__main__":
    with one_line_errors("collect_traces"):
        main()
