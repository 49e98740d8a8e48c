"""Behaviour with known answers: each test fails if the behaviour it names breaks (tools/mutation.py checks that).

The data are hand-built (tests/handmade.py) and every expected number is worked out in the comments, except
for the training run, which uses the real tiny traces and compares against the popularity baseline.

    pytest -q tests/test_behaviour.py
"""
import argparse
import dataclasses
import os

import numpy as np
import pytest
import torch

from collection.traces.format import ROUTER_WEIGHTS, TraceFormatError, TraceSet
from collection.traces.rows import load_block, split_sequences
from common.atomic import FILE_MODE, atomic_path, atomic_write_bytes
from models.checkpoint import load_checkpoint
from models.features import make_features
from models.predictors import PredictorConfig, build_predictor
from tests.handmade import token_block, write_trace_set
from validation.coverage.evaluate import epoch_validation, evaluate
from validation.coverage.scorers import baseline_scorer, predictor_scorer

CPU = torch.device("cpu")

# --------------------------------------------------------------------------------------------------
# Router reuse. L = 3 layers, E = 4 experts, top-2, H = 4; one sequence of 3 tokens.
# Routers: W0 = identity, W1 = reversal, W2 = identity, so W h is h or h reversed.
#   h_0 = [4, 3, 2, 1] (every token):  reuse W1 h_0 = [1, 2, 3, 4] -> {3, 2};  own W0 h_0 = [4, 3, 2, 1] -> {0, 1}
#   h_1 = [1, 4, 2, 3] (every token):  reuse W2 h_1 = [1, 4, 2, 3] -> {1, 3};  own W1 h_1 = [3, 2, 4, 1] -> {2, 0}
# True experts: layer 1: t0 {3, 2}, t1 {3, 1}, t2 {2, 3};  layer 2: {1, 3} for all;  layer 0: {0, 1} for all.
# recall@2 at d = 1: layer-1 targets 1 + 1/2 + 1 = 2.5 of 3, layer-2 targets 3 of 3 -> 5.5 / 6.
# Layer l's own router instead would find 0 + 1/2 + 0 and 0 -> 0.5 / 6.

J = np.eye(4)[::-1]
ROUTER = np.stack([np.eye(4), J, np.eye(4)]).astype(np.float32)
H0, H1 = [4, 3, 2, 1], [1, 4, 2, 3]


@pytest.fixture(scope="module")
def router_traces(tmp_path_factory):
    hidden = np.array([[H0] * 3, [H1] * 3, [[0] * 4] * 3], dtype=np.float32)
    ids = np.array([[[0, 1]] * 3, [[3, 2], [3, 1], [2, 3]], [[1, 3]] * 3])
    return write_trace_set(tmp_path_factory.mktemp("router") / "t", ids, np.full(ids.shape, 0.5), [3],
                           num_experts=4, hidden=hidden, router=ROUTER)


def test_router_reuse_is_the_target_layers_router(router_traces):
    ts = router_traces
    reuse = baseline_scorer("router-reuse", ts, 1, np.array([0]), CPU)
    own = baseline_scorer("router", ts, 0, np.array([0]), CPU)
    block = load_block(ts, [0], np.array([0]), CPU)
    tok, layer = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 0, 0, 1, 1, 1])
    expected = torch.tensor([[1, 2, 3, 4]] * 3 + [H1] * 3, dtype=torch.float32)  # W_{l+1} h_l
    assert torch.equal(reuse(block, tok, layer), expected)
    assert torch.equal(own(block, tok, layer), torch.tensor([H0] * 3 + [[3, 2, 4, 1]] * 3, dtype=torch.float32))

    acc = evaluate(reuse, ts, np.array([0]), 1, CPU, progress=False)
    s = acc.summary()
    assert s["tokens"] == 6
    assert s["recall@2"] == pytest.approx(5.5 / 6)
    assert s["coverage@2"] == pytest.approx(5 / 6)       # only t1 at layer 1 misses an expert
    assert s["any_hit@1"] == 1.0                         # top-1 is 3 (layer 1) and 1 (layer 2): in every true set
    assert acc.per_layer("recall@2") == pytest.approx([None, 2.5 / 3, 1.0])  # rows are counted at the target layer
    assert evaluate(own, ts, np.array([0]), 1, CPU, progress=False).summary()["recall@2"] == pytest.approx(0.5 / 6)


