"""The router-anchored predictor, its features, losses, schedule, sweep and cost scripts, with known answers.

    pytest -q tests/test_anchored.py
"""
import json
import math
import types

import numpy as np
import pytest
import torch

from collection.traces.format import TraceSet
from collection.traces.rows import (
    SplitBlocks,
    TokenBlock,
    context_mean,
    earlier_token,
    hidden_at,
    row_batches,
    split_sequences,
)
from common.errors import UserError
from models.checkpoint import check_fits_traces, load_checkpoint, save_checkpoint
from models.features import FeatureSpec, make_features
from models.predictors import PredictorConfig, build_predictor, flops_per_row
from tests.conftest import run_script
from training.trainer import distill_kl, hidden_mse, lr_lambda
from validation.coverage.evaluate import evaluate
from validation.coverage.scorers import baseline_scorer, predictor_scorer


def anchored_at_init(ts: TraceSet, d: int, **kw) -> torch.nn.Module:
    m = ts.manifest
    model = build_predictor(PredictorConfig("anchored", m.hidden_size, m.num_experts, m.top_k, m.num_layers,
                                            lookahead=d, hidden_dim=16, **kw))
    model.set_router(ts.router_weights().float())
    return model.eval()


@pytest.mark.parametrize("d", [0, 1])
def test_before_training_it_is_the_router_and_router_reuse(tiny_traces, d):
    """Zero-initialised heads: at d = 0 the layer's own router (recall 1.0), at d = 1 router reuse, row for row,
    whatever features feed the (still silent) trunk."""
    ts = TraceSet(tiny_traces)
    split = split_sequences(ts.sequence_table(), 0)
    model = anchored_at_init(ts, d, past_layers=2, own_layers=1, window=2, token_vocab=8192)
    mine = evaluate(predictor_scorer(model, d, 60), ts, split["test"], d, torch.device("cpu"), progress=False)
    theirs = evaluate(baseline_scorer("router" if d == 0 else "router-reuse", ts, d, split["train"],
                                      torch.device("cpu")), ts, split["test"], d, torch.device("cpu"), progress=False)
    assert mine.per_layer("recall@4") == theirs.per_layer("recall@4")
    if d == 0:
        assert mine.summary()["recall@4"] == 1.0
    else:
        assert mine.summary()["recall@4"] < 0.95  # router reuse is not the answer one layer ahead


@pytest.mark.parametrize("d", [0, 1])
def test_before_training_every_row_picks_the_routers_experts(tiny_traces, d):
    """Row for row, not only on average: at init the anchored predictor's top-4 of every test row is the stored
    top-4 at d = 0 (the model's own choice) and router reuse's top-4 at d = 1."""
    ts = TraceSet(tiny_traces)
    split = split_sequences(ts.sequence_table(), 0)
    model = anchored_at_init(ts, d, past_layers=1, window=1, token_vocab=8192)
    mine, reuse = predictor_scorer(model, d, 60), baseline_scorer("router-reuse", ts, d, split["train"],
                                                                  torch.device("cpu"))
    rows = 0
    for block in SplitBlocks(ts, split["test"], torch.device("cpu"), 4):
        for tok, layer in row_batches(block, list(range(8 - d)), 4096):
            got = mine(block, tok, layer).topk(4, dim=1).indices.sort(1).values
            want = (block.topk_ids[layer, tok] if d == 0 else reuse(block, tok, layer).topk(4, dim=1).indices)
            assert torch.equal(got, want.sort(1).values)
            rows += tok.shape[0]
    assert rows == 6 * 64 * (8 - d)  # every (token, layer) row of the 6 test sequences of 64 tokens


def test_set_router_refuses_another_shape():
    model = build_predictor(PredictorConfig("anchored", 16, 8, 2, 3))
    with pytest.raises(ValueError, match="router matrices"):
        model.set_router(torch.zeros(3, 8, 17))


