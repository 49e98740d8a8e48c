"""Prefetch predictors run live, on the GPU, from the decode's own hidden states: what `prefetch:<source>`
policies (the simulator's registry, validation/prefetch/simulator.py) predict at layer l for layer l+d.

    router-reuse      layer l+d's router (the model's own module weights, and its bias / selection rule) on
                      layer l's MoE input
    <checkpoint.pth>  a learned predictor of models/checkpoint.py, checked to fit the model (layers, experts,
                      top-k, hidden size unless it is the routing-only hybrid, lookahead); its features
                      (models/features.py) are assembled from the decode's live state by `LiveFeatures`; the
                      anchored kind scores with the model's own routers
    previous-token    the previous token's experts at layer l+d, popularity (a trace set's training split) below
    popularity        each layer's most used experts (a trace set's training split)
    random            uniform random scores

Each returns the top-m experts (m,) on the device; a batch's rows are merged by votes (how many rows put an
expert in their top-m; the mean score breaks ties), one row is its own top-m. On CUDA each layer's predictor
(features, network, top-m) is one captured CUDA graph per batch size, replayed from static input buffers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from collection.families import selection_scores
from common.errors import UserError
from models.features import Features, FeatureSpec, feature_spec
from models.predictors import reads_hidden


def top_m(scores: torch.Tensor, m: int) -> torch.Tensor:
    """(m,) experts from (N, E) scores: one row's top-m, or a batch's by votes (module docstring)."""
    if scores.shape[0] == 1:
        return scores[0].topk(m).indices
    votes = torch.zeros_like(scores, dtype=torch.float32).scatter_(1, scores.topk(m, dim=1).indices, 1.0).sum(0)
    return (votes + scores.float().softmax(-1).mean(0)).topk(m).indices


class LiveFeatures:
    """The decode's state a learned predictor reads, in static buffers (what `make_features` reads from traces):

        cur_hidden   (L, N, H)     this step's MoE input at every layer run so far (read unless routing-only)
        cur_routing  (L, N, E)     this step's routing weights (scattered) at every layer run so far
        hist_hidden  (L, N, W, H)  previous W tokens' MoE input per layer (newest first); W = max(window, context),
                                   the window counted only where the predictor reads hidden states
        hist_routing (L, N, V, E)  previous V tokens' routing per layer; V = max(window, 1 with history)
        seen         (N,)          tokens before the current one in each row's sequence
        token        (N,)          this step's token id

    Rows are the batch's sequences at decode (N = batch size). `record` is called at every layer of every forward;
    a forward of T > 1 tokens per sequence (a prompt) restarts the history from its last tokens.

    lookahead 0 (a next-tokens predictor, read for eviction): its target is layer l itself, which `record` has
    already written for this token when the scorer runs, so the history is one entry longer and is read from
    entry 1 (the previous token), and this token's routing from layer l - 1 down (make_features at d = 0)."""

    def __init__(self, spec: FeatureSpec, L: int, E: int, H: int, lookahead: int, rows: int,
                 device: torch.device, dtype: torch.dtype):
        self.spec, self.L, self.E, self.H, self.d, self.N = spec, L, E, H, lookahead, rows
        self.off = 1 if lookahead == 0 else 0  # history entries of this token at the target layer (see above)
        W = max(spec.window if spec.hidden else 0, spec.context)
        V = max(spec.window, 1 if spec.history else 0)
        self.W, self.V = W + self.off if W else 0, V + self.off if V else 0
        z = lambda *s, dt=dtype: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        self.cur_hidden = z(L, rows, H)
        self.cur_routing = z(L, rows, E, dt=torch.float32)
        self.hist_hidden = z(L, rows, self.W, H) if self.W else None
        self.hist_routing = z(L, rows, self.V, E, dt=torch.float32) if self.V else None
        self.seen = z(rows, dt=torch.int64)
        self.token = z(rows, dt=torch.int64)
        self.layers = [torch.full((rows,), l, dtype=torch.int64, device=device) for l in range(L)]
        self.needs_routing = spec.history or spec.own_layers > 0 or self.V > 0

    def begin(self, input_ids: torch.Tensor | None, new_sequence: bool, pads: torch.Tensor | None = None) -> None:
        """A forward starts: its last tokens' ids; a new sequence clears the history. `pads` (N,): each row's
        left-padding tokens in a new sequence's prompt, which are no earlier tokens of it (a feature of a token
        further back than the row's real tokens stays zero, as in training)."""
        if new_sequence:
            self.seen.zero_()
            if pads is not None:
                self.seen.sub_(pads.to(self.seen.dtype))
            for t in (self.hist_hidden, self.hist_routing):
                if t is not None:
                    t.zero_()
        if input_ids is not None and self.spec.token_id and input_ids.shape[0] == self.N:
            self.token.copy_(input_ids[:, -1])

    def end(self, tokens_per_row: int) -> None:
        self.seen.add_(tokens_per_row)

    def record(self, l: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        """Layer l's MoE input x (N*T, H) and routing (N*T, K); T > 1 at a prompt."""
        N = self.N
        if x.shape[0] == N:  # decode: this step's state, and the history after it
            self.cur_hidden[l].copy_(x)
            if self.needs_routing:
                self.cur_routing[l].zero_().scatter_(1, ids, w.float())
            if self.W:
                h = self.hist_hidden[l]
                h[:, 1:] = h[:, :-1].clone()
                h[:, 0] = x
            if self.V:
                r = self.hist_routing[l]
                r[:, 1:] = r[:, :-1].clone()
                r[:, 0] = self.cur_routing[l]
            return
        T = x.shape[0] // N  # a prompt (T tokens per row): its last tokens, newest first, become the history
        if self.W:
            last = x.view(N, T, -1).flip(1)[:, :self.W]
            self.hist_hidden[l, :, :last.shape[1]] = last
        if self.V:
            routing = torch.zeros(N * T, self.E, device=x.device).scatter_(1, ids, w.float()).view(N, T, -1)
            last = routing.flip(1)[:, :self.V]
            self.hist_routing[l, :, :last.shape[1]] = last

    def features(self, l: int) -> Features:
        """What make_features gives for rows at input layer l, from the buffers (no host sync)."""
        s, d, o = self.spec, self.d, self.off
        target = l + d
        last = l if d >= 1 else l - 1  # this token's newest routing a row reads (at d = 0 layer l's is the answer)
        f = Features(hidden=self.cur_hidden[l] if s.hidden else None, layer=self.layers[l])
        valid = lambda j: (self.seen > j).unsqueeze(-1)  # noqa: E731  an earlier token j+1 back exists
        routing = lambda j: self.cur_routing[j] if j >= 0 else torch.zeros_like(self.cur_routing[0])  # noqa: E731
        if s.history:
            f.own_routing = routing(last)
            f.prev_token = self.hist_routing[target, :, o] * valid(0)
        if s.past_layers:
            f.past_hidden = torch.stack([self.cur_hidden[l - j] if l - j >= 0 else torch.zeros_like(self.cur_hidden[0])
                                         for j in range(1, s.past_layers + 1)], 1)
        if s.own_layers:
            f.own_window = torch.stack([routing(last - j) for j in range(s.own_layers)], 1)
        if s.window:
            mask = torch.stack([valid(j) for j in range(s.window)], 1)                     # (N, W, 1)
            if s.hidden:
                f.window_hidden = self.hist_hidden[target, :, o:o + s.window] * mask
            f.window_routing = self.hist_routing[target, :, o:o + s.window] * mask
        if s.token_id:
            f.token_id = self.token
        if s.context:
            n = self.seen.clamp(max=s.context)                                             # (N,)
            mask = (torch.arange(s.context, device=n.device).unsqueeze(0) < n.unsqueeze(1)).unsqueeze(-1)
            total = (self.hist_hidden[target, :, o:o + s.context].float() * mask).sum(1)
            f.context = (total / n.clamp(min=1).unsqueeze(1)).to(self.cur_hidden.dtype)
        # routing is kept in float32 (weights accumulate exactly); the network runs in the model's dtype, and its
        # first layer concatenates every feature, so each one reaches it in that dtype
        for name in ("own_routing", "prev_token", "own_window", "window_routing"):
            if getattr(f, name) is not None:
                setattr(f, name, getattr(f, name).to(self.cur_hidden.dtype))
        return f


def eviction_ranks(logits: torch.Tensor, m: int = 0) -> torch.Tensor:
    """(E,) int64 each expert's rank among the layer's, from least (0) to most likely used in the next tokens: a
    next-tokens predictor's (N, E) logits, a batch's rows merged by their highest probability (an expert any row will
    use soon is kept). Equal scores get equal ranks, so that least-recently-used breaks their tie, as in the
    simulator (an argsort would order them arbitrarily)."""
    v = logits.float().amax(0)
    return torch.searchsorted(v.sort().values, v)


class LivePredictor:
    """One prefetch source run live. `__call__(l, x)` -> (m,) int64 experts of layer l+d on the device (`reduce`:
    top_m; eviction_ranks for a next-tokens predictor, (E,)). `run(l, x)` gives (N, E) scores; a learned predictor
    reads its features from `features(N)` instead of x."""

    def __init__(self, name: str, m: int, run: Callable[[int, torch.Tensor], torch.Tensor], reads_x: bool = True,
                 features: Callable[[int], LiveFeatures] | None = None,
                 reduce: Callable[[torch.Tensor, int], torch.Tensor] = top_m):
        self.name, self.m, self._run, self.reads_x, self.reduce = name, m, run, reads_x, reduce
        self.features = features          # rows -> the LiveFeatures of that batch size (learned predictors)
        self.graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self._static: dict[int, torch.Tensor] = {}
        self.use_graphs = False

    def __call__(self, l: int, x: torch.Tensor) -> torch.Tensor:
        if not self.use_graphs:
            return self.reduce(self._run(l, x), self.m)
        n = x.shape[0]
        if self.reads_x:
            if n not in self._static:
                self._static[n] = torch.zeros_like(x)
            self._static[n].copy_(x)
        g = self.graphs.get((l, n))
        if g is None:  # captured at its first use: its inputs are the static buffers, which stay where they are
            xs = self._static.get(n, x)
            g = self.graphs[(l, n)] = _capture(lambda: self.reduce(self._run(l, xs), self.m), x.device)
        g[0].replay()
        return g[1]


def _capture(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[Any, torch.Tensor]:
    """`fn` captured as a CUDA graph (warm-up on a side stream, as torch.cuda.graph asks): (graph, its output)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def router_reuse(routers: list[nn.Module], spec: dict[str, Any], lookahead: int,
                 bias_attr: str | None, correction_attr: str | None) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """(l, x) -> scores of layer l+d's experts: its router's logits (with its bias) on x, ranked by the family's
    selection rule (collection/families.py selection_scores: softmax families by the logits themselves)."""
    plain = spec["scoring"] != "sigmoid" and not spec.get("groups")

    def run(l: int, x: torch.Tensor) -> torch.Tensor:
        r = routers[l + lookahead]
        logits = F.linear(x.to(r.weight.dtype), r.weight)
        if bias_attr:
            logits = logits + getattr(r, bias_attr)
        if plain:
            return logits
        return selection_scores(spec, logits, getattr(r, correction_attr) if correction_attr else None)
    return run


def check_fits_model(cfg: Any, L: int, E: int, K: int, H: int, lookahead: int, vocab: int, where: str) -> None:
    """One line unless the checkpoint's predictor reads this model: routing shape, hidden size (a routing-only
    predictor reads none: it may come from a set of imported routing, hidden size 0), lookahead."""
    shape = lambda l, e, k, *h: f"{l} layers x {e} experts, top-{k}" + "".join(f", hidden {x}" for x in h)  # noqa: E731
    reads = reads_hidden(cfg)
    mine = (cfg.num_layers, cfg.num_experts, cfg.top_k) + ((cfg.input_dim,) if reads else ())
    theirs = (L, E, K) + ((H,) if reads else ())
    if mine != theirs:
        raise UserError(f"{where}: the checkpoint predicts for {shape(*mine)}; this model is {shape(*theirs)} "
                        "(a predictor of another model)")
    if cfg.lookahead != lookahead:
        raise UserError(f"{where}: the checkpoint predicts {cfg.lookahead} layer(s) ahead, --lookahead is {lookahead}")
    if cfg.token_vocab and vocab > cfg.token_vocab:
        raise UserError(f"{where}: the model's vocabulary ({vocab}) exceeds the predictor's token table "
                        f"({cfg.token_vocab}): another tokenizer")


class Learned:
    """A checkpoint's predictor on the device, with one LiveFeatures per batch size (`features(N)`)."""

    def __init__(self, model: nn.Module, cfg: Any, L: int, E: int, H: int, lookahead: int, device: torch.device,
                 dtype: torch.dtype):
        self.model, self.cfg, self.d = model, cfg, lookahead
        self.spec = feature_spec(model)
        self.dims = (L, E, H)
        self.device, self.dtype = device, dtype
        self.live: dict[int, LiveFeatures] = {}
        self.current: LiveFeatures | None = None
        self.one_layer = getattr(model, "predict_layer", None)  # the anchored kind: one target layer, no host sync

    def features(self, rows: int) -> LiveFeatures:
        if rows not in self.live:
            self.live[rows] = LiveFeatures(self.spec, *self.dims, self.d, rows, self.device, self.dtype)
        self.current = self.live[rows]
        return self.current

    @torch.no_grad()
    def __call__(self, l: int, x: torch.Tensor) -> torch.Tensor:
        f = self.current.features(l)
        return self.one_layer(f, l + self.d)[0] if self.one_layer is not None else self.model(f)


def learned(path: str, L: int, E: int, K: int, H: int, lookahead: int, vocab: int, routers: torch.Tensor,
            device: torch.device, dtype: torch.dtype, check: bool = True, seed: int = 0, evict: bool = False
            ) -> Learned:
    """A checkpoint's predictor, on `device` in `dtype`. With check=False (routing forced from traces of another
    model) a predictor of the checkpoint's kind and width is built at this model's size with random weights: the
    same work, for its time; its answers are not used. evict: a next-tokens predictor (lookahead_tokens > 0, d = 0)
    for `evict:<checkpoint>`; otherwise a predictor of layer l + d's experts for `prefetch:<checkpoint>`."""
    from models.checkpoint import load_checkpoint
    from models.predictors import PredictorConfig, build_predictor

    where = f"policy {'evict' if evict else 'prefetch'}:{path}"
    model, cfg, _ = load_checkpoint(Path(path), "cpu", where=where)
    window = int(getattr(cfg, "lookahead_tokens", 0) or 0)
    if evict and window <= 0:
        raise UserError(f"{where}: the checkpoint predicts layer l+{cfg.lookahead}'s experts of the same token, not "
                        "the next tokens' (its config has no lookahead_tokens > 0); train one for eviction")
    if not evict and window > 0:
        raise UserError(f"{where}: the checkpoint predicts the next tokens' experts (lookahead_tokens {window}); "
                        f"use it as evict:{path}")
    if check:
        check_fits_model(cfg, L, E, K, H, lookahead, vocab, where)
    else:
        torch.manual_seed(seed)
        cfg = PredictorConfig(**{**cfg.to_json(), "input_dim": H, "num_experts": E, "top_k": K, "num_layers": L,
                                 "lookahead": lookahead, "token_vocab": vocab if cfg.token_vocab else 0})
        model = build_predictor(cfg)
    if hasattr(model, "set_router"):
        model.set_router(routers.float())  # the anchored kind scores with the model's own routers
    model = model.to(device=device, dtype=dtype).eval()
    return Learned(model, cfg, L, E, H, lookahead, device, dtype)
