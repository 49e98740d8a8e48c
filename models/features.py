"""What a predictor may see of a row: the one place where the no-future-leakage rule lives.

A row is (token t, input layer l) and its target is layer l + d (d = lookahead). When layer l runs for
token t at decode time, what exists is: t's MoE input at layer l and at every earlier layer; t's token id
(known before layer 0); t's routing at every layer that has already run (layers <= l if d >= 1; layers
<= l - 1 if d = 0, since layer l's own routing is the answer then); and everything of earlier tokens,
which have finished every layer. Nothing of t at later layers and nothing of later tokens:
tests/test_leakage.py holds every feature to that.

A *window* row (a predictor trained with a lookahead in tokens, `lookahead_tokens` W >= 1) is (token t,
layer l) with the target "the experts layer l uses in tokens t+1 .. t+W". It sees exactly what a d = 0 row
sees (its features are make_features(.., lookahead=0, ..)): t's MoE inputs up to layer l, t's routing up to
layer l - 1, and the earlier tokens. t's own routing at layer l is not in its target, yet stays unseen, so
that the scores of (t, l) exist before layer l's router runs for t (an eviction or a prefetch decided then
may use them).

A *routing-only* predictor (`FeatureSpec.hidden` False: the hybrid trained with --routing-only) reads the routing
parts alone and never a MoE input, so that a set of imported routing, which holds no hidden state, serves it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from collection.traces.rows import TokenBlock, context_mean, earlier_token, hidden_at, routing_vector


@dataclass(frozen=True)
class FeatureSpec:
    """Which features a predictor reads (all causal; zeros where a layer or token does not exist)."""
    hidden: bool = True     # the MoE input h_l (and, through past_layers, window and context, other MoE inputs);
                            # False: routing only (the routing-only hybrid), what a set of imported routing holds
    history: bool = False   # hybrid: own_routing and prev_token below
    past_layers: int = 0    # this token's MoE inputs at layers l-1 .. l-P
    own_layers: int = 0     # this token's routing at its last Q finished layers (l .. l-Q+1; l-1 .. l-Q at d = 0)
    window: int = 0         # the previous W tokens' MoE inputs (when `hidden`) and routing at the target layer l + d
    token_id: bool = False  # this token's id
    context: int = 0        # the mean MoE input at the target layer l + d over the previous C tokens


@dataclass
class Features:
    """One batch of rows. Only `layer` exists for every predictor, `hidden` for every one that reads the MoE input."""
    hidden: torch.Tensor | None              # (R, H) MoE-block input at layer l (None: a routing-only predictor)
    layer: torch.Tensor                      # (R,) input layer l; the target is l + lookahead
    own_routing: torch.Tensor | None = None  # (R, E) this token's routing weights at layer l (scattered)
    prev_token: torch.Tensor | None = None   # (R, E) previous token's routing weights at layer l + d (0 at t=0)
    past_hidden: torch.Tensor | None = None  # (R, P, H) this token's MoE inputs at layers l-1 .. l-P
    own_window: torch.Tensor | None = None   # (R, Q, E) this token's routing at its last Q finished layers
    window_hidden: torch.Tensor | None = None   # (R, W, H) tokens t-1 .. t-W: MoE input at layer l + d
    window_routing: torch.Tensor | None = None  # (R, W, E) tokens t-1 .. t-W: routing weights at layer l + d
    token_id: torch.Tensor | None = None     # (R,) int64 this token's id
    context: torch.Tensor | None = None      # (R, H) mean MoE input at layer l + d of tokens t-C .. t-1

    def select(self, rows: torch.Tensor) -> "Features":
        """The same features for a subset of rows (index tensor)."""
        return Features(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                           for f in fields(self)})


def feature_spec(model: torch.nn.Module) -> FeatureSpec:
    """What `model` reads: its own `features` spec, or the hybrid-style `uses_history` flag."""
    spec = getattr(model, "features", None)
    return spec if isinstance(spec, FeatureSpec) else FeatureSpec(history=bool(getattr(model, "uses_history", False)))


def make_features(block: TokenBlock, tok: torch.Tensor, layer: torch.Tensor, lookahead: int, num_experts: int,
                  needs: bool | FeatureSpec, dtype: torch.dtype = torch.float32) -> Features:
    """What is known when layer `layer` runs for token `tok` (see the module docstring). `needs` is a
    FeatureSpec, or a bool meaning FeatureSpec(history=needs) (the hybrid's features)."""
    spec = needs if isinstance(needs, FeatureSpec) else FeatureSpec(history=bool(needs))
    f = Features(hidden=block.hidden_at(layer, tok, dtype) if spec.hidden else None, layer=layer)
    last_seen = layer if lookahead >= 1 else layer - 1  # layer l's own routing is the answer when d = 0
    target = layer + lookahead
    if spec.history:
        f.own_routing = routing_vector(block, last_seen, tok, num_experts).to(dtype)
        f.prev_token = routing_vector(block, target, block.prev[tok], num_experts).to(dtype)
    if spec.past_layers:
        f.past_hidden = torch.stack([hidden_at(block, layer - j, tok, dtype)
                                     for j in range(1, spec.past_layers + 1)], 1)
    if spec.own_layers:
        f.own_window = torch.stack([routing_vector(block, last_seen - j, tok, num_experts)
                                    for j in range(spec.own_layers)], 1).to(dtype)
    if spec.window:
        back = [earlier_token(block, tok, j) for j in range(1, spec.window + 1)]
        if spec.hidden:
            f.window_hidden = torch.stack([hidden_at(block, target, b, dtype) for b in back], 1)
        f.window_routing = torch.stack([routing_vector(block, target, b, num_experts) for b in back], 1).to(dtype)
    if spec.token_id:
        f.token_id = block.token_ids[tok]
    if spec.context:
        f.context = context_mean(block, target, tok, spec.context).to(dtype)
    return f


def example_features(spec: FeatureSpec, hidden_size: int, num_experts: int, token_vocab: int, rows: int, layer: int,
                     device: torch.device, dtype: torch.dtype, seed: int = 0) -> Features:
    """Random inputs of `rows` rows that all sit at input layer `layer`, in the shapes make_features gives for
    `spec`: what a cost measurement or a replay feeds a predictor whose answers it does not use."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)
    H, E = hidden_size, num_experts
    f = Features(hidden=rand(rows, H) if spec.hidden else None, layer=torch.full((rows,), layer, device=device))
    if spec.history:
        f.own_routing, f.prev_token = rand(rows, E), rand(rows, E)
    if spec.past_layers:
        f.past_hidden = rand(rows, spec.past_layers, H)
    if spec.own_layers:
        f.own_window = rand(rows, spec.own_layers, E)
    if spec.window:
        f.window_hidden = rand(rows, spec.window, H) if spec.hidden else None
        f.window_routing = rand(rows, spec.window, E)
    if spec.token_id:
        f.token_id = torch.randint(0, max(token_vocab, 1), (rows,), generator=g).to(device)
    if spec.context:
        f.context = rand(rows, H)
    return f
