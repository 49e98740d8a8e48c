"""Per-forward timing of a causal LM, prompt and decode apart: what the engine reports, and what the benchmark
measures its baselines (the resident model, accelerate's offload) with, the same way.

A forward whose cache is empty is a prompt ("prefill"), any later one a decode step. Prefill time is the sum of
prompt forwards; decode time is, per generation, from the start of its first decode forward to the end of its
last (sampling and generate()'s own work between steps included). On CUDA the marks are timed events on the
current stream (read once, at `seconds`); on a CPU, the host clock.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn


def forward_shape(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, int, int, bool]:
    """(input ids or None, batch B, tokens per row T, new sequence?) of a causal LM forward call."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    ref = ids if ids is not None else kwargs.get("inputs_embeds")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return ids, int(ref.shape[0]), int(ref.shape[1]), cache is None or cache.get_seq_length() == 0


class ForwardClock:
    def __init__(self, device: torch.device, timing: bool = True):
        self.device = device
        self.cuda = timing and device.type == "cuda"
        self.tokens = {"prefill": 0, "decode": 0}
        self.forwards = {"prefill": 0, "decode": 0}
        self.marks: list[tuple[str, Any, Any]] = []  # (phase, start, end)
        self.phase = "prefill"

    def reset(self) -> None:
        self.__init__(self.device, self.cuda)

    def _now(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def begin(self, phase: str, tokens: int) -> None:
        self.phase = phase
        self.tokens[phase] += tokens
        self.forwards[phase] += 1
        self.marks.append((phase, self._now(), None))

    def end(self) -> None:
        phase, start, _ = self.marks[-1]
        self.marks[-1] = (phase, start, self._now())

    def seconds(self) -> tuple[float, float]:
        """(prefill seconds, decode seconds) (module docstring)."""
        marks = [m for m in self.marks if m[2] is not None]
        if not marks:
            return 0.0, 0.0
        if self.cuda:
            marks[-1][2].synchronize()
        ms = (lambda a, b: a.elapsed_time(b)) if self.cuda else (lambda a, b: (b - a) * 1e3)
        prefill = sum(ms(s, e) for p, s, e in marks if p == "prefill") / 1e3
        decode, run = 0.0, None
        for p, s, e in marks + [("prefill", None, None)]:
            if p == "decode":
                run = (run[0] if run else s, e)
            elif run:
                decode += ms(*run) / 1e3
                run = None
        return prefill, decode

    def rates(self) -> tuple[float | None, float | None]:
        """(prefill tokens/s, decode tokens/s)."""
        p, d = self.seconds()
        return (self.tokens["prefill"] / p if p > 0 else None, self.tokens["decode"] / d if d > 0 else None)

    @classmethod
    def attach(cls, model: nn.Module, device: torch.device) -> "ForwardClock":
        """A clock on any model's forwards (hooks on the model)."""
        clock = cls(device)

        def begin(module: nn.Module, args: tuple, kwargs: dict) -> None:
            _, B, T, new = forward_shape(args, kwargs)
            clock.begin("prefill" if new else "decode", B * T)
        model.register_forward_pre_hook(begin, with_kwargs=True)
        model.register_forward_hook(lambda module, args, output: clock.end())
        return clock
