"""Is the launch-bound forward slowed by background work, and where should that work run? (diagnostic, H200)

    python diag_background.py OUTDIR cpu      # threads hashing / copying / taking the GIL, pinned or not, writer counts
    python diag_background.py OUTDIR process  # the same hashing in a thread vs in a helper process, in durable collection

Results: diag_cpu_h200.txt (cpu: 3 rounds, before the 5-round loop below) and diag_hash_process_h200.txt (process).
Both ran at commit 460a5ae, when ShardCommitter still hashed on threads: "(now)" is that path; collection/traces/durable.py
has hashed in helper processes since (HashProcesses).
"""
import concurrent.futures as cf
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
from transformers import AutoModelForCausalLM

import collection.capture as capmod
import collection.traces.durable as durmod
from collection.capture import RoutingCapture, ShardFiller
from collection.model import routing_shape
from collection.traces.durable import OpenAhead, ShardCommitter
from collection.traces.format import ShardWriter, shard_specs
from collection.traces.hidden_format import FORMATS
from models.moe_configs import make_config

OUT, WHICH = sys.argv[1], sys.argv[2]

torch.manual_seed(0)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(make_config("qwen1.5-moe-a2.7b"), dtype=torch.bfloat16)
model.eval()
shape = routing_shape(model)
L, E, K, H = shape.num_layers, shape.num_experts, shape.top_k, shape.hidden_size
B, T = 8, 256; N = B * T
g = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 8000, (B, T), generator=g) for _ in range(16)]
mask = torch.ones(B, T, dtype=torch.long)
dev = torch.device("cuda")
work = Path("/tmp/diagc"); work.mkdir(exist_ok=True)
ALL = sorted(os.sched_getaffinity(0))
MAIN = {ALL[0]}
sib = open(f"/sys/devices/system/cpu/cpu{ALL[0]}/topology/thread_siblings_list").read().strip()
sibs = set()
for part in sib.split(","):
    a, _, b = part.partition("-"); sibs |= set(range(int(a), int(b or a) + 1))
BG = set(ALL) - sibs
print("main cpu", MAIN, "siblings", sibs, "background cpus", sorted(BG), flush=True)

blob = work / "blob.bin"
blob.write_bytes(os.urandom(256 << 20))


class Load:
    def __init__(self, kind, cpus=None):
        self.kind, self.cpus, self.stop = kind, cpus, False
        self.t = threading.Thread(target=self.run, daemon=True); self.t.start()

    def run(self):
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)
        a = np.ones(64 << 20, np.uint8); b = np.empty_like(a)
        while not self.stop:
            if self.kind == "gil":  # takes the GIL ~1000 times a second, briefly
                time.sleep(0.001); sum(range(200))
            elif self.kind == "hash":
                durmod.sha256_of(blob)
            else:
                np.copyto(b, a)

    def close(self):
        self.stop = True; self.t.join()


def bare(nb):
    with torch.no_grad():
        for b in batches[:nb]:
            model(input_ids=b.to(dev, non_blocking=True), attention_mask=mask.to(dev, non_blocking=True), use_cache=False)


cap = RoutingCapture(model, list(range(L)), torch.bfloat16, True, N, K, shape.norm_topk_prob, E, H,
                     hidden_format=FORMATS["hadamard-3.5bit"])
cap.close()
RealPool = cf.ThreadPoolExecutor


def durable(nb, pin=False, threads=4, hash_threads=3, write=True):
    fmt = FORMATS["hadamard-3.5bit"]
    init = (lambda: os.sched_setaffinity(0, BG)) if pin else None
    class Pool(RealPool):
        def __init__(self, *a, **k):
            super().__init__(*a, initializer=init, **k)
    capmod.ThreadPoolExecutor = durmod.ThreadPoolExecutor = Pool
    if pin:
        os.sched_setaffinity(0, MAIN)  # this (main) thread
    try:
        cap.handles = [mm.router.register_forward_hook(cap._hook(j)) for j, mm in enumerate(cap.layers)]
        filler = ShardFiller(cap, write_threads=threads, committer=ShardCommitter(hash_threads=hash_threads))
        if pin:
            filler.submit(lambda: os.sched_setaffinity(0, BG))  # the writer thread itself
        starts = list(range(0, nb, 8))
        def open_shard(s0):
            specs = shard_specs(8 * N, 1, num_layers=L, top_k=K, num_experts=E, hidden_size=H, hidden_layers=L,
                                hidden_dtype="bfloat16", store_logits=True, hidden_format=fmt.name)
            return ShardWriter(work / f"d_{s0}.safetensors", specs, writeback=True)
        ahead = OpenAhead(open_shard, starts)
        for s0 in starts:
            w = ahead.take(); row = 0
            for b in batches[s0:s0 + 8]:
                hb = cap.forward(model, b, mask)
                if write:
                    filler.write_batch(w, hb, row)
                else:
                    filler.submit(lambda hb=hb: (hb.ready.synchronize(), cap.release(hb)))
                row += hb.rows
            if write:
                filler.commit(w, lambda nbytes, sha, path=w.path: path.unlink())
            else:
                w.abort()
        filler.join(); ahead.close(); filler.close(); cap.close()
    finally:
        capmod.ThreadPoolExecutor = durmod.ThreadPoolExecutor = RealPool
        os.sched_setaffinity(0, set(ALL))


