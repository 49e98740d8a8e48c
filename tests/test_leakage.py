"""No future leaks into a prediction: what a predictor sees for (token t, layer l, lookahead d) must not
change when anything of token t at layers it has not reached, or of any later token, changes.

    pytest -q tests/test_leakage.py

Deliberate leaks (`make mutation` candidates, each must make a test here fail): in models/features.py,
    1. `range(1, spec.window + 1)` -> `range(0, spec.window)`: the window includes token t itself at l+d
    2. `last_seen = layer if lookahead >= 1 else layer - 1` -> `last_seen = layer`: own routing of layer l at d = 0
    3. `hidden_at(block, layer - j, tok)` -> `hidden_at(block, layer + j, tok)`: "past" layers read later ones
    4. `f.token_id = block.token_ids[tok]` -> `block.token_ids[(tok + 1).clamp(max=block.tokens - 1)]`
    5. in collection/traces/rows.py context_mean, `prefix[s, tok] - prefix[s, tok - n]` ->
       `prefix[s, (tok + 1).clamp(max=block.tokens - 1)] - prefix[s, tok - n]`: the context includes token t
test_a_planted_leak_is_caught plants leaks like these at run time and checks the test catches each.
"""
import numpy as np
import pytest
import torch
from torch import nn

import models.features as features
from collection.traces.rows import TokenBlock, targets
from models.features import feature_spec, make_features
from models.predictors import PredictorConfig, build_predictor

L, E, K, H, N, V = 6, 60, 4, 16, 40, 50
# the anchored predictor with every feature it has (each test builds it through anchored_model)
ALL_FEATURES = dict(past_layers=2, own_layers=2, window=3, token_vocab=V, context=4)


def make_block(seed: int) -> TokenBlock:
    """Two sequences in one block: tokens 0-14 and 15-39."""
    g = torch.Generator().manual_seed(seed)
    prev = torch.tensor([-1 if i in (0, 15) else i - 1 for i in range(N)])
    return TokenBlock(hidden=torch.randn(L, N, H, generator=g),
                      topk_ids=torch.rand(L, N, E, generator=g).argsort(-1)[..., :K],
                      topk_weights=torch.rand(L, N, K, generator=g),
                      prev=prev, source=torch.zeros(N, dtype=torch.long),
                      hidden_slot=torch.arange(L), token_ids=torch.randint(0, V, (N,), generator=g),
                      router_logits=torch.randn(L, N, E, generator=g).half())


def scramble_future(block: TokenBlock, t: int, l: int, d: int, seed: int) -> TokenBlock:
    """Replace every value a causal predictor may not know at (t, l): token t's routing at layers it has
    not finished (>= l when d = 0, > l when d >= 1), token t's hidden state at layers > l, and every later
    token of its sequence at every layer."""
    g = torch.Generator().manual_seed(seed)
    b = TokenBlock(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(block).items()})
    seq_end = 15 if t < 15 else N
    first_unknown = l if d == 0 else l + 1
    b.topk_ids[first_unknown:, t] = torch.rand(L - first_unknown, E, generator=g).argsort(-1)[..., :K]
    b.topk_weights[first_unknown:, t] = torch.rand(L - first_unknown, K, generator=g)
    b.router_logits[first_unknown:, t] = torch.randn(L - first_unknown, E, generator=g).half()
    b.hidden[l + 1:, t] = torch.randn(L - l - 1, H, generator=g)
    later = slice(t + 1, seq_end)
    n = seq_end - t - 1
    b.topk_ids[:, later] = torch.rand(L, n, E, generator=g).argsort(-1)[..., :K]
    b.topk_weights[:, later] = torch.rand(L, n, K, generator=g)
    b.router_logits[:, later] = torch.randn(L, n, E, generator=g).half()
    b.hidden[:, later] = torch.randn(L, n, H, generator=g)
    b.token_ids[later] = torch.randint(0, V, (n,), generator=g)
    return b