# --------------------------------------------------------------------------------------------------
# Previous token and popularity. L = 2, E = 4, top-2, d = 1 (input layer 0, target layer 1).
# Sequences A (3 tokens), B (2) in shard 0 and C (2) in shard 1; every routing weight pair is (0.75, 0.25).
#   layer 1:  A0 {0,1}  A1 {0,2}  A2 {0,2} | B0 {0,1}  B1 {2,3} | C0 {1,2}  C1 {2,3}
#   layer 0:  {3,1} for every token
# Popularity on the training split {A, B}, layer 1: counts 4, 2, 3, 1 of 10 -> [0.4, 0.2, 0.3, 0.1], top-2 {0, 2};
# layer 0: [0, 0.5, 0, 0.5].
# Previous-token predicts the previous token's layer-1 experts; sequence starts fall back to popularity {0, 2}:
#   A0 {0,2} vs {0,1}: 1/2   A1 {0,1} vs {0,2}: 1/2   A2 {0,2} vs {0,2}: 1   B0 {0,2}: 1/2   B1 {0,1} vs {2,3}: 0
#   C0 {0,2} vs {1,2}: 1/2   C1 {1,2} vs {2,3}: 1/2   -> recall@2 = 3.5 / 7
# Popularity alone: 1/2, 1, 1, 1/2, 1/2, 1/2, 1/2 -> 4.5 / 7.

L1_IDS = [[0, 1], [0, 2], [0, 2], [0, 1], [2, 3], [1, 2], [2, 3]]
PREV_IDS = np.array([[[3, 1]] * 7, L1_IDS])
PREV_W = np.tile([0.75, 0.25], (2, 7, 1))
LENGTHS = [3, 2, 2]
POP1 = [0.4, 0.2, 0.3, 0.1]


@pytest.fixture(scope="module")
def prev_traces(tmp_path_factory):
    return write_trace_set(tmp_path_factory.mktemp("prev") / "t", PREV_IDS, PREV_W, LENGTHS, num_experts=4,
                           seq_sources=[0, 1, 0], shard_sequences=[2, 1])


def test_rows_know_each_tokens_previous_token(prev_traces):
    block = load_block(prev_traces, [0, 1], np.array([0, 1, 2]), CPU)
    assert block.prev.tolist() == [-1, 0, 1, -1, 3, -1, 5]  # -1 at every sequence start, also across shards
    assert block.source.tolist() == [0, 0, 0, 1, 1, 0, 0]
    assert torch.equal(block.topk_ids[1], torch.tensor(L1_IDS))
    only_b = load_block(prev_traces, [0, 1], np.array([1]), CPU)
    assert only_b.prev.tolist() == [-1, 0] and torch.equal(only_b.topk_ids[1], torch.tensor(L1_IDS[3:5]))


def test_popularity_counts_the_training_split_at_the_target_layer(prev_traces):
    pop = baseline_scorer("popularity", prev_traces, 1, np.array([0, 1]), CPU)
    block = load_block(prev_traces, [0, 1], np.array([0, 1, 2]), CPU)
    scores = pop(block, torch.arange(7), torch.zeros(7, dtype=torch.long))
    assert torch.allclose(scores, torch.tensor([POP1] * 7), atol=1e-7)
    acc = evaluate(pop, prev_traces, np.array([0, 1, 2]), 1, CPU, need_hidden=False, progress=False)
    assert acc.summary()["recall@2"] == pytest.approx(4.5 / 7)


def test_previous_token_is_the_previous_tokens_experts(prev_traces):
    prev = baseline_scorer("previous-token", prev_traces, 1, np.array([0, 1]), CPU)
    block = load_block(prev_traces, [0, 1], np.array([0, 1, 2]), CPU)
    scores = prev(block, torch.arange(7), torch.zeros(7, dtype=torch.long))
    w = lambda a, b: [0.75 if e == a else 0.25 if e == b else 0.0 for e in range(4)]  # noqa: E731
    start = [0.0] * 4
    expected = torch.tensor([start, w(0, 1), w(0, 2), start, w(0, 1), start, w(1, 2)]) + 1e-3 * torch.tensor(POP1)
    assert torch.allclose(scores, expected, atol=1e-7)
    s = evaluate(prev, prev_traces, np.array([0, 1, 2]), 1, CPU, need_hidden=False, progress=False).summary()
    assert s["recall@2"] == pytest.approx(3.5 / 7)
    assert s["any_hit@1"] == pytest.approx(4 / 7)  # top-1: A0 0, A1 0, A2 0, B0 0 hit; B1 0, C0 0, C1 1 miss


