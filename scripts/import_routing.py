r"""Import routing recorded by a serving engine as a routing-only trace set that every routing reader here takes.

vLLM (--enable-return-routed-experts), SGLang (return_routed_experts, or its expert distribution recorder in
per_token mode), llama.cpp (examples/moe-trace) and Hugging Face (output_router_logits=True) each record expert
ids in their own layout (docs/trace-format.md, "Imported routing", names the versions they were read from). The
set holds expert ids, token ids where the engine gives them, and sequence boundaries; no hidden states, router
logits or router matrices, which its manifest says (capture.imported), so readers that need them refuse it.

    python scripts/import_routing.py --from vllm routed/ --output routing_data/traces/vllm-qwen3 \
        --model-config qwen3-30b-a3b
    python scripts/analyze_routing.py routing_data/traces/vllm-qwen3 --model-config qwen3-30b-a3b
Seconds on a CPU, a hand-written llama.cpp trace (2 tokens, 2 MoE layers, top-2 of 4 experts):
    printf '0,1\n0,2\n1,3\n1,0\n0,2\n0,3\n1,0\n1,1\n' > /tmp/moe_trace.csv
    python scripts/import_routing.py --from llamacpp-csv /tmp/moe_trace.csv --top-k 2 --num-experts 4 \
        --output /tmp/moe-trace-set --overwrite
"""
from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

from tqdm import tqdm

