"""No future leaks into a prediction: what a predictor sees for (token t, layer l, lookahead d) must not
change when anything of token t at layers it has not reached, or of any later token, changes."""
import numpy as np
import pytest
import torch

from models.predictors import PredictorConfig, build_predictor
from collection.rows import TokenBlock, targets
from models.features import make_features

L, E, K, H, N = 6, 60, 4, 16, 40


def make_block(seed: int) -> TokenBlock:
    """Two sequences in one block: tokens 0-14 and 15-39."""
    g = torch.Generator().manual_seed(seed)
    prev = torch.tensor([-1 if i in (0, 15) else i - 1 for i in range(N)])
    return TokenBlock(hidden=torch.randn(L, N, H, generator=g),
                      topk_ids=torch.rand(L, N, E, generator=g).argsort(-1)[..., :K],
                      topk_weights=torch.rand(L, N, K, generator=g),
                      prev=prev, source=torch.zeros(N, dtype=torch.long),
                      hidden_slot=torch.arange(L))


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
    b.hidden[l + 1:, t] = torch.randn(L - l - 1, H, generator=g)
    later = slice(t + 1, seq_end)
    n = seq_end - t - 1
    b.topk_ids[:, later] = torch.rand(L, n, E, generator=g).argsort(-1)[..., :K]
    b.topk_weights[:, later] = torch.rand(L, n, K, generator=g)
    b.hidden[:, later] = torch.randn(L, n, H, generator=g)
    return b


@pytest.mark.parametrize("d", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", ["simple", "layer-aware", "hybrid"])
def test_no_future_information_reaches_the_prediction(kind, d):
    block = make_block(0)
    torch.manual_seed(0)
    model = build_predictor(PredictorConfig(kind, H, E, K, L, lookahead=d, hidden_dim=32)).eval()
    rng = np.random.default_rng(d)
    for t, l in [(0, 0), (14, L - 1 - d), (15, 1), (27, 2), (N - 1, 0)] + [
            (int(rng.integers(N)), int(rng.integers(L - d))) for _ in range(6)]:
        if l + d >= L:
            continue
        tok, layer = torch.tensor([t]), torch.tensor([l])
        before = model(make_features(block, tok, layer, d, E, kind == "hybrid"))
        after_block = scramble_future(block, t, l, d, seed=t * 100 + l)
        after = model(make_features(after_block, tok, layer, d, E, kind == "hybrid"))
        assert torch.equal(before, after), f"future leaked into (t={t}, l={l}, d={d})"


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