def test_flops_count_one_trunk_and_one_layers_heads():
    """H=16, d=8, E=6, L=3, one past layer, window 1, one block: hand count of multiply-adds x 2."""
    cfg = PredictorConfig("anchored", 16, 6, 2, 3, hidden_dim=8, past_layers=1, window=1, depth=1)
    trunk = 16 * 8 + 16 * 8 + (16 * 8 + 6 * 8) + 2 * 8 * 8  # proj, past, window (hidden + routing), fc1 + fc2
    heads = 8 * 16 + 16 * 6 + 8 * 6                          # delta, router, residual logits
    assert flops_per_row(build_predictor(cfg)) == 2 * (trunk + heads)


def hand_block() -> TokenBlock:
    """5 tokens, 3 layers, H = 2, E = 4, k = 1: sequences [0, 1, 2] and [3, 4]; hidden[l, t] = (10 l + t, -1)."""
    L, N = 3, 5
    hidden = torch.tensor([[[10.0 * l + t, -1.0] for t in range(N)] for l in range(L)])
    ids = torch.tensor([[[(l + t) % 4] for t in range(N)] for l in range(L)])
    return TokenBlock(hidden=hidden, topk_ids=ids, topk_weights=torch.full((L, N, 1), 0.5),
                      prev=torch.tensor([-1, 0, 1, -1, 3]), source=torch.zeros(N, dtype=torch.long),
                      hidden_slot=torch.arange(L), token_ids=torch.tensor([7, 8, 9, 10, 11]))


def test_earlier_tokens_and_hidden_states_by_hand():
    b = hand_block()
    assert earlier_token(b, torch.tensor([2, 4, 0, 2]), 2).tolist() == [0, -1, -1, 0]
    assert earlier_token(b, torch.tensor([2]), 0).tolist() == [2]
    h = hidden_at(b, torch.tensor([2, -1, 1]), torch.tensor([1, 1, -1]))
    assert h.tolist() == [[21.0, -1.0], [0.0, 0.0], [0.0, 0.0]]


def test_context_mean_by_hand():
    """Sequences [0..3] and [4..6], one layer, hidden = row index: the mean of at most 2 earlier tokens."""
    b = TokenBlock(hidden=torch.arange(7.0).view(1, 7, 1), topk_ids=torch.zeros(1, 7, 1, dtype=torch.long),
                   topk_weights=torch.ones(1, 7, 1), prev=torch.tensor([-1, 0, 1, 2, -1, 4, 5]),
                   source=torch.zeros(7, dtype=torch.long), hidden_slot=torch.tensor([0]))
    mean = context_mean(b, torch.zeros(7, dtype=torch.long), torch.arange(7), 2)
    assert mean.squeeze(1).tolist() == [0.0, 0.0, 0.5, 1.5, 0.0, 4.0, 4.5]


def test_features_by_hand():
    """Token 2 at layer 1, d = 1 (target layer 2): past layer 0, own routing at layers 1 and 0, tokens 1 and 0
    at layer 2, its id. At d = 0 its own routing starts one layer lower."""
    b = hand_block()
    spec = FeatureSpec(past_layers=2, own_layers=2, window=3, token_id=True)
    f = make_features(b, torch.tensor([2]), torch.tensor([1]), 1, 4, spec)
    assert f.hidden.tolist() == [[12.0, -1.0]]
    assert f.past_hidden.tolist() == [[[2.0, -1.0], [0.0, 0.0]]]            # h_0 of token 2; layer -1 is zeros
    assert f.own_window[0].nonzero().tolist() == [[0, 3], [1, 2]]          # layer 1: expert 3, layer 0: expert 2
    assert f.window_hidden.tolist() == [[[21.0, -1.0], [20.0, -1.0], [0.0, 0.0]]]  # tokens 1, 0 at layer 2
    assert f.window_routing[0].nonzero().tolist() == [[0, 3], [1, 2]]      # (2+1)%4, (2+0)%4
    assert f.token_id.tolist() == [9]
    f0 = make_features(b, torch.tensor([2]), torch.tensor([1]), 0, 4, spec)
    assert f0.own_window[0].nonzero().tolist() == [[0, 2]]                 # layer 0 only; layer -1 is zeros


