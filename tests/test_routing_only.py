"""The routing-only hybrid (--routing-only): trained and scored on a set of imported routing, which holds no hidden
states, token ids, router logits or router matrices; every reader builds it from its checkpoint without asking for
hidden states; the hidden-reading predictors are still refused on such a set, in one line naming the flag.

    pytest -q tests/test_routing_only.py
"""
import json

import numpy as np
import pytest
import torch

from common.errors import UserError
from tests.test_safety import run_main  # a script's main in this process, wrapped as its __main__ block wraps it

L, E, K = 4, 8, 2  # MoE layers, experts, top-k of the imported sets


def imported(tmp_path_factory, name: str, requests: list[np.ndarray]) -> str:
    """`requests` (each (T, L, K) expert ids) saved as vLLM's routed experts, one .npy per request, and imported."""
    from scripts.import_routing import main

    d = tmp_path_factory.mktemp(name)
    for i, ids in enumerate(requests):
        np.save(d / f"request_{i:03d}.npy", ids.astype(np.int16))
    main(["--from", "vllm", str(d), "--output", str(d / "set"), "--num-experts", str(E)])
    return str(d / "set")


@pytest.fixture(scope="module")
def random_routing(tmp_path_factory) -> str:
    """14 requests of 16-29 tokens, each token's K experts per layer drawn at random: enough for every split."""
    rng = np.random.default_rng(0)
    return imported(tmp_path_factory, "random", [np.argsort(rng.random((16 + i, L, E)), axis=2)[:, :, :K]
                                                 for i in range(14)])


T_REPEAT = 24


@pytest.fixture(scope="module")
def repeating_routing(tmp_path_factory) -> str:
    """100 requests of 24 tokens in which every token uses exactly the previous token's experts: one random pair of
    experts per (request, layer), drawn independently for each layer."""
    rng = np.random.default_rng(1)
    return imported(tmp_path_factory, "repeating", [
        np.broadcast_to(np.argsort(rng.random((L, E)), axis=1)[:, :K], (T_REPEAT, L, K)) for _ in range(100)])


def train(capsys, traces: str, out, *flags: str):
    from scripts.train_hybrid_predictor import main

    return run_main(capsys, "train_hybrid_predictor", main, "--traces", traces, "--output", out, "--device", "cpu",
                    "--batch-rows", "128", "--hidden-dim", "64", "--dropout", "0", *flags)


def coverage(capsys, ckpt, out) -> tuple[int, dict]:
    """validate_coverage_analysis.py on a checkpoint's test split: (exit code, its JSON)."""
    from scripts.validate_coverage_analysis import main

    proc = run_main(capsys, "validate_coverage_analysis", main, "--checkpoint", ckpt, "--device", "cpu",
                    "--json", out / "coverage.json", "--plot", out / "coverage.png")
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads((out / "coverage.json").read_text())


def tokens_of_test_split(traces: str, ckpt) -> int:
    """Tokens of a checkpoint's test split."""
    from collection.traces.format import TraceSet
    from models.checkpoint import checkpoint_split, load_checkpoint

    table = TraceSet(traces).sequence_table()
    test = checkpoint_split(load_checkpoint(ckpt)[2], "test", ckpt)
    return int(table["length"][np.isin(table["seq_id"], test)].sum())


def test_the_routing_only_hybrid_trains_on_imported_routing_and_every_reader_scores_it(random_routing, tmp_path,
                                                                                        capsys):
    from scripts.simulate_prefetch import main as simulate

    out = tmp_path / "ck"
    proc = train(capsys, random_routing, out, "--routing-only", "--epochs", "2", "--lr", "3e-3")
    assert proc.returncode == 0, proc.stderr
    ckpt = out / "best_checkpoint.pth"
    cfg = json.loads(ckpt.with_suffix(".json").read_text())["config"]
    assert (cfg["kind"], cfg["routing_only"], cfg["input_dim"], cfg["own_layers"], cfg["window"]) == (
        "hybrid", True, 0, 1, 1)

    proc, res = coverage(capsys, ckpt, tmp_path)
    assert "hybrid predictor" in proc.stdout and f"recall@{K}" in proc.stdout
    assert 0 <= res[f"recall@{K}"] <= 1 and res["lookahead"] == 1 and res[f"recall@{E}"] == 1.0
    # every layer l with l + 1 < L is an input layer, though none has a stored hidden state: L - 1 rows per test token
    assert res["tokens"] == tokens_of_test_split(random_routing, ckpt) * (L - 1)

    sim = tmp_path / "sim"
    proc = run_main(capsys, "simulate_prefetch", simulate, "--traces", random_routing, "--policies",
                    f"on-demand,prefetch:{ckpt}", "--cache-experts", "4", "--fetch-budget", "2", "--output-dir", sim)
    assert proc.returncode == 0, proc.stderr
    rows = {r["policy"]: r for r in json.loads((sim / "prefetch.json").read_text())["rows"]}
    assert set(rows) == {"on-demand", f"prefetch:{ckpt}"}
    assert rows[f"prefetch:{ckpt}"]["label"].startswith("prefetch:hybrid-d1")
    assert rows[f"prefetch:{ckpt}"]["speculative_per_token"] > 0  # it predicted, and its experts were fetched