# --------------------------------------------------------------------------------------------------
# What the hybrid sees (models.features) and whether it uses it.

def test_features_are_the_routing_already_observed():
    block = token_block(PREV_IDS, PREV_W, LENGTHS)
    tok = torch.arange(7)
    one_hot = lambda pairs: torch.tensor([[0.75 if e == p[0] else 0.25 if e == p[1] else 0.0 for e in range(4)]  # noqa: E731
                                          for p in pairs])
    block.hidden = torch.zeros(2, 7, 3)
    zero = torch.zeros(1, 4)
    # d = 1 from layer 0: this token's layer-0 experts {3, 1}; the previous token's layer-1 experts (0 at starts)
    f = make_features(block, tok, torch.zeros(7, dtype=torch.long), 1, 4, True)
    assert torch.equal(f.own_routing, one_hot([[3, 1]] * 7))
    prev1 = one_hot([L1_IDS[i] for i in (0, 0, 1, 0, 3, 0, 5)])
    prev1[[0, 3, 5]] = zero
    assert torch.equal(f.prev_token, prev1)
    # d = 0 from layer 1: layer 1's own routing is the answer, so the token's layer-0 routing is what exists
    f = make_features(block, tok, torch.ones(7, dtype=torch.long), 0, 4, True)
    assert torch.equal(f.own_routing, one_hot([[3, 1]] * 7))
    assert torch.equal(f.prev_token, prev1)
    # d = 0 from layer 0: nothing of this token is known yet
    f = make_features(block, tok, torch.zeros(7, dtype=torch.long), 0, 4, True)
    assert torch.equal(f.own_routing, torch.zeros(7, 4))


def random_block(seed: int = 0, L: int = 6, N: int = 40, E: int = 60, K: int = 4, H: int = 16):
    g = torch.Generator().manual_seed(seed)
    block = token_block(torch.rand(L, N, E, generator=g).argsort(-1)[..., :K], torch.rand(L, N, K, generator=g),
                        [15, N - 15])
    block.hidden = torch.randn(L, N, H, generator=g)
    return block


def changed(block, **edits):
    b = dataclasses.replace(block, **{k: v.clone() for k, v in vars(block).items() if isinstance(v, torch.Tensor)})
    for name, fn in edits.items():
        fn(getattr(b, name))
    return b


def test_every_input_of_the_hybrid_changes_its_output():
    L, E, K, H, d, t, l = 6, 60, 4, 16, 1, 20, 2
    torch.manual_seed(0)
    model = build_predictor(PredictorConfig("hybrid", H, E, K, L, lookahead=d, hidden_dim=32, dropout=0.0)).eval()
    block = random_block()
    tok, layer = torch.tensor([t]), torch.tensor([l])
    logits = lambda b, lay=layer: model(make_features(b, tok, lay, d, E, True))  # noqa: E731
    base = logits(block)
    new_experts = lambda x: (x + 7) % E  # noqa: E731  (still K distinct experts)
    edits = {
        "hidden at layer l": changed(block, hidden=lambda h: h[l, t].add_(1.0)),
        "own routing at layer l": changed(block, topk_ids=lambda i: i[l, t].copy_(new_experts(i[l, t]))),
        "previous token at layer l+d": changed(block, topk_ids=lambda i: i[l + d, t - 1].copy_(new_experts(i[l + d, t - 1]))),
    }
    for what, b in edits.items():
        assert not torch.allclose(logits(b), base, atol=1e-4), f"the hybrid ignores {what}"
    # the layer id alone, everything it reads being equal: copy layer l's row of token t to layer l+1
    same = changed(block, hidden=lambda h: h[l + 1, t].copy_(h[l, t]), topk_ids=lambda i: i[l + 1, t].copy_(i[l, t]),
                   topk_weights=lambda w: w[l + 1, t].copy_(w[l, t]))
    same.topk_ids[l + 2, t - 1] = same.topk_ids[l + 1, t - 1]
    same.topk_weights[l + 2, t - 1] = same.topk_weights[l + 1, t - 1]
    f0, f1 = make_features(same, tok, layer, d, E, True), make_features(same, tok, layer + 1, d, E, True)
    assert torch.equal(f0.hidden, f1.hidden) and torch.equal(f0.own_routing, f1.own_routing)
    assert torch.equal(f0.prev_token, f1.prev_token)
    assert not torch.allclose(model(f0), model(f1), atol=1e-4), "the hybrid ignores the layer id"
    # and each field of the features, perturbed alone, moves the logits
    f = make_features(block, tok, layer, d, E, True)
    for name in ("hidden", "own_routing", "prev_token"):
        g = dataclasses.replace(f, **{name: getattr(f, name) + 0.5})
        assert not torch.allclose(model(g), base, atol=1e-4), f"the hybrid ignores Features.{name}"


