"""Retraining the embedded default: the report's routing-target numbers and verdict (tools/train_proxy_moe.py),
bringing the chosen model back in pieces (tools/retrain_bundle.py), and the GPU script's arguments."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from common.errors import UserError
from tests.conftest import REPO
from tools.retrain_bundle import MANIFEST, choose, pack, unpack
from tools.train_proxy_moe import locality_loss, routing_report, verdict

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
TEXTS = ["The cat sat on the mat and looked at the door.", "Stocks fell sharply on Monday.",
         "A short one", "Another sentence about the weather, which was cold and grey all week long."]


def test_report_previous_token_recall_is_counted_within_each_sequence(tiny_model):
    """The batched, padded capture of the report gives, per layer, the overlap of consecutive tokens' experts
    that one unpadded forward per text gives, counted here with sets (no pair across two texts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    K = model.config.num_experts_per_tok
    rep = routing_report(model, tok, TEXTS, torch.device("cpu"), 64)
    L = len(rep["previous_token_recall"])
    shared, pairs = [0] * L, 0
    for text in TEXTS:
        ids = tok(text, truncation=True, max_length=64, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids, output_router_logits=True).router_logits  # L x (T, E)
        top = [[set(row.tolist()) for row in lg.topk(K, -1).indices] for lg in logits]
        pairs += ids.shape[1] - 1
        for l in range(L):
            shared[l] += sum(len(top[l][t] & top[l][t - 1]) for t in range(1, ids.shape[1]))
    assert rep["previous_token_recall"] == pytest.approx([s / (pairs * K) for s in shared])
    assert rep["previous_token_recall_mean"] == pytest.approx(sum(shared) / (pairs * K * L))
    assert rep["least_used_share"] == pytest.approx(min(rep["min_share"]))


def test_locality_loss_pulls_toward_the_previous_tokens_experts_within_each_window():
    # two windows of two tokens (a, b) and (c, d); E = 3, K = 1. Layer 0: tops a:0, b:1, c:1, d:1 (b -> c would
    # match, but c starts a window). Layer 1: every token's top is expert 2.
    e = math.e
    layer0 = torch.tensor([[2.0, 0, 0], [0, 1, 0], [0, 3, 0], [0, 2, 0]])
    layer1 = torch.tensor([[0, 0, 5.0]] * 4)
    loss, recall = locality_loss((layer0, layer1), batch=2, top_k=1)
    # layer 0: -log p_b(0) and -log p_d(1); layer 1: -log p(2) twice
    by_hand0 = (math.log(2 + e) + math.log(2 + e ** 2) - 2) / 2
    by_hand1 = math.log(2 + e ** 5) - 5
    assert loss.item() == pytest.approx((by_hand0 + by_hand1) / 2, rel=1e-5)
    assert recall.tolist() == pytest.approx([0.5, 1.0])


def test_locality_weight_follows_its_target(tmp_path):
    """Below the target recall the weight grows every step; above it, it shrinks (the batch's recall is read on
    the device, the weight logged at every step here)."""
    from tools.train_proxy_moe import main

    weights = {}
    for target in (0.99, 0.01):
        out = tmp_path / f"t{target}"
        main(["--steps", "3", "--warmup", "1", "--batch-size", "2", "--seq-len", "32", "--eval-every", "1",
              "--vocab-size", "512", "--report-sequences", "4", "--max-texts", "60", "--device", "cpu",
              "--locality-coef", "0.5", "--locality-target", str(target), "--locality-gain", "0.01", "--output", str(out)])
        weights[target] = [h["locality_weight"] for h in json.loads((out / "training_report.json").read_text())["history"]]
    assert len(weights[0.99]) == 3 and all(b > a for a, b in zip([0.5] + weights[0.99], weights[0.99]))
    assert all(b < a for a, b in zip([0.5] + weights[0.01], weights[0.01])) and weights[0.01][-1] > 1e-3  # not clamped


def routing(recall: float, least: float) -> dict:
    return {"previous_token_recall_mean": recall, "least_used_share": least}


def test_verdict_is_the_target_at_its_edges():
    assert verdict(70.3, routing(0.30, 0.002))["meets_target"]          # every edge is inside
    assert verdict(60.0, routing(0.45, 0.01))["meets_target"]
    low = verdict(60.0, routing(0.299, 0.01))
    assert not low["meets_target"] and not low["recall"] and low["perplexity"] and low["no_dead_expert"]
    assert not verdict(60.0, routing(0.451, 0.01))["recall"]
    assert not verdict(60.0, routing(0.35, 0.0019))["no_dead_expert"]
    v = verdict(70.4, routing(0.35, 0.01))
    assert not v["perplexity"] and v["line"].startswith("MISSES TARGET") and "perplexity 70.4" in v["line"]


def variant(path, **checks):
    path.mkdir()
    checks = {"recall": True, "no_dead_expert": True, "perplexity": True, **checks}
    (path / "training_report.json").write_text(json.dumps({"verdict": {"meets_target": all(checks.values()),
                                                                       **checks, "line": "x"}}))
    return path


def test_choose_takes_the_first_that_meets_the_target_else_the_closest(tmp_path):
    a = variant(tmp_path / "a", recall=False)
    b = variant(tmp_path / "b")
    c = variant(tmp_path / "c")
    failed = tmp_path / "failed"  # a run that left no report
    assert choose([failed, a, b, c]) == (2, True)
    assert choose([c, b]) == (0, True)
    d = variant(tmp_path / "d", recall=False, perplexity=False)
    e = variant(tmp_path / "e", perplexity=False)
    assert choose([d, a, e]) == (1, False)  # one missed check each for a and e: the earlier
    with pytest.raises(UserError, match="no variant left"):
        choose([failed])


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "qwen2_moe"}')
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 400)  # 102,400 bytes
    (d / "tokenizer.json").write_text("{}")
    return d


