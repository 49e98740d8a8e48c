"""The collector: from a model and a plan of texts to a finished trace set, shard by shard.

`collect` is stage 1 (scripts/collect_traces.py parses the flags and calls it). The story, in order: the output
is only read until every input is checked and the model has loaded; the plan (which texts, in which order, as
which tokens) is deterministic from --seed; rank 0 prepares the destination (a fresh directory, an interrupted
collection, or the staging directory of a replacement: collection/traces/output.py) and writes the manifest
and router weights; every rank collects its shards (one forward pass per batch, capture copies on a side stream,
shards filled and committed on background threads); the complete set is swapped in last.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from collection.capture import RoutingCapture, ShardFiller, hidden_moments, pad_batch
from collection.distributed import ShardLedger, fold_partial_manifests, partial_manifest_files, shard_index
from collection.families import moe_layers, router_extras
from collection.model import load_model, resolve_model_path, router_weights, routing_shape
from collection.placement import describe_placement, placement_from_args
from collection.plan import announce, tokens_per_second
from collection.sources import parse_sources, sample_balanced
from collection.traces.durable import OpenAhead
from collection.traces.format import (
    COMPACT_FORMAT_VERSION,
    FORMAT_VERSION,
    MANIFEST,
    ROUTER_WEIGHTS,
    Manifest,
    SafetensorsFile,
    ShardInfo,
    ShardWriter,
    TraceFormatError,
    TraceShard,
    bytes_per_token,
    encode_codec,
    encode_tensors,
    read_codec,
    shard_name,
    shard_specs,
    write_manifest,
)
from collection.traces.hidden_format import CODEC_FILE, FORMATS, LOSSLESS, fit_codec
from collection.traces.output import (
    OutputLock,
    OutputState,
    check_free_space,
    check_no_collision,
    expected_partials,
    human_size,
    inspect_output,
    owned_names,
    prepare_destination,
    swap_in,
)
from common.atomic import atomic_write_bytes, atomic_write_json, sha256_file
from common.device import device_name, host_memory_available, pick_device, pick_dtype
from common.errors import UserError
from common.paths import is_link
from common.ranks import Ranks, rank_device

BUNDLED_PER_DOMAIN = 400  # the bundled corpus holds at least this many trace texts per domain
QUICK_COMMAND = ("python scripts/collect_traces.py --target_traces 120 --shard_size 60 --max_length 128 "
                 "--output routing_data/traces/quick --overwrite")  # the docstring's seconds-long command


def is_out_of_memory(e: RuntimeError) -> bool:
    """A forward that does not fit: CUDA's error, or the CPU allocator's RuntimeError."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(e)


def parse_layers(spec: str, num_layers: int | None) -> list[int]:
    """MoE layer indices of --hidden-layers; `num_layers` None checks only the spelling."""
    if spec == "all":
        return list(range(num_layers or 0))
    if spec == "none":
        return []
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            a, _, b = part.partition("-")
            first, last = int(a), int(b or a)
            if last < first:  # range() of a reversed range is empty: it would store nothing and say "layers 0..0"
                raise UserError(f"--hidden-layers {spec!r}: the range {part} runs backwards; write {last}-{first}")
            layers.update(range(first, last + 1))
    except ValueError:
        raise UserError(f"--hidden-layers {spec!r}: use all, none, or indices like 0,4,8 or 0-11") from None
    if not layers or min(layers) < 0 or (num_layers is not None and max(layers) >= num_layers):
        raise UserError(f"--hidden-layers {spec!r}: the model has MoE layers 0..{(num_layers or 1) - 1}")
    return sorted(layers)