def test_features_decode_a_compact_hidden_format(tiny_pca_traces):
    """On a trace set whose hidden states are stored compact (pca-3.5bit codes), every hidden-state feature
    (this row's, past layers, the window, the context mean) is the decoded state, as a lossless block of the
    decoded states gives it."""
    import dataclasses

    from collection.traces.hidden_format import FORMATS, LOSSLESS

    ts = TraceSet(tiny_pca_traces)
    block = next(iter(SplitBlocks(ts, split_sequences(ts.sequence_table(), 0)["test"], torch.device("cpu"), 4)))
    assert block.hidden.dtype == torch.uint8  # codes, not states: reading them raw would be wrong
    N, L = block.tokens, ts.manifest.num_layers
    states = torch.stack([block.hidden_at(torch.full((N,), l), torch.arange(N), torch.float32) for l in range(L)])
    plain = dataclasses.replace(block, hidden=states, hidden_scale=None, hidden_format=FORMATS[LOSSLESS],
                                hidden_codec=None)
    spec = FeatureSpec(past_layers=2, own_layers=1, window=2, token_id=True, context=3)
    tok, layer = next(row_batches(block, list(range(L - 1)), 4096))
    f, g = make_features(block, tok, layer, 1, 60, spec), make_features(plain, tok, layer, 1, 60, spec)
    for name in ("hidden", "past_hidden", "window_hidden", "context", "own_window", "window_routing"):
        assert torch.allclose(getattr(f, name), getattr(g, name), atol=1e-5), name
    assert f.context.abs().sum() > 0 and f.window_hidden.abs().sum() > 0


def test_losses_by_hand():
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # p = (3/4, 1/4) against q = (1/2, 1/2)
    assert distill_kl(torch.zeros(1, 2), teacher).item() == pytest.approx(kl, rel=1e-6)
    assert distill_kl(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-7)
    assert hidden_mse(torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]])).item() == pytest.approx(0.5)


def test_warmup_then_cosine():
    f = lr_lambda(types.SimpleNamespace(warmup=0.1), 100)
    assert [f(0), f(9), f(10), f(55)] == pytest.approx([0.1, 1.0, 1.0, 0.5])
    assert f(100) == pytest.approx(0.0, abs=1e-12) and f(150) == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def trained(tiny_traces, tmp_path_factory):
    """d = 0, distillation only, every feature, the questions domain left out of train and val."""
    out = tmp_path_factory.mktemp("anchored")
    run_script("train_anchored_predictor", "--traces", tiny_traces, "--lookahead", "0", "--epochs", "1",
               "--hidden-dim", "16", "--batch-rows", "2048", "--loss-ce", "0", "--loss-kl", "1",
               "--exclude-sources", "questions", "--no-layer-fallback", "--output", out)
    return out


@pytest.fixture(scope="module")
def fell_back(tiny_traces, tmp_path_factory):
    """d = 1, one short epoch of cross-entropy at a high learning rate: some layers end below router reuse."""
    out = tmp_path_factory.mktemp("fallback")
    run_script("train_anchored_predictor", "--traces", tiny_traces, "--lookahead", "1", "--epochs", "1",
               "--hidden-dim", "16", "--batch-rows", "1024", "--lr", "3e-2", "--loss-kl", "0", "--output", out)
    return out


