"""The evaluation loop: every (token, layer) row of a split, scored, ranked and summed into the metrics.

Every stage that measures a scorer (`validation.coverage.scorers`) goes through `evaluate`: the coverage analysis,
the comparison table, per-epoch validation during training (`epoch_validation`, handed to the trainer by
the train scripts, so `training` never imports `validation`) and the benchmarks.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from collection.traces.format import ROUTER_WEIGHTS, TraceSet
from collection.traces.rows import (
    SplitBlocks,
    TokenBlock,
    has_later_token,
    input_layers,
    row_batches,
    targets,
    window_targets,
)
from models.features import feature_spec
from models.predictors import lookahead_tokens
from validation.coverage.metrics import SEED_KS, CoverageAccumulator, WindowAccumulator, true_expert_ranks
from validation.coverage.scorers import Scorer, baseline_scorer, predictor_scorer


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
    for block, tok, layer in split_rows(ts, seq_ids, lookahead, device, batch_rows, shards_per_group, need_hidden,
                                        progress, blocks):
        scores = scorer(block, tok, layer)
        true = targets(block, tok, layer, lookahead)
        ranks = true_expert_ranks(scores, true)
        pred = scores.topk(m.top_k, dim=1).indices
        acc.update(ranks, layer + lookahead, block.source[tok], true, pred)
        if loss_fn is not None:
            acc.add_loss(loss_fn(scores, true) * tok.shape[0], tok.shape[0])
    return acc


def split_rows(ts: TraceSet, seq_ids: np.ndarray, lookahead: int, device: torch.device, batch_rows: int,
               shards_per_group: int, need_hidden: bool, progress: bool, blocks: SplitBlocks | None
               ) -> Iterator[tuple[TokenBlock, torch.Tensor, torch.Tensor]]:
    """(block, token rows, input layers) batches over every (token, layer) row of `seq_ids` whose target layer
    l + `lookahead` exists, group by group (a progress bar over the groups when asked)."""
    layers = input_layers(ts, lookahead, need_hidden)
    if blocks is None:
        blocks = SplitBlocks(ts, seq_ids, device, shards_per_group, with_hidden=need_hidden, keep=False)
    n_groups = -(-len(ts) // blocks.per_group)
    for block in tqdm(blocks, desc="evaluate", unit="group", total=n_groups, disable=not progress or n_groups < 2,
                      dynamic_ncols=True):
        for tok, layer in row_batches(block, layers, batch_rows):
            yield block, tok, layer


@torch.no_grad()
def evaluate_window(scorer: Scorer, ts: TraceSet, seq_ids: np.ndarray, tokens: int, device: torch.device,
                    batch_rows: int = 65536, shards_per_group: int = 4, need_hidden: bool = True,
                    ks: tuple[int, ...] = SEED_KS, progress: bool = True,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                    blocks: SplitBlocks | None = None) -> WindowAccumulator:
    """Every (token t, layer l) row of `seq_ids` that has a later token, scored against the set of experts layer
    l uses in tokens t+1..t+`tokens` (`window_targets`); returns the window metric sums (and the mean of
    `loss_fn(scores, 0/1 set)` over rows when given)."""
    m = ts.manifest
    acc = WindowAccumulator(m.num_layers, m.num_experts, m.top_k, ks, device)
    for block, tok, layer in split_rows(ts, seq_ids, 0, device, batch_rows, shards_per_group, need_hidden,
                                        progress, blocks):
        keep = has_later_token(block, tok)  # a sequence's last token has no window
        tok, layer = tok[keep], layer[keep]
        if tok.numel() == 0:
            continue
        scores = scorer(block, tok, layer)
        used = window_targets(block, tok, layer, tokens, m.num_experts)
        acc.update(scores, used.bool(), layer)
        if loss_fn is not None:
            acc.add_loss(loss_fn(scores, used) * tok.shape[0], tok.shape[0])
    return acc


def epoch_validation(model: nn.Module, ts: TraceSet, seq_ids: np.ndarray, lookahead: int, device: torch.device,
                     blocks: SplitBlocks, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     dtype: torch.dtype) -> dict[str, float]:
    """The validation metrics of one training epoch (flat dict, plus the mean loss as "loss" and the per-target-layer
    recall@K as a list, "per_layer_recall@K"); a predictor trained for a lookahead in tokens gets the window
    metrics (and "per_layer_window_ap")."""
    W = lookahead_tokens(model)
    hidden = feature_spec(model).hidden  # a routing-only predictor's rows: every layer, stored h_l or not
    if W:
        acc = evaluate_window(predictor_scorer(model, 0, ts.manifest.num_experts, dtype), ts, seq_ids, W, device,
                              need_hidden=hidden, progress=False, loss_fn=loss_fn, blocks=blocks)
        return {**acc.summary(), "loss": acc.mean_loss(), "per_layer_window_ap": acc.per_layer("window_ap")}
    acc = evaluate(predictor_scorer(model, lookahead, ts.manifest.num_experts, dtype), ts, seq_ids, lookahead,
                   device, need_hidden=hidden, progress=False, loss_fn=loss_fn, blocks=blocks)
    recall = f"recall@{ts.manifest.top_k}"
    return {**acc.summary(), "loss": acc.mean_loss(), f"per_layer_{recall}": acc.per_layer(recall)}


def router_reuse_recall(ts: TraceSet, seq_ids: np.ndarray, lookahead: int, device: torch.device,
                        blocks: SplitBlocks) -> float | None:
    """Router reuse's recall@K on the rows of `seq_ids` (the training-free prefetcher a trained one must beat; one
    matmul per row), or None where it is not defined: at d = 0 it is the layer's own router (the control, 1.0), and
    traces without router matrices (legacy imports) cannot run it. Handed to the trainer by the train scripts."""
    if lookahead == 0 or not (ts.dir / ROUTER_WEIGHTS).is_file():
        return None
    scorer = baseline_scorer("router-reuse", ts, lookahead, np.empty(0, dtype=np.int64), device)
    acc = evaluate(scorer, ts, seq_ids, lookahead, device, progress=False, blocks=blocks)
    return acc.summary()[f"recall@{ts.manifest.top_k}"]