def test_pack_cuts_pieces_and_unpack_restores_every_byte(model_dir, tmp_path):
    m = pack(model_dir, tmp_path / "out", piece_bytes=40_000)
    sizes = [p["bytes"] for p in m["pieces"]]
    assert len(sizes) == 3 and max(sizes) <= 40_000 and sizes[:2] == [40_000, 40_000]  # ~104 kB of tar
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MANIFEST, "model.tar.000", "model.tar.001",
                                                                    "model.tar.002"]
    dest = tmp_path / "copy"
    assert unpack(tmp_path / "out", dest, overwrite=False) == ["config.json", "model.safetensors", "tokenizer.json"]
    for f in model_dir.iterdir():
        assert (dest / f.name).read_bytes() == f.read_bytes()
    with pytest.raises(UserError, match="exists"):
        unpack(tmp_path / "out", dest, overwrite=False)
    (model_dir / "model.safetensors").write_bytes(b"new")
    pack(model_dir, tmp_path / "out2", piece_bytes=40_000)
    unpack(tmp_path / "out2", dest, overwrite=True)
    assert (dest / "model.safetensors").read_bytes() == b"new" and not (dest.parent / "copy.old").exists()


def test_unpack_refuses_a_corrupted_or_missing_piece_and_leaves_dest_alone(model_dir, tmp_path):
    pack(model_dir, tmp_path / "out", piece_bytes=40_000)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "config.json").write_text("old")
    piece = tmp_path / "out" / "model.tar.001"
    data = bytearray(piece.read_bytes())
    data[100] ^= 1
    piece.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"model\.tar\.001: SHA-256 differs"):  # the piece, before the tar is read
        unpack(tmp_path / "out", dest, overwrite=True)
    piece.unlink()
    with pytest.raises(UserError, match="missing"):
        unpack(tmp_path / "out", dest, overwrite=True)
    assert (dest / "config.json").read_text() == "old"
    not_a_model = tmp_path / "docs"
    not_a_model.mkdir()
    with pytest.raises(UserError, match="not a model folder"):
        unpack(tmp_path / "out", not_a_model, overwrite=True)


def test_unpack_refuses_a_manifest_naming_files_outside_its_folder(model_dir, tmp_path):
    pack(model_dir, tmp_path / "out", piece_bytes=40_000)
    m = json.loads((tmp_path / "out" / MANIFEST).read_text())
    m["files"][0]["name"] = "../config.json"
    (tmp_path / "out" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(UserError, match="outside its folder"):
        unpack(tmp_path / "out", tmp_path / "dest", overwrite=False)


@pytest.mark.parametrize("flags, message", [
    (["--locality-target", "0.3"], "starting --locality-coef"),
    (["--locality-coef", "1", "--locality-target", "1.5"], "0 < R < 1"),
    (["--locality-coef", "1", "--locality-max", "0"], "--locality-max"),
    (["--locality-coef", "1", "--locality-min", "2", "--locality-max", "1"], "--locality-min <= --locality-max"),
    (["--init-from", "no/such/model"], "no saved model there"),
])
def test_bad_retraining_flags_are_one_line_errors(tmp_path, flags, message):
    from tools.train_proxy_moe import main

    with pytest.raises(UserError, match=message):
        main([*flags, "--output", str(tmp_path / "m"), "--device", "cpu"])
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_the_retraining_script_runs_tiny_on_the_cpu_and_its_model_unpacks(tmp_path):
    """RETRAIN_SMOKE=1: the four variants, tiny, on the CPU (about a minute): none meets the target (exit 3), the
    closest is packed with every report, and the pieces unpack to a loadable model folder."""
    env = {**os.environ, "RETRAIN_SMOKE": "1", "PYTHON": sys.executable, "WORK": str(tmp_path / "work"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "tools/gpu/retrain_default.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "model.manifest.json", "model.tar.000", "model.tar.001", "retrain.log", "variants.tar.gz"]
    assert "chosen: " in (tmp_path / "out" / "retrain.log").read_text()
    unpack(tmp_path / "out", tmp_path / "model", overwrite=False)
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "model" / "model.safetensors").is_file()