def with_load(kind, cpus=None):
    def f(nb):
        l = Load(kind, cpus)
        try:
            bare(nb)
            torch.cuda.synchronize()
        finally:
            l.close()
    return f



import subprocess

HASHER = ("import sys, hashlib\nb = bytearray(8 << 20); m = memoryview(b)\nfor line in sys.stdin:\n"
          "    h = hashlib.sha256(); f = open(line.strip(), 'rb', buffering=0)\n"
          "    while (n := f.readinto(b)): h.update(m[:n])\n    f.close(); print(h.hexdigest(), flush=True)\n")
LOOPER = ("import hashlib, sys\nb = bytearray(8 << 20); m = memoryview(b)\nwhile True:\n"
          "    h = hashlib.sha256(); f = open(sys.argv[1], 'rb', buffering=0)\n"
          "    while (n := f.readinto(b)): h.update(m[:n])\n    f.close()\n")
import queue as _q

helpers = _q.Queue()
for _ in range(3):
    helpers.put(subprocess.Popen([sys.executable, "-S", "-c", HASHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))


def sha_proc(path, chunk=None):
    p = helpers.get()
    try:
        p.stdin.write(f"{path}\n"); p.stdin.flush(); return p.stdout.readline().strip()
    finally:
        helpers.put(p)


assert sha_proc(blob) == durmod.sha256_of(blob)
real_sha = durmod.sha256_of


def proc_hash_load(nb):
    p = subprocess.Popen([sys.executable, "-S", "-c", LOOPER, str(blob)])
    try:
        bare(nb); torch.cuda.synchronize()
    finally:
        p.kill(); p.wait()


def durable_proc(nb, **kw):
    durmod.sha256_of = sha_proc
    try:
        durable(nb, **kw)
    finally:
        durmod.sha256_of = real_sha


if WHICH == "cpu":
    variants = {
        "bare": bare,
        "bare + 1 thread hashing": with_load("hash"),
        "bare + 1 thread copying memory": with_load("copy"),
        "bare + 1 thread hashing, pinned away": lambda nb: (os.sched_setaffinity(0, MAIN), with_load("hash", BG)(nb), os.sched_setaffinity(0, set(ALL))),
        "bare + 1 thread taking the GIL each ms": with_load("gil"),
        "nodisk hadamard-3.5bit": lambda nb: durable(nb, write=False),
        "durable, switch interval 20 ms": lambda nb: (sys.setswitchinterval(0.02), durable(nb), sys.setswitchinterval(0.005)),
        "durable hadamard-3.5bit (now)": lambda nb: durable(nb),
        "durable, threads pinned away": lambda nb: durable(nb, pin=True),
        "durable, 1 writer + 1 hasher": lambda nb: durable(nb, threads=1, hash_threads=1),
        "durable, 1+1 pinned away": lambda nb: durable(nb, pin=True, threads=1, hash_threads=1),
    }
else:
    variants = {
        "bare": bare,
        "bare + 1 thread hashing": with_load("hash"),
        "bare + 1 process hashing": proc_hash_load,
        "bare + 1 thread taking the GIL each ms": with_load("gil"),
        "durable hadamard-3.5bit (now)": lambda nb: durable(nb),
        "durable, hashing in 3 processes": durable_proc,
        "durable, hashing in processes, 1 writer": lambda nb: durable_proc(nb, threads=1),
    }

for f in variants.values():
    f(8)
NB = 16
R = 5
times = {k: [] for k in variants}
for r in range(R):
    for k in (list(variants) if r % 2 == 0 else list(reversed(variants))):
        torch.cuda.synchronize(); t = time.perf_counter()
        variants[k](NB)
        torch.cuda.synchronize(); times[k].append(time.perf_counter() - t)
b0 = np.median(times["bare"])
print(f"\n{NB} batches of {B}x{T}, {R} rounds (order alternating), median; hadamard-3.5bit, shards of 8 batches")
for k, v in times.items():
    t = np.median(v)
    print(f"{k:<44} {NB * N / t:9,.0f} tok/s  {t / b0:5.2f} x bare   (rounds: {', '.join(f'{NB * N / x:,.0f}' for x in v)})")
json.dump(times, open(f"{OUT}/diag_{WHICH}.json", "w"))