def test_on_routing_that_repeats_the_previous_token_the_routing_only_hybrid_learns_to_copy_it(repeating_routing,
                                                                                              tmp_path, capsys):
    """Each token uses exactly the previous token's experts, and each layer's pair is drawn independently of the other
    layers'. From the previous token's experts at the target layer a predictor can name every expert of every token
    but a sequence's first (1 in 24), where it can only guess: recall@K at most 23/24 + 1/24 x K/E = 0.969. Without
    the history it sees the target layer and this token's experts at another layer (independent of the target's):
    no better than the training split's popularity, about K/E = 0.25 on pairs drawn uniformly. 0.9 lies between."""
    out = tmp_path / "ck"
    proc = train(capsys, repeating_routing, out, "--routing-only", "--epochs", "2", "--lr", "3e-3")
    assert proc.returncode == 0, proc.stderr
    _, res = coverage(capsys, out / "best_checkpoint.pth", tmp_path)
    ceiling = (T_REPEAT - 1) / T_REPEAT + K / E / T_REPEAT
    assert res["random/recall@2"] == K / E
    assert 0.9 <= res[f"recall@{K}"] <= ceiling + 0.02, res[f"recall@{K}"]  # + 0.02: the first tokens' lucky guesses


def normal_hybrid_checkpoint(path, traces: str) -> str:
    """A hidden-reading hybrid of the imported set's routing shape (hidden size 16), with its split."""
    from collection.traces.format import TraceSet
    from collection.traces.rows import split_sequences
    from models.checkpoint import save_checkpoint
    from models.predictors import PredictorConfig, build_predictor

    cfg = PredictorConfig("hybrid", 16, E, K, L, lookahead=1, hidden_dim=8)
    save_checkpoint(path, build_predictor(cfg), cfg, split_sequences(TraceSet(traces).sequence_table(), 0),
                    {"dir": traces}, {}, {})
    return str(path)


