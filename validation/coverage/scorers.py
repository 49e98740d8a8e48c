"""Every predictor and baseline as a *scorer*, and the one registry that says what each one needs.

A scorer maps (block, token rows, input layers) to expert scores (R, E) for the target layer l + d.
Learned predictors and the training-free baselines are all scorers, so every stage (the coverage
analysis, the comparison table, the prefetch simulator) measures them with the same rows and metrics.

Baselines:
    router          layer l's own router on h_l (d = 0 only): the control, reads exactly 1.0
                    (ties in the model's dtype broken as its top-k broke them)
    router-reuse    layer l+d's router on h_l: the training-free prefetcher to beat
    previous-token  the previous token's experts at the target layer (its routing weights)
    popularity      each target layer's most frequent experts in the training split
    random          uniform random scores (recall@k = k / E in expectation)
    recency         the experts of the target layer used by the previous N tokens (--history), most recent
                    first (an LRU order of that layer's experts, as the cache sees it); popularity below them
    frequency       how often the previous N tokens used each expert of the target layer; popularity below

A predictor trained for a lookahead in tokens (W >= 1) scores, for row (t, l), the probability that layer
l uses each expert in tokens t+1..t+W; recency and frequency are its training-free baselines.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from collection.families import selection_scores
from collection.traces.format import ROUTER_WEIGHTS, TraceSet
from collection.traces.rows import SplitBlocks, TokenBlock, earlier_token, expert_set, routing_vector
from common.errors import UserError
from models.features import feature_spec, make_features
from models.predictors import PREDICTORS, lookahead_tokens
from validation.coverage.metrics import true_expert_ranks

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
    needs_training_split: bool = False  # counts expert use on the training split (popularity)
    looks_back: bool = False            # reads the previous `history` tokens' routing (recency, frequency)


SCORERS: dict[str, ScorerInfo] = {
    **{name: ScorerInfo(learned=True, needs_hidden=True, needs_router=False, needs_history=cls.uses_history,
                        same_layer_only=False, summary=(cls.__doc__ or name).split(".")[0].strip())
       for name, cls in PREDICTORS.items()},
    "router": ScorerInfo(False, True, True, False, True, "layer l's own router on h_l: the control"),
    "router-reuse": ScorerInfo(False, True, True, False, False, "layer l+d's router applied to h_l"),
    "previous-token": ScorerInfo(False, False, False, True, False, "the previous token's experts at l+d",
                                 needs_training_split=True),  # popularity orders the rest
    "popularity": ScorerInfo(False, False, False, False, False, "most frequent experts of l+d (training split)",
                             needs_training_split=True),
    "random": ScorerInfo(False, False, False, False, False, "uniform random scores"),
    "recency": ScorerInfo(False, False, False, True, False, "the previous N tokens' experts at l+d, most recent first",
                          needs_training_split=True, looks_back=True),
    "frequency": ScorerInfo(False, False, False, True, False, "how often the previous N tokens used each expert of l+d",
                            needs_training_split=True, looks_back=True),
}
DEFAULT_HISTORY = 16  # tokens the recency and frequency baselines look back unless told
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


# bits of precision of the 16-bit dtypes a router may run in; a float32 router leaves no room for a tie-break
_PRECISION_BITS = {torch.bfloat16: 8, torch.float16: 11}


def break_ties_like_topk(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """float32 scores of `logits` (R, E), a 16-bit dtype, that rank the `top_k` experts torch.topk picks
    from softmax(logits) (what Hugging Face MoE routers run) above every expert tied with them.

    Ties among bf16 logits are common (8 bits of precision), and the metrics count a tie against the
    prediction, so without this the router control reads below 1.0 where only the tie order differs.
    The picked experts are raised by a quarter of the dtype's spacing at their value: exact ties across
    the top-k boundary then rank as the model's top-k broke them, distinct values keep their order, and
    rounding the scores back to the dtype gives the logits again. float32 logits are returned unchanged.
    """
    scores = logits.float()
    bits = _PRECISION_BITS.get(logits.dtype)
    if bits is None:
        return scores
    picked = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float), top_k, dim=-1).indices  # (R, K)
    value = scores.gather(1, picked)
    _, exponent = torch.frexp(value)                               # value = m * 2^exponent, 0.5 <= |m| < 1
    smallest_normal = torch.finfo(logits.dtype).smallest_normal
    step = torch.where(value.abs() < smallest_normal, torch.full_like(value, smallest_normal * 2.0 ** -(bits + 1)),
                       torch.ldexp(torch.ones_like(value), exponent - bits - 2))
    return scores.scatter_add(1, picked, step)


class RouterScorer:
    """Layer l+d's router on h_l, in the model's own dtype, as the model applied it (d = 0: the control,
    which then matches the stored routing exactly; d >= 1: router reuse). Ties are broken as the model's
    top-k breaks them (`break_ties_like_topk`).

    For the control it also counts why a row could still differ: `tied_rows` rows had a chosen expert tied
    in the model's dtype with an unchosen one, and the tie-break missed `tied_missed_rows` of them
    (torch.topk documents no order among ties, and CUDA's may differ from the evaluating device's)."""

    def __init__(self, weights: torch.Tensor, lookahead: int, top_k: int, rule: dict[str, Any] | None = None,
                 extras: dict[str, torch.Tensor] | None = None):
        self.weights, self.lookahead, self.top_k = weights, lookahead, top_k   # weights: (L, E, H)
        # `rule` (manifest routing.router) says how the family chose from its logits; `extras` its router bias
        # (GPT-OSS) or score-correction bias (DeepSeek-V3), (L, E) each. Top-k of softmax(logits) otherwise.
        self.rule, self.extras = rule, extras or {}
        self.plain_topk = rule is None or (rule.get("scoring") != "sigmoid" and not rule.get("groups"))
        self.rows = self.tied_rows = self.tied_missed_rows = 0

    def __call__(self, block: TokenBlock, tok: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        h = block.hidden_at(layer, tok, self.weights.dtype)  # decoded here when the set is compact
        scores = torch.empty(tok.shape[0], self.weights.shape[1], device=h.device)
        for l in layer.unique().tolist():  # one matmul per target layer present in the batch
            m, t = layer == l, l + self.lookahead
            logits = torch.nn.functional.linear(h[m].to(self.weights.dtype), self.weights[t])
            if "router_bias" in self.extras:  # GPT-OSS: the bias is part of the logits
                logits = logits + self.extras["router_bias"][t].to(logits.dtype)
            if self.plain_topk:
                scores[m] = break_ties_like_topk(logits, self.top_k)
            else:  # the family's own rule: sigmoid + correction bias, expert groups
                bias = self.extras.get("score_correction_bias")
                scores[m] = selection_scores(self.rule, logits, None if bias is None else bias[t])
            if self.lookahead == 0:
                self._count_ties(logits.float(), scores[m], block.topk_ids[l, tok[m]])
        return scores

    def _count_ties(self, logits: torch.Tensor, scores: torch.Tensor, chosen: torch.Tensor) -> None:
        is_chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, chosen, True)
        ties = (logits.gather(1, chosen).unsqueeze(2) == logits.unsqueeze(1)) & ~is_chosen.unsqueeze(1)  # (R, K, E)
        tied = ties.any(dim=(1, 2))
        missed = (true_expert_ranks(scores, chosen) >= self.top_k).any(dim=1)
        self.rows += int(tied.numel())
        self.tied_rows += int(tied.sum())
        self.tied_missed_rows += int((tied & missed).sum())


def _router(ts: TraceSet, lookahead: int, train_ids: np.ndarray, device: torch.device, seed: int) -> Scorer:
    return RouterScorer(ts.router_weights().to(device), lookahead, ts.manifest.top_k, ts.manifest.routing.get("router"),
                        {k: v.to(device) for k, v in ts.router_extras().items()})


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


def recency_scores(block: TokenBlock, tok: torch.Tensor, layer: torch.Tensor, history: int,
                   num_experts: int) -> torch.Tensor:
    """(R, E) N + 1 - j for an expert that token t-j last used at `layer` (j = 1..N, N = `history`: the most
    recent use scores highest), 0 for one the N previous tokens of t's sequence did not use."""
    score = torch.zeros(tok.shape[0], num_experts, device=tok.device)
    rows = tok
    for j in range(1, history + 1):  # `history` is a small window: N vectorized gathers, no loop over tokens
        rows = earlier_token(block, rows, 1)
        used = expert_set(block, layer, rows, num_experts)
        score = torch.where(used & (score == 0), float(history + 1 - j), score)
    return score


