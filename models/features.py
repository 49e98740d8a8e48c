"""What a predictor may see of a row: the one place where the no-future-leakage rule lives.

A row is (token t, input layer l) and its target is layer l + d (d = lookahead). When layer l runs for
token t at decode time, what exists is: t's MoE input at layer l; t's routing at every layer that has
already run (layer l if d >= 1; layer l - 1 if d = 0, since layer l's own routing is the answer then);
and everything of earlier tokens, which have finished every layer. Nothing of t at later layers and
nothing of later tokens: tests/test_leakage.py holds every feature to that.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from collection.rows import TokenBlock, routing_vector


@dataclass
class Features:
    """One batch of rows. Only `hidden` and `layer` exist for every predictor."""
    hidden: torch.Tensor                     # (R, H) MoE-block input at layer l
    layer: torch.Tensor                      # (R,) input layer l; the target is l + lookahead
    own_routing: torch.Tensor | None = None  # (R, E) this token's routing weights at layer l (scattered)
    prev_token: torch.Tensor | None = None   # (R, E) previous token's routing weights at layer l + d (0 at t=0)


def make_features(block: TokenBlock, tok: torch.Tensor, layer: torch.Tensor, lookahead: int, num_experts: int,
                  with_history: bool, dtype: torch.dtype = torch.float32) -> Features:
    """What is known when layer `layer` runs for token `tok` (see the module docstring)."""
    f = Features(hidden=block.hidden_at(layer, tok, dtype), layer=layer)
    if with_history:
        seen = layer if lookahead >= 1 else layer - 1  # layer l's own routing is the answer when d = 0
        f.own_routing = routing_vector(block, seen, tok, num_experts).to(dtype)
        f.prev_token = routing_vector(block, layer + lookahead, block.prev[tok], num_experts).to(dtype)
    return f