def plan_dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def largest_batch_tokens(lengths: np.ndarray, shard_size: int, batch_size: int) -> int:
    """Real tokens of the largest forward batch: batches of `batch_size` sequences that never cross a shard.
    The capture buffers hold exactly this many rows (not batch_size x max_length)."""
    i = np.arange(len(lengths))
    per_shard = -(-shard_size // batch_size)
    batch_of = (i // shard_size) * per_shard + (i % shard_size) // batch_size
    return int(np.bincount(batch_of, weights=lengths).max())


def shard_left_by_plan(path: Path, index: int, tokens: int, sequences: int) -> bool:
    """Whether `path`, listed by no manifest, is shard `index` of this very plan, written whole by this
    collector: a run killed between a shard's rename and its manifest record leaves one. Such a file is the
    collector's own and is collected again; any other file of a shard's name is the user's and is refused."""
    if not path.is_file():
        return False
    try:
        f = SafetensorsFile(path)
    except TraceFormatError:
        return False
    return (f.metadata.get("shard") == str(index) and f.entries.get("token_ids", ("", ()))[1] == (tokens,)
            and f.entries.get("seq_ids", ("", ()))[1] == (sequences,))


def choose_destination(state: OutputState, args: argparse.Namespace) -> tuple[Path, Manifest | None]:
    """Where this run writes and which manifest it continues, decided from the (read-only) output state:
    a fresh directory in place, an interrupted collection where it was, an existing set's replacement in
    the staging directory."""
    out = state.out
    if args.resume and state.interrupted_swap:
        return out, state.staged                # its swap is finished first: the set then lies in `out`
    if args.resume and state.staged is not None:
        return state.staging_dir, state.staged  # a replacement cut short while it was collected
    if args.resume and state.manifest is not None and (not state.staging or state.swap_leftover):
        return out, state.manifest
    if state.manifest is not None or state.interrupted_swap:
        return state.staging_dir, None          # --overwrite (or --resume of a replacement never begun)
    return out, None                            # nothing here yet


FIT_TOKENS = 65536  # a fitted --hidden-format is fitted on this many tokens (at most the first shard's)


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def collect(args: argparse.Namespace, lock: OutputLock, ranks: Ranks) -> None:
    out = Path(args.output)

    # --- the output is only read until every input has been checked and the model has loaded; rank 0 decides
    # about it for every process (under torchrun), and holds the lock
    def inspect() -> OutputState:
        state = inspect_output(out, args.resume, args.overwrite)
        if out.is_dir():
            lock.acquire()  # a second collector stops here, before loading anything
        return state
    state = ranks.on_main(inspect)
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
    if any(skipped.values()):  # "NAME (null text)": rows whose text is null
        print(f"skipped {sum(skipped.values())} texts shorter than --min-chars {args.min_chars} or null: "
              + ", ".join(f"{name} {n}" for name, n in skipped.items() if n))

    placement = None
    if args.device_map is not None:  # accelerate spreads the layers; each torchrun rank over its own GPUs
        placement, device = placement_from_args(args.device_map, args.max_memory, ranks.local_rank,
                                                ranks.local_world, ranks.distributed)
    else:
        device = pick_device(*rank_device(ranks, args.device, args.gpu))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # pinned buffers and events of this process belong to its own GPU
    dtype = pick_dtype(args.dtype, device)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, device, dtype, args.quantization, placement)
    load_s = time.perf_counter() - t0
    placed = describe_placement(model, [m.router for m in moe_layers(model)]) if placement is not None else None
    if placed:
        print(f"device map ({args.device_map}): {placed}")
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
    routers = {**{f"router.{l}": w.to(compute_dtype) for l, w in enumerate(router_weights(model))},
               **router_extras(model)}

    # --- memory: the capture buffers hold the largest real batch, twice on a GPU (one fills while one drains)
    max_rows = largest_batch_tokens(lengths, args.shard_size, args.batch_size)
    buffers = (2 if device.type == "cuda" else 1) * max_rows * per_token
    if buffers > 0.5 * host_memory_available():
        raise UserError(f"--batch_size {args.batch_size}: its largest batch ({max_rows:,} tokens) needs "
                        f"{human_size(buffers)} of host buffers, and only {human_size(host_memory_available())} "
                        "of memory are available; lower --batch_size")

    # --- where to write and what is already there, then (from "written" on) the writing of the manifest and
    # router weights: rank 0 alone, under the lock, for every process; the old set stays untouched until the new
    # one is complete
    names = [shard_name(i) for i in range(n_shards)] + [ROUTER_WEIGHTS, MANIFEST] + ([CODEC_FILE] if fmt.fitted else [])

    def shard_tokens(i: int) -> int:
        return int(lengths[i * args.shard_size:(i + 1) * args.shard_size].sum())

    def shard_sequences(i: int) -> int:
        return min((i + 1) * args.shard_size, n_seq) - i * args.shard_size

    def prepare() -> tuple[Path, Manifest | None]:
        dest, previous = choose_destination(state, args)
        if previous is not None:
            mismatch = [k for k in plan if previous.plan.get(k) != plan[k]]
            mismatch += [k for k in ("hidden_layers", "hidden_dtype", "store_logits")
                         if previous.capture.get(k) != capture_cfg[k]]
            mismatch += ["hidden_format"] if previous.hidden_format != fmt.name else []
            if mismatch:
                raise UserError(f"--resume: this run differs from the interrupted one in {', '.join(mismatch)}; "
                                f"repeat its flags exactly (they are in {dest / MANIFEST})")
            for info in previous.shards:  # a finished shard is kept only if it is intact
                where = state.staging_dir if (state.staging_dir / info.file).is_file() else dest  # mid-swap: either
                try:
                    TraceShard(where / info.file, info, previous, verify=True, hint="")
                except UserError as e:
                    raise UserError(f"--resume: {e}; --overwrite collects the set again") from None
            # shards the ranks of a killed torchrun run finished (checked; written into the manifest below)
            previous = fold_partial_manifests(dest, copy.deepcopy(previous), write=False)  # `state` stays as read
        # files of this run's names that no manifest lists are the user's: never written over
        # (`previous` also lists the shards of a killed torchrun run's partial manifests, folded in above)
        owned = owned_names((state.manifest, state.staged, state.replaced, previous))
        if previous is not None:  # a shard this plan's writer renamed into place just before it was killed
            owned |= {shard_name(i) for i in range(n_shards)
                      if shard_left_by_plan(dest / shard_name(i), i, shard_tokens(i), shard_sequences(i))}
        check_no_collision(out, names, owned)
        if dest == out and previous is None and not (args.resume or args.overwrite):
            for partial in expected_partials(names):
                if (out / partial).exists():
                    raise UserError(f"{out / partial} is left from an interrupted collection; --resume starts it over")
        done = {shard_index(s) for s in previous.shards} if previous is not None else set()

        # --- disk: refuse a collection that cannot fit rather than fail hours in (before anything is written)
        need = sum(shard_tokens(i) for i in range(n_shards) if i not in done) * per_token
        sizes = check_free_space(out, need, "store fewer --hidden-layers, a compact --hidden-format, a 2-byte "
                                            "--hidden-dtype, --no-logits, or choose another --output")
        stored_as = hidden_name if fmt.lossless else f"{fmt.name}, captured in {hidden_name}"
        print(f"storing {per_token / 1024:.1f} KiB per token ({len(hidden_layers)} hidden layers in {stored_as}"
              f"{', logits' if store_logits else ''}): {sizes}")

        # --- a fitted format is fitted on the first tokens of the first shard, before any shard is written
        # (a resumed run keeps the interrupted run's fit, so its codes are the same)
        codec_bytes = None
        if previous is None and fmt.fitted and hidden_layers:
            t1 = time.perf_counter()
            fit_seqs = min(int(np.searchsorted(np.cumsum(lengths), FIT_TOKENS)) + 1, args.shard_size, n_seq)
            moments, fit_tokens = hidden_moments(
                model, hidden_layers, [pad_batch(encoded[b:min(b + args.batch_size, fit_seqs)], pad_id(tokenizer))
                                       for b in range(0, fit_seqs, args.batch_size)], device)
            codec = fit_codec(fmt, moments, router_weights(model), hidden_layers)
            codec_bytes, capture_cfg["hidden_codec"] = encode_codec(codec, fit_tokens)
            print(f"fitted {fmt.name} on the first {fit_tokens:,} tokens in {time.perf_counter() - t1:.1f} s: "
                  f"bits per axis rank {codec.bits[::8].tolist()} (every 8th)")

        # --- written from here on
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        if inspect_output(out, args.resume, args.overwrite) != state:
            raise UserError(f"{out} changed while this run was loading; run it again")
        prepare_destination(state, dest, previous, names)
        if previous is not None and previous.complete:
            print(f"{out}: collection already complete ({len(previous.shards)} shards)")
            return dest, None
        if previous is not None:
            manifest = previous
            print(f"resuming: {len(manifest.shards)} of {n_shards} shards already done and verified")
        else:
            manifest = Manifest(model={"name_or_path": args.model, "architecture": shape.architecture,
                                       "quantization": args.quantization, "dtype": plan["dtype"]},
                                routing=shape.to_json(), capture=capture_cfg,
                                sources=[{**s.describe(), "sequences": per_source} for s in sources], plan=plan,
                                format_version=FORMAT_VERSION if fmt.lossless else COMPACT_FORMAT_VERSION)
        # the router weights: listed in the manifest before they are written, so an interruption leaves no
        # unlisted file
        router_bytes, info = encode_tensors(ROUTER_WEIGHTS, routers)
        if manifest.router_weights is not None and manifest.router_weights.sha256 != info.sha256:
            raise UserError(f"--resume: the router weights of --model {args.model} differ from the interrupted run's "
                            f"({dest / MANIFEST}); --overwrite collects the set again")
        manifest.router_weights = info
        write_manifest(dest, manifest)
        for partial_manifest in partial_manifest_files(dest):  # folded into the manifest just written (or cut short)
            partial_manifest.unlink()
        rw_path = dest / ROUTER_WEIGHTS
        if is_link(rw_path) or not (rw_path.is_file() and rw_path.stat().st_size == info.bytes
                                    and sha256_file(rw_path) == info.sha256):
            atomic_write_bytes(rw_path, router_bytes)
        if codec_bytes is not None:  # listed in the manifest just written, as the router weights are
            atomic_write_bytes(dest / CODEC_FILE, codec_bytes)
        return dest, manifest
    dest, manifest = ranks.on_main(prepare)
    if manifest is None:
        return
    ledger = ShardLedger(dest, manifest, n_shards, ranks)  # which shards are done, which are this process's
    done_tokens = int(lengths.sum()) - sum(shard_tokens(i) for i in ledger.remaining())
    need = (int(lengths.sum()) - done_tokens) * per_token

    speed = tokens_per_second(model, encoded[:args.batch_size], pad_id(tokenizer), device)
    announce(len([i for i in range(n_seq) if i // args.shard_size in ledger.remaining()]),
             int(lengths.sum()) - done_tokens, need, speed, device, QUICK_COMMAND)

    # --- collect, one shard at a time; batches never cross a shard, so a resumed run is identical
    # a fitted format's parameters: fitted by rank 0 above or by the interrupted run, read back by every rank
    codec = read_codec(dest, manifest) if fmt.fitted and hidden_layers else None
    capture = RoutingCapture(model, hidden_layers, hidden_dtype, store_logits, max_rows, K, shape.norm_topk_prob,
                             E, H, hidden_format=fmt, hidden_codec=codec)
    filler = ShardFiller(capture)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if ranks.distributed:  # rank 0's bar counts its own shards; the others draw none
        print(f"{ranks.world} processes: shard i is collected by rank i % {ranks.world}; "
              f"rank 0 has {len(ledger.todo)} of the {len(ledger.remaining())} shards to do")
        bar = tqdm(total=sum(map(shard_tokens, ledger.todo)), unit="tok", desc=f"collect, rank 0 of {ranks.world}",
                   dynamic_ncols=True, disable=not ranks.is_main)
    else:
        bar = tqdm(total=int(lengths.sum()), initial=done_tokens, unit="tok", desc="collect", dynamic_ncols=True)
    ranks.barrier()  # rank 0's manifest exists before any shard is recorded; the ranks' clocks start together
    t0 = time.perf_counter()

    def shard_bounds(shard_idx: int) -> tuple[int, int]:
        """The shard's first sequence and the one after its last."""
        return shard_idx * args.shard_size, min((shard_idx + 1) * args.shard_size, n_seq)

    def open_shard(shard_idx: int) -> ShardWriter:
        """The shard's file, sized, with its token ids and sequence table written (run one shard ahead)."""
        lo, hi = shard_bounds(shard_idx)
        writer = ShardWriter(dest / shard_name(shard_idx), shard_specs(int(lengths[lo:hi].sum()), hi - lo, **dims),
                             {"format_version": str(manifest.format_version), "shard": str(shard_idx)}, writeback=True)
        writer.write("token_ids", np.concatenate([np.asarray(encoded[i], dtype=np.int32) for i in range(lo, hi)]))
        writer.write("seq_offsets", offsets[lo:hi + 1] - offsets[lo])
        writer.write("seq_ids", np.arange(lo, hi, dtype=np.int64))
        writer.write("seq_sources", np.array([texts[i][0] for i in range(lo, hi)], dtype=np.int16))
        return writer

    ahead = OpenAhead(open_shard, ledger.todo)  # every writer it opened: an error aborts all not committed
    try:
        for shard_idx in ledger.todo:
            lo, hi = shard_bounds(shard_idx)
            N = int(lengths[lo:hi].sum())
            writer = ahead.take()
            row = 0
            for b in range(lo, hi, args.batch_size):
                input_ids, mask = pad_batch(encoded[b:min(b + args.batch_size, hi)], pad_id(tokenizer))
                try:
                    host = capture.forward(model, input_ids, mask)
                except RuntimeError as e:
                    if not is_out_of_memory(e):
                        raise
                    raise UserError(f"out of {device.type.upper()} memory in a batch of {input_ids.shape[0]} "
                                    f"sequences x {input_ids.shape[1]} tokens; lower --batch_size") from None
                filler.write_batch(writer, host, row)
                row += host.rows
                bar.update(host.rows)

            # committed (fsync, SHA-256, rename, manifest) on background threads, in shard order, while the next
            # shard is collected; a crash before its manifest update leaves a .partial that --resume redoes
            def committed(nbytes: int, digest: str, idx: int = shard_idx, S: int = hi - lo, N: int = N) -> None:
                ledger.record(ShardInfo(file=shard_name(idx), sequences=S, tokens=N, bytes=nbytes, sha256=digest))
            filler.commit(writer, committed)
        filler.join()
    except BaseException:
        filler.close()  # waits for the writing threads: no write lands after the aborts below
        ahead.close()
        for w in ahead.opened:
            w.abort()  # a shard in progress never looks finished; --resume redoes it
        raise
    ahead.close()
    filler.close()
    capture.close()
    bar.close()
    elapsed = time.perf_counter() - t0
    mine = {"rank": ranks.rank, "device": f"{device} ({device_name(device)})", "tokens": sum(map(shard_tokens, ledger.todo)),
            "seconds": elapsed, "load_seconds": load_s}
    manifest = ledger.finish()  # under torchrun: waits for every rank, rank 0 writes the one manifest
    if dest != out and ranks.is_main:
        swap_in(out)  # the new set is complete: now, and only now, it replaces the old one
    per_rank = ranks.all_gather(mine)
    collected, seconds = sum(r["tokens"] for r in per_rank), max(r["seconds"] for r in per_rank)
    total_bytes = sum(s.bytes for s in manifest.shards)
    print(f"done: {n_seq} sequences, {int(lengths.sum())} tokens in {len(manifest.shards)} shards "
          f"({human_size(total_bytes)}) at {out}; {collected / max(seconds, 1e-9):,.0f} tokens/s this run"
          + (f" over {ranks.world} processes" if ranks.distributed else ""))
    if args.stats_json and ranks.is_main:
        atomic_write_json(Path(args.stats_json), {
            "processes": ranks.world, "device_map": args.device_map, "max_memory": args.max_memory, "placement": placed,
            "tokens": collected, "seconds": seconds, "tokens_per_s": collected / max(seconds, 1e-9),
            "bytes_per_token": per_token, "complete": manifest.complete, "per_rank": per_rank})
    ranks.leave()