def frequency_scores(block: TokenBlock, tok: torch.Tensor, layer: torch.Tensor, history: int,
                     num_experts: int) -> torch.Tensor:
    """(R, E) how many of the N = `history` previous tokens of t's sequence used each expert at `layer`."""
    count = torch.zeros(tok.shape[0], num_experts, device=tok.device)
    rows = tok
    for _ in range(history):
        rows = earlier_token(block, rows, 1)
        count += expert_set(block, layer, rows, num_experts)
    return count


def _looking_back(scores: Callable[..., torch.Tensor]) -> Callable[..., Scorer]:
    """A builder of recency or frequency at the target layer, training-split popularity ordering the experts
    they leave tied (the scores are whole numbers, and 1e-3 x a share never reorders them)."""
    def build(ts: TraceSet, lookahead: int, train_ids: np.ndarray, device: torch.device, seed: int,
              history: int = DEFAULT_HISTORY) -> Scorer:
        popularity = expert_popularity(ts, train_ids).to(device)
        E = ts.manifest.num_experts
        return lambda block, tok, layer: (scores(block, tok, layer + lookahead, history, E)
                                          + 1e-3 * popularity[layer + lookahead])
    return build


_BASELINE_BUILDERS: dict[str, Callable[..., Scorer]] = {
    "router": _router, "router-reuse": _router, "previous-token": _previous_token, "popularity": _popularity,
    "random": _random, "recency": _looking_back(recency_scores), "frequency": _looking_back(frequency_scores),
}


