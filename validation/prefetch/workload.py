"""What the server is asked to do with the replayed tokens: prompts to prefill, and lanes decoded together.

`with_prompts(stream, P)`: each request (a sequence of the test split) begins with a prompt of its first
min(P, n - 1) tokens, prefilled at once before its first decoded token (every request decodes at least
one token); the prompt's experts per layer are their union. `as_batch(stream, B)`: the requests are dealt
round-robin to B lanes, each lane's tokens one after another; step t decodes token t of every lane, so a
layer needs the union of the lanes' experts. Every lane stops at the shortest lane's length, so each step
decodes B tokens.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from common.errors import UserError
from validation.prefetch.simulator import Stream


def with_prompts(stream: Stream, prompt_tokens: int, num_experts: int) -> Stream:
    """The stream with each request's first min(P, n - 1) tokens moved into a prompt prefilled before it."""
    if prompt_tokens == 0:
        return stream
    if stream.lanes != 1:
        raise ValueError("prompts are cut before the lanes are dealt")
    L = stream.ids.shape[1]
    seq = np.cumsum(stream.first) - 1                      # (T,) request of each token
    plen = np.minimum(prompt_tokens, np.bincount(seq) - 1)  # (R,) prompt tokens of each request
    is_prompt = stream.position < plen[seq]
    tok = np.flatnonzero(is_prompt)
    need = np.zeros((len(plen), L, num_experts), dtype=bool)
    need[seq[tok][:, None, None], np.arange(L)[None, :, None], stream.ids[tok]] = True
    keep = ~is_prompt
    starts = keep & (stream.position == plen[seq]) & (plen[seq] > 0)  # a request's first decoded token
    prompt_at = np.where(starts, seq, -1)[keep][:, None].astype(np.int64)
    first = (keep & (stream.position == plen[seq]))[keep]
    return replace(stream, ids=stream.ids[keep], weights=stream.weights[keep], first=first,
                   position=stream.position[keep], predictions={k: v[keep] for k, v in stream.predictions.items()},
                   scores={k: v[keep] for k, v in stream.scores.items()}, prompt_need=need,
                   prompt_len=plen.astype(np.int64), prompt_at=prompt_at)


def as_batch(stream: Stream, lanes: int) -> Stream:
    """B lanes decoded together: step t holds token t of each lane (module docstring)."""
    if lanes == 1:
        return stream
    seq = np.cumsum(stream.first) - 1
    requests = int(seq[-1]) + 1
    lane_of = (np.arange(requests) % lanes)[seq]
    tokens = [np.flatnonzero(lane_of == b) for b in range(lanes)]
    T = min(len(x) for x in tokens)
    if T == 0:
        raise UserError(f"--batch {lanes}: the replayed stream holds {requests} requests; each lane needs one")
    idx = np.stack([x[:T] for x in tokens], axis=1)  # (T, B) token of lane b at step t

    def lanes_last(a: np.ndarray) -> np.ndarray:  # (N, L, X) -> (T, L, B x X), lane-major
        x = a[idx]                                 # (T, B, L, X)
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(T, x.shape[2], -1))
    prompt_at = None
    if stream.prompt_at is not None:
        prompt_at = np.ascontiguousarray(stream.prompt_at[idx, 0])  # (T, B)
    return replace(stream, ids=lanes_last(stream.ids), weights=lanes_last(stream.weights),
                   first=stream.first[idx].any(1), position=stream.position[idx[:, 0]],
                   predictions={k: lanes_last(v) for k, v in stream.predictions.items()},
                   # a step keeps an expert for whichever lane needs it soonest
                   scores={k: np.ascontiguousarray(v[idx].max(1)) for k, v in stream.scores.items()},
                   lanes=lanes, prompt_at=prompt_at)
