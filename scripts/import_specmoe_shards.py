r"""Import the original SpecMoE project's pickle shards as a trace set that every stage here reads.

Each legacy shard is a pickled list of the collector's dataclass, one object per (MoE layer, forward
batch). They are read through a restricted unpickler (no code in the files runs, the collector's
module is never imported), their layer index is recovered from the trace order, and each input
shard becomes one output shard of whole forward passes. What cannot be recovered (padding, token ids,
router weights) is stated in the manifest's capture.legacy section. Details: docs/legacy-import.md.

    python scripts/import_specmoe_shards.py --input routing_data/shards --output routing_data/traces/specmoe \
        --num-layers 24
    python scripts/train_simple_predictor.py --traces routing_data/traces/specmoe
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from tqdm import tqdm

from collection.traces.format import (
    MANIFEST,
    Manifest,
    ShardInfo,
    ShardWriter,
    bytes_per_token,
    shard_name,
    write_manifest,
)
from collection.traces.legacy import (
    CONFIG_FILE,
    DEFAULT_CLASS_MODULE,
    DEFAULT_CLASS_NAME,
    LegacyFormatError,
    expand_inputs,
    fill_shard,
    group_passes,
    layer_id_meaning,
    load_legacy_shard,
    looks_like_probabilities,
    num_layers_from_config,
    number_traces,
    open_shard,
    read_traces,
    shape_run_hint,
)
from collection.traces.output import OutputLock, open_output, start_one_shot
from common.atomic import sha256_file
from common.errors import UserError, one_line_errors
from common.paths import check_writable, set_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="legacy shard files, or directories of *.pkl shards (read in natural name order)")
    p.add_argument("--output", required=True, help="trace directory to write")
    p.add_argument("--num-layers", type=int, default=None,
                   help="MoE layers of the model (24 for Qwen1.5-MoE-A2.7B); default: model_info.num_layers of "
                        "the collector's training_config.json beside the shards, else required")
    p.add_argument("--class-module", default=DEFAULT_CLASS_MODULE,
                   help=f"module the trace dataclass pickled under (default {DEFAULT_CLASS_MODULE}: the collector "
                        "ran as a script); never imported")
    p.add_argument("--class-name", default=DEFAULT_CLASS_NAME,
                   help=f"the trace dataclass's name (default {DEFAULT_CLASS_NAME}; the streaming collector's "
                        "was QwenMoEGatingDataPoint)")
    p.add_argument("--order", choices=["auto", "input"], default="auto",
                   help="where a trace sits in the collection: auto = the trace counter in sample_id when there "
                        "is one, else input order; input = input order always")
    p.add_argument("--model", default="Qwen/Qwen1.5-MoE-A2.7B",
                   help="the model the traces came from, recorded in the manifest (not checked)")
    p.add_argument("--norm-topk-prob", action="store_true",
                   help="the model renormalised its top-k weights to sum to 1 (Qwen1.5-MoE did not)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing trace set in --output")
    args = p.parse_args(argv)
    if args.num_layers is not None and args.num_layers <= 0:
        p.error("--num-layers must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_writable("--output", args.output, "dir")  # before any input is read
    lock = OutputLock(Path(args.output))
    try:
        import_shards(args, lock)
    finally:
        lock.release()


def import_shards(args: argparse.Namespace, lock: OutputLock) -> None:
    inputs = expand_inputs(args.input)
    out = Path(args.output)

    # --- the output is only read until the inputs have been checked (rules: collection/traces/output.py)
    if any(f.resolve().parent == out.resolve() for f in inputs):
        raise UserError(f"--output {out} holds the input shards; choose another directory")
    state = open_output(out, lock, args.overwrite)

    # --- L: the one fact the layer recovery rests on, from the user or the collector's own config
    config_L, config_file, config_unusable = num_layers_from_config(inputs)
    if config_unusable:  # said, never skipped silently
        print(f"{len(config_unusable)} {CONFIG_FILE} ignored: {'; '.join(config_unusable)}")
    if args.num_layers is not None and config_L is not None and args.num_layers != config_L:
        raise UserError(f"--num-layers {args.num_layers}, but {config_file} says {config_L}")
    L = args.num_layers or config_L
    L_from = "--num-layers" if args.num_layers else config_file

    # --- an existing set is replaced only once the new one is complete: it is written beside it first
    names = [shard_name(i) for i in range(len(inputs))] + [MANIFEST]  # at most one output shard per input
    target = start_one_shot(state, lock, args.overwrite, names, sum(f.stat().st_size for f in inputs),
                            "choose another --output")
    dest = target.dest
    print(f"importing {len(inputs)} legacy shards into {out} (about {target.sizes})"
          + (f"; {L} MoE layers ({L_from})" if L else ""))

    # --- one output shard per input shard: the forward passes that complete in it
    dims: dict[str, int] = {}           # H, E, K, fixed by the first pass
    probabilities: bool | None = None   # was target_routing probabilities (True) or logits (False)?
    sources: dict[str, int] = {}        # dataset name -> index into manifest["sources"]
    seqs_per_source: dict[str, int] = {}
    shards: list[ShardInfo] = []
    inputs_info: list[dict] = []
    carry, next_index, dropped, num_seq, agree, rows = [], 0, 0, 0, 0.0, 0
    token_ids_seen, datasets_seen, source_dtype = set(), set(), ""
    writer: ShardWriter | None = None
    try:
        bar = tqdm(inputs, desc="import", unit="shard", dynamic_ncols=True)
        for path in bar:
            bar.set_postfix_str(path.name)
            traces = read_traces(path, load_legacy_shard(path, args.class_module, args.class_name))
            how = number_traces(traces, next_index, args.order == "auto", path)
            next_index = traces[-1].index + 1
            if L is None:
                no_config = "; ".join(config_unusable) or f"no {inputs[0].parent / CONFIG_FILE}"
                raise UserError(f"--num-layers is needed: {no_config}; and {shape_run_hint(traces)}")
            grouping = group_passes(traces, L, carry)
            carry, dropped = grouping.carry, dropped + grouping.dropped
            info = {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path),
                    "traces": len(traces), "first_trace": traces[0].index, "layer_index_from": how,
                    "layer_id_field": layer_id_meaning(traces, L), "output_shard": None}
            inputs_info.append(info)
            if not grouping.passes:
                continue
            first = grouping.passes[0].traces[0]
            if not dims:
                dims = {"H": first.hidden.shape[-1], "E": first.routing.shape[-1], "K": first.topk.shape[-1]}
                probabilities = looks_like_probabilities(first.routing)
                source_dtype = str(first.hidden.dtype).removeprefix("torch.")
            pass_sources = []
            for fp in grouping.passes:
                for t in fp.traces:
                    got = {"H": t.hidden.shape[-1], "E": t.routing.shape[-1], "K": t.topk.shape[-1]}
                    if got != dims:
                        raise LegacyFormatError(f"{t.where}: hidden/experts/top-k {list(got.values())}, earlier "
                                                f"traces {list(dims.values())}: not one model's traces")
                name = fp.traces[0].dataset or "legacy"
                datasets_seen.add(fp.traces[0].dataset is not None)
                token_ids_seen.add(fp.traces[0].token_ids is not None)
                pass_sources.append(sources.setdefault(name, len(sources)))
                seqs_per_source[name] = seqs_per_source.get(name, 0) + fp.shape[0]

            idx = len(shards)
            writer = open_shard(set_file(dest, shard_name(idx)), idx, grouping.passes, L, dims, probabilities)
            agree += fill_shard(writer, grouping.passes, num_seq, pass_sources, probabilities, args.norm_topk_prob)
            nbytes, digest = writer.commit()
            writer = None
            S, N = sum(fp.shape[0] for fp in grouping.passes), sum(fp.tokens for fp in grouping.passes)
            shards.append(ShardInfo(file=shard_name(idx), sequences=S, tokens=N, bytes=nbytes, sha256=digest))
            info["output_shard"] = shard_name(idx)
            num_seq, rows = num_seq + S, rows + N
            del traces, grouping
        bar.close()
        dropped += len(carry)  # a pass still open after the last input: the collector stopped mid-pass
        if not shards:
            raise UserError(f"the inputs hold no complete forward pass of {L} layers ({dropped} traces); "
                            f"check --num-layers")

        # --- the manifest, last: it lists only finished shards, and says what the import could not recover
        H, E, K = dims["H"], dims["E"], dims["K"]
        weights_from = ("target_routing probabilities at the stored ids" if probabilities else
                        "softmax over all experts of the stored router logits, at the stored ids")
        legacy = {
            "importer": "scripts/import_specmoe_shards.py", "dataclass": f"{args.class_module}.{args.class_name}",
            "num_layers_from": L_from,
            "layer_index": "trace g of the collection is layer g % num_layers (hook order); layer_id ignored",
            "target_routing_was": "probabilities" if probabilities else "logits",
            "topk_weights_from": weights_from + (", renormalised (--norm-topk-prob)" if args.norm_topk_prob else ""),
            "topk_ids_equal_routing_topk": round(agree / max(rows * L, 1), 6),
            "padding_recovered": False,
            "padding_note": "no attention mask was stored: every position of the padded batch is a token here",
            "token_ids_recovered": token_ids_seen == {True},
            "source_dataset_recovered": datasets_seen == {True},
            "router_weights": False,
            "router_weights_note": "legacy shards hold no router matrices: router baselines are unavailable",
            "dropped_traces": dropped,
            "dropped_note": "traces of forward passes with a layer missing (collection stopped mid-pass, or a "
                            "shard absent from the inputs)",
            "configs_ignored": config_unusable,
        }
        capture = {"hidden_layers": list(range(L)), "hidden_dtype": "float16", "store_logits": not probabilities,
                   "hidden_is": "MoE-block input (post-attention RMSNorm output), every padded position",
                   "bytes_per_token": bytes_per_token(num_layers=L, top_k=K, num_experts=E, hidden_size=H,
                                                      hidden_layers=L, hidden_dtype="float16",
                                                      store_logits=not probabilities),
                   "legacy": legacy}
        identity = hashlib.sha256("".join(i["sha256"] for i in inputs_info).encode() + str(L).encode()).hexdigest()
        plan = {"legacy_import": True, "model": args.model, "num_layers": L, "order": args.order,
                "class": f"{args.class_module}.{args.class_name}", "norm_topk_prob": args.norm_topk_prob,
                "inputs": inputs_info, "sequences": num_seq, "tokens": rows,
                "tokens_sha256": identity}  # no token ids exist: the inputs' checksums identify the data instead
        unnamed = "unknown: the legacy traces do not name their dataset"
        source_list = [{"name": n, "kind": "legacy", "spec": unnamed if n == "legacy" and False in datasets_seen
                        else "dataset_name of the legacy traces", "sequences": seqs_per_source[n]} for n in sources]
        manifest = Manifest(model={"name_or_path": args.model, "architecture": "unknown (legacy import)",
                                   "quantization": "unknown (legacy import)",
                                   "dtype": source_dtype},
                            routing={"architecture": "unknown (legacy import)", "num_layers": L, "num_experts": E,
                                     "top_k": K, "hidden_size": H, "norm_topk_prob": args.norm_topk_prob,
                                     "moe_layer_indices": list(range(L))},
                            capture=capture, sources=source_list, plan=plan, shards=shards, complete=True)
        write_manifest(dest, manifest)
    except BaseException:
        if writer is not None:
            writer.abort()
        target.abandon(s.file for s in shards)  # a refused input leaves the directory as it was found
        raise
    target.finish()
    print(f"done: {num_seq} sequences ({rows} token positions, padding included) in {len(shards)} shards at {out}; "
          f"{dropped} traces of unfinished passes dropped; target_routing held "
          f"{'probabilities' if probabilities else 'logits'}; no router weights, token ids "
          f"{'kept' if token_ids_seen == {True} else 'absent (-1)'}")


if __name__ == "__main__":
    with one_line_errors("import_specmoe_shards"):
        main()
