"""Stage 1: collect routing traces from an MoE language model into shards on disk.

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
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from collection.capture import RoutingCapture, ShardFiller, hidden_moments, pad_batch
from collection.device import pick_device, pick_dtype
from collection.errors import UserError, one_line_errors
from collection.atomic import PARTIAL_SUFFIX
from collection.format import (COMPACT_FORMAT_VERSION, FORMAT_VERSION, MANIFEST, ROUTER_WEIGHTS, Manifest, ShardInfo,
                               ShardWriter, TraceShard, atomic_save_tensors, bytes_per_token, read_codec,
                               read_manifest, save_codec, shard_name, shard_specs, write_manifest)
from collection.hidden_format import CODEC_FILE, FORMATS, LOSSLESS, fit_codec
from collection.model import (EMBEDDED_MODEL_NAME, QUANTIZATIONS, load_model, resolve_model_path, router_weights,
                              routing_shape)
from collection.sources import MIN_CHARS, parse_sources, sample_balanced
from models.moe_configs import QWEN15_MOE_A27B


BUNDLED_PER_DOMAIN = 400  # the bundled corpus holds at least this many trace texts per domain


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
    args = p.parse_args(argv)
    for name in ("target_traces", "shard_size", "batch_size", "max_length"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other")
    if args.output is None:
        args.output = f"routing_data/traces/{Path(args.model.rstrip('/')).name}"
    return args


def parse_layers(spec: str, num_layers: int) -> list[int]:
    if spec == "all":
        return list(range(num_layers))
    if spec == "none":
        return []
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            a, _, b = part.partition("-")
            layers.update(range(int(a), int(b or a) + 1))
    except ValueError:
        raise UserError(f"--hidden-layers {spec!r}: use all, none, or indices like 0,4,8 or 0-11") from None
    if not layers or min(layers) < 0 or max(layers) >= num_layers:
        raise UserError(f"--hidden-layers {spec!r}: the model has MoE layers 0..{num_layers - 1}")
    return sorted(layers)


def plan_dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


SEED_RECIPE_TOKENS = 5000 * 256  # the seed's recipe: 5,000 sequences of up to 256 tokens
FIT_TOKENS = 65536  # a fitted --hidden-format is fitted on this many tokens (at most the first shard's)


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def seed_recipe_table() -> list[dict[str, float | str]]:
    """Stored bytes of the seed's full recipe (5,000 x 256 tokens, every layer's hidden state and the router
    logits, Qwen1.5-MoE-A2.7B's dimensions, captured in bf16) in every hidden format."""
    c = QWEN15_MOE_A27B
    dims = {"num_layers": c["num_hidden_layers"], "top_k": c["num_experts_per_tok"], "num_experts": c["num_experts"],
            "hidden_size": c["hidden_size"], "hidden_layers": c["num_hidden_layers"], "hidden_dtype": "bfloat16",
            "store_logits": True}
    rest = bytes_per_token(**{**dims, "hidden_layers": 0})
    ref = bytes_per_token(**dims)
    rows = []
    for name in FORMATS:
        record = bytes_per_token(**dims, hidden_format=name)
        rows.append({"format": name, "hidden_bytes_per_token": record - rest, "record_bytes_per_token": record,
                     "hidden_vs_bf16": (ref - rest) / (record - rest), "record_vs_bf16": ref / record,
                     "seed_recipe_gb": record * SEED_RECIPE_TOKENS / 1e9})
    return rows


def print_seed_recipe_table() -> None:
    print("disk for the seed's full recipe (5,000 x 256 tokens, all 24 layers, Qwen1.5-MoE-A2.7B dims, bf16 capture, "
          "with logits):")
    print(f"  {'--hidden-format':<16} {'hidden B/token':>14} {'record B/token':>14} {'x smaller (hidden / record)':>28} "
          f"{'GB':>7}")
    for r in seed_recipe_table():
        print(f"  {r['format']:<16} {r['hidden_bytes_per_token']:>14,} {r['record_bytes_per_token']:>14,} "
              f"{r['hidden_vs_bf16']:>14.2f} / {r['record_vs_bf16']:<11.2f} {r['seed_recipe_gb']:>7.1f}")


