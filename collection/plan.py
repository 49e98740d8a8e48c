"""What a collection will cost, said before it starts: sequences, tokens, bytes and a rough time.

A plain `collect_traces.py` on a CPU runs for a quarter of an hour and writes gigabytes; nobody should
learn that from the progress bar. The time is extrapolated from one timed forward pass of the first batch.
"""
from __future__ import annotations

import sys
import time

import torch
from torch import nn

from collection.capture import pad_batch

# a CPU collection longer or larger than this gets a warning (and, on a terminal, a pause to stop it)
LONG_ON_CPU_S = 120
LARGE_BYTES = 2**30
PAUSE_S = 5


@torch.no_grad()
def tokens_per_second(model: nn.Module, batch: list[list[int]], pad_id: int, device: torch.device) -> float:
    """Speed of the bare forward pass on `batch`: the second of two passes is timed (the first pays one-time
    costs such as kernel selection and allocator growth)."""
    input_ids, mask = pad_batch(batch, pad_id)
    input_ids, mask = input_ids.to(device), mask.to(device)
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    return int(mask.sum()) / max(seconds, 1e-9)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def announce(sequences: int, tokens: int, nbytes: int, speed: float, device: torch.device,
             quick_command: str, interactive: bool | None = None) -> float:
    """Print the plan; warn when it is long for a CPU (and, on a terminal, leave time to stop it).
    Returns the estimated seconds."""
    seconds = tokens / max(speed, 1e-9)
    print(f"plan: {sequences:,} sequences, {tokens:,} tokens, {nbytes / 2**30:.2f} GiB to write; about "
          f"{duration(seconds)} on {device.type} (the forward pass alone runs at {speed:,.0f} tokens/s here)")
    if device.type == "cpu" and (seconds > LONG_ON_CPU_S or nbytes > LARGE_BYTES):
        print(f"warning: this is a large collection for a CPU (about {duration(seconds)} and {nbytes / 2**30:.2f} GiB; "
              f"writing and a busy machine add to the time). For a quick look:\n    {quick_command}")
        if sys.stdin.isatty() if interactive is None else interactive:
            print(f"starting in {PAUSE_S} s; Ctrl-C stops it", flush=True)
            time.sleep(PAUSE_S)
    return seconds
