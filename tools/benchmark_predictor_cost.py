"""Cost of one expert prediction: parameters, FLOPs and measured time per (token, layer), at batch 1 and 64.

The cost target: a prediction may take at most 5% of the time one fp16 expert of Qwen1.5-MoE takes to
cross PCIe Gen5 (17.3 MB at 55 GB/s ~ 0.31 ms), i.e. 15.5 us per token per layer. Each predictor is built
with random weights (its cost does not depend on their values) at the embedded default's dimensions and at
Qwen1.5-MoE's (H = 2048, 24 layers, 60 experts, vocabulary 151,936), and timed the way a decoder would
call it: rows of one target layer at a time (the anchored kind's `predict_layer`), inputs already on the
device. On a GPU: bf16 weights, CUDA events around blocks of --iters back-to-back calls after --warmup
calls, the median block over --repeats; eager, replayed as one CUDA graph, and with --compile also
torch.compile. On a CPU the same loop is timed with perf_counter in fp32 (a smoke test, not a measurement
of the budget, which is about the GPU).

GPU (the numbers of docs/RESULTS.md):
    python tools/benchmark_predictor_cost.py --json results/cost.json --markdown results/cost.md
Seconds on a CPU:
    python tools/benchmark_predictor_cost.py --dims embedded --kinds anchored --iters 5 --repeats 3 --warmup 2
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch

from common.atomic import atomic_write_bytes, atomic_write_json
from common.device import device_name, pick_device
from common.errors import UserError, choices_list, one_line_errors
from models.features import Features, example_features, feature_spec
from models.predictors import PREDICTORS, PredictorConfig, build_predictor, count_parameters, flops_per_row
from training.trainer import BASE_DEFAULTS, KIND_DEFAULTS
from validation.prefetch.cost_model import model_shape

EXPERT_MS = 0.31  # the time it takes to cross PCIe Gen5 at 55 GB/s pinned
BUDGET_US = 0.05 * EXPERT_MS * 1000
# (hidden H, MoE layers L, experts E, top-k, vocabulary): the embedded default and Qwen1.5-MoE-A2.7B
DIMS = {"embedded": (128, 8, 60, 4, 8192), "qwen1.5-moe": (2048, 24, 60, 4, 151936)}


def predictor_config(kind: str, dims: str, hidden_dim: int, depth: int | None = None) -> PredictorConfig:
    """The predictor as trained: the anchored kind with its default recipe's features (KIND_DEFAULTS), at
    `depth` residual blocks when given."""
    H, L, E, K, V = DIMS[dims]
    cfg = PredictorConfig(kind=kind, input_dim=H, num_experts=E, top_k=K, num_layers=L, lookahead=1,
                          hidden_dim=hidden_dim, dropout=0.0)
    if kind == "anchored":
        r = {**BASE_DEFAULTS, **KIND_DEFAULTS["anchored"]}
        cfg.past_layers, cfg.own_layers, cfg.window = r["past_layers"], r["own_layers"], r["window"]
        cfg.context = r["context"]
        cfg.depth = r["depth"] if depth is None else depth
        cfg.token_vocab = V if r["token_emb"] else 0
        cfg.separate_layers, cfg.anchor, cfg.residual_logits = r["separate_layers"], r["anchor"], r["residual_logits"]
    return cfg


def random_features(model: torch.nn.Module, cfg: PredictorConfig, rows: int, target: int, device: torch.device,
                    dtype: torch.dtype) -> Features:
    """Inputs of `rows` rows that all target layer `target`, in the shapes make_features gives."""
    return example_features(feature_spec(model), cfg.input_dim, cfg.num_experts, cfg.token_vocab, rows,
                            target - cfg.lookahead, device, dtype)


def median_us(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int, repeats: int) -> float:
    """Median over `repeats` blocks of the mean time of one call in a block of `iters` back-to-back calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()  # waits for this block's kernels only: a sync point by design
            times.append(start.elapsed_time(end) * 1000 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) * 1e6 / iters)
    return statistics.median(times)