from collection.importers import (
    IMPORT_FORMATS,
    READERS,
    SHARD_BYTES,
    Assembler,
    ModelFacts,
    RoutingShards,
    imported_manifest,
    model_facts,
    read_expert_map,
)
from collection.traces.format import MANIFEST, shard_name, write_manifest
from collection.traces.legacy import natural_key
from collection.traces.output import OutputLock, open_output, start_one_shot
from common.atomic import sha256_file
from common.errors import UserError, one_line_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="fmt", required=True, choices=list(IMPORT_FORMATS),
                   help="the recording's layout: " + "; ".join(f"{f.name} = {f.summary}" for f in IMPORT_FORMATS.values()))
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files, or directories whose files of the format's suffixes are read in natural name order; "
                        "each request / run is one sequence, in input order")
    p.add_argument("--output", required=True, help="trace directory to write")
    p.add_argument("--num-experts", type=int, default=None,
                   help="routed experts per layer (default: the --model-config's, else the largest id + 1)")
    p.add_argument("--top-k", type=int, default=None,
                   help="experts per token (default: the --model-config's; needed by sglang-meta, llamacpp-csv and "
                        "hf-logits without one)")
    p.add_argument("--model-config", default=None,
                   help="the model's preset (models/moe_configs.py): E, top-k, which decoder layers are MoE, and "
                        "the expert size the analysis prices")
    p.add_argument("--expert-map", type=Path, default=None,
                   help="physical -> logical expert map [layer slots, physical experts] (.npy, or a torch.save of it "
                        "or of an SGLang recorder dump) for ids recorded under expert-parallel load balancing")
    p.add_argument("--model", default=None, help="the model's name recorded in the manifest (default: the preset)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing trace set in --output")
    args = p.parse_args(argv)
    for flag in ("num_experts", "top_k"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    return args


def expand_inputs(specs: list[str], suffixes: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted((f for f in p.iterdir() if f.suffix in suffixes and f.is_file()), key=natural_key)
            if not found:
                raise UserError(f"{p}: no {' or '.join(suffixes)} files in this directory")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p}: no such file or directory")
    if len({f.resolve() for f in files}) != len(files):
        raise UserError("the same input is named twice")
    return files


def resolve_model(args: argparse.Namespace) -> tuple[ModelFacts | None, int | None, int | None, dict[str, str]]:
    """(facts, E, k, where E and k came from): flags win only where they agree with the preset."""
    facts = None
    if args.model_config:
        from models.moe_configs import make_config

        facts = model_facts(args.model_config, make_config(args.model_config))
    E, K, notes = args.num_experts, args.top_k, {}
    for flag, value, own in (("--num-experts", E, facts and facts.num_experts), ("--top-k", K, facts and facts.top_k)):
        if facts is not None and value is not None and value != own:
            raise UserError(f"{flag} {value}, but --model-config {args.model_config} says {own}")
    E, K = E or (facts and facts.num_experts), K or (facts and facts.top_k)
    notes["num_experts_from"] = ("--num-experts" if args.num_experts else f"--model-config {args.model_config}"
                                 if facts else "the largest expert id + 1 (no --num-experts or --model-config)")
    notes["top_k_from"] = ("--top-k" if args.top_k else f"--model-config {args.model_config}" if facts
                           else "the recorded arrays")
    notes["moe_layer_indices_from"] = (f"--model-config {args.model_config}" if facts else
                                       "the recording (llama.cpp's layer numbers, or the slots that hold routing)")
    if args.fmt == "hf-logits" and facts is not None and facts.why_not_topk:
        raise UserError(f"--from hf-logits: {facts.why_not_topk}; import this model's routing from vLLM or SGLang")
    return facts, E, K, notes


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    lock = OutputLock(Path(args.output))
    try:
        import_routing(args, lock)
    finally:
        lock.release()


def import_routing(args: argparse.Namespace, lock: OutputLock) -> None:
    fmt = IMPORT_FORMATS[args.fmt]
    inputs = expand_inputs(args.inputs, fmt.suffixes)
    out = Path(args.output)

    # --- every input and flag is checked before the output is touched (rules: collection/traces/output.py)
    if any(out.resolve() in f.resolve().parents for f in inputs):
        raise UserError(f"--output {out} holds the inputs; choose another directory")
    state = open_output(out, lock, args.overwrite)
    facts, E, K, notes = resolve_model(args)
    asm = Assembler(facts, E, K, read_expert_map(args.expert_map) if args.expert_map else None)
    total = sum(f.stat().st_size for f in inputs)
    # stored routing takes at most ~2x the recorded bytes (int16 ids + float16 weights per id); every shard name
    # that may be written is checked against the user's files now
    max_shards = len(inputs) + math.ceil(2 * total / SHARD_BYTES) + 1
    names = [shard_name(i) for i in range(max_shards)] + [MANIFEST]
    target = start_one_shot(state, lock, args.overwrite, names, 2 * total + (1 << 20), "choose another --output")
    print(f"importing {len(inputs)} {fmt.name} files into {out} (about {target.sizes})")

    # --- one sequence per request / run / batch row, buffered into shards
    writer: RoutingShards | None = None
    has_tokens = has_weights = None
    dropped, empty, digests = 0, 0, []
    try:
        for path in tqdm(inputs, desc="import", unit="file", dynamic_ncols=True, disable=len(inputs) < 2):
            digests.append(sha256_file(path))
            for rec in READERS[fmt.name](path, top_k=K, slots=facts and facts.decoder_layers,
                                         normalized=bool(facts and facts.normalized)):
                if len(rec.ids) == 0:  # a request of one token: nothing was routed
                    empty += 1
                    continue
                ids = asm.add(rec)
                if has_tokens is None:
                    has_tokens, has_weights = rec.token_ids is not None, rec.weights is not None
                    writer = RoutingShards(target.dest, ids.shape[1], ids.shape[2], E or 1, max_shards)
                if (rec.token_ids is not None) != has_tokens:
                    raise UserError(f"{rec.where}: {'no ' if has_tokens else ''}token ids, unlike the first sequence")
                writer.add(ids, rec.token_ids, rec.weights if has_weights else None)
                dropped += rec.dropped
        if writer is None:
            raise UserError(f"{', '.join(map(str, inputs[:3]))}: no routed token in the inputs")
        writer.flush()
        K = writer.K
        E = E or asm.max_id + 1
        notes["dropped_tokens"], notes["empty_sequences_skipped"] = dropped, empty
        if fmt.name == "llamacpp-csv":
            notes["dropped_note"] = ("prefill tokens without routing at the last MoE layer (llama.cpp runs it "
                                     "on a ubatch's output tokens only)")
        if has_weights:
            notes["weights_from"] = ("softmax over the router outputs at the chosen ids (stored probabilities as "
                                     "they are)" + (", renormalised to sum 1 (the family does)" if facts and
                                                    facts.normalized else ", not renormalised"))
        identity = hashlib.sha256("".join(digests).encode()).hexdigest()
        plan = {"imported": fmt.name, "inputs": {"files": len(inputs), "bytes": total, "sha256_of_sha256s": identity},
                "tokens_sha256": identity}  # the inputs' checksums identify the data
        write_manifest(target.dest, imported_manifest(
            fmt, asm, writer, facts=facts, model=args.model or args.model_config or "unknown", num_experts=E,
            top_k=K, tokens=bool(has_tokens), weights=bool(has_weights), plan=plan, notes=notes))
    except BaseException:
        if writer is not None:
            writer.abort()
        target.abandon(s.file for s in (writer.shards if writer else []))  # the directory as it was found
        raise
    target.finish()
    L = len(asm.layer_indices)
    print(f"done: {writer.sequences} sequences, {writer.tokens} tokens x {L} MoE layers x top-{K} "
          f"({writer.tokens * L * K:,} ids, {E} experts) in {len(writer.shards)} shards at {out}; token ids "
          f"{'kept' if has_tokens else 'absent'}, routing weights {'kept' if has_weights else 'absent (1/k)'}"
          + (f"; {dropped} tokens without routing at every MoE layer dropped" if dropped else "")
          + (f"; {empty} requests with no routed token skipped" if empty else ""))


if __name__ == "__main__":
    with one_line_errors("import_routing"):
        main()