def test_fallback_layers_are_router_reuse_exactly(fell_back, tiny_traces):
    """Every target layer where router reuse validated better is reset to it: zero heads, the same per-layer
    test recall as the router-reuse baseline; validation recall does not drop."""
    model, cfg, ckpt = load_checkpoint(fell_back / "best_checkpoint.pth")
    metrics = ckpt["metrics"]
    reset = metrics["fallback_layers"]
    assert reset, "the setup should leave at least one layer below router reuse"
    assert metrics["val"]["recall@4"] >= metrics["val_before_fallback"]["recall@4"]
    for t in reset:
        assert not model.delta_w[t].any() and not model.res_w[t].any() and not model.delta_b[t].any()
    kept = [t for t in range(1, 8) if t not in reset]
    assert kept and all(model.delta_w[t].any() for t in kept)
    ts = TraceSet(tiny_traces)
    test = ckpt["split"]["test"].numpy()
    mine = evaluate(predictor_scorer(model, 1, 60), ts, test, 1, torch.device("cpu"), progress=False)
    theirs = evaluate(baseline_scorer("router-reuse", ts, 1, ckpt["split"]["train"].numpy(), torch.device("cpu")),
                      ts, test, 1, torch.device("cpu"), progress=False)
    for t in reset:
        assert mine.per_layer("recall@4")[t] == theirs.per_layer("recall@4")[t]


def test_checkpoint_rebuilds_alone_with_its_router(trained, tiny_traces, tmp_path):
    moved = tmp_path / "elsewhere.pth"
    moved.write_bytes((trained / "best_checkpoint.pth").read_bytes())
    model, cfg, ckpt = load_checkpoint(moved)
    ts = TraceSet(tiny_traces)
    assert torch.equal(model.router.detach(), ts.router_weights().float())  # frozen, and inside the checkpoint
    assert cfg.token_vocab == 8192 and cfg.window == 2 and cfg.past_layers == 2  # the kind's default recipe
    check_fits_traces(cfg, ts, "here")
    for field, value in (("num_experts", 59), ("num_layers", 7), ("input_dim", 64)):
        bad = PredictorConfig(**{**cfg.to_json(), field: value})
        with pytest.raises(UserError, match="routing shape .* differs from the checkpoint's"):
            check_fits_traces(bad, ts, "here")
    with pytest.raises(UserError, match="outside the predictor's table"):
        check_fits_traces(PredictorConfig(**{**cfg.to_json(), "token_vocab": 5}), ts, "here")


def test_hidden_layers_the_features_read_must_be_stored(trained, tiny_traces, tmp_path):
    """A trace set without the hidden states of other layers cannot feed past layers / the window: one line."""
    import shutil

    partial = tmp_path / "traces"
    shutil.copytree(tiny_traces, partial)
    man = json.loads((partial / "manifest.json").read_text())
    man["capture"]["hidden_layers"] = list(range(7))  # the last layer's MoE input not stored
    (partial / "manifest.json").write_text(json.dumps(man))
    _, cfg, _ = load_checkpoint(trained / "best_checkpoint.pth")
    with pytest.raises(UserError, match="stores only layers"):
        check_fits_traces(cfg, TraceSet(partial), "here")


@pytest.fixture(scope="module")
def other_shape(tmp_path_factory):
    """An anchored checkpoint of a 3-layer model with hidden size 32: not the tiny traces' 8 layers x 128."""
    cfg = PredictorConfig("anchored", 32, 60, 4, 3, lookahead=1, hidden_dim=8, window=1)
    path = tmp_path_factory.mktemp("other") / "best_checkpoint.pth"
    torch.manual_seed(0)
    save_checkpoint(path, build_predictor(cfg), cfg, {"test": np.arange(3)}, {"dir": "elsewhere"}, {}, {})
    return path


@pytest.mark.parametrize("script,argv", [
    ("validate_coverage_analysis", ["--checkpoint", "CKPT", "--model-type", "anchored"]),
    ("simulate_prefetch", ["--policies", "on-demand,prefetch:CKPT", "--cache-experts", "8"]),
])
def test_checkpoint_of_other_traces_is_refused_in_one_line(script, argv, other_shape, tiny_traces, tmp_path):
    """Every consumer of a checkpoint refuses traces of another routing shape: exit 2, one line, nothing written."""
    out = tmp_path / "out"
    argv = [a.replace("CKPT", str(other_shape)) for a in argv]
    proc = run_script(script, *argv, "--traces", tiny_traces, "--output-dir", out, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"{script}: error:")
    assert proc.stderr.strip().count("\n") == 0
    assert "routing shape 8 layers x 60 experts, top-4, hidden 128 differs from the checkpoint's 3 layers" in proc.stderr
    assert not out.exists()


