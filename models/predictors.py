"""Expert predictors: score all E experts of a target layer for one (token, layer) row.

Every predictor takes a `Features` batch and returns logits (R, E). What a predictor may see is
decided by `models.features.make_features`, which is where the no-future-leakage rule lives.

    simple       the seed's MLP on the MoE input h_l, one network for all layers (layer-agnostic)
    layer-aware  the same trunk plus a layer embedding and one output head per target layer
    hybrid       layer-aware, plus the routing already observed: this token's experts at layer l
                 and the previous token's experts at the target layer (causal by construction)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from models.features import Features


@dataclass
class PredictorConfig:
    kind: str              # simple | layer-aware | hybrid
    input_dim: int         # hidden size of the MoE model (2048 for Qwen1.5-MoE)
    num_experts: int       # 60
    top_k: int             # 4
    num_layers: int        # MoE layers
    lookahead: int = 0     # predict layer l + lookahead from what is known at layer l
    hidden_dim: int = 256  # the seed's width
    dropout: float = 0.1

    def to_json(self) -> dict:
        return asdict(self)


def _xavier(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SimplePredictor(nn.Module):
    """The seed's predictor, layer for layer: Linear(H, 256), then twice [Linear(256, 256), LayerNorm,
    ReLU, Dropout 0.1], then Linear(256, E); Xavier-uniform weights, zero biases (0.67M parameters at
    H = 2048). The first two Linear layers compose linearly, as in the original; kept for fidelity."""

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.net = nn.Sequential(
            nn.Linear(cfg.input_dim, d),
            nn.Linear(d, d), nn.LayerNorm(d), nn.ReLU(), nn.Dropout(cfg.dropout),
            nn.Linear(d, d), nn.LayerNorm(d), nn.ReLU(), nn.Dropout(cfg.dropout),
            nn.Linear(d, cfg.num_experts),
        )
        _xavier(self)

    uses_history = False

    def forward(self, f: Features) -> torch.Tensor:
        return self.net(f.hidden)


class LayerAwarePredictor(nn.Module):
    """Knows which layer it predicts for: the target layer's embedding joins the projected input,
    and each target layer has its own output head (expert 7 of layer 3 and of layer 9 are unrelated)."""

    uses_history = False

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.cfg = cfg
        d, E, L = cfg.hidden_dim, cfg.num_experts, cfg.num_layers
        self.proj = nn.Linear(cfg.input_dim, d)
        self.layer_emb = nn.Embedding(L, d)
        if self.uses_history:
            self.own_proj = nn.Linear(E, d, bias=False)
            self.prev_proj = nn.Linear(E, d, bias=False)
        self.trunk = nn.Sequential(
            nn.LayerNorm(d), nn.ReLU(), nn.Dropout(cfg.dropout),
            nn.Linear(d, d), nn.LayerNorm(d), nn.ReLU(), nn.Dropout(cfg.dropout),
            nn.Linear(d, d), nn.LayerNorm(d), nn.ReLU(), nn.Dropout(cfg.dropout),
        )
        self.heads = nn.Linear(d, L * E)  # all target layers' heads in one matmul, then one gather
        _xavier(self)
        nn.init.normal_(self.layer_emb.weight, std=0.02)

    def forward(self, f: Features) -> torch.Tensor:
        target = f.layer + self.cfg.lookahead
        z = self.proj(f.hidden) + self.layer_emb(target)
        if self.uses_history:
            z = z + self.own_proj(f.own_routing) + self.prev_proj(f.prev_token)
        z = self.trunk(z)
        E = self.cfg.num_experts
        out = self.heads(z).view(-1, self.cfg.num_layers, E)  # (R, L, E)
        return out.gather(1, target.view(-1, 1, 1).expand(-1, 1, E)).squeeze(1)


class HybridPredictor(LayerAwarePredictor):
    """The sound form of the seed's hybrid idea: hidden state plus routing already observed
    (this token at layer l, the previous token at the target layer), causal by construction."""

    uses_history = True


PREDICTORS: dict[str, type[nn.Module]] = {"simple": SimplePredictor, "layer-aware": LayerAwarePredictor,
                                          "hybrid": HybridPredictor}


def build_predictor(cfg: PredictorConfig) -> nn.Module:
    if cfg.kind not in PREDICTORS:
        raise ValueError(f"unknown predictor kind {cfg.kind!r}")
    return PREDICTORS[cfg.kind](cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_row(model: nn.Module) -> int:
    """Multiply-adds x 2 for one row's forward pass (Linear layers; LayerNorm and activations ignored)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += 2 * m.in_features * m.out_features
    return total
