"""Expert predictors: score all E experts of a target layer for one (token, layer) row.

Every predictor takes a `Features` batch and returns logits (R, E). What a predictor may see is
decided by `models.features.make_features`, which is where the no-future-leakage rule lives.

    simple       the seed's MLP on the MoE input h_l, one network for all layers (layer-agnostic)
    layer-aware  the same trunk plus a layer embedding and one output head per target layer
    hybrid       layer-aware, plus the routing already observed: this token's experts at layer l
                 and the previous token's experts at the target layer (causal by construction);
                 `routing_only`: that history part alone, over this token's last Q finished layers and the
                 previous W tokens, and no hidden state (what a set of imported routing can train)
    anchored     router-anchored: predicts the target layer's MoE input h_{l+d} = h_l + delta and scores it
                 with the target layer's own router matrix (stored in the checkpoint), plus a residual
                 logit head; router reuse is its starting point (d = 0 reads exactly the router at init)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from models.features import Features, FeatureSpec


@dataclass
class PredictorConfig:
    kind: str              # simple | layer-aware | hybrid | anchored
    input_dim: int         # hidden size of the MoE model (2048 for Qwen1.5-MoE); 0 for a routing-only predictor
    num_experts: int       # 60
    top_k: int             # 4
    num_layers: int        # MoE layers
    lookahead: int = 0     # predict layer l + lookahead from what is known at layer l
    hidden_dim: int = 256  # the seed's width
    dropout: float = 0.1
    # anchored only (the other kinds ignore them, but for own_layers and window of a routing-only hybrid; their
    # defaults keep older checkpoints loadable)
    past_layers: int = 0          # this token's MoE inputs at layers l-1 .. l-P
    own_layers: int = 0           # this token's routing at its last Q finished layers
    window: int = 0               # previous W tokens' MoE input (anchored) and routing at the target layer
    token_vocab: int = 0          # token-id embedding table size (the model's vocabulary); 0 = none
    token_dim: int = 64           # width of that table (projected to hidden_dim)
    context: int = 0              # mean MoE input at the target layer over the previous C tokens; 0 = none
    depth: int = 2                # residual MLP blocks in the trunk
    separate_layers: bool = False  # one trunk per target layer instead of one shared trunk
    anchor: bool = True           # score the predicted h_{l+d} with the target router (else a plain head)
    residual_logits: bool = True  # add a zero-initialised per-layer logit head
    # W >= 1: row (t, l) predicts the experts layer l uses in tokens t+1 .. t+W (then lookahead is 0); older
    # checkpoints, which predict layers ahead, load with 0
    lookahead_tokens: int = 0
    # hybrid only: read no hidden state, only the routing already observed (own_layers Q >= 1 finished layers of this
    # token, window W >= 1 previous tokens at the target layer; Q = W = 1 is the hybrid's history part exactly), so
    # that a set of imported routing trains and scores it; older checkpoints, which all read h_l, load with False
    routing_only: bool = False

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
        self.features = (FeatureSpec(hidden=False, own_layers=cfg.own_layers, window=cfg.window) if cfg.routing_only
                         else FeatureSpec(history=self.uses_history))
        self.proj = None if cfg.routing_only else nn.Linear(cfg.input_dim, d)
        self.layer_emb = nn.Embedding(L, d)
        if cfg.routing_only:  # the history part over Q layers and W tokens: (R, Q*E) and (R, W*E) in
            self.own_proj = nn.Linear(cfg.own_layers * E, d, bias=False)
            self.prev_proj = nn.Linear(cfg.window * E, d, bias=False)
        elif self.uses_history:
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
        z = self.layer_emb(target) if self.proj is None else self.proj(f.hidden) + self.layer_emb(target)
        if self.cfg.routing_only:
            z = z + self.own_proj(f.own_window.flatten(1)) + self.prev_proj(f.window_routing.flatten(1))
        elif self.uses_history:
            z = z + self.own_proj(f.own_routing) + self.prev_proj(f.prev_token)
        z = self.trunk(z)
        E = self.cfg.num_experts
        out = self.heads(z).view(-1, self.cfg.num_layers, E)  # (R, L, E)
        return out.gather(1, target.view(-1, 1, 1).expand(-1, 1, E)).squeeze(1)


class HybridPredictor(LayerAwarePredictor):
    """The sound form of the seed's hybrid idea: hidden state plus routing already observed
    (this token at layer l, the previous token at the target layer), causal by construction. With
    `routing_only`, that routing alone (over cfg.own_layers layers and cfg.window tokens) and no hidden state."""

    uses_history = True


class _ResidualBlock(nn.Module):
    """z + Dropout(Linear(ReLU(Linear(LayerNorm(z))))): depth without losing the input."""

    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.norm, self.drop = nn.LayerNorm(d), nn.Dropout(dropout)
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.drop(self.fc2(torch.relu(self.fc1(self.norm(z)))))


class _Trunk(nn.Module):
    """Every input in one Linear to width d (one kernel at decode time, not one per input), plus the target
    layer's embedding, then residual blocks. Initialised as if each input had its own Xavier-uniform projection."""

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        d, H, E = cfg.hidden_dim, cfg.input_dim, cfg.num_experts
        # (Features field, width) in the order they are concatenated
        self.parts = [("hidden", H), ("past_hidden", cfg.past_layers * H), ("own_window", cfg.own_layers * E),
                      ("window_hidden", cfg.window * H), ("window_routing", cfg.window * E),
                      ("context", H if cfg.context else 0), ("token_id", cfg.token_dim if cfg.token_vocab else 0)]
        self.parts = [(name, width) for name, width in self.parts if width]
        self.inputs = nn.Linear(sum(width for _, width in self.parts), d)
        self.layer_emb = nn.Embedding(cfg.num_layers, d)
        self.blocks = nn.ModuleList(_ResidualBlock(d, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        _xavier(self)
        with torch.no_grad():
            start = 0
            for _, width in self.parts:  # each input's block with its own fan-in, as separate projections had
                bound = math.sqrt(6.0 / (width + d))
                self.inputs.weight[:, start:start + width].uniform_(-bound, bound)
                start += width
        nn.init.normal_(self.layer_emb.weight, std=0.02)

    def forward(self, f: Features, target: torch.Tensor | int, token: torch.Tensor | None) -> torch.Tensor:
        """`token`: (R, token_dim) the rows' token embeddings (the table is shared by every trunk)."""
        x = [token if name == "token_id" else getattr(f, name).flatten(1) for name, _ in self.parts]
        z = self.inputs(x[0] if len(x) == 1 else torch.cat(x, 1))
        z = z + (self.layer_emb(target) if isinstance(target, torch.Tensor) else self.layer_emb.weight[target])
        for block in self.blocks:
            z = block(z)
        return self.norm(z)


class RouterAnchoredPredictor(nn.Module):
    """Predicts the target layer's MoE input and scores it with the target layer's router.

    logits = W_{l+d} (h_l + delta_{l+d}(z)) + r_{l+d}(z), z = trunk(features). W is the model's router matrix
    of each layer (`router`, (L, E, H), copied from the traces by `set_router` and saved in the checkpoint);
    delta and r are per-target-layer heads initialised to zero, so before training this is router reuse
    exactly. `router` is a parameter: the trainer freezes it or fine-tunes it at a small learning rate.
    """

    uses_history = True  # may read routing already observed (cfg.own_layers, cfg.window)

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.cfg = cfg
        d, H, E, L = cfg.hidden_dim, cfg.input_dim, cfg.num_experts, cfg.num_layers
        self.features = FeatureSpec(past_layers=cfg.past_layers, own_layers=cfg.own_layers, window=cfg.window,
                                    token_id=cfg.token_vocab > 0, context=cfg.context)
        self.trunks = nn.ModuleList(_Trunk(cfg) for _ in range(L if cfg.separate_layers else 1))
        self.token = nn.Embedding(cfg.token_vocab, cfg.token_dim) if cfg.token_vocab else None  # one table for all
        if self.token is not None:
            nn.init.normal_(self.token.weight, std=0.02)
        if cfg.anchor:
            self.router = nn.Parameter(torch.zeros(L, E, H))  # filled by set_router or load_state_dict
            self.delta_w = nn.Parameter(torch.zeros(L, d, H))
            self.delta_b = nn.Parameter(torch.zeros(L, H))
        if cfg.residual_logits or not cfg.anchor:
            # the only head without an anchor: then it starts random like the other kinds' heads
            self.res_w = nn.Parameter(torch.zeros(L, d, E))
            if not cfg.anchor:
                for w in self.res_w.data:
                    nn.init.xavier_uniform_(w)
            self.res_b = nn.Parameter(torch.zeros(L, E))

    def set_router(self, weights: torch.Tensor) -> None:
        """Copy the model's router matrices (L, E, H) in; a shape mismatch is an error, never a broadcast."""
        if not self.cfg.anchor:
            return
        if tuple(weights.shape) != tuple(self.router.shape):
            raise ValueError(f"router matrices of shape {tuple(weights.shape)}; this predictor needs "
                             f"{tuple(self.router.shape)} (layers, experts, hidden)")
        with torch.no_grad():
            self.router.copy_(weights.to(self.router.dtype))

    def reset_layer(self, target: int) -> None:
        """Zero target layer `target`'s heads: that layer is router reuse again, exactly (the per-layer fallback
        the trainer takes where router reuse validates better than what was learned)."""
        with torch.no_grad():
            for name in ("delta_w", "delta_b", "res_w", "res_b"):
                if hasattr(self, name) and self.cfg.anchor:
                    getattr(self, name)[target].zero_()

    def head(self, z: torch.Tensor, h: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (R, E), predicted h_{l+d} (R, H) or None) for rows that all target layer `target`."""
        logits, h_hat = None, None
        if self.cfg.anchor:
            h_hat = h.to(z.dtype) + z @ self.delta_w[target].to(z.dtype) + self.delta_b[target].to(z.dtype)
            # the router product in the router's own dtype, outside autocast: at d = 0 and init it then
            # reproduces the model's routing bit for bit (bf16 would flip near-tied experts)
            with torch.autocast(device_type=h.device.type, enabled=False):
                logits = nn.functional.linear(h_hat.to(self.router.dtype), self.router[target])  # as the gate does
        if self.cfg.residual_logits or not self.cfg.anchor:
            r = z @ self.res_w[target].to(z.dtype) + self.res_b[target].to(z.dtype)
            logits = r if logits is None else logits + r.to(logits.dtype)
        return logits, h_hat

    def predict_layer(self, f: Features, target: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every row targets layer `target` (decode time: one layer at a time; no host sync, graph-capturable)."""
        token = self.token(f.token_id) if self.token is not None else None
        z = self.trunks[target if self.cfg.separate_layers else 0](f, target, token)
        return self.head(z, f.hidden, target)

    def forward(self, f: Features, return_hidden: bool = False):
        target = f.layer + self.cfg.lookahead
        order = torch.argsort(target)
        counts = torch.bincount(target, minlength=self.cfg.num_layers).tolist()  # one host sync per batch
        shared = None
        if not self.cfg.separate_layers:  # one trunk: all rows at once, then each layer's heads on its rows
            shared = self.trunks[0](f, target, self.token(f.token_id) if self.token is not None else None)
        logits, hats = [], []
        for t, rows in enumerate(torch.split(order, counts)):
            if rows.numel() == 0:
                continue
            if shared is None:
                out, h_hat = self.predict_layer(f.select(rows), t)
            else:
                out, h_hat = self.head(shared[rows], f.hidden[rows], t)
            logits.append(out)
            hats.append(h_hat)
        inverse = torch.argsort(order)
        out = torch.cat(logits)[inverse]
        if not return_hidden:
            return out
        return out, (torch.cat(hats)[inverse] if self.cfg.anchor else None)

    def flops_per_row(self) -> int:
        """One row's forward: one trunk, one target layer's heads (multiply-adds x 2; norms ignored)."""
        c = self.cfg
        total = sum(2 * m.in_features * m.out_features for m in self.trunks[0].modules() if isinstance(m, nn.Linear))
        if c.anchor:
            total += 2 * c.hidden_dim * c.input_dim + 2 * c.input_dim * c.num_experts
        if c.residual_logits or not c.anchor:
            total += 2 * c.hidden_dim * c.num_experts
        return total


PREDICTORS: dict[str, type[nn.Module]] = {"simple": SimplePredictor, "layer-aware": LayerAwarePredictor,
                                          "hybrid": HybridPredictor, "anchored": RouterAnchoredPredictor}


# Largest value of each size of a predictor, beyond any useful run (and any real MoE model: the trace format's own
# bounds, collection/traces/format.py), so a flag or a checkpoint's config cannot size a model that exhausts memory.
# Every training flag of the same name is held to it, and every checkpoint's config before anything is built.
CONFIG_LIMITS: dict[str, int] = {"input_dim": 1 << 17, "num_experts": 32767, "top_k": 32767, "num_layers": 4096,
                                 "lookahead": 4095, "hidden_dim": 16384, "past_layers": 256, "own_layers": 256,
                                 "window": 64, "token_vocab": 1 << 22, "token_dim": 4096, "context": 4096, "depth": 64}


def config_problem(cfg: PredictorConfig) -> str | None:
    """Why `cfg` (e.g. read from a checkpoint) cannot describe a predictor, or None: its kind, the type and range of
    every size (CONFIG_LIMITS), the dropout and the flags."""
    if cfg.kind not in PREDICTORS:
        return f"kind {cfg.kind!r} is not one of {', '.join(PREDICTORS)}"
    if not isinstance(cfg.routing_only, bool):
        return f"routing_only {cfg.routing_only!r} is not true or false"
    positive = ("num_experts", "top_k", "num_layers") + (() if cfg.routing_only else ("input_dim",))
    for name, most in CONFIG_LIMITS.items():
        value, low = getattr(cfg, name), 1 if name in positive else 0
        if type(value) is not int or not low <= value <= most:
            return f"{name} {value!r} is not an integer in {low}..{most}"
    if cfg.top_k > cfg.num_experts:
        return f"top_k {cfg.top_k} exceeds num_experts {cfg.num_experts}"
    if not (isinstance(cfg.dropout, (int, float)) and 0 <= cfg.dropout < 1):
        return f"dropout {cfg.dropout!r} is not in [0, 1)"
    for name in ("separate_layers", "anchor", "residual_logits"):
        if not isinstance(getattr(cfg, name), bool):
            return f"{name} {getattr(cfg, name)!r} is not true or false"
    if cfg.routing_only and not (cfg.kind == "hybrid" and cfg.own_layers >= 1 and cfg.window >= 1):
        return (f"routing_only is the hybrid's variant with own_layers and window of 1 or more (kind {cfg.kind}, "
                f"own_layers {cfg.own_layers}, window {cfg.window})")
    return None


def reads_hidden(cfg: PredictorConfig) -> bool:
    """Whether the predictor of `cfg` reads stored MoE inputs: every kind but the routing-only hybrid, the one that a
    set of imported routing (no hidden states) can train and score."""
    return not cfg.routing_only


def build_predictor(cfg: PredictorConfig) -> nn.Module:
    if cfg.kind not in PREDICTORS:
        raise ValueError(f"unknown predictor kind {cfg.kind!r}")
    return PREDICTORS[cfg.kind](cfg)


def lookahead_tokens(model: nn.Module) -> int:
    """W of a predictor trained for a lookahead in tokens (experts of layer l in tokens t+1..t+W), else 0."""
    return int(getattr(getattr(model, "cfg", None), "lookahead_tokens", 0))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_row(model: nn.Module) -> int:
    """Multiply-adds x 2 for one row's forward pass (Linear layers; LayerNorm and activations ignored)."""
    if hasattr(model, "flops_per_row"):  # per-layer heads: only the target layer's share runs for a row
        return model.flops_per_row()
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += 2 * m.in_features * m.out_features
    return total
