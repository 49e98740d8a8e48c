r"""Generate text with a Hugging Face MoE whose routed experts live in host memory behind a GPU expert cache.

The model is loaded on the host, its routed experts go to pinned host memory (fp16, bf16 or NF4), and the rest
moves to the GPU with C expert slots per MoE layer; `model.generate()` then runs as usual (greedy). Prints the
text, then the engine's statistics: prefill and decode tokens/s, hit rate, stall ms per token, MB moved and
wasted per token, and peak GPU memory split into weights, expert slots, staging and KV cache (docs/OFFLOAD.md).

A full-size model on one GPU, prefetching with router reuse:
    python scripts/generate_offloaded.py --model Qwen/Qwen1.5-MoE-A2.7B --cache-experts 15 \
        --policy prefetch:router-reuse --expert-format bf16 --prompt "The history of Rome" --max-new-tokens 64
Seconds on a CPU (the embedded default, fp32):
    python scripts/generate_offloaded.py --device cpu --expert-format fp32 --cache-experts 15 --max-new-tokens 16
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from collection.model import EMBEDDED_MODEL_NAME, load_model
from common.atomic import atomic_write_json
from common.device import pick_device
from common.errors import UserError, one_line_errors
from common.paths import check_writable
from offload import format_table, offload_experts
from offload.api import ENGINE_POLICY_HELP, engine_policy, expert_format_dtype


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and prompts")
    g.add_argument("--model", default=EMBEDDED_MODEL_NAME, help=f"local directory or hub id ({EMBEDDED_MODEL_NAME})")
    g.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several; default "
                   "'The history of the city')")
    g.add_argument("--prompts-file", default=None, help="a text file, one prompt per line")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt (32)")
    g.add_argument("--batch-size", type=int, default=1, help="prompts generated together (1)")
    g.add_argument("--device", default="auto", help="auto (the GPU with most free memory, else CPU), cpu, cuda:N")
    g = p.add_argument_group("the expert cache")
    g.add_argument("--cache-experts", type=int, default=None, help="GPU expert slots per MoE layer, 0..E "
                   "(0 streams every expert; default 15 unless --cache-gib)")
    g.add_argument("--cache-gib", type=float, default=None, help="GPU memory for all layers' expert slots, in GiB "
                   "(instead of --cache-experts)")
    g.add_argument("--policy", default="on-demand", help=f"cache and prefetch policy: {ENGINE_POLICY_HELP} (on-demand)")
    g.add_argument("--lookahead", type=int, default=1, help="prefetch layer l+d's experts while layer l runs (1)")
    g.add_argument("--fetch-budget", type=int, default=4, help="experts prefetched per layer (4)")
    g.add_argument("--expert-format", default="bf16", choices=["fp16", "bf16", "nf4", "fp32"],
                   help="host and slot format of the experts; the model is loaded in the same dtype (nf4: bf16 "
                   "compute; fp32 for CPU runs) (bf16)")
    g.add_argument("--staging-experts", type=int, default=None, help="experts per staging bank (two banks; top-k)")
    g = p.add_argument_group("routing and frequencies from traces")
    g.add_argument("--routing-from", default=None, help="a trace set: force every layer's top-k from its test "
                   "split (trace MoE layer i -> model MoE layer i); needed by oracle and belady")
    g.add_argument("--static-from", default=None, help="a trace set whose training split gives static-popular's "
                   "and popularity's expert frequencies (default --routing-from)")
    g.add_argument("--locality", type=float, default=0.0, help="with --routing-from: reuse each previous-token "
                   "expert with probability p (validation/prefetch/simulator.py add_locality) (0)")
    g.add_argument("--seed", type=int, default=0, help="trace split seed (0)")
    p.add_argument("--json", default=None, help="also write the texts, statistics and arguments here")
    return p.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if any(not p.strip() for p in prompts):
        raise UserError("--prompt '': an empty prompt gives generation no token to start from")
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            what = "a directory" if path.is_dir() else "not a regular file" if path.exists() else "no such file"
            raise UserError(f"--prompts-file {path}: {what}, not a text file of prompts")
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise UserError(f"--prompts-file {path}: not UTF-8 text (byte {e.start}); one prompt per line") from None
        if not lines:
            raise UserError(f"--prompts-file {path}: holds no prompt (one per line)")
        prompts += lines
    return prompts or ["The history of the city"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise UserError("--max-new-tokens and --batch-size must be at least 1")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed {args.seed}: must be in 0..{2**63 - 1}")
    check_writable("--json", args.json, "file")  # before the model loads: a run never ends unable to save
    engine_policy(args.policy)
    if args.cache_experts is None and args.cache_gib is None and args.policy != "all-resident":
        args.cache_experts = 15
    prompts = read_prompts(args)
    dev = pick_device(args.device)
    if args.expert_format == "nf4" and dev.type != "cuda":
        raise UserError(f"--expert-format nf4 needs a CUDA GPU (bitsandbytes' NF4 kernels); this run is on {dev}")

    # --- the model, loaded on the host; its experts go to the store, the rest to the device
    model, tok = load_model(args.model, torch.device("cpu"), expert_format_dtype(args.expert_format))
    tok.padding_side = "left"  # a batch's prompts end where generation starts
    handle = offload_experts(model, device=dev, cache_experts=args.cache_experts, cache_gib=args.cache_gib,
                             policy=args.policy, lookahead=args.lookahead, fetch_budget=args.fetch_budget,
                             expert_format=args.expert_format, routing_from=args.routing_from,
                             static_from=args.static_from, locality=args.locality, seed=args.seed,
                             staging_experts=args.staging_experts)
    print(handle.describe())
    if args.routing_from:
        print(f"routing: {handle.engine.forced.mapping}")

    # --- generate, a batch at a time, greedy
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    encoded = [tok(batch, return_tensors="pt", padding=True) for batch in batches]
    if args.routing_from:  # every forward takes B x T rows of the stream: refuse now, not when it runs out
        need = sum(e["input_ids"].shape[0] * (e["input_ids"].shape[1] + args.max_new_tokens - 1) for e in encoded)
        have = handle.engine.forced.tokens
        if need > have:
            raise UserError(f"--routing-from {args.routing_from}: its test split holds {have} tokens of routing and "
                            f"this run may need {need} (prompt tokens + --max-new-tokens - 1, per sequence); use "
                            "fewer or shorter prompts, fewer tokens, or a larger trace set")
    texts = []
    for batch, enc in zip(batches, encoded):
        enc = enc.to(dev)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for prompt, row in zip(batch, out):
            texts.append(prompt + tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True))
            print(f"\n{texts[-1]}")

    # --- what it cost
    stats = handle.stats()
    print("\n" + format_table(stats))
    if args.json:
        atomic_write_json(Path(args.json), {"texts": texts, "stats": stats, "args": vars(args),
                                            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    with one_line_errors("generate_offloaded"):
        main()