def as_graph(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` captured once as a CUDA graph (its inputs are static tensors); returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # allocator warm-up off the capture, as the CUDA graph docs require
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(kind: str, dims: str, args: argparse.Namespace, device: torch.device,
            depth: int | None = None) -> list[dict[str, Any]]:
    cfg = predictor_config(kind, dims, args.hidden_dim, depth)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_predictor(cfg).eval()
    with torch.no_grad():  # random values in every weight, the zero-initialised heads included, as after training
        for p in model.parameters():
            p.normal_(0, 0.02)
    model = model.to(device, dtype)
    target = cfg.num_layers // 2
    info = {"kind": kind if depth is None else f"{kind} depth {depth}", "dims": dims,
            "hidden_size": cfg.input_dim, "num_layers": cfg.num_layers,
            "num_experts": cfg.num_experts, "width": cfg.hidden_dim, "parameters": count_parameters(model),
            "flops_per_row": flops_per_row(model), "dtype": str(dtype).replace("torch.", "")}
    info["memory_mb_bf16"] = info["parameters"] * 2 / 1e6
    expert_mb = model_shape("qwen1.5-moe-a2.7b").expert_bytes("fp16") / 1e6  # one fp16 Qwen1.5-MoE expert: 17.3 MB
    info["memory_in_fp16_experts"] = info["memory_mb_bf16"] / expert_mb  # GPU memory the expert cache loses
    if kind == "anchored":
        shared = build_predictor(PredictorConfig(**{**cfg.to_json(), "separate_layers": False}))
        info["parameters_one_shared_trunk"] = count_parameters(shared)  # the same per-row cost, less memory
        info["router_parameters"] = model.router.numel() if cfg.anchor else 0  # the model's own gates, copied
        info["token_table_parameters"] = cfg.token_vocab * cfg.token_dim
        # what one call reads: one trunk plus one target layer's heads (the other layers' heads stay idle)
        per_layer = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("delta", "res", "router")))
        info["parameters_read_per_call"] = (sum(p.numel() for p in model.trunks[0].parameters())
                                            + per_layer // cfg.num_layers + (cfg.token_dim if cfg.token_vocab else 0))
    out = []
    for batch in args.batches:
        f = random_features(model, cfg, batch, target, device, dtype)
        if kind == "anchored":
            def call() -> torch.Tensor:
                return model.predict_layer(f, target)[0]
        else:
            def call() -> torch.Tensor:
                return model(f)
        modes: dict[str, Callable[[], Any]] = {"eager": call}
        with torch.inference_mode():
            if device.type == "cuda":
                modes["cuda_graph"] = as_graph(call)
                if args.compile and kind == "anchored":
                    compiled = torch.compile(call, mode="reduce-overhead", fullgraph=False)
                    modes["compile"] = compiled
            row = {**info, "batch": batch}
            for mode, fn in modes.items():
                us = median_us(fn, device, args.warmup, args.iters, args.repeats)
                row[f"{mode}_us_per_call"] = us
                row[f"{mode}_us_per_token"] = us / batch
            best = min(row[f"{m}_us_per_token"] for m in modes)
            row["best_us_per_token"] = best
            row["within_budget"] = best <= BUDGET_US
        print(f"{dims:<12} {kind:<12} batch {batch:>3}: " + ", ".join(
            f"{m} {row[f'{m}_us_per_call']:.1f} us/call ({row[f'{m}_us_per_token']:.2f} us/token)" for m in modes)
            + f" | {info['flops_per_row'] / 1e6:.2f} MFLOPs/row, {info['parameters'] / 1e6:.2f}M params", flush=True)
        out.append(row)
    return out


def markdown(rows: list[dict[str, Any]], device: str) -> str:
    modes = [m for m in ("eager", "cuda_graph", "compile") if any(f"{m}_us_per_call" in r for r in rows)]
    lines = [f"Predictor cost per (token, layer): one target layer per call, inputs on the device; {device}; "
             f"budget {BUDGET_US:.1f} us per token per layer (5% of {EXPERT_MS} ms).", "",
             "| dims | predictor | width | params | MB (bf16) = fp16 experts | FLOPs/row | batch | " +
             " | ".join(f"{m} us/call" for m in modes) + " | best us/token | within budget |",
             "|---|---|---|---|---|---|---|" + "---|" * (len(modes) + 2)]
    for r in rows:
        lines.append(f"| {r['dims']} (H={r['hidden_size']}, L={r['num_layers']}) | {r['kind']} | {r['width']} | "
                     f"{r['parameters']:,} | {r['memory_mb_bf16']:.1f} = {r['memory_in_fp16_experts']:.2f} | "
                     f"{r['flops_per_row']:,} | {r['batch']} | " +
                     " | ".join(f"{r[f'{m}_us_per_call']:.1f}" if f"{m}_us_per_call" in r else "-" for m in modes) +
                     f" | {r['best_us_per_token']:.2f} | {'yes' if r['within_budget'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default="embedded,qwen1.5-moe", help=f"comma list of {', '.join(DIMS)}")
    p.add_argument("--kinds", default="anchored,hybrid", help=f"comma list of predictors ({', '.join(PREDICTORS)})")
    p.add_argument("--hidden-dim", type=int, default=512, help="predictor width (512, as trained)")
    p.add_argument("--anchored-depths", default="2,1", help="residual blocks of the anchored predictor to time "
                   "(2 = its default recipe; 2,1)")
    p.add_argument("--batches", default="1,64", help="rows per call (1,64)")
    p.add_argument("--warmup", type=int, default=50, help="calls before timing (50)")
    p.add_argument("--iters", type=int, default=200, help="calls per timed block (200)")
    p.add_argument("--repeats", type=int, default=11, help="timed blocks; the median is reported (11)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(mode='reduce-overhead') "
                   "of the anchored predictor (about a minute of compilation per shape)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda:N")
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--markdown", default=None, help="write the table here")
    args = p.parse_args(argv)
    dims = choices_list("dims", args.dims, DIMS)
    kinds = choices_list("kinds", args.kinds, PREDICTORS)
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        raise UserError(f"--batches {args.batches!r}: expected a comma list of integers") from None
    if not args.batches or min(args.batches) <= 0 or min(args.iters, args.repeats) <= 0 or args.warmup < 0:
        raise UserError("--batches, --iters and --repeats must be positive, --warmup 0 or more")
    device = pick_device(args.device)
    torch.manual_seed(0)
    try:
        depths = [int(x) for x in args.anchored_depths.split(",") if x]
    except ValueError:
        raise UserError(f"--anchored-depths {args.anchored_depths!r}: expected a comma list of integers") from None
    rows = [r for d in dims for k in kinds for depth in (depths if k == "anchored" else [None])
            for r in measure(k, d, args, device, depth)]
    md = markdown(rows, device_name(device))
    print("\n" + md)
    if args.json:
        atomic_write_json(args.json, {"rows": rows, "device": device_name(device), "budget_us": BUDGET_US,
                                      "torch": torch.__version__, "args": vars(args)})
    if args.markdown:
        atomic_write_bytes(args.markdown, md.encode())


if __name__ == "__main__":
    with one_line_errors("benchmark_predictor_cost"):
        main()