def test_prefetch_simulator_replays_anchored_checkpoints(fell_back, tiny_traces, tmp_path):
    """`simulate_prefetch --policies prefetch:<checkpoint>` with anchored checkpoints: one at init replays exactly
    as router reuse (same predictions, hence the same hits, misses and bytes), a trained one replays too."""
    from scripts.simulate_prefetch import main

    ts = TraceSet(tiny_traces)
    m = ts.manifest
    model = anchored_at_init(ts, 1, past_layers=1, own_layers=1, window=2, token_vocab=8192, context=3)
    init = tmp_path / "init" / "best_checkpoint.pth"
    save_checkpoint(init, model, model.cfg, split_sequences(ts.sequence_table(), 0), {"dir": str(tiny_traces)}, {}, {})
    trained = fell_back / "best_checkpoint.pth"
    js = tmp_path / "sim.json"
    main(["--traces", str(tiny_traces), "--policies", f"on-demand,prefetch:router-reuse,prefetch:{init},"
          f"prefetch:{trained}", "--cache-experts", "8", "--predictor-ms", "0", "--json", str(js),
          "--plot", str(tmp_path / "sim.png")])
    rows = {r["policy"]: r for r in json.loads(js.read_text())["rows"]}
    reuse, at_init, learned = rows["prefetch:router-reuse"], rows[f"prefetch:{init}"], rows[f"prefetch:{trained}"]
    assert at_init["label"].startswith("prefetch:anchored-d1")
    same = {k: v for k, v in reuse.items() if k not in ("policy", "label", "sim_steps_per_cpu_s")}
    assert {k: at_init[k] for k in same} == same
    assert reuse["hit_rate"] > rows["on-demand"]["hit_rate"]
    assert 0 < learned["hit_rate"] <= 1 and learned["tokens"] == reuse["tokens"] == 6 * 64 and m.num_layers == 8


def test_distillation_keeps_d0_at_the_router(trained, tiny_traces):
    """The capacity control: trained toward the router's own distribution, d = 0 stays (almost) exact."""
    model, cfg, ckpt = load_checkpoint(trained / "best_checkpoint.pth")
    ts = TraceSet(tiny_traces)
    acc = evaluate(predictor_scorer(model, 0, 60), ts, ckpt["split"]["test"].numpy(), 0, torch.device("cpu"),
                   progress=False)
    assert acc.summary()["recall@4"] >= 0.99


def test_left_out_domain_is_not_trained_on(trained, tiny_traces):
    ckpt = torch.load(trained / "best_checkpoint.pth", weights_only=True)
    table = TraceSet(tiny_traces).sequence_table()
    src = dict(zip(table["seq_id"].tolist(), table["source"].tolist()))
    questions = 5  # sources in manifest order: encyclopedia, fiction, movie_reviews, news, product_reviews, questions
    assert all(src[s] != questions for s in ckpt["split"]["train"].tolist() + ckpt["split"]["val"].tolist())
    assert any(src[s] == questions for s in ckpt["split"]["test"].tolist())
    assert ckpt["args"]["exclude_sources"] == "questions"


def test_unknown_left_out_domain_is_one_line(tiny_traces, tmp_path):
    proc = run_script("train_anchored_predictor", "--traces", tiny_traces, "--exclude-sources", "poetry",
                      "--output", tmp_path, check=False)
    assert proc.returncode == 2 and "poetry not in the traces" in proc.stderr


