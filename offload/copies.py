"""The copy engine: host-to-GPU expert copies on their own stream, ordered by events, and the host's reads of
the router's choice.

Every copy group (the demand copies of a step, a staging bank, a step's prefetches) is queued behind a marker
recorded on the compute stream (so it never overwrites a slot a queued kernel still reads), then gets a
sequence number and an event. Copies run in FIFO order on one stream, so waiting for group n waits for every
group before it: the compute stream waits once per call, for the newest group among the rows it reads
(`wait`), and never the host. The host blocks only in `HostReader.get`, for the router's choice.

    SyncCopies      CPU: each copy runs when it is issued
    DelayedCopies   CPU, tests only: a copy runs only when the compute side waits for its group (or a later
                    one); a missed wait leaves the slot stale and changes the output
    CudaCopies      CUDA: a side stream, pinned sources, non_blocking copies, one event per group; with
                    timing, a pair of timed events around each wait measures the compute stream's stall

A copy that fails raises at once: torch raises on a bad copy when it is issued, and a failed asynchronous copy
raises at the next event synchronization (the router read of the next layer), never a hang.
"""
from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch

Pairs = list[tuple[torch.Tensor, torch.Tensor]]  # (GPU destination, host source)


class SyncCopies:
    timing = False

    def __init__(self) -> None:
        self.seq = 0     # the newest copy group issued
        self.waited = 0  # the compute side has waited for every group up to this one
        self.waits = 0   # waits issued (each would be one stream.wait_event on CUDA)

    def mark(self) -> Any:
        return None

    def copy(self, pairs: Pairs, after: Any = None) -> int:
        self._run(pairs)
        self.seq += 1
        return self.seq

    @staticmethod
    def _run(pairs: Pairs) -> None:
        for dst, src in pairs:
            dst.copy_(src)

    def wait(self, seq: int) -> None:
        if seq > self.waited:
            self.waited = seq
            self.waits += 1

    def stall_ms(self) -> float:
        return 0.0


class DelayedCopies(SyncCopies):
    """Copies held back until waited for (tests: a missed wait computes with stale weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: deque[tuple[int, Pairs]] = deque()

    def copy(self, pairs: Pairs, after: Any = None) -> int:
        self.seq += 1
        self.queue.append((self.seq, list(pairs)))
        return self.seq

    def wait(self, seq: int) -> None:
        while self.queue and self.queue[0][0] <= seq:  # FIFO: a group and every one queued before it
            self._run(self.queue.popleft()[1])
        super().wait(seq)


class CudaCopies(SyncCopies):
    def __init__(self, device: torch.device, timing: bool = True, ring: int = 4096):
        super().__init__()
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.events = [torch.cuda.Event() for _ in range(ring)]
        self.markers = [torch.cuda.Event() for _ in range(8)]
        self.n_markers = 0
        self.timing = timing
        self._timed: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._spare: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._stall_ms = 0.0
        self.profile: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] | None = None  # measure_costs

    def mark(self) -> torch.cuda.Event:
        """An event at the compute stream's current end: copies issued `after` it wait for everything before.
        (A stream waits for an event's state at the time of the wait call, so a small ring of markers suffices.)"""
        ev = self.markers[self.n_markers % len(self.markers)]
        self.n_markers += 1
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def copy(self, pairs: Pairs, after: Any = None) -> int:
        s = self.stream
        if after is not None:
            s.wait_event(after)
        if self.profile is not None:  # the group's time on the copy stream (bandwidth of the engine's own copies)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(s)
        with torch.cuda.stream(s):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
        if self.profile is not None:
            end.record(s)
            self.profile.append((start, end, sum(src.numel() * src.element_size() for _, src in pairs)))
        self.seq += 1
        self.events[self.seq % len(self.events)].record(s)
        return self.seq

    def wait(self, seq: int) -> None:
        if seq <= self.waited:
            return
        # an older group's event may have been recorded again by a newer group: waiting for that one is later, never
        # too early (FIFO), so the ring can wrap
        cur = torch.cuda.current_stream(self.device)
        if self.timing:
            pair = self._spare.pop() if self._spare else (torch.cuda.Event(enable_timing=True),
                                                           torch.cuda.Event(enable_timing=True))
            pair[0].record(cur)
            cur.wait_event(self.events[seq % len(self.events)])
            pair[1].record(cur)
            self._timed.append(pair)
            if len(self._timed) >= 4096:
                self._collect()
        else:
            cur.wait_event(self.events[seq % len(self.events)])
        self.waited = seq
        self.waits += 1

    def _collect(self) -> None:
        if self._timed:
            self._timed[-1][1].synchronize()
            self._stall_ms += sum(a.elapsed_time(b) for a, b in self._timed)
            self._spare += self._timed
            self._timed = []

    def stall_ms(self) -> float:
        """Compute-stream time spent waiting for copies so far (synchronizes on the last timed wait)."""
        self._collect()
        return self._stall_ms


def make_copies(device: torch.device, delayed: bool = False, timing: bool = True) -> SyncCopies:
    if device.type == "cuda":
        if delayed:
            raise ValueError("DelayedCopies is a CPU test mode")
        return CudaCopies(device, timing)
    return DelayedCopies() if delayed else SyncCopies()


class HostReader:
    """Small int64 tensors of the GPU (the router's top-k ids, the predictor's top-m, expert counts) read on the
    host: copied into pinned memory behind an event, which `get` waits for. Two buffers alternate, so a layer's
    values stay readable while the next layer's copy is queued."""

    def __init__(self, device: torch.device, capacity: int = 1 << 12):
        self.device = device
        self.cuda = device.type == "cuda"
        self.capacity = 0
        self.bufs: list[torch.Tensor] = []
        self.events = [torch.cuda.Event() for _ in range(2)] if self.cuda else []
        self.turn = 0
        self.sizes: list[int] = []
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        self.capacity = capacity
        self.bufs = [torch.zeros(capacity, dtype=torch.int64, pin_memory=self.cuda) for _ in range(2)]
        self.views = [b.numpy() for b in self.bufs]

    def stage(self, *tensors: torch.Tensor) -> None:
        """Queue the copies of `tensors` (any int dtype, flattened) behind the work already on the compute stream."""
        need = sum(t.numel() for t in tensors)
        if need > self.capacity:
            if self.cuda:
                torch.cuda.current_stream(self.device).synchronize()  # the old buffers may still be read by copies
            self._grow(max(need, 2 * self.capacity))
        self.turn ^= 1
        buf, pos = self.bufs[self.turn], 0
        self.sizes = []
        for t in tensors:
            n = t.numel()
            buf[pos:pos + n].copy_(t.reshape(-1), non_blocking=self.cuda)
            self.sizes.append(n)
            pos += n
        if self.cuda:
            self.events[self.turn].record(torch.cuda.current_stream(self.device))

    def get(self) -> list[np.ndarray]:
        """The staged tensors as int64 numpy views (valid until the second `stage` after this one)."""
        if self.cuda:
            self.events[self.turn].synchronize()
        out, pos, view = [], 0, self.views[self.turn]
        for n in self.sizes:
            out.append(view[pos:pos + n])
            pos += n
        return out
