"""Where does collection time go on the full-size Qwen1.5-MoE architecture? (diagnostic, not a benchmark of record)

Variants timed in interleaved rounds (pipelined, as collect_traces.py runs: no sync per batch on the main thread):
bare, bare with a sync per batch, capture to pinned memory (no disk) per format, durable per format.
Per variant: wall per batch, main-thread time blocked on a free host buffer, and a profiler table for one batch.
"""
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
from transformers import AutoModelForCausalLM

from collection.capture import RoutingCapture, ShardFiller, hidden_moments
from collection.model import routing_shape
from collection.traces.format import ShardWriter, shard_specs
from collection.traces.hidden_format import FORMATS, fit_codec
from models.moe_configs import make_config

OUT = sys.argv[1]
impl = sys.argv[2] if len(sys.argv) > 2 else None
torch.manual_seed(0)
cfg = make_config(os.environ.get("PRESET", "qwen1.5-moe-a2.7b"))
kw = {} if impl is None else {"experts_implementation": impl}
t0 = time.perf_counter()
DEV = os.environ.get("DEV", "cuda")
with torch.device(DEV):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, **kw)
model.eval()
print("built in", round(time.perf_counter() - t0, 1), "s; experts impl:", model.config._experts_implementation, flush=True)
shape = routing_shape(model)
L, E, K, H = shape.num_layers, shape.num_experts, shape.top_k, shape.hidden_size
B, T = 8, 256
N = B * T
g = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 8000, (B, T), generator=g) for _ in range(16)]
mask = torch.ones(B, T, dtype=torch.long)
dev = torch.device(DEV)
if DEV == "cpu":
    torch.cuda.synchronize = lambda *a: None
    B, T = 2, 16; N = B * T
    batches = [torch.randint(0, 500, (B, T), generator=g) for _ in range(16)]; mask = torch.ones(B, T, dtype=torch.long)
work = "/tmp/diag"; os.makedirs(work, exist_ok=True)


def bare(nb, sync_each=False):
    with torch.no_grad():
        for b in batches[:nb]:
            model(input_ids=b.to(dev, non_blocking=True), attention_mask=mask.to(dev, non_blocking=True), use_cache=False)
            if sync_each:
                torch.cuda.synchronize()


codecs = {}
for name in ("pca-3.5bit",):
    m, _ = hidden_moments(model, list(range(L)), [(b, mask) for b in batches[:2]], dev)
    codecs[name] = fit_codec(FORMATS[name], m)
captures = {}
blocked = {}


def get_capture(name):
    if name not in captures:
        fmt = FORMATS[name]
        cap = RoutingCapture(model, list(range(L)), torch.bfloat16, True, N, K, shape.norm_topk_prob, E, H,
                             hidden_format=fmt, hidden_codec=codecs.get(name))
        cap.close()  # hooks re-registered per use
        blocked[name] = [0.0]
        get = cap.free.get

        def timed_get(*a, **k):
            t = time.perf_counter(); x = get(*a, **k); blocked[name][0] += time.perf_counter() - t; return x
        cap.free.get = timed_get
        captures[name] = cap
    cap = captures[name]
    cap.handles = [m.router.register_forward_hook(cap._hook(j)) for j, m in enumerate(cap.layers)]
    return cap


def nodisk(name, nb):
    cap = get_capture(name)
    filler = ShardFiller(cap)
    try:
        for b in batches[:nb]:
            hb = cap.forward(model, b, mask)
            filler.submit(lambda hb=hb: (hb.ready.synchronize() if hb.ready else None, cap.release(hb)))
        filler.join()
    finally:
        filler.close(); cap.close()


def durable(name, nb, shard_batches=4):
    cap = get_capture(name)
    filler = ShardFiller(cap)
    fmt = FORMATS[name]
    try:
        for s0 in range(0, nb, shard_batches):
            group = batches[s0:s0 + shard_batches]
            specs = shard_specs(len(group) * N, 1, num_layers=L, top_k=K, num_experts=E, hidden_size=H, hidden_layers=L,
                                hidden_dtype="bfloat16", store_logits=True, hidden_format=fmt.name)
            w = ShardWriter(__import__("pathlib").Path(work) / f"d_{name}_{s0}.safetensors", specs, writeback=True)
            row = 0
            for b in group:
                hb = cap.forward(model, b, mask)
                filler.write_batch(w, hb, row)
                row += hb.rows
            filler.commit(w, lambda nbytes, sha, path=w.path: path.unlink())
        filler.join()
    finally:
        filler.close(); cap.close()


