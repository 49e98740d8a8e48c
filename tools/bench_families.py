r"""Full-size MoE families on one GPU: memory after load (bf16 and 4-bit) and the paired capture overhead.

For each full-size preset (models/moe_configs.py), with random weights and the exact architecture:
  * bf16: the model is built directly on the GPU (no checkpoint on disk: Qwen3-30B-A3B's 61 GB would not
    fit this machine's disk, nor write in minutes); skipped, with the reason in its JSON, when its weights
    do not fit the GPU (Mixtral-8x7B's 93 GB on an 80 GB H100);
  * 4-bit: built on the CPU in float16, then moved to the GPU by `collection.quantize.quantize_model_4bit`,
    the same function `--quantization 4bit` loads through (fused routed experts NF4, dense layers
    Linear4bit); skipped when the CPU cannot hold the float16 model;
  * memory: torch.cuda.memory_allocated / max_memory_allocated right after the model is on the GPU;
  * capture overhead: forward passes of 8 x 256 real tokens, bare and with RoutingCapture storing every
    MoE layer's ids, weights, logits and hidden state into pinned host memory, interleaved batch by batch
    (ABBA) as in tools/benchmark.py; the median of the paired ratios, with quartiles.
One JSON per (preset, quantization) under OUTDIR, and a summary table at the end. Random weights route
differently from the real models: speed and memory only.

On one H100 (estimated 6-8 minutes, not yet run; needs bitsandbytes):
    python tools/bench_families.py results/families
One preset, fewer rounds:
    python tools/bench_families.py results/families --presets olmoe-1b-7b --paired-rounds 8
Seconds on a CPU (the tiny presets; checks the script, measures nothing worth keeping):
    python tools/bench_families.py /tmp/fam-bench --presets tiny-mixtral,tiny-deepseek_v3 \
        --quantizations none --batch-size 2 --seq-len 32 --paired-rounds 2 --device cpu
"""
from __future__ import annotations

import argparse
import gc
import platform
import time
from pathlib import Path
from typing import Any

import torch

from collection.capture import RoutingCapture
from collection.model import EMBEDDED_MODEL, routing_shape
from common.atomic import atomic_write_json
from common.device import device_name, pick_device
from common.errors import UserError, one_line_errors
from models.moe_configs import FULL_SIZE, PRESETS, make_config
from tools.benchmark import paired_overhead, sync, token_batches

DEFAULT_PRESETS = ("olmoe-1b-7b", "deepseek-v2-lite", "qwen3-30b-a3b", "mixtral-8x7b")
HEADROOM = 4 * 2**30  # activations, pinned capture buffers' device side, allocator slack


def meta_parameters(preset: str) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(make_config(preset)).parameters())


def available_cpu_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def build(preset: str, quantization: str, dev: torch.device) -> tuple[Any, torch.dtype, float]:
    """The random-weight model on `dev`, its compute dtype, and the seconds it took."""
    from transformers import AutoModelForCausalLM

    from collection.quantize import quantize_model_4bit

    torch.manual_seed(0)
    t0 = time.perf_counter()
    if quantization == "none":
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(make_config(preset), dtype=dtype)
    else:  # the seed's 4-bit recipe: NF4, float16 compute
        dtype = torch.float16
        model = AutoModelForCausalLM.from_config(make_config(preset), dtype=dtype)
        model = quantize_model_4bit(model, dev, dtype)
    model.eval().requires_grad_(False)
    sync(dev)
    return model, dtype, time.perf_counter() - t0


