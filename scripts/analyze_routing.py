r"""One page on a trace set's routing: is a static hot set, an LRU cache or a predictor worth building, and at what cost?

Reads only the routing of any trace set (collected by collect_traces.py, or imported from vLLM, SGLang, llama.cpp or
Hugging Face by import_routing.py): popularity skew, temporal locality, cross-layer affinity, history-only predictors
at lookahead 0..3, and hit rates of a static hot set, LRU, LRU + previous-token prefetch, Belady and oracle prefetch
from the prefetch simulator's kernel, then a verdict in plain sentences (validation/routing_report.py says how each
number is made). Writes routing_report.md, routing_report.png and routing_report.json (every number).

    python scripts/analyze_routing.py routing_data/traces/vllm-qwen3 --model-config qwen3-30b-a3b
Seconds on a CPU, the embedded default's traces (python scripts/collect_traces.py writes them):
    python scripts/analyze_routing.py routing_data/traces/qwen2moe-mini --cache-sizes 4,8,16 \
        --output-dir results/routing-quick
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from collection.traces.format import TraceSet
from common.atomic import atomic_write_bytes, atomic_write_json
from common.errors import UserError, one_line_errors
from models.moe_configs import PRESETS
from validation.plots import save_figure
from validation.routing_report import analyze, default_cache_sizes, draw_figure, load_routing, render_markdown, verdict


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", metavar="TRACES", help="trace directory (collected or imported)")
    p.add_argument("--output-dir", default=None, help="where the page, figure and JSON go "
                   "(default results/routing/<traces directory name>)")
    p.add_argument("--cache-sizes", default=None, help="experts cached per layer, a comma list "
                   "(default: k, 2k, E/4, E/2 of the set)")
    p.add_argument("--model-config", default=None, choices=sorted(PRESETS), metavar="PRESET",
                   help="the model whose expert size prices each budget in GiB (fp16, NF4); default: the set's "
                        "model when it is a preset (models/moe_configs.py), else no prices")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the shards' SHA-256 check (faster; a damaged shard then goes unnoticed)")
    return p.parse_args(argv)


def cache_sizes(text: str | None, E: int, K: int) -> list[int]:
    if text is None:
        return default_cache_sizes(E, K)
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--cache-sizes {text!r}: a comma list of integers") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > E:
        raise UserError(f"--cache-sizes {text!r}: each layer has {E} experts, so sizes are 1..{E}")
    return sizes


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.time()

    # --- the set and what it is; every flag checked before anything is computed
    ts = TraceSet(Path(args.traces), verify=not args.no_verify)
    m = ts.manifest
    sizes = cache_sizes(args.cache_sizes, m.num_experts, m.top_k)
    preset = args.model_config or (m.model.get("name_or_path") if m.model.get("name_or_path") in PRESETS else None)
    out = Path(args.output_dir or f"results/routing/{ts.dir.resolve().name}")
    source = (f"Imported from {m.imported['engine']} ({m.imported['format']})" if m.imported
              else f"Collected from {m.model.get('name_or_path')}")
    rows = sum(s.tokens for s in m.shards) * m.num_layers
    print(f"{ts.dir}: {rows:,} (token, layer) rows, {m.num_layers} MoE layers, top-{m.top_k} of {m.num_experts}; "
          f"cache sizes {sizes}; {'prices from ' + preset if preset else 'no --model-config: no GiB prices'}")

    # --- the routing as one decode stream, every number, then the page
    routing = load_routing(ts, progress=rows > 1 << 20)
    res = analyze(routing, sizes, ts, progress=rows > 1 << 20, layer_indices=m.moe_layer_indices)
    res.update(traces=str(ts.dir), source=source, model_config=preset, seconds=round(time.time() - start, 2))
    title = ts.dir.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "routing_report.json", json.loads(json.dumps(res, default=float).replace("NaN", "null")))
    atomic_write_bytes(out / "routing_report.md", render_markdown(res, title, source, preset,
                                                                 "routing_report.png").encode())
    fig = draw_figure(res, title)
    save_figure(fig, out / "routing_report.png")
    print("\n".join(f"- {s}" for s in verdict(res, preset)))
    print(f"wrote {out / 'routing_report.md'}, .png and .json in {time.time() - start:.1f} s")


if __name__ == "__main__":
    with one_line_errors("analyze_routing"):
        main()
