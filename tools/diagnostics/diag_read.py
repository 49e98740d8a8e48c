"""Where the lossless first epoch's time goes: the train split's groups read alone (no training), by reader threads
and by read policy (ranges of the split's sequences vs the whole tensor then a selection), each timed 2x."""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
import collection.traces.rows as rows
import collection.traces.staging as staging
from collection.traces.format import TraceSet
from collection.traces.rows import SplitBlocks, split_sequences

ts = TraceSet(sys.argv[1])
dev = torch.device("cuda")
table = ts.sequence_table()
split = split_sequences(table, 0, 0.05, 0.05)  # as benchmark.py's training
print(len(ts), "shards;", len(split["train"]), "train sequences;", os.cpu_count(), "cpus", flush=True)
for threads in (4, 8, 12, 16):
    for policy in ("ranges", "whole"):
        staging.READ_THREADS = threads
        staging._READERS.clear()
        rows.RANGE_MIN_BYTES = (256 << 10) if policy == "ranges" else (1 << 50)
        for rep in range(2):
            blocks = SplitBlocks(ts, split["train"], dev, 4, keep=False)
            torch.cuda.synchronize(); t = time.perf_counter()
            n = nbytes = 0
            for b in blocks.epoch(np.random.default_rng(0)):
                n += b.tokens * ts.manifest.num_layers
                nbytes += b.hidden.numel() * b.hidden.element_size()
                del b
            torch.cuda.synchronize(); dt = time.perf_counter() - t
            print(f"threads {threads:2d} {policy:6s} rep {rep}: {n / dt / 1e6:5.2f}M rows/s, hidden {nbytes / dt / 1e9:5.2f} GB/s "
                  f"into the block ({dt:.3f} s)", flush=True)
