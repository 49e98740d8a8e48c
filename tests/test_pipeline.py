"""The three stages end to end on the tiny model, as a user runs them, and the sanity controls."""
import json

import numpy as np
import pytest
import torch

from collection.traces.format import TraceSet
from tests.conftest import run_script
from tests.handmade import baselines_by_hand


@pytest.fixture(scope="module")
def trained(tiny_traces, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    run_script("train_simple_predictor", "--traces", tiny_traces, "--epochs", "2", "--batch-rows", "2048",
               "--lr", "1e-3", "--output", out)
    return out


def test_training_writes_safe_checkpoints_with_split_and_metrics(trained, tiny_traces):
    for name in ("best_checkpoint.pth", "latest_checkpoint.pth"):
        ckpt = torch.load(trained / name, weights_only=True)  # no pickle of custom classes inside
        assert ckpt["config"]["kind"] == "simple" and ckpt["config"]["input_dim"] == 128  # the embedded default
        split = {k: set(v.tolist()) for k, v in ckpt["split"].items()}
        assert not (split["train"] & split["test"]) and not (split["val"] & split["test"])
        assert len(split["train"] | split["val"] | split["test"]) == 72
        assert ckpt["args"]["lr"] == 1e-3 and len(ckpt["metrics"]["history"]) >= 1
    side = json.loads((trained / "best_checkpoint.json").read_text())
    assert side["split_sizes"]["test"] >= 6  # 10% of 12 per source, at least 1 per source


def test_validation_json_table_and_plot(trained, tiny_traces, tmp_path):
    js, png = tmp_path / "m.json", tmp_path / "m.png"
    proc = run_script("validate_coverage_analysis", "--checkpoint", trained / "best_checkpoint.pth",
                      "--model-type", "simple", "--batch-size", "16", "--json", js, "--plot", png)
    assert "coverage@k" in proc.stdout and "smallest k with coverage >= 90%" in proc.stdout
    res = json.loads(js.read_text())
    for key in ("recall@4", "coverage@10", "any_hit@1", "any_hit@5", "avg_found@30", "exact_match", "tokens"):
        assert key in res
    assert res["model_type"] == "simple" and res["lookahead"] == 0
    ckpt = torch.load(trained / "best_checkpoint.pth", weights_only=True)
    table = TraceSet(tiny_traces).sequence_table()
    test_tokens = int(table["length"][np.isin(table["seq_id"], ckpt["split"]["test"].numpy())].sum())
    assert res["tokens"] == 8 * test_tokens  # every (token, layer) row of the test split, 8 MoE layers at d = 0
    assert sum(s["tokens"] for s in res["per_source"].values()) == res["tokens"]
    assert png.stat().st_size > 10_000
    assert set(res["per_source"]) == {"encyclopedia", "fiction", "movie_reviews", "news", "product_reviews",
                                      "questions"}


def test_the_checkpoint_says_its_kind_and_a_contradicting_model_type_is_refused(trained, tmp_path, capsys):
    from common.errors import one_line_errors
    from scripts.validate_coverage_analysis import main

    ckpt, js = trained / "best_checkpoint.pth", tmp_path / "k.json"
    main(["--checkpoint", str(ckpt), "--json", str(js), "--plot", str(tmp_path / "k.png"), "--quiet", "--device", "cpu"])
    assert json.loads(js.read_text())["model_type"] == "simple"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e, one_line_errors("validate_coverage_analysis"):
        main(["--checkpoint", str(ckpt), "--model-type", "layer-aware", "--json", str(tmp_path / "x.json")])
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"validate_coverage_analysis: error: --checkpoint {ckpt} holds a simple predictor, not layer-aware; drop "
        "--model-type (the checkpoint says its kind)\n")
    with pytest.raises(SystemExit) as e, one_line_errors("validate_coverage_analysis"):
        main([])
    assert e.value.code == 2 and capsys.readouterr().err.startswith(
        "validate_coverage_analysis: error: give --checkpoint (a trained predictor) or --model-type BASELINE (router, ")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_router_control_is_exact_and_random_is_at_chance(tiny_traces, tmp_path):
    js = tmp_path / "r.json"
    run_script("validate_coverage_analysis", "--traces", tiny_traces, "--model-type", "router", "--lookahead", "0",
               "--json", js, "--plot", tmp_path / "r.png")
    res = json.loads(js.read_text())
    assert res["recall@4"] == 1.0 and res["coverage@4"] == 1.0 and res["exact_match"] == 1.0
    run_script("validate_coverage_analysis", "--traces", tiny_traces, "--model-type", "random", "--split", "train",
               "--json", js, "--plot", tmp_path / "r.png")
    res = json.loads(js.read_text())
    assert abs(res["recall@4"] - 4 / 60) < 0.01


@pytest.mark.slow
def test_baselines_at_lookahead_1_equal_a_hand_computation(tiny_traces, tmp_path):
    hand = baselines_by_hand(tiny_traces, 1)
    # router reuse must be layer l+1's router, which here predicts far better than layer l's own
    assert hand["router-reuse"] > hand["own-router"] + 0.1, hand
    for kind in ("router-reuse", "previous-token", "popularity"):
        js = tmp_path / f"{kind}.json"
        run_script("validate_coverage_analysis", "--traces", tiny_traces, "--model-type", kind, "--lookahead", "1",
                   "--json", js, "--plot", tmp_path / "x.png", "--quiet")
        res = json.loads(js.read_text())
        assert res["lookahead"] == 1 and res["tokens"] == hand["rows"]
        # float32 matmuls may order their sums differently: a near-tie at the k-th expert may flip for a row or two
        assert res["recall@4"] == pytest.approx(hand[kind], abs=1e-3 if kind == "router-reuse" else 1e-9), kind