def test_sweep_scores_configs_and_survives_a_failing_one(tiny_traces, tmp_path):
    out = tmp_path / "sweep"
    proc = run_script("sweep_predictors", "--traces", tiny_traces, "--configs", "anchor", "--extra",
                      "broken=--window -1", "--lookaheads", "1", "--epochs", "1", "--hidden-dim", "16",
                      "--batch-rows", "2048", "--jobs", "2", "--output", out, "--best-dir", out / "best")
    assert "What mattered" in proc.stdout and "1 failed" in proc.stdout
    # the best (here the only working) config's checkpoint is copied for the prefetch simulator
    best = json.loads((out / "best" / "best_d1" / "best.json").read_text())
    assert best["config"] == "anchor" and load_checkpoint(out / "best" / "best_d1" / "best_checkpoint.pth")[1].window == 0
    res = json.loads((out / "sweep.json").read_text())
    rows = {r["config"]: r for r in res["rows"]}
    assert "error" in rows["broken"] and "--window must be 0 or more" in rows["broken"]["error"]
    assert 0.0 < rows["anchor"]["recall@4"] <= 1.0 and len(rows["anchor"]["per_layer"]) == 8
    assert res["per_layer"]["1"]["config"] == "anchor"
    reuse = res["router_reuse"]["1"]["recall@4"]
    md = (out / "sweep.md").read_text()
    assert f"| router reuse | training-free (the router itself at d = 0) | | {reuse:.4f} |" in md
    assert f"| 1 | anchor | {rows['anchor']['recall@4']:.4f} | {reuse:.4f} |" in md  # best per lookahead


def test_cost_benchmark_reports_flops_and_times(tmp_path):
    from tools.benchmark_predictor_cost import main

    js = tmp_path / "cost.json"
    main(["--dims", "embedded", "--kinds", "anchored,hybrid", "--batches", "1,4", "--iters", "1", "--repeats", "1",
          "--warmup", "0", "--hidden-dim", "32", "--anchored-depths", "2", "--device", "cpu", "--json", str(js)])
    rows = json.loads(js.read_text())["rows"]
    assert [(r["kind"], r["batch"]) for r in rows] == [("anchored depth 2", 1), ("anchored depth 2", 4),
                                                       ("hybrid", 1), ("hybrid", 4)]
    anchored = rows[0]
    assert anchored["eager_us_per_call"] > 0 and anchored["eager_us_per_token"] == anchored["eager_us_per_call"]
    assert rows[1]["eager_us_per_token"] == pytest.approx(rows[1]["eager_us_per_call"] / 4)
    assert anchored["router_parameters"] == 8 * 60 * 128 and anchored["token_table_parameters"] == 8192 * 64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cost_benchmark_graph_replay_matches_eager_on_gpu():
    """The CUDA-graph path times the same computation: its replayed output equals the eager one."""
    from tools.benchmark_predictor_cost import as_graph, predictor_config, random_features

    dev = torch.device("cuda")
    cfg = predictor_config("anchored", "embedded", 64)
    model = build_predictor(cfg).to(dev, torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    f = random_features(model, cfg, 8, 3, dev, torch.bfloat16)
    out = {}
    with torch.inference_mode():
        eager = model.predict_layer(f, 3)[0].clone()
        replay = as_graph(lambda: out.__setitem__("y", model.predict_layer(f, 3)[0]))  # last set: the capture
        replay()
    assert torch.equal(out["y"], eager)


def test_an_undone_warm_up_step_leaves_weights_optimiser_and_rng_as_they_were():
    """The trainer's warm-up step (kernels loaded before the first epoch is timed) changes nothing the run sees."""
    from training.trainer import undone

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)

    def step():
        opt.zero_grad(set_to_none=True)
        model(torch.randn(16, 4)).square().mean().backward()
        opt.step()

    step()  # the optimiser has state (moments, step count) to disturb
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    undone(step, model, opt, torch.device("cpu"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters()))
    assert all(float(opt.state[p]["step"]) == 1 for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