def measure(preset: str, quantization: str, dev: torch.device, args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    n_params = meta_parameters(preset)
    res: dict[str, Any] = {"preset": preset, "family": PRESETS[preset]["model_type"], "quantization": quantization,
                           "parameters": n_params, "device": device_name(dev)}
    need16 = 2 * n_params
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        res["gpu_total_bytes"] = total
        if quantization == "none" and need16 + HEADROOM > free:
            res["skipped"] = (f"bf16 weights need {need16 / 2**30:.1f} GiB + {HEADROOM / 2**30:.0f} GiB headroom; "
                              f"the GPU has {free / 2**30:.1f} GiB free")
            return res
    if quantization == "4bit" and need16 > 0.9 * available_cpu_bytes():
        res["skipped"] = (f"the float16 model ({need16 / 2**30:.1f} GiB) is built on the CPU first; "
                          f"{available_cpu_bytes() / 2**30:.1f} GiB of host memory available")
        return res
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model, dtype, build_s = build(preset, quantization, dev)
    res["build_seconds"] = build_s
    if dev.type == "cuda":
        res["gpu_memory_after_load_bytes"] = torch.cuda.memory_allocated(dev)
        res["gpu_max_memory_after_load_bytes"] = torch.cuda.max_memory_allocated(dev)
    if quantization == "4bit":
        from collection.quantize import quantized_bytes

        res["parameter_bytes"] = quantized_bytes(model)
    shape = routing_shape(model)
    res["routing"] = shape.to_json()
    L, E, K, H = shape.num_layers, shape.num_experts, shape.top_k, shape.hidden_size
    batches = token_batches(tokenizer, args.warmup + args.batches, args.batch_size, args.seq_len)
    mask = torch.ones_like(batches[0])
    hidden_dtype = dtype if dtype != torch.float32 or dev.type != "cuda" else torch.float16
    capture = RoutingCapture(model, list(range(L)), hidden_dtype, True, args.batch_size * args.seq_len, K,
                             shape.norm_topk_prob, E, H)

    def bare(b: torch.Tensor) -> None:
        with torch.no_grad():
            model(input_ids=b.to(dev, non_blocking=True), attention_mask=mask.to(dev, non_blocking=True), use_cache=False)

    def captured(b: torch.Tensor) -> None:
        hb = capture.forward(model, b, mask)
        if hb.ready is not None:
            hb.ready.synchronize()
        capture.release(hb)

    for b in batches[:args.warmup]:
        bare(b)
        captured(b)
    res["paired"] = paired_overhead(bare, captured, batches[args.warmup:], args.paired_rounds,
                                    args.batch_size * args.seq_len, dev)
    res["batch"] = f"{args.batch_size}x{args.seq_len}"
    res["hidden_dtype"] = str(hidden_dtype).removeprefix("torch.")
    if dev.type == "cuda":
        res["gpu_max_memory_with_capture_bytes"] = torch.cuda.max_memory_allocated(dev)
    capture.close()
    del model, capture
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def row(r: dict[str, Any]) -> str:
    head = f"{r['preset']:<18} {r['quantization']:<5}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    mem = f"{r['gpu_memory_after_load_bytes'] / 2**30:6.2f} GiB" if "gpu_memory_after_load_bytes" in r else "   - (CPU)"
    q = r["paired"]
    return (f"{head} {mem}  bare {q['bare_tokens_per_s_median']:>9,.0f} tok/s  capture "
            f"{q['capture_only_overhead_median'] * 100:+5.1f}% ({q['capture_only_overhead_p25'] * 100:+.1f}% to "
            f"{q['capture_only_overhead_p75'] * 100:+.1f}%, {q['rounds']} pairs)  built in {r['build_seconds']:.0f} s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", help="directory for one JSON per (preset, quantization) and summary.json")
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                   help=f"comma list (default {','.join(DEFAULT_PRESETS)}; full size: {', '.join(FULL_SIZE)})")
    p.add_argument("--quantizations", default="none,4bit", help="comma list of none, 4bit (default both)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (tiny presets only)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (256)")
    p.add_argument("--batches", type=int, default=4, help="distinct batches cycled through (4)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up batches, each bare and captured (2)")
    p.add_argument("--paired-rounds", type=int, default=16, help="bare/capture pairs timed, ABBA order (16)")
    args = p.parse_args(argv)
    presets = [x for x in args.presets.split(",") if x]
    quants = [x for x in args.quantizations.split(",") if x]
    bad = [x for x in presets if x not in PRESETS] + [x for x in quants if x not in ("none", "4bit")]
    if bad or not presets or not quants:
        raise UserError(f"unknown preset or quantization: {', '.join(bad) or '(none given)'}; presets: "
                        f"{', '.join(sorted(PRESETS))}; quantizations: none, 4bit")
    if min(args.batch_size, args.seq_len, args.batches, args.paired_rounds) < 1 or args.warmup < 0:
        raise UserError("--batch-size, --seq-len, --batches and --paired-rounds must be >= 1, --warmup >= 0")
    dev = pick_device(args.device)
    if "4bit" in quants and dev.type != "cuda":
        raise UserError("--quantizations 4bit needs a CUDA GPU (bitsandbytes); use --quantizations none on CPU")
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)  # 8192 ids: inside every preset's vocabulary
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}
    try:
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    results = []
    t_all = time.perf_counter()
    for preset in presets:
        for q in quants:
            t0 = time.perf_counter()
            r = {**measure(preset, q, dev, args, tokenizer), "versions": versions, "args": vars(args),
                 "wall_seconds": None}
            r["wall_seconds"] = time.perf_counter() - t0
            label = q if q == "4bit" else ("bf16" if dev.type == "cuda" else "float32")
            atomic_write_json(out / f"{preset}_{label}.json", r)
            results.append(r)
            print(row(r), flush=True)
    atomic_write_json(out / "summary.json", {"results": [{k: v for k, v in r.items() if k != "paired"} | (
        {"paired_overhead_median": r["paired"]["capture_only_overhead_median"]} if "paired" in r else {})
        for r in results], "seconds": time.perf_counter() - t_all})
    print(f"\n{len(results)} measurements in {time.perf_counter() - t_all:.0f} s on {device_name(dev)}; "
          f"JSON in {out}/ (random weights: speed and memory only)")


if __name__ == "__main__":
    with one_line_errors("bench_families"):
        main()