def anchored_model(d: int, **overrides) -> nn.Module:
    """The anchored predictor with every feature, weights drawn at random: its zero-initialised heads would
    otherwise make it router reuse, blind to every feature, and the leakage test vacuous."""
    torch.manual_seed(0)
    model = build_predictor(PredictorConfig("anchored", H, E, K, L, lookahead=d, hidden_dim=32,
                                            **{**ALL_FEATURES, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def build(kind: str, d: int) -> nn.Module:
    if kind.startswith("anchored"):
        return anchored_model(d, separate_layers=kind == "anchored-separate")
    torch.manual_seed(0)
    return build_predictor(PredictorConfig(kind, H, E, K, L, lookahead=d, hidden_dim=32)).eval()


def check_no_leak(model: nn.Module, d: int, make=make_features) -> None:
    """Assert that scrambling everything a causal predictor may not know leaves its scores unchanged, at a
    spread of (token, layer) rows: sequence starts and ends, the first and last input layers."""
    block = make_block(0)
    spec = feature_spec(model)
    rng = np.random.default_rng(d)
    for t, l in [(0, 0), (14, L - 1 - d), (15, 1), (27, 2), (N - 1, 0), (16, L - 1 - d)] + [
            (int(rng.integers(N)), int(rng.integers(L - d))) for _ in range(6)]:
        if l + d >= L:
            continue
        tok, layer = torch.tensor([t]), torch.tensor([l])
        before = model(make(block, tok, layer, d, E, spec))
        after = model(make(scramble_future(block, t, l, d, seed=t * 100 + l), tok, layer, d, E, spec))
        assert torch.equal(before, after), f"future leaked into (t={t}, l={l}, d={d})"


@pytest.mark.parametrize("d", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", ["simple", "layer-aware", "hybrid", "anchored", "anchored-separate"])
def test_no_future_information_reaches_the_prediction(kind, d):
    check_no_leak(build(kind, d), d)


def test_every_predictor_kind_is_checked_for_leaks():
    """A new kind added to the registry must join the parametrisation above."""
    from models.predictors import PREDICTORS

    assert set(PREDICTORS) == {"simple", "layer-aware", "hybrid", "anchored"}


@pytest.mark.parametrize("feature", ["past_hidden", "own_window", "window_hidden", "window_routing", "token_id",
                                     "context"])
@pytest.mark.parametrize("d", [0, 2])
def test_every_anchored_feature_is_live(feature, d):
    """The leakage test only means something if each feature reaches the output: changing one feature
    tensor (everything else fixed) changes the anchored predictor's scores."""
    model = anchored_model(d)
    block = make_block(0)
    tok, layer = torch.tensor([27, 33]), torch.tensor([3, 3 - d])
    f = make_features(block, tok, layer, d, E, feature_spec(model))
    assert getattr(f, feature) is not None
    g = make_features(block, tok, layer, d, E, feature_spec(model))
    value = getattr(g, feature)
    setattr(g, feature, (value + 7) % V if feature == "token_id" else value + 1.0)
    assert not torch.equal(model(f), model(g)), f"{feature} does not reach the prediction"


def next_token_id(*args, **kwargs) -> features.Features:
    """make_features with a planted leak: the token id of the next token instead of this one."""
    f = make_features(*args, **kwargs)
    block, tok = args[0], args[1]
    f.token_id = block.token_ids[(tok + 1).clamp(max=block.tokens - 1)]
    return f


@pytest.mark.parametrize("leak", ["window includes this token", "own routing of layer l at d = 0",
                                  "past layers read later layers", "next token's id", "context includes this token"])
def test_a_planted_leak_is_caught(leak, monkeypatch):
    """Mutation check of the test itself: plant one leak in the feature builder and the check must fail."""
    d = 0 if leak == "own routing of layer l at d = 0" else 1
    make = make_features
    if leak == "window includes this token":  # back = 1 reads token t itself at layer l + d
        real_back = features.earlier_token
        monkeypatch.setattr(features, "earlier_token", lambda block, tok, back: real_back(block, tok, back - 1))
    elif leak == "own routing of layer l at d = 0":  # every routing read one layer later
        real_routing = features.routing_vector
        monkeypatch.setattr(features, "routing_vector",
                            lambda block, layer, tok, num_experts: real_routing(block, layer + 1, tok, num_experts))
    elif leak == "past layers read later layers":  # h_{l-j} read as h_{l-j+2}
        real_hidden = features.hidden_at
        monkeypatch.setattr(features, "hidden_at", lambda block, layer, tok, *dtype:
                            real_hidden(block, layer + 2, tok, *dtype))
    elif leak == "context includes this token":  # the mean over t-C+1 .. t instead of t-C .. t-1
        real_context = features.context_mean
        monkeypatch.setattr(features, "context_mean", lambda block, layer, tok, tokens:
                            real_context(block, layer, (tok + 1).clamp(max=block.tokens - 1), tokens))
    else:
        make = next_token_id
    with pytest.raises(AssertionError, match="future leaked"):
        check_no_leak(anchored_model(d), d, make)


def test_the_scramble_reaches_what_it_must():
    """The test above would pass vacuously if the scramble changed nothing that features could read:
    the target itself and the previous token's own future must change."""
    block = make_block(0)
    t, l, d = 20, 1, 1
    after = scramble_future(block, t, l, d, seed=1)
    assert not torch.equal(targets(block, torch.tensor([t]), torch.tensor([l]), d),
                           targets(after, torch.tensor([t]), torch.tensor([l]), d))
    assert not torch.equal(block.topk_ids[:, t + 1], after.topk_ids[:, t + 1])
    # what may be used stays: this token's layer l routing (d >= 1), the previous token at every layer
    assert torch.equal(block.topk_ids[l, t], after.topk_ids[l, t])
    assert torch.equal(block.topk_ids[:, t - 1], after.topk_ids[:, t - 1])


def test_hybrid_uses_the_history_it_is_allowed():
    """The hybrid's history features are live: changing the previous token's routing changes them."""
    block = make_block(0)
    t, l, d = 20, 2, 1
    f = make_features(block, torch.tensor([t]), torch.tensor([l]), d, E, True)
    changed = TokenBlock(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(block).items()})
    changed.topk_ids[l + d, t - 1] = (changed.topk_ids[l + d, t - 1] + 1) % E
    g = make_features(changed, torch.tensor([t]), torch.tensor([l]), d, E, True)
    assert not torch.equal(f.prev_token, g.prev_token)
    assert torch.equal(f.own_routing, g.own_routing)