def prepare_output(out: Path, resume: bool, overwrite: bool) -> Manifest | None:
    """Existing manifest when resuming; refuses to touch an existing trace set without a flag."""
    if resume and (out / MANIFEST).is_file():
        for partial in out.glob(f"*{PARTIAL_SUFFIX}"):
            partial.unlink()  # a shard cut short by the interruption: redone from its first sequence
        return read_manifest(out)
    ours = lambda: [out / MANIFEST, out / ROUTER_WEIGHTS, out / CODEC_FILE, *out.glob("shard_*"),  # noqa: E731
                    *out.glob(f"*{PARTIAL_SUFFIX}")]
    if out.exists() and any(out.iterdir()):
        if not any(f.exists() for f in ours()):
            raise UserError(f"--output {out} exists, is not empty and is not a trace directory; choose another")
        if not (overwrite or resume):  # resume without a manifest: killed before the first shard, start over
            raise UserError(f"--output {out} already holds traces; --resume continues them, --overwrite replaces them")
        for f in ours():
            f.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.output)
    previous = prepare_output(out, args.resume, args.overwrite)

    resolve_model_path(args.model)  # a hub id fails here, in seconds, before any text is read

    # --- the plan: which texts, in which order, as which tokens (all deterministic from --seed)
    sources = parse_sources(args.datasets)
    if args.target_traces is None:
        bundled = any(s.kind == "bundled" for s in sources)
        args.target_traces = BUNDLED_PER_DOMAIN * len(sources) if bundled else 5000
    per_source = args.target_traces // len(sources)
    if per_source == 0:
        raise UserError(f"--target_traces {args.target_traces} is fewer than the {len(sources)} datasets")
    print(f"sampling {per_source} texts from each of {len(sources)} sources: {', '.join(s.name for s in sources)}")
    texts, skipped = sample_balanced(sources, per_source, args.seed, args.min_chars)
    if any(skipped.values()):
        print(f"skipped {sum(skipped.values())} texts shorter than --min-chars {args.min_chars}: "
              + ", ".join(f"{name} {n}" for name, n in skipped.items() if n))

    device = pick_device(args.device, args.gpu)
    dtype = pick_dtype(args.dtype, device)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, device, dtype, args.quantization)
    load_s = time.perf_counter() - t0
    shape = routing_shape(model)
    compute_dtype = model.get_input_embeddings().weight.dtype if args.quantization == "none" else dtype
    hidden_dtype = compute_dtype if args.hidden_dtype == "auto" else pick_dtype(args.hidden_dtype, device)
    hidden_layers = parse_layers(args.hidden_layers, shape.num_layers)
    store_logits = not args.no_logits
    mem = f", {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU memory" if device.type == "cuda" else ""
    print(f"model: {shape.architecture} from {args.model} ({args.quantization}, {plan_dtype(compute_dtype)}) in {load_s:.1f} s{mem}: "
          f"{shape.num_layers} MoE layers x {shape.num_experts} experts, top-{shape.top_k}, hidden {shape.hidden_size}")

    encoded = tokenizer([t for _, t in texts], truncation=True, max_length=args.max_length)["input_ids"]
    lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
    if lengths.min() < 1:
        raise UserError("a text tokenized to zero tokens; raise --min-chars")
    fingerprint = hashlib.sha256(np.concatenate([np.asarray(x, dtype=np.int64) for x in encoded]).tobytes()
                                 + lengths.tobytes()).hexdigest()
    n_seq = len(texts)
    n_shards = -(-n_seq // args.shard_size)

    H, L, E, K = shape.hidden_size, shape.num_layers, shape.num_experts, shape.top_k
    hidden_name = plan_dtype(hidden_dtype)
    fmt = FORMATS[args.hidden_format if hidden_layers else LOSSLESS]  # no hidden states: nothing to encode
    if (why := fmt.check(H)):
        raise UserError(f"--hidden-format {fmt.name}: {why}")
    dims = {"num_layers": L, "top_k": K, "num_experts": E, "hidden_size": H, "hidden_layers": len(hidden_layers),
            "hidden_dtype": hidden_name, "store_logits": store_logits, "hidden_format": fmt.name}
    per_token = bytes_per_token(**dims)
    plan = {"model": args.model, "quantization": args.quantization, "dtype": plan_dtype(compute_dtype),
            "datasets": [s.describe() for s in sources], "target_traces": args.target_traces,
            "per_source": per_source, "shard_size": args.shard_size, "batch_size": args.batch_size,
            "max_length": args.max_length, "min_chars": args.min_chars, "seed": args.seed,
            "sequences": n_seq, "tokens": int(lengths.sum()), "tokens_sha256": fingerprint}
    capture_cfg = {"hidden_layers": hidden_layers, "hidden_dtype": hidden_name, "hidden_format": fmt.name,
                   "store_logits": store_logits,
                   "hidden_is": "MoE-block input (post-attention RMSNorm output), real tokens only",
                   "bytes_per_token": per_token}

    if previous is not None:
        mismatch = [k for k in plan if previous.plan.get(k) != plan[k]]
        mismatch += [k for k in ("hidden_layers", "hidden_dtype", "store_logits") if previous.capture.get(k) != capture_cfg[k]]
        mismatch += ["hidden_format"] if previous.hidden_format != fmt.name else []
        if mismatch:
            raise UserError(f"--resume: this run differs from the interrupted one in {', '.join(mismatch)}; "
                            f"repeat its flags exactly (they are in {out / MANIFEST})")
        manifest = previous
        for info in manifest.shards:  # a finished shard is kept only if it is intact
            TraceShard(out / info.file, info, manifest, verify=True)
        if manifest.complete:
            print(f"{out}: collection already complete ({len(manifest.shards)} shards)")
            return
        print(f"resuming: {len(manifest.shards)} of {n_shards} shards already done and verified")
        codec = read_codec(out, manifest)  # a fitted format: the interrupted run's fit, so the codes are the same
    else:
        codec = None
        if fmt.fitted and hidden_layers:  # fitted on the first tokens of the first shard, before any is written
            t1 = time.perf_counter()
            fit_seqs = min(int(np.searchsorted(np.cumsum(lengths), FIT_TOKENS)) + 1, args.shard_size, n_seq)
            moments, fit_tokens = hidden_moments(
                model, hidden_layers, [pad_batch(encoded[b:min(b + args.batch_size, fit_seqs)], pad_id(tokenizer))
                                       for b in range(0, fit_seqs, args.batch_size)], device)
            codec = fit_codec(fmt, moments)
            capture_cfg["hidden_codec"] = save_codec(out, codec, fit_tokens)
            print(f"fitted {fmt.name} on the first {fit_tokens:,} tokens in {time.perf_counter() - t1:.1f} s: "
                  f"bits per axis rank {codec.bits[::8].tolist()} (every 8th)")
        manifest = Manifest(model={"name_or_path": args.model, "architecture": shape.architecture,
                                   "quantization": args.quantization, "dtype": plan["dtype"]},
                            routing=shape.to_json(), capture=capture_cfg,
                            sources=[{**s.describe(), "sequences": per_source} for s in sources], plan=plan,
                            format_version=FORMAT_VERSION if fmt.lossless else COMPACT_FORMAT_VERSION)
        atomic_save_tensors(out / ROUTER_WEIGHTS,
                            {f"router.{l}": w.to(compute_dtype) for l, w in enumerate(router_weights(model))})
        write_manifest(out, manifest)

    # --- disk: refuse a collection that cannot fit rather than fail hours in
    start = len(manifest.shards)
    done_tokens = int(lengths[: start * args.shard_size].sum())
    need = (int(lengths.sum()) - done_tokens) * per_token
    free = shutil.disk_usage(out).free
    print_seed_recipe_table()
    stored_as = hidden_name if fmt.lossless else f"{fmt.name}, captured in {hidden_name}"
    print(f"this run stores {per_token / 1024:.1f} KiB per token ({len(hidden_layers)} hidden layers in {stored_as}"
          f"{', logits' if store_logits else ''}): {need / 2**30:.2f} GiB to write, {free / 2**30:.1f} GiB free")
    if need > 0.98 * free:
        raise UserError(f"{out}: needs {need / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB are free; store fewer "
                        f"--hidden-layers, a compact --hidden-format, --no-logits, or choose another --output")

    # --- collect, one shard at a time; batches never cross a shard, so a resumed run is identical
    max_rows = args.batch_size * args.max_length
    capture = RoutingCapture(model, hidden_layers, hidden_dtype, store_logits, max_rows, K, shape.norm_topk_prob,
                             E, H, hidden_format=fmt, hidden_codec=codec)
    filler = ShardFiller(capture)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    bar = tqdm(total=int(lengths.sum()), initial=done_tokens, unit="tok", desc="collect", dynamic_ncols=True)
    t0 = time.perf_counter()
    writer: ShardWriter | None = None
    try:
        for shard_idx in range(start, n_shards):
            lo, hi = shard_idx * args.shard_size, min((shard_idx + 1) * args.shard_size, n_seq)
            seq_len = lengths[lo:hi]
            N = int(seq_len.sum())
            specs = shard_specs(N, hi - lo, **dims)
            writer = ShardWriter(out / shard_name(shard_idx), specs,
                                 {"format_version": str(manifest.format_version), "shard": str(shard_idx)}, writeback=True)
            writer.write("token_ids", np.concatenate([np.asarray(encoded[i], dtype=np.int32) for i in range(lo, hi)]))
            writer.write("seq_offsets", offsets[lo:hi + 1] - offsets[lo])
            writer.write("seq_ids", np.arange(lo, hi, dtype=np.int64))
            writer.write("seq_sources", np.array([texts[i][0] for i in range(lo, hi)], dtype=np.int16))
            row = 0
            for b in range(lo, hi, args.batch_size):
                input_ids, mask = pad_batch(encoded[b:min(b + args.batch_size, hi)], pad_id(tokenizer))
                host = capture.forward(model, input_ids, mask)
                filler.write_batch(writer, host, row)
                row += host.rows
                bar.update(host.rows)

            # committed (fsync, SHA-256, rename, manifest) on background threads, in shard order, while the next
            # shard is collected; a crash before its manifest update leaves a .partial that --resume redoes
            def committed(nbytes: int, digest: str, idx: int = shard_idx, S: int = hi - lo, N: int = N) -> None:
                manifest.shards.append(ShardInfo(file=shard_name(idx), sequences=S, tokens=N, bytes=nbytes,
                                                 sha256=digest))
                manifest.complete = len(manifest.shards) == n_shards
                write_manifest(out, manifest)
            filler.commit(writer, committed)
            writer = None  # the committer owns it now
        filler.join()
    except BaseException:
        filler.close()
        if writer is not None:
            writer.abort()  # the shard in progress never looks finished; --resume redoes it
        raise
    filler.close()
    capture.close()
    bar.close()
    elapsed = time.perf_counter() - t0
    collected = int(lengths.sum()) - done_tokens
    total_bytes = sum(s.bytes for s in manifest.shards)
    print(f"done: {n_seq} sequences, {int(lengths.sum())} tokens in {len(manifest.shards)} shards "
          f"({total_bytes / 2**20:.1f} MiB) at {out}; {collected / max(elapsed, 1e-9):,.0f} tokens/s this run")


if __name__ == "__main__":
    with one_line_errors("collect_traces"):
        main()
