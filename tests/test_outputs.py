"""A newcomer is told what a run will cost before it starts, speeds read as numbers, and where outputs land.

    pytest -q tests/test_outputs.py
"""
import json

import torch

from collection import plan
from tests.conftest import run_script
from training.trainer import rate


def test_rates_read_as_people_read_them():
    assert rate(13_200) == "13.2k"  # the trainer printed "0.01M rows/s" for this
    assert rate(2_500_000) == "2.50M"
    assert rate(950) == "950"


def test_a_long_cpu_collection_is_announced_with_a_warning(capsys, monkeypatch):
    monkeypatch.setattr(plan, "PAUSE_S", 0)
    # 2,400 sequences of ~200 tokens at 500 tokens/s: 16 minutes
    seconds = plan.announce(2400, 480_000, int(2.4 * 2**30), 500.0, torch.device("cpu"), "QUICK", interactive=True)
    out = capsys.readouterr().out
    assert seconds == 960
    assert "plan: 2,400 sequences, 480,000 tokens, 2.40 GiB to write; about 16 min on cpu" in out
    assert "warning: this is a large collection for a CPU" in out and "    QUICK" in out and "Ctrl-C" in out


def test_a_large_cpu_collection_is_warned_even_when_quick(capsys):
    plan.announce(2400, 480_000, int(2.4 * 2**30), 1e6, torch.device("cpu"), "QUICK", interactive=False)  # 0.5 s
    assert "warning: this is a large collection for a CPU" in capsys.readouterr().out


def test_non_interactive_runs_are_warned_but_never_paused(capsys, monkeypatch):
    pauses = []
    monkeypatch.setattr(plan.time, "sleep", pauses.append)
    plan.announce(2400, 480_000, 2**30, 500.0, torch.device("cpu"), "QUICK", interactive=False)
    out = capsys.readouterr().out
    assert "warning:" in out and "Ctrl-C" not in out and pauses == []
    plan.announce(2400, 480_000, 2**30, 500.0, torch.device("cpu"), "QUICK", interactive=True)
    assert pauses == [plan.PAUSE_S]  # a terminal's run pauses, for contrast


def test_short_or_gpu_collections_get_the_plan_only(capsys):
    plan.announce(120, 15_000, 2**26, 1000.0, torch.device("cpu"), "QUICK", interactive=True)  # 15 s, 64 MiB
    plan.announce(2400, 480_000, 2**31, 500.0, torch.device("cuda", 0), "QUICK", interactive=True)
    out = capsys.readouterr().out
    assert out.count("plan:") == 2 and "warning" not in out


def test_collect_prints_its_plan_and_where_it_wrote(tmp_path):
    out = tmp_path / "t"
    proc = run_script("collect_traces", "--target_traces", "12", "--shard_size", "6", "--max_length", "16",
                      "--device", "cpu", "--dtype", "float32", "--no-logits", "--output", out)
    tokens = sum(s["tokens"] for s in json.loads((out / "manifest.json").read_text())["shards"])
    assert f"plan: 12 sequences, {tokens} tokens" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("done: ") and f"at {out}" in proc.stdout.splitlines()[-1]


def test_training_prints_a_readable_speed_and_where_it_wrote(tiny_traces, tmp_path):
    import re

    out = tmp_path / "ckpt"
    proc = run_script("train_simple_predictor", "--traces", tiny_traces, "--epochs", "1", "--hidden-dim", "32",
                      "--batch-rows", "2048", "--output", out)
    epoch = next(l for l in proc.stdout.splitlines() if l.startswith("epoch "))
    assert re.search(r"\| (\d+|\d+\.\dk|\d\.\d\dM) rows/s \|", epoch), epoch
    assert not re.search(r"\| 0\.\d\dM rows/s", epoch)
    assert proc.stdout.strip().splitlines()[-1].endswith(f"results.json to {out}/")
