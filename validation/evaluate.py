"""Scoring a predictor or baseline on a split: the single evaluation loop of every stage.

A scorer maps (block, token rows, input layers) to expert scores (R, E) for the target layer
l + d. Learned predictors and the training-free baselines are all scorers, so they are measured
by exactly the same rows, ranks and metric code.

Baselines (`--model-type`):
    router          layer l's own router on h_l (d = 0 only): the control, reads exactly 1.0
    router-reuse    layer l+d's router on h_l: the training-free prefetcher to beat
    previous-token  the previous token's experts at the target layer (its routing weights)
    popularity      each target layer's most frequent experts in the training split
    random          uniform random scores (recall@k = k / E in expectation)
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from collection.errors import UserError
from collection.format import TraceSet
from training.data import (SplitBlocks, TokenBlock, input_layers, make_features, routing_vector, row_batches,
                           targets)
from validation.metrics import SEED_KS, CoverageAccumulator, true_expert_ranks

Scorer = Callable[[TokenBlock, torch.Tensor, torch.Tensor], torch.Tensor]
BASELINES = ("router", "router-reuse", "previous-token", "popularity", "random")
ROUTER_BASELINES = ("router", "router-reuse")  # the ones that apply stored router weights to stored hidden states


def expert_popularity(ts: TraceSet, seq_ids: np.ndarray, shards_per_group: int = 8) -> torch.Tensor:
    """(L, E) share of top-k assignments per layer over the given sequences (the training split)."""
    L, E = ts.manifest.num_layers, ts.manifest.num_experts
    counts = torch.zeros(L, E, dtype=torch.float64)
    for block in SplitBlocks(ts, seq_ids, torch.device("cpu"), shards_per_group, with_hidden=False, keep=False):
        counts.scatter_add_(1, block.topk_ids.reshape(L, -1),
                            torch.ones(L, block.topk_ids[0].numel(), dtype=torch.float64))
    return (counts / counts.sum(1, keepdim=True).clamp(min=1)).float()


def baseline_scorer(name: str, ts: TraceSet, lookahead: int, train_ids: np.ndarray, device: torch.device,
                    seed: int = 0) -> Scorer:
    E = ts.manifest.num_experts
    if name in ROUTER_BASELINES:
        if name == "router" and lookahead != 0:
            raise UserError("--model-type router is the same-layer control: it needs --lookahead 0 "
                            "(router-reuse applies layer l+d's router to h_l)")
        # the router in the model's own dtype, as the model applied it: the control then matches bit for bit
        weights = ts.router_weights().to(device)

        def router(block: TokenBlock, tok: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
            h = block.hidden[block.hidden_slot[layer], tok]
            scores = torch.empty(tok.shape[0], E, device=device)
            for l in layer.unique().tolist():  # one matmul per target layer present in the batch
                m = layer == l
                scores[m] = torch.nn.functional.linear(h[m].to(weights.dtype), weights[l + lookahead]).float()
            return scores
        return router
    popularity = expert_popularity(ts, train_ids).to(device) if name in ("popularity", "previous-token") else None
    if name == "popularity":
        return lambda block, tok, layer: popularity[layer + lookahead]
    if name == "previous-token":
        # previous token's routing weights, popularity below them: ranks its 4 experts first, then
        # orders the rest sensibly (the first token of a sequence falls back to popularity)
        return lambda block, tok, layer: (routing_vector(block, layer + lookahead, block.prev[tok], E)
                                          + 1e-3 * popularity[layer + lookahead])
    if name == "random":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return lambda block, tok, layer: torch.rand(tok.shape[0], E, generator=gen).to(device)
    raise UserError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")


def predictor_scorer(model: nn.Module, lookahead: int, num_experts: int, with_history: bool,
                     dtype: torch.dtype = torch.float32) -> Scorer:
    def score(block: TokenBlock, tok: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        f = make_features(block, tok, layer, lookahead, num_experts, with_history, dtype)
        with torch.autocast(device_type=tok.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(f).float()
    return score


@torch.no_grad()
def evaluate(scorer: Scorer, ts: TraceSet, seq_ids: np.ndarray, lookahead: int, device: torch.device,
             batch_rows: int = 65536, shards_per_group: int = 4, need_hidden: bool = True,
             ks: tuple[int, ...] = SEED_KS, progress: bool = True,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             blocks: SplitBlocks | None = None) -> CoverageAccumulator:
    """Every (token, layer) row of `seq_ids`, scored and ranked; returns the metric sums
    (and the mean of `loss_fn(scores, true_ids)` over rows when given). `blocks` may hold the split's
    blocks already loaded (training validates every epoch on the same rows)."""
    m = ts.manifest
    acc = CoverageAccumulator(m.num_layers, len(m.sources), m.num_experts, m.top_k, ks, device)
    layers = input_layers(ts, lookahead, need_hidden)
    if blocks is None:
        blocks = SplitBlocks(ts, seq_ids, device, shards_per_group, with_hidden=need_hidden, keep=False)
    n_groups = -(-len(ts) // blocks.per_group)
    for block in tqdm(blocks, desc="evaluate", unit="group", total=n_groups, disable=not progress or n_groups < 2,
                      dynamic_ncols=True):
        for tok, layer in row_batches(block, layers, batch_rows):
            scores = scorer(block, tok, layer)
            true = targets(block, tok, layer, lookahead)
            ranks = true_expert_ranks(scores, true)
            pred = scores.topk(m.top_k, dim=1).indices
            acc.update(ranks, layer + lookahead, block.source[tok], true, pred)
            if loss_fn is not None:
                acc.add_loss(loss_fn(scores, true) * tok.shape[0], tok.shape[0])
    return acc