def baseline_scorer(name: str, ts: TraceSet, lookahead: int, train_ids: np.ndarray, device: torch.device,
                    seed: int = 0, history: int = DEFAULT_HISTORY) -> Scorer:
    """The training-free scorer `name`, after checking the trace set holds what it needs (`history`: the
    tokens recency and frequency look back)."""
    if name not in _BASELINE_BUILDERS:
        raise UserError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    check_traces(name, ts, lookahead)
    if SCORERS[name].looks_back:
        if history < 1:
            raise UserError(f"--history {history}: {name} needs at least 1 previous token")
        return _BASELINE_BUILDERS[name](ts, lookahead, train_ids, device, seed, history=history)
    return _BASELINE_BUILDERS[name](ts, lookahead, train_ids, device, seed)


def predictor_scorer(model: nn.Module, lookahead: int, num_experts: int, dtype: torch.dtype = torch.float32) -> Scorer:
    """A trained predictor as a scorer (features built by `models.features.make_features`): its logits for the
    experts of layer l + d. A predictor trained for a lookahead in tokens (W = cfg.lookahead_tokens >= 1; then
    `lookahead` must be 0) gives instead, for row (t, l), the probability that layer l uses each expert in
    tokens t+1..t+W, from what a d = 0 row sees: an eviction policy's (T, L, E) scores, row by row."""
    spec = feature_spec(model)
    window = lookahead_tokens(model) > 0
    if window and lookahead != 0:
        raise UserError(f"the predictor looks {lookahead_tokens(model)} tokens ahead at the same layer; "
                        f"it has no lookahead {lookahead} in layers")

    def score(block: TokenBlock, tok: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        f = make_features(block, tok, layer, lookahead, num_experts, spec, dtype)
        with torch.autocast(device_type=tok.device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(f).float()
        return torch.sigmoid(logits) if window else logits
    return score
