"""Routing forced from a trace set, and expert frequencies counted on one: what `routing_from` and the static and
popularity policies read.

Forced routing (`routing_from=TRACES`): the trace set's test split, concatenated in the simulator's decode order
(validation/cache_sim.build_stream, with --locality applied), is one stream of rows. Layer mapping: trace MoE
layer i -> the model's MoE layer i (same count, experts and top-k, else one line). Every forward takes the next
B*T rows (B sequences of T tokens, row-major), and each layer's router output is replaced by the rows' top-k ids
and weights (the router itself still runs: its time is part of the model). Prefetch policies then use the
stream's predictions, made by the simulator's scorers on the trace set (the same predictions the simulator
replays), so the engine's counts equal the simulator's; oracle reads the stream's future rows, Belady its next
uses. Running past the end of the stream is an error, never a wrap-around.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from validation.prefetch.simulator import BELADY, Policy, Stream, build_stream, next_uses, prepare, static_experts


@dataclass
class ForcedRouting:
    traces: str
    stream: Stream
    ids: torch.Tensor                  # (T, L, K) int64 on the device
    weights: torch.Tensor              # (T, L, K) in the model's dtype on the device
    next_use: np.ndarray | None        # (T, L, K) for Belady
    mapping: str
    position: int = 0                  # next row

    @property
    def tokens(self) -> int:
        return self.stream.tokens

    def take(self, rows: int) -> int:
        """Reserve the next `rows` rows for one forward; returns the first."""
        start = self.position
        if start + rows > self.tokens:
            raise UserError(f"routing from {self.traces}: its test split holds {self.tokens} tokens and this run "
                            f"needs more ({start + rows}); use fewer tokens or a larger trace set")
        self.position += rows
        return start


def check_shape(what: str, traces: str, shape: tuple[int, int, int], model: tuple[int, int, int]) -> None:
    if shape != model:
        s = lambda l, e, k: f"{l} MoE layers x {e} experts, top-{k}"  # noqa: E731
        raise UserError(f"{what} {traces}: routing of {s(*shape)}; the model has {s(*model)} (traces of another "
                        "shape: trace layer i runs as the model's MoE layer i, so the shapes must agree)")


def load_forced_routing(traces: str | Path, policy: Policy, model_shape: tuple[int, int, int], lookahead: int,
                        budget: int, device: torch.device, dtype: torch.dtype, seed: int = 0, locality: float = 0.0,
                        max_tokens: int | None = None, verify: bool = True) -> ForcedRouting:
    """The test split of `traces` as forced routing, with the policy's predictions (see the module docstring)."""
    setup = prepare(traces, policy.name, lookahead, budget, seed, locality, max_tokens, verify=verify)
    m = setup.ts.manifest
    check_shape("--routing-from", str(traces), (m.num_layers, m.num_experts, m.top_k), model_shape)
    stream = build_stream(setup.ts, setup.split["test"], setup.predictors, lookahead, budget, locality, seed,
                          max_tokens, progress=False)
    L = m.num_layers
    mapping = f"trace MoE layer i -> model MoE layer i, i = 0..{L - 1} (test split of {traces}, {stream.tokens} tokens)"
    nu = next_uses(stream.ids, m.num_experts) if policy.eviction == BELADY else None
    return ForcedRouting(str(traces), stream, torch.from_numpy(stream.ids).to(device),
                         torch.from_numpy(stream.weights).to(device=device, dtype=dtype), nu, mapping)


def trace_frequencies(traces: str | Path, model_shape: tuple[int, int, int], cache: int, seed: int = 0,
                      verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """((L, E) bool: each layer's `cache` most used experts, (L, E) float share of top-k assignments) on the
    training split of `traces` (static-popular's pinned set, the popularity baseline's scores)."""
    from collection.traces.format import TraceSet
    from collection.traces.rows import split_sequences
    from validation.coverage.scorers import expert_popularity

    ts = TraceSet(Path(traces), verify=verify)
    m = ts.manifest
    check_shape("--static-from", str(traces), (m.num_layers, m.num_experts, m.top_k), model_shape)
    split = split_sequences(ts.sequence_table(), seed)
    if len(split["train"]) == 0:
        raise UserError(f"{traces}: too few sequences for a training split")
    return static_experts(ts, split["train"], cache), expert_popularity(ts, split["train"]).numpy()