variants = {
    "bare": lambda nb: bare(nb),
    "bare_sync_each": lambda nb: bare(nb, True),
    "nodisk_lossless": lambda nb: nodisk("lossless", nb),
    "nodisk_hadamard-3.5bit": lambda nb: nodisk("hadamard-3.5bit", nb),
    "nodisk_pca-3.5bit": lambda nb: nodisk("pca-3.5bit", nb),
    "nodisk_int4": lambda nb: nodisk("int4", nb),
    "durable_lossless": lambda nb: durable("lossless", nb),
    "durable_hadamard-3.5bit": lambda nb: durable("hadamard-3.5bit", nb),
    "durable_pca-3.5bit": lambda nb: durable("pca-3.5bit", nb),
}
for name, fn in variants.items():  # warm-up
    fn(2)
torch.cuda.synchronize()
NB = 16
times = {k: [] for k in variants}
blk = {k: [] for k in variants}
for r in range(3):
    order = list(variants) if r % 2 == 0 else list(reversed(variants))
    for name in order:
        for v in blocked.values():
            v[0] = 0.0
        torch.cuda.synchronize()
        t = time.perf_counter()
        variants[name](NB)
        torch.cuda.synchronize()
        times[name].append((time.perf_counter() - t) / NB)
        blk[name].append(sum(v[0] for v in blocked.values()) / NB)
res = {}
print(f"\n{'variant':<26} {'ms/batch':>9} {'tok/s':>9} {'vs bare':>8} {'blocked ms':>10}  (median of 3 rounds of {NB} batches)")
bare_ms = np.median(times["bare"]) * 1e3
for name in variants:
    ms = np.median(times[name]) * 1e3
    res[name] = {"ms": times[name], "blocked": blk[name]}
    print(f"{name:<26} {ms:9.2f} {N / ms * 1e3:9,.0f} {ms / bare_ms:8.2f} {np.median(blk[name]) * 1e3:10.2f}")

# GPU time of one encode of all layers, per format (side stream excluded: default stream, synced)
with torch.no_grad():
    hs = torch.randn(L, N, H, device=dev, dtype=torch.bfloat16)
    for name in ("hadamard-3.5bit", "pca-3.5bit", "int4", "fp8"):
        fmt = FORMATS[name]; codec = codecs.get(name)
        for _ in range(2):
            fmt.encode(hs[:min(8, L)], codec.to(dev) if codec else None, list(range(min(8, L))))
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(5):
            for j0 in range(0, L, 8):
                fmt.encode(hs[j0:j0 + 8], codec.to(dev) if codec else None, list(range(j0, min(j0 + 8, L))))
        torch.cuda.synchronize()
        print(f"encode {name}: {(time.perf_counter() - t) / 5 * 1e3:.2f} ms GPU per batch (24 layers x 2048 rows)")
    # D2H copy speed, pinned
    pinned = torch.empty(L, N, H, dtype=torch.bfloat16, pin_memory=DEV == "cuda")
    torch.cuda.synchronize(); t = time.perf_counter(); pinned.copy_(hs); torch.cuda.synchronize()
    print(f"D2H pinned 192 MiB: {(time.perf_counter() - t) * 1e3:.2f} ms")

from torch.profiler import ProfilerActivity, profile

for name in ("bare", "nodisk_lossless", "nodisk_pca-3.5bit", "nodisk_int4"):
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])) as prof:
        variants[name](2)
        torch.cuda.synchronize()
    print(f"\n=== profile {name} (2 batches) ===")
    print(prof.key_averages().table(sort_by="cuda_time_total" if DEV == "cuda" else "cpu_time_total", row_limit=14, max_name_column_width=50))
json.dump(res, open(f"{OUT}/diag.json", "w"))
