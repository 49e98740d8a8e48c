"""Durable collection on the full-size Qwen1.5-MoE architecture: what each change to the write path bought.
Variants (interleaved rounds): open-ahead on/off x writer batched/per-slice, per format; main-thread time split."""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
from transformers import AutoModelForCausalLM

from collection.capture import RoutingCapture, ShardFiller, hidden_moments
from collection.model import routing_shape
from collection.traces.durable import OpenAhead
from collection.traces.format import ShardWriter, shard_specs
from collection.traces.hidden_format import FORMATS, fit_codec
from models.moe_configs import make_config

OUT = sys.argv[1]
torch.manual_seed(0)
cfg = make_config("qwen1.5-moe-a2.7b")
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
model.eval()
shape = routing_shape(model)
L, E, K, H = shape.num_layers, shape.num_experts, shape.top_k, shape.hidden_size
B, T = 8, 256
N = B * T
g = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 8000, (B, T), generator=g) for _ in range(24)]
mask = torch.ones(B, T, dtype=torch.long)
dev = torch.device("cuda")
work = Path("/tmp/diag"); work.mkdir(exist_ok=True)
m, _ = hidden_moments(model, list(range(L)), [(b, mask) for b in batches[:2]], dev)
codecs = {"pca-3.5bit": fit_codec(FORMATS["pca-3.5bit"], m)}


def old_write_batch(self, writer, batch, row):  # the per-slice writer before this change
    def task():
        try:
            if batch.ready is not None:
                batch.ready.synchronize()
            n = batch.rows
            parts = [(name, t) for name, t in (("topk_ids", batch.topk_ids), ("topk_weights", batch.topk_weights),
                                               ("router_logits", batch.router_logits), ("hidden", batch.hidden),
                                               ("hidden_scale", batch.hidden_scale)) if t is not None]
            jobs = [self.pool.submit(writer.write, name, t[j, :n], (j,), row) for name, t in parts for j in range(t.shape[0])]
            for job in jobs:
                job.result()
        finally:
            self.capture.release(batch)
    self.submit(task)


new_write_batch = ShardFiller.write_batch
caps = {}


def durable(name, nb, shard_batches, ahead_on, writer_new, timing):
    fmt = FORMATS[name]
    if name not in caps:
        caps[name] = RoutingCapture(model, list(range(L)), torch.bfloat16, True, N, K, shape.norm_topk_prob, E, H,
                                    hidden_format=fmt, hidden_codec=codecs.get(name))
        caps[name].close()
    cap = caps[name]
    cap.handles = [mm.router.register_forward_hook(cap._hook(j)) for j, mm in enumerate(cap.layers)]
    ShardFiller.write_batch = new_write_batch if writer_new else old_write_batch
    filler = ShardFiller(cap)
    starts = list(range(0, nb, shard_batches))

    def open_shard(s0):
        specs = shard_specs(len(batches[s0:s0 + shard_batches]) * N, 1, num_layers=L, top_k=K, num_experts=E, hidden_size=H,
                            hidden_layers=L, hidden_dtype="bfloat16", store_logits=True, hidden_format=fmt.name)
        return ShardWriter(work / f"d_{s0}.safetensors", specs, writeback=True)
    ahead = OpenAhead(open_shard, starts) if ahead_on else None
    try:
        for s0 in starts:
            t = time.perf_counter()
            w = ahead.take() if ahead_on else open_shard(s0)
            timing["open"] += time.perf_counter() - t
            row = 0
            for b in batches[s0:s0 + shard_batches]:
                t = time.perf_counter()
                hb = cap.forward(model, b, mask)
                t1 = time.perf_counter()
                filler.write_batch(w, hb, row)
                timing["forward"] += t1 - t
                timing["submit"] += time.perf_counter() - t1
                row += hb.rows
            t = time.perf_counter()
            filler.commit(w, lambda nbytes, sha, path=w.path: path.unlink())
            timing["submit"] += time.perf_counter() - t
        t = time.perf_counter()
        filler.join()
        timing["tail"] += time.perf_counter() - t
    finally:
        if ahead:
            ahead.close()
        filler.close(); cap.close()
        ShardFiller.write_batch = new_write_batch


def bare(nb):
    with torch.no_grad():
        for b in batches[:nb]:
            model(input_ids=b.to(dev, non_blocking=True), attention_mask=mask.to(dev, non_blocking=True), use_cache=False)


NB, SB = 24, 4
variants = {"bare": None}
for fmt in ("lossless", "hadamard-3.5bit", "pca-3.5bit"):
    for ahead_on, writer_new, label in ((False, False, "before"), (True, False, "+open-ahead"), (False, True, "+batched-writer"),
                                        (True, True, "both (now)")):
        variants[f"{fmt} {label}"] = (fmt, ahead_on, writer_new)
timing = {k: {"open": 0.0, "forward": 0.0, "submit": 0.0, "tail": 0.0} for k in variants}
for k, v in variants.items():  # warm-up
    if v is None:
        bare(2)
    else:
        durable(v[0], 4, 4, v[1], v[2], {"open": 0.0, "forward": 0.0, "submit": 0.0, "tail": 0.0})
torch.cuda.synchronize()
times = {k: [] for k in variants}
ROUNDS = 2
for r in range(ROUNDS):
    for k in (list(variants) if r % 2 == 0 else list(reversed(variants))):
        torch.cuda.synchronize()
        t = time.perf_counter()
        if variants[k] is None:
            bare(NB)
        else:
            durable(variants[k][0], NB, SB, variants[k][1], variants[k][2], timing[k])
        torch.cuda.synchronize()
        times[k].append(time.perf_counter() - t)
print(f"{NB} batches of {B}x{T} per run, shards of {SB} batches, {ROUNDS} rounds (median); main thread ms per batch:")
print(f"{'variant':<34} {'tok/s':>8} {'vs bare':>8} {'open':>7} {'fwd':>7} {'submit':>7} {'tail/b':>7}")
bare_t = np.median(times["bare"])
res = {}
for k in variants:
    t = np.median(times[k])
    tm = {a: b / ROUNDS / NB * 1e3 for a, b in timing[k].items()}
    res[k] = {"seconds": times[k], "main_ms_per_batch": tm}
    print(f"{k:<34} {NB * N / t:8,.0f} {t / bare_t:8.2f} {tm['open']:7.2f} {tm['forward']:7.2f} {tm['submit']:7.2f} {tm['tail']:7.2f}")
json.dump(res, open(f"{OUT}/diag_durable.json", "w"), indent=1)
