"""Every predictor and baseline as a *scorer*, and the one registry that says what each one needs.

A scorer maps (block, token rows, input layers) to expert scores (R, E) for the target layer l + d.
Learned predictors and the training-free baselines are all scorers, so every stage (the coverage
analysis, the comparison table, the prefetch simulator) measures them with the same rows and metrics.

Baselines:
    router          layer l's own router on h_l (d = 0 only): the control, reads exactly 1.0
    router-reuse    layer l+d's router on h_l: the training-free prefetcher to beat
    previous-token  the previous token's experts at the target layer (its routing weights)
    popularity      each target layer's most frequent experts in the training split
    random          uniform random scores (recall@k = k / E in expectation)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from collection.errors import UserError
from collection.format import ROUTER_WEIGHTS, TraceSet
from collection.rows import SplitBlocks, TokenBlock, routing_vector
from models.features import feature_spec, make_features
from models.predictors import PREDICTORS

Scorer = Callable[[TokenBlock, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ScorerInfo:
    """What one registry entry is and what it needs from a trace set."""
    learned: bool          # a trained predictor: needs a checkpoint
    needs_hidden: bool     # reads the stored MoE-input hidden states
    needs_router: bool     # reads the stored router matrices (router_weights.safetensors)
    needs_history: bool    # reads routing already observed (this token's earlier layers, earlier tokens)
    same_layer_only: bool  # defined at lookahead 0 only
    summary: str


SCORERS: dict[str, ScorerInfo] = {
    **{name: ScorerInfo(learned=True, needs_hidden=True, needs_router=False, needs_history=cls.uses_history,
                        same_layer_only=False, summary=(cls.__doc__ or name).split(".")[0].strip())
       for name, cls in PREDICTORS.items()},
    "router": ScorerInfo(False, True, True, False, True, "layer l's own router on h_l: the control"),
    "router-reuse": ScorerInfo(False, True, True, False, False, "layer l+d's router applied to h_l"),
    "previous-token": ScorerInfo(False, False, False, True, False, "the previous token's experts at l+d"),
    "popularity": ScorerInfo(False, False, False, False, False, "most frequent experts of l+d (training split)"),
    "random": ScorerInfo(False, False, False, False, False, "uniform random scores"),
}
BASELINES = tuple(name for name, info in SCORERS.items() if not info.learned)


def check_traces(name: str, ts: TraceSet, lookahead: int) -> None:
    """One clear line if the trace set lacks what `name` needs, before anything is computed or written."""
    if name not in SCORERS:
        raise UserError(f"unknown predictor or baseline {name!r}; choose from {', '.join(SCORERS)}")
    info = SCORERS[name]
    if info.same_layer_only and lookahead != 0:
        raise UserError(f"{name} is the same-layer control: it needs --lookahead 0 "
                        "(router-reuse applies layer l+d's router to h_l)")
    if info.needs_hidden and not ts.manifest.hidden_layers:
        raise UserError(f"{name} needs stored hidden states, and {ts.dir} has none; collect with --hidden-layers all")
    if info.needs_router and not (ts.dir / ROUTER_WEIGHTS).is_file():
        raise UserError(f"{name} needs the router matrices, and {ts.dir / ROUTER_WEIGHTS} is missing "
                        "(legacy imports have none)")


def expert_popularity(ts: TraceSet, seq_ids: np.ndarray, shards_per_group: int = 8) -> torch.Tensor:
    """(L, E) share of top-k assignments per layer over the given sequences (the training split)."""
    L, E = ts.manifest.num_layers, ts.manifest.num_experts
    counts = torch.zeros(L, E, dtype=torch.float64)
    for block in SplitBlocks(ts, seq_ids, torch.device("cpu"), shards_per_group, with_hidden=False, keep=False):
        counts.scatter_add_(1, block.topk_ids.reshape(L, -1),
                            torch.ones(L, block.topk_ids[0].numel(), dtype=torch.float64))
    return (counts / counts.sum(1, keepdim=True).clamp(min=1)).float()


def _router(ts: TraceSet, lookahead: int, train_ids: np.ndarray, device: torch.device, seed: int) -> Scorer:
    # the router in the model's own dtype, as the model applied it: the control then matches bit for bit
    weights = ts.router_weights().to(device)
    E = ts.manifest.num_experts

    def score(block: TokenBlock, tok: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        h = block.hidden[block.hidden_slot[layer], tok]
        scores = torch.empty(tok.shape[0], E, device=device)
        for l in layer.unique().tolist():  # one matmul per target layer present in the batch
            m = layer == l
            scores[m] = torch.nn.functional.linear(h[m].to(weights.dtype), weights[l + lookahead]).float()
        return scores
    return score


def _popularity(ts: TraceSet, lookahead: int, train_ids: np.ndarray, device: torch.device, seed: int) -> Scorer:
    popularity = expert_popularity(ts, train_ids).to(device)
    return lambda block, tok, layer: popularity[layer + lookahead]


def _previous_token(ts: TraceSet, lookahead: int, train_ids: np.ndarray, device: torch.device, seed: int) -> Scorer:
    # previous token's routing weights, popularity below them: ranks its K experts first, then orders the rest
    # sensibly (the first token of a sequence falls back to popularity)
    popularity = expert_popularity(ts, train_ids).to(device)
    E = ts.manifest.num_experts
    return lambda block, tok, layer: (routing_vector(block, layer + lookahead, block.prev[tok], E)
                                      + 1e-3 * popularity[layer + lookahead])


def _random(ts: TraceSet, lookahead: int, train_ids: np.ndarray, device: torch.device, seed: int) -> Scorer:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    E = ts.manifest.num_experts
    return lambda block, tok, layer: torch.rand(tok.shape[0], E, generator=gen).to(device)


_BASELINE_BUILDERS: dict[str, Callable[[TraceSet, int, np.ndarray, torch.device, int], Scorer]] = {
    "router": _router, "router-reuse": _router, "previous-token": _previous_token, "popularity": _popularity,
    "random": _random,
}


def baseline_scorer(name: str, ts: TraceSet, lookahead: int, train_ids: np.ndarray, device: torch.device,
                    seed: int = 0) -> Scorer:
    """The training-free scorer `name`, after checking the trace set holds what it needs."""
    if name not in _BASELINE_BUILDERS:
        raise UserError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    check_traces(name, ts, lookahead)
    return _BASELINE_BUILDERS[name](ts, lookahead, train_ids, device, seed)


def predictor_scorer(model: nn.Module, lookahead: int, num_experts: int, dtype: torch.dtype = torch.float32) -> Scorer:
    """A trained predictor as a scorer (features built by `models.features.make_features`)."""
    spec = feature_spec(model)

    def score(block: TokenBlock, tok: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        f = make_features(block, tok, layer, lookahead, num_experts, spec, dtype)
        with torch.autocast(device_type=tok.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(f).float()
    return score