def test_the_hidden_reading_predictors_on_imported_routing_are_refused_in_one_line_naming_the_flag(
        random_routing, tmp_path, capsys):
    from scripts.simulate_prefetch import main as simulate
    from scripts.train_simple_predictor import main as simple
    from scripts.validate_coverage_analysis import main as validate

    out = tmp_path / "ck"
    lacks = f"reads the MoE input h_l, and {random_routing} stores no hidden states (routing only)"
    refusals = [
        (train(capsys, random_routing, out), "train_hybrid_predictor: error: the hybrid predictor "
         f"{lacks}: collect with --hidden-layers all, or add --routing-only"),
        (run_main(capsys, "train_simple_predictor", simple, "--traces", random_routing, "--output", out),
         f"train_simple_predictor: error: the simple predictor {lacks}: collect with --hidden-layers all, or add "
         "--model-type hybrid --routing-only"),
        (train(capsys, random_routing, out, "--routing-only", "--model-type", "layer-aware"),
         "train_hybrid_predictor: error: --routing-only is the hybrid predictor's variant; --model-type layer-aware "
         "reads hidden states (add --model-type hybrid)"),
        (train(capsys, random_routing, out, "--routing-only", "--window", "0"),
         "train_hybrid_predictor: error: --routing-only reads this token's finished layers and the previous tokens: "
         "--own-layers and --window must be 1 or more"),
        (train(capsys, random_routing, out, "--window", "16"),  # the hybrid that reads h_l takes no window
         "train_hybrid_predictor: error: --window: read by --model-type anchored only (--own-layers and --window "
         "also by --routing-only); --model-type hybrid would ignore it"),
        (run_main(capsys, "train_simple_predictor", simple, "--traces", random_routing, "--output", out,
                  "--model-type", "layer-aware", "--depth", "3", "--no-anchor", "--routing-only"),
         "train_simple_predictor: error: --depth, --anchor: read by --model-type anchored only (--own-layers and "
         "--window also by --routing-only); --model-type layer-aware would ignore them"),
    ]
    ckpt = normal_hybrid_checkpoint(tmp_path / "normal.pth", random_routing)
    refusals += [
        (run_main(capsys, "validate_coverage_analysis", validate, "--checkpoint", ckpt, "--json", tmp_path / "c.json",
                  "--plot", tmp_path / "c.png"),
         f"validate_coverage_analysis: error: --traces {random_routing}: the hybrid predictor {lacks}; a hybrid "
         "trained with --routing-only reads none"),
        (run_main(capsys, "simulate_prefetch", simulate, "--traces", random_routing, "--policies",
                  f"on-demand,prefetch:{ckpt}", "--cache-experts", "4", "--output-dir", tmp_path / "sim"),
         f"simulate_prefetch: error: policy prefetch:{ckpt} needs the stored MoE input (hidden state) of layers 0..2; "
         f"{random_routing} lacks layers [0, 1, 2] (collect with --hidden-layers all)"),
    ]
    for proc, line in refusals:
        assert (proc.returncode, proc.stderr) == (2, line + "\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["normal.json", "normal.pth"]  # nothing else written


def test_a_routing_only_checkpoint_fits_any_hidden_size_and_a_hidden_reading_one_must_still_match(tmp_path):
    """The shape check of a checkpoint against traces (models/checkpoint.py) and against a live model
    (offload/prefetch.py): the routing-only hybrid is held to layers, experts and top-k only."""
    import types

    from models.checkpoint import check_fits_traces
    from models.predictors import PredictorConfig, config_problem
    from offload.prefetch import check_fits_model

    def traces(hidden_size: int, e: int = E):
        return types.SimpleNamespace(dir=tmp_path, manifest=types.SimpleNamespace(
            num_layers=L, num_experts=e, top_k=K, hidden_size=hidden_size,
            hidden_layers=list(range(L)) if hidden_size else []))

    only = PredictorConfig("hybrid", 0, E, K, L, lookahead=1, own_layers=2, window=3, routing_only=True)
    normal = PredictorConfig("hybrid", 16, E, K, L, lookahead=1)
    for cfg in (only, normal):
        assert config_problem(cfg) is None
    for h in (0, 16, 2048):  # imported (no hidden state), the normal checkpoint's size, another model's
        check_fits_traces(only, traces(h), "x")
        check_fits_model(only, L, E, K, h, 1, 0, "x")
    with pytest.raises(UserError, match=f"^x: routing shape {L} layers x 9 experts, top-{K} differs from the "
                                        f"checkpoint's {L} layers x {E} experts, top-{K} .it was trained"):
        check_fits_traces(only, traces(16, e=9), "x")
    check_fits_traces(normal, traces(16), "x")
    with pytest.raises(UserError, match=f"hidden 32 differs from the checkpoint's {L} layers x {E} experts, "
                                        f"top-{K}, hidden 16"):
        check_fits_traces(normal, traces(32), "x")
    with pytest.raises(UserError, match="reads the MoE input h_l, and .* stores no hidden states"):
        check_fits_traces(normal, traces(0), "x")
    with pytest.raises(UserError, match="top-2, hidden 16; this model is 4 layers x 8 experts, top-2, hidden 32"):
        check_fits_model(normal, L, E, K, 32, 1, 0, "x")

    # a config the routing-only hybrid cannot be, and a hidden size of 0 for any predictor that reads hidden states
    assert config_problem(PredictorConfig("hybrid", 0, E, K, L)) == "input_dim 0 is not an integer in 1..131072"
    assert config_problem(PredictorConfig("layer-aware", 0, E, K, L, own_layers=1, window=1, routing_only=True)) == (
        "routing_only is the hybrid's variant with own_layers and window of 1 or more (kind layer-aware, "
        "own_layers 1, window 1)")
    assert "own_layers 0, window 1" in config_problem(PredictorConfig("hybrid", 0, E, K, L, window=1,
                                                                       routing_only=True))
    assert config_problem(PredictorConfig("hybrid", 0, E, K, L, own_layers=1, window=1, routing_only=1)) == (
        "routing_only 1 is not true or false")


def routing_only_model(d: int, q: int = 2, w: int = 3):
    """A routing-only hybrid for the leakage block of tests/test_leakage.py, weights drawn at random."""
    from models.predictors import PredictorConfig, build_predictor
    from tests.test_leakage import E as LE
    from tests.test_leakage import K as LK
    from tests.test_leakage import L as LL

    torch.manual_seed(0)
    model = build_predictor(PredictorConfig("hybrid", 0, LE, LK, LL, lookahead=d, hidden_dim=32, own_layers=q,
                                            window=w, routing_only=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("d", [0, 1, 2, 3])
def test_the_routing_only_hybrid_sees_no_future_and_no_hidden_state(d):
    """tests/test_leakage.py's check (everything a causal predictor may not know scrambled: same scores); its
    features hold no MoE input, and scores from a block without hidden states equal those from one with them."""
    from dataclasses import replace

    from models.features import feature_spec, make_features
    from tests.test_leakage import E as LE
    from tests.test_leakage import check_no_leak, make_block

    model = routing_only_model(d)
    check_no_leak(model, d)
    block = make_block(0)
    tok, layer = torch.tensor([0, 14, 27, 33]), torch.tensor([0, 1, 2, 2])
    f = make_features(block, tok, layer, d, LE, feature_spec(model))
    assert f.hidden is None and f.window_hidden is None and f.own_routing is None and f.prev_token is None
    assert f.own_window.shape == (4, 2, LE) and f.window_routing.shape == (4, 3, LE)
    bare = replace(block, hidden=None, hidden_slot=torch.full_like(block.hidden_slot, -1))  # as an import loads
    assert torch.equal(model(f), model(make_features(bare, tok, layer, d, LE, feature_spec(model))))


@pytest.mark.parametrize("feature", ["own_window", "window_routing"])
def test_every_input_of_the_routing_only_hybrid_reaches_its_output(feature):
    """The leakage check means something only if each feature reaches the output: one changed, the scores change."""
    from models.features import feature_spec, make_features
    from tests.test_leakage import E as LE
    from tests.test_leakage import make_block

    model = routing_only_model(1)
    f = make_features(make_block(0), torch.tensor([27, 33]), torch.tensor([2, 3]), 1, LE, feature_spec(model))
    g = make_features(make_block(0), torch.tensor([27, 33]), torch.tensor([2, 3]), 1, LE, feature_spec(model))
    setattr(g, feature, getattr(g, feature) + 1.0)
    assert not torch.equal(model(f), model(g))


def test_compare_predictors_trains_and_scores_the_routing_only_hybrid_beside_the_routing_baselines(repeating_routing,
                                                                                                  tmp_path):
    """On the repeating routing (above): the same rows for every entry (the test split's tokens x L - 1 layers, no
    hidden state needed), the previous-token baseline exact but at a sequence's first token, the learned copy close."""
    from tests.conftest import run_script

    out = tmp_path / "cmp"
    run_script("compare_predictors", "--traces", repeating_routing, "--routing-only", "--predictors", "hybrid",
               "--baselines", "previous-token,random", "--lookaheads", "1", "--epochs", "2", "--lr", "3e-3",
               "--batch-rows", "128", "--hidden-dim", "64", "--device", "cpu", "--output", out)
    row = {r["predictor"]: r for r in json.loads((out / "comparison.json").read_text())["rows"]}
    assert set(row) == {"hybrid-routing-only", "previous-token", "random"}
    ckpt = out / "checkpoints" / "hybrid-routing-only-d1" / "best_checkpoint.pth"
    rows = tokens_of_test_split(repeating_routing, ckpt) * (L - 1)
    assert {r["rows"] for r in row.values()} == {rows}
    assert row["previous-token"][f"recall@{K}"] >= (T_REPEAT - 1) / T_REPEAT
    assert row["hybrid-routing-only"][f"recall@{K}"] >= 0.9