def test_layer_aware_head_follows_the_lookahead():
    """Same weights, different d: the target is layer l + d, whose embedding and output head are used."""
    L, E, K, H = 6, 8, 2, 5
    torch.manual_seed(0)
    m1 = build_predictor(PredictorConfig("layer-aware", H, E, K, L, lookahead=1, hidden_dim=16, dropout=0.0)).eval()
    m3 = build_predictor(PredictorConfig("layer-aware", H, E, K, L, lookahead=3, hidden_dim=16, dropout=0.0)).eval()
    m3.load_state_dict(m1.state_dict())
    block = random_block(1, L=L, E=E, K=K, H=H)
    tok, layer = torch.tensor([3, 20, 21]), torch.tensor([0, 1, 2])
    f = make_features(block, tok, layer, 1, E, False)
    out1, out3 = m1(f), m3(f)
    assert not torch.allclose(out1, out3, atol=1e-4)
    for model, d, out in ((m1, 1, out1), (m3, 3, out3)):
        target = layer + d
        z = model.trunk(model.proj(f.hidden) + model.layer_emb.weight[target])
        W, b = model.heads.weight.view(L, E, -1)[target], model.heads.bias.view(L, E)[target]
        assert torch.allclose(out, torch.einsum("rd,red->re", z, W) + b, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Splits, shards on disk, atomic writes.

def test_split_is_a_seeded_stratified_partition():
    rng = np.random.default_rng(0)
    table = {"seq_id": rng.permutation(25), "source": np.array([0] * 10 + [1] * 10 + [2] * 5)}
    split = split_sequences(table, seed=3)
    # 10% of each source rounds to 1 test and 1 val sequence; the 5-sequence source still gets one of each
    assert [len(split[k]) for k in ("train", "val", "test")] == [19, 3, 3]
    parts = [set(split[k].tolist()) for k in ("train", "val", "test")]
    assert set.union(*parts) == set(range(25)) and sum(map(len, parts)) == 25  # each sequence in exactly one split
    for k in ("val", "test"):
        assert sorted(table["source"][np.isin(table["seq_id"], split[k])].tolist()) == [0, 1, 2]
    again = split_sequences(table, seed=3)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    other = split_sequences(table, seed=4)
    assert not all(np.array_equal(split[k], other[k]) for k in split)


def test_a_changed_byte_in_a_shard_is_refused(prev_traces, tmp_path):
    import shutil

    copy = tmp_path / "t"
    shutil.copytree(prev_traces.dir, copy)
    shard = copy / prev_traces.manifest.shards[0].file
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x01  # the last weight's low bits: same size, same structure, different data
    shard.write_bytes(bytes(raw))
    with pytest.raises(TraceFormatError, match="checksum mismatch"):
        TraceSet(copy).shard(0)
    TraceSet(copy, verify=False).shard(0)  # the opt-out skips only the hash
    TraceSet(copy).shard(1)                # the other shard is intact


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half of the new")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_written_files_get_the_normal_mode(tmp_path, prev_traces, router_traces):
    umask = os.umask(0o022)
    os.umask(umask)
    assert FILE_MODE == 0o666 & ~umask
    path = tmp_path / "x"
    with atomic_path(path) as tmp:  # a writer that creates a private file, as tempfile and some libraries do
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
    assert path.stat().st_mode & 0o777 == FILE_MODE
    for f in (router_traces.dir / ROUTER_WEIGHTS, prev_traces.dir / "manifest.json",
              prev_traces.dir / prev_traces.manifest.shards[0].file):
        assert f.stat().st_mode & 0o777 == FILE_MODE, f


# --------------------------------------------------------------------------------------------------
# Training, on the real tiny traces.

@pytest.fixture
def one_thread():
    # tiny matrices: one thread is faster, and on a shared machine more threads only wait for each other
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_training_lowers_the_loss_and_beats_popularity(tiny_traces, tmp_path, one_thread):
    from training.trainer import add_training_args, run_training

    p = argparse.ArgumentParser()
    add_training_args(p, kind="layer-aware", shards_per_group=4, batch_size=8, lr=3e-3, epochs=2, lookahead=1,
                      output=str(tmp_path / "ckpt"))
    args = p.parse_args(["--traces", str(tiny_traces), "--batch-rows", "4096", "--hidden-dim", "64", "--device", "cpu"])
    summary = run_training(args, validate=epoch_validation)
    hist = summary["history"]
    assert len(hist) == 2
    assert hist[1]["train_loss"] < hist[0]["train_loss"] - 0.05, [h["train_loss"] for h in hist]

    model, cfg, ckpt = load_checkpoint(tmp_path / "ckpt" / "best_checkpoint.pth")
    ts = TraceSet(tiny_traces)
    val, train = ckpt["split"]["val"].numpy(), ckpt["split"]["train"].numpy()
    popularity = evaluate(baseline_scorer("popularity", ts, 1, train, CPU), ts, val, 1, CPU, need_hidden=False,
                          progress=False).summary()["recall@4"]
    recalls = [h["val/recall@4"] for h in hist]
    # measured: popularity 0.074 (random 0.067), the predictor 0.16 then 0.22 (val split, d = 1, CPU)
    assert max(recalls) > popularity + 0.08, (recalls, popularity)
    # the best checkpoint is the best epoch, and evaluating it again gives the number recorded for it
    assert summary["best"]["recall@4"] == max(recalls)
    assert ckpt["metrics"]["best"]["epoch"] == 1 + int(np.argmax(recalls))
    again = evaluate(predictor_scorer(model, 1, cfg.num_experts), ts, val, 1, CPU, progress=False).summary()
    assert again["recall@4"] == pytest.approx(max(recalls), abs=1e-6)


def test_the_warm_up_step_changes_nothing_training_learns(tiny_traces, tmp_path, one_thread, monkeypatch):
    """The step taken and undone before the first epoch (so first-use costs are not timed as reading) leaves the
    run where it was: with dropout on, the same seed gives the same losses and weights as a run without it."""
    import training.trainer as trainer

    def train(out, warm_up):
        if not warm_up:
            monkeypatch.setattr(trainer, "undone", lambda step, model, opt, device: None)
        p = argparse.ArgumentParser()
        trainer.add_training_args(p, kind="layer-aware", shards_per_group=2, batch_size=8, lr=3e-3, epochs=1,
                                  lookahead=1, output=str(out))
        args = p.parse_args(["--traces", str(tiny_traces), "--batch-rows", "2048", "--hidden-dim", "32",
                             "--dropout", "0.3", "--device", "cpu", "--no-verify"])
        summary = trainer.run_training(args, validate=epoch_validation)
        monkeypatch.undo()
        return summary, load_checkpoint(out / "latest_checkpoint.pth")[0].state_dict()

    with_warm, w1 = train(tmp_path / "a", True)
    without, w2 = train(tmp_path / "b", False)
    assert with_warm["warmup_seconds"] > 0
    assert with_warm["history"][0]["train_loss"] == without["history"][0]["train_loss"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_the_warm_up_step_is_no_larger_than_a_real_step(tiny_traces, tmp_path, one_thread, monkeypatch, capsys):
    """With huge steps and one shard per group, a real step holds one shard's rows: so does the warm-up's block
    (it once took a step's worth of sequences from every shard, more than training ever holds)."""
    import training.trainer as trainer

    loads = []
    real = trainer.load_block
    monkeypatch.setattr(trainer, "load_block", lambda ts, shards, ids, *a, **k: loads.append((shards, len(ids)))
                        or real(ts, shards, ids, *a, **k))
    p = argparse.ArgumentParser()
    trainer.add_training_args(p, kind="simple", shards_per_group=1, batch_size=8, lr=1e-3, epochs=1, lookahead=0,
                              output=str(tmp_path / "o"))
    args = p.parse_args(["--traces", str(tiny_traces), "--batch-rows", "100000000", "--hidden-dim", "16",
                         "--device", "cpu", "--no-verify"])
    trainer.run_training(args, validate=epoch_validation)
    ts = TraceSet(tiny_traces)
    table = ts.sequence_table()
    split = split_sequences(table, args.seed, args.val_fraction, args.test_fraction)
    first = int(np.unique(table["shard"][np.isin(table["seq_id"], split["train"])])[0])
    in_first = int(np.isin(split["train"], table["seq_id"][table["shard"] == first]).sum())
    assert loads[0] == ([first], in_first)  # the warm-up's load: one group's shard, its training sequences
    assert f"warm-up: one step on {in_first} training sequence(s)" in capsys.readouterr().out
