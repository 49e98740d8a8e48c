"""What a run tells its user beyond its result: what the traces lack and what to add, before anything is trained;
whether a trained predictor is worth prefetching with; what Ctrl-C kept and the command that goes on.

    pytest -q tests/test_guidance.py
"""
import argparse
import json
import types

import numpy as np
import pytest
import torch

from tests.handmade import write_trace_set
from tests.test_safety import run_main  # a script's main in this process, wrapped as its __main__ block wraps it
from training.checks import interrupted_note, missing_inputs, quality_warning


@pytest.fixture(scope="module")
def no_logits(tmp_path_factory):
    """A trace set as `make demo` collects it (--no-logits), with every layer's hidden state and the router
    matrices: 3 layers, 8 experts, top-2, 20 sequences of 4 tokens from two sources."""
    rng = np.random.default_rng(0)
    L, E, K, H, S, T = 3, 8, 2, 4, 20, 4
    ids = np.stack([rng.permutation(E)[:K] for _ in range(L * S * T)]).reshape(L, S * T, K)
    return write_trace_set(tmp_path_factory.mktemp("demo-like") / "t", ids, np.full(ids.shape, 0.5), [T] * S,
                           num_experts=E, hidden=rng.standard_normal((L, S * T, H)).astype(np.float32),
                           router=rng.standard_normal((L, E, H)).astype(np.float32), seq_sources=[0, 1] * (S // 2)).dir


def trainer_args(kind: str, **flags):
    from training.trainer import BASE_DEFAULTS, KIND_DEFAULTS

    recipe = {**BASE_DEFAULTS, **KIND_DEFAULTS.get(kind, {}), **flags}
    return types.SimpleNamespace(model_type=kind, lookahead=1, **recipe)


def fake_traces(tmp_path, *, logits: bool, hidden_layers: list[int], router: bool = True, layers: int = 4):
    if router:
        (tmp_path / "router_weights.safetensors").write_bytes(b"")
    manifest = types.SimpleNamespace(num_layers=layers, hidden_layers=hidden_layers, capture={"store_logits": logits})
    return types.SimpleNamespace(dir=tmp_path, manifest=manifest)


def test_each_missing_input_is_named_with_its_collection_flag_and_the_training_flags_that_do_without(tmp_path):
    everything = fake_traces(tmp_path, logits=True, hidden_layers=[0, 1, 2, 3])
    assert missing_inputs(trainer_args("anchored"), everything) == []
    assert missing_inputs(trainer_args("simple"), fake_traces(tmp_path, logits=False, hidden_layers=[1])) == []

    [logits] = missing_inputs(trainer_args("anchored"), fake_traces(tmp_path, logits=False, hidden_layers=[0, 1, 2, 3]))
    assert logits.what == (f"the anchored predictor's default recipe distils the target router's logits (--loss-kl 1), "
                           f"and {tmp_path} holds none (collected with --no-logits)")
    assert (logits.collect, logits.without) == ("collect without --no-logits", "--loss-kl 0")
    [logits] = missing_inputs(trainer_args("simple", loss_kl=0.5), fake_traces(tmp_path, logits=False,
                                                                                hidden_layers=[0]))
    assert logits.what.startswith("this run distils the target router's logits (--loss-kl 0.5)")

    [layers] = missing_inputs(trainer_args("anchored", loss_kl=0.0), fake_traces(tmp_path, logits=True,
                                                                                  hidden_layers=[0, 2]))
    assert layers.what.endswith(f"(--past-layers 2, --window 2, --context 0), and {tmp_path} stores layers [0, 2] only")
    assert (layers.collect, layers.without) == ("collect with --hidden-layers all",
                                                "--past-layers 0 --window 0 --context 0")
    assert missing_inputs(trainer_args("anchored", loss_kl=0.0, past_layers=0, window=0),
                          fake_traces(tmp_path, logits=True, hidden_layers=[0, 2])) == []

    bare = tmp_path / "legacy"
    bare.mkdir()
    [router] = missing_inputs(trainer_args("anchored", loss_kl=0.0),
                              fake_traces(bare, logits=True, hidden_layers=[0, 1, 2, 3], router=False))
    assert "starts from the model's router matrices" in router.what and router.without is None


def test_the_anchored_trainer_on_demo_traces_says_what_to_add_and_writes_nothing(no_logits, tmp_path, capsys):
    from scripts.train_anchored_predictor import main

    out = tmp_path / "ck"
    proc = run_main(capsys, "train_anchored_predictor", main, "--traces", no_logits, "--output", out, "--device", "cpu")
    assert proc.returncode == 2 and proc.stderr == (
        f"train_anchored_predictor: error: the anchored predictor's default recipe distils the target router's logits "
        f"(--loss-kl 1), and {no_logits} holds none (collected with --no-logits): collect without --no-logits, or "
        "add --loss-kl 0\n")
    assert not out.exists()


def test_compare_predictors_checks_every_predictor_before_training_any(no_logits, tmp_path, capsys):
    from scripts.compare_predictors import main

    out = tmp_path / "cmp"
    proc = run_main(capsys, "compare_predictors", main, "--traces", no_logits, "--predictors", "simple,hybrid,anchored",
                    "--lookaheads", "0,1", "--epochs", "1", "--output", out, "--device", "cpu")
    assert proc.returncode == 2 and proc.stderr == (
        f"compare_predictors: error: --predictors anchored (d = 0): the anchored predictor's default recipe distils the "
        f"target router's logits (--loss-kl 1), and {no_logits} holds none (collected with --no-logits): collect "
        "without --no-logits, or compare without it: --predictors simple,hybrid\n")
    assert not out.exists()  # nothing trained, not even the simple predictor listed first


def test_a_result_near_random_or_below_router_reuse_is_warned():
    # K / E = 4 / 60 = 0.0667: 0.1166 is within 0.05 of it, 0.1167 is not
    assert quality_warning(0.09, 4, 60, 1, None) == (
        "warning: best validation recall@4 0.0900 is within 0.05 of random (0.0667): the predictor learned next to "
        "nothing; try another --lr (1e-3 suits most predictors) or more --epochs")
    assert quality_warning(0.1166, 4, 60, 0, None).startswith("warning: best validation recall@4 0.1166 is within")
    assert quality_warning(0.1167, 4, 60, 0, None) is None
    assert quality_warning(0.62, 4, 60, 2, 0.6106) is None
    assert quality_warning(0.60, 4, 60, 2, 0.6106) == (
        "warning: best validation recall@4 0.6000 is below router reuse's 0.6106 at lookahead 2 (layer l+2's router "
        "on h_l, no training): prefetch with router reuse instead, or train longer / with another --lr")


def test_router_reuse_recall_is_the_baselines(tiny_traces):
    from collection.traces.format import TraceSet
    from collection.traces.rows import SplitBlocks, split_sequences
    from tests.handmade import baselines_by_hand
    from validation.coverage.evaluate import router_reuse_recall

    ts = TraceSet(tiny_traces)
    test = split_sequences(ts.sequence_table(), 0)["test"]
    cpu = torch.device("cpu")
    recall = router_reuse_recall(ts, test, 1, cpu, SplitBlocks(ts, test, cpu, 4))
    assert recall == pytest.approx(baselines_by_hand(tiny_traces, 1)["router-reuse"], abs=1e-3)
    assert router_reuse_recall(ts, test, 0, cpu, SplitBlocks(ts, test, cpu, 4)) is None  # d = 0: the router itself


def test_a_trainer_that_learned_nothing_says_so(tiny_traces, tmp_path, capsys):
    from scripts.train_simple_predictor import main

    proc = run_main(capsys, "train_simple_predictor", main, "--traces", tiny_traces, "--lookahead", "1",
                    "--model-type", "layer-aware", "--lr", "1e-9", "--epochs", "1", "--batch-rows", "4096",
                    "--output", tmp_path / "ck", "--device", "cpu")
    assert proc.returncode == 0
    res = json.loads((tmp_path / "ck" / "results.json").read_text())
    assert 0 < res["val_router_reuse"] <= 1 and f"recall@4 {res['val_router_reuse']:.4f}" in proc.stdout
    [warning] = [l for l in proc.stderr.splitlines() if l.startswith("warning:")]
    assert warning.startswith("warning: best validation recall@4") and "within 0.05 of random (0.0667)" in warning


def test_ctrl_c_in_training_names_what_was_kept(tiny_traces, tmp_path, capsys):
    from training.trainer import add_training_args, run_training
    from validation.coverage.evaluate import epoch_validation

    calls = []

    def validate_then_interrupt(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return epoch_validation(*a)
    p = argparse.ArgumentParser()
    add_training_args(p, kind="simple", shards_per_group=4, batch_size=8, lr=1e-3, epochs=3, lookahead=0, output="")
    out = tmp_path / "ck"
    args = p.parse_args(["--traces", str(tiny_traces), "--batch-rows", "4096", "--output", str(out), "--device", "cpu"])
    with pytest.raises(KeyboardInterrupt) as e:
        run_training(args, validate=validate_then_interrupt)
    best = json.loads((out / "best_checkpoint.json").read_text())["metrics"]["best"]["recall@4"]
    assert str(e.value) == (f"kept {out}/latest_checkpoint.pth (epoch 1) and best_checkpoint.pth (epoch 1, val "
                            f"recall@4 {best:.4f}); training has no --resume: rerun the same command with --overwrite "
                            "to start again")
    assert interrupted_note(out, None, None) == "no epoch had finished: nothing was kept"


def test_ctrl_c_in_collection_names_the_resume_command(tmp_path, capsys, monkeypatch):
    import scripts.collect_traces as ct

    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(ct, "collect", interrupted)
    proc = run_main(capsys, "collect_traces", ct.main, "--target_traces", "12", "--output", tmp_path / "t x",
                    "--overwrite")
    assert proc.returncode == 130 and proc.stderr.splitlines()[-1] == (
        f"collect_traces: interrupted; continue with: python scripts/collect_traces.py --target_traces 12 "
        f"--output '{tmp_path}/t x' --resume")
    assert ct.resume_command(["--ov", "--resume"]) == "python scripts/collect_traces.py --resume"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert ct.resume_command(["--output", "o"]) == ("torchrun --nproc_per_node 2 scripts/collect_traces.py --output o "
                                                    "--resume")
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert ct.resume_command(["--output", "o"]) == ("the same torchrun command (its --nnodes and --rdzv flags) with "
                                                    "scripts/collect_traces.py --output o --resume")


def test_a_window_predictor_is_warned_against_a_random_ranking_not_router_reuse():
    from training.checks import window_quality_warning

    assert "random ranking" in window_quality_warning(0.46, 0.43)  # 0.03 above random: under the 0.05 margin
    assert window_quality_warning(0.50, 0.43) is None
