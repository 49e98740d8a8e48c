"""Small host arrays sent to the GPU on the compute stream: a call's expert -> row table (and nf4's rows).

A ring of pinned rows: the host writes row i, queues its non_blocking copy into device row i and records an
event; before writing row i again it waits for that event (long complete in practice: the ring is far longer
than the calls in flight between two router reads). On a CPU the arrays are wrapped, not copied.
"""
from __future__ import annotations

import numpy as np
import torch


class Uploads:
    def __init__(self, device: torch.device, width: int, ring: int = 256):
        self.device, self.width, self.ring = device, width, ring
        self.cuda = device.type == "cuda"
        self.n = 0
        if self.cuda:
            self.host = torch.zeros((ring, width), dtype=torch.int64, pin_memory=True)
            self.host_np = self.host.numpy()
            self.dev = torch.zeros((ring, width), dtype=torch.int64, device=device)
            self.events = [torch.cuda.Event() for _ in range(ring)]
            self.views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (row, n) -> (host, device)

    def send(self, values: np.ndarray) -> torch.Tensor:
        """(n,) int64 on the device, holding `values`; valid for the kernels queued after this call."""
        if not self.cuda:
            return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
        n = len(values)
        if n > self.width:
            raise ValueError(f"upload of {n} values, rows hold {self.width}")
        i = self.n % self.ring
        self.n += 1
        ev = self.events[i]
        ev.synchronize()  # the copy that last read this pinned row has run
        self.host_np[i, :n] = values
        pair = self.views.get((i, n))
        if pair is None:  # slicing costs host time on every call: each (row, length) is sliced once
            pair = self.views[(i, n)] = (self.host[i, :n], self.dev[i, :n])
        out = pair[1]
        out.copy_(pair[0], non_blocking=True)
        ev.record(torch.cuda.current_stream(self.device))
        return out
