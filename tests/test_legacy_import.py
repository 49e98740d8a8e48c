"""Importing the original SpecMoE pickle shards: layers recovered from trace order, trainable result,
and a restricted unpickler that refuses crafted pickles by name without running them."""
from __future__ import annotations

import builtins
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest
import torch

from collection.errors import UserError
from collection.format import TraceSet
from scripts.import_specmoe_shards import main as import_main
from tests.conftest import run_script

L, B, H, E, K = 3, 2, 16, 60, 4
SEQ = [5, 4, 5, 3]        # padded length of each forward pass
DATASETS = ["imdb", "ag_news"]


@dataclass
class GatingDataPoint:
    """The original collector's dataclass, field for field."""
    layer_id: int
    hidden_states: torch.Tensor
    input_embeddings: torch.Tensor
    target_routing: torch.Tensor
    target_top_k: torch.Tensor
    prev_layer_gates: List[torch.Tensor]
    sequence_length: int
    token_ids: Optional[torch.Tensor]
    dataset_name: str
    sample_id: str


def make_collection() -> list[dict]:
    """4 forward passes x 3 layers, then 2 traces of a pass cut off when the collector hit its target."""
    gen = torch.Generator().manual_seed(0)
    traces = []
    for p, T in enumerate(SEQ + [4]):
        for _layer in range(L if p < len(SEQ) else 2):
            h = torch.randn(B, T, H, generator=gen, dtype=torch.float32).half()
            logits = (2 * torch.randn(B, T, E, generator=gen)).half()
            traces.append({"hidden_states": h, "input_embeddings": h, "target_routing": logits,
                           "target_top_k": logits.float().topk(K, -1).indices, "prev_layer_gates": [],
                           "sequence_length": T, "token_ids": None, "dataset_name": DATASETS[p % 2],
                           "sample_id": f"trace_{len(traces)}"})
    return traces


def dump_shard(path: Path, traces: list[dict], protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    # the original's bug: layer_id is the index inside the shard
    with open(path, "wb") as f:
        pickle.dump([GatingDataPoint(layer_id=i, **t) for i, t in enumerate(traces)], f, protocol=protocol)


@pytest.fixture
def as_main(monkeypatch):
    """Pickle the dataclass as the original did: defined in the collector run as a script (__main__)."""
    monkeypatch.setattr(GatingDataPoint, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "GatingDataPoint", GatingDataPoint, raising=False)


@pytest.fixture
def legacy(tmp_path, as_main) -> tuple[Path, list[dict]]:
    """Two shards of 8 and 6 traces: pass 2 straddles them, as 500-trace shards of 24 layers do."""
    traces = make_collection()
    d = tmp_path / "shards"
    d.mkdir()
    dump_shard(d / "shard_000_8_traces.pkl", traces[:8])
    dump_shard(d / "shard_001_6_traces.pkl", traces[8:], protocol=2)  # protocol 2 spells bytes via _codecs
    return d, traces


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert ": error: " in lines[-1], proc.stderr
    for f in fragments:
        assert f in lines[-1], lines[-1]


def test_import_recovers_layers_and_trains(legacy, tmp_path):
    src, traces = legacy
    out = tmp_path / "traces"
    import_main(["--input", str(src), "--output", str(out), "--num-layers", str(L)])  # the CLI: malicious test

    ts = TraceSet(out)
    m = ts.manifest
    assert (m.num_layers, m.num_experts, m.top_k, m.hidden_size) == (L, E, K, H) and m.complete
    assert m.hidden_layers == list(range(L)) and not (out / "router_weights.safetensors").exists()
    legacy_info = m.capture["legacy"]
    assert legacy_info["padding_recovered"] is False and legacy_info["token_ids_recovered"] is False
    assert legacy_info["dropped_traces"] == 2 and legacy_info["target_routing_was"] == "logits"
    assert legacy_info["topk_ids_equal_routing_topk"] == 1.0
    assert [s["name"] for s in m.sources] == DATASETS
    assert [i["layer_id_field"].startswith("index inside the shard") for i in m.plan["inputs"]] == [True, True]
    # input 0 completes passes 0-1; pass 2 starts there and completes in input 1 with pass 3
    assert [(s.sequences, s.tokens) for s in m.shards] == [(4, B * 9), (4, B * 8)]

    seq_ids = []
    for shard, passes in zip(ts.shards(), [[0, 1], [2, 3]]):
        row = 0
        seq_ids += shard.numpy("seq_ids").tolist()
        assert (shard.numpy("token_ids") == -1).all()
        for p in passes:
            n = B * SEQ[p]
            for layer in range(L):
                t = traces[p * L + layer]
                rows = slice(row, row + n)
                assert torch.equal(shard.tensor("hidden", (layer, rows)), t["hidden_states"].reshape(n, H))
                assert torch.equal(shard.tensor("topk_ids", (layer, rows)).long(), t["target_top_k"].reshape(n, K))
                assert torch.equal(shard.tensor("router_logits", (layer, rows)), t["target_routing"].reshape(n, E))
                probs = torch.softmax(t["target_routing"].float().reshape(n, E), -1)
                want = probs.gather(1, t["target_top_k"].reshape(n, K))
                assert torch.allclose(shard.tensor("topk_weights", (layer, rows)).float(), want, atol=1e-3)
            row += n
        assert shard.numpy("seq_sources").tolist() == [i % 2 for i in passes for _ in range(B)]
    assert seq_ids == list(range(8))

    with pytest.raises(UserError, match="already holds traces"):
        import_main(["--input", str(src), "--output", str(out), "--num-layers", str(L)])

    ckpt = tmp_path / "ckpt"
    proc = run_script("train_simple_predictor", "--traces", out, "--epochs", "1", "--batch-rows", "512",
                      "--output", ckpt, "--device", "cpu")
    assert (ckpt / "best_checkpoint.pth").is_file(), proc.stdout


def test_num_layers_from_collector_config_or_required(legacy, tmp_path):
    src, _ = legacy
    with pytest.raises(UserError, match="--num-layers is needed"):
        import_main(["--input", str(src), "--output", str(tmp_path / "a")])
    assert not any((tmp_path / "a").glob("*.safetensors"))
    (src / "training_config.json").write_text('{"model_info": {"num_layers": 3, "num_experts": 60}}')
    import_main(["--input", str(src), "--output", str(tmp_path / "b")])
    assert TraceSet(tmp_path / "b").manifest.num_layers == L


def test_wrong_num_layers_is_caught(legacy, tmp_path):
    src, _ = legacy
    with pytest.raises(UserError, match="--num-layers 2 is wrong"):
        import_main(["--input", str(src), "--output", str(tmp_path / "o"), "--num-layers", "2"])
    assert not (tmp_path / "o" / "manifest.json").exists() and not any((tmp_path / "o").glob("shard_*"))


class Evil:
    """What a crafted pickle does: __reduce__ names any callable, which pickle.load would call."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def test_malicious_pickles_are_refused_unrun(legacy, tmp_path):
    src, traces = legacy
    flag = tmp_path / "pwned"
    bad = tmp_path / "bad"
    bad.mkdir()
    legit = GatingDataPoint(layer_id=0, **traces[0])
    (bad / "shard_000.pkl").write_bytes(pickle.dumps([legit, Evil(os.system, f"echo pwned > {flag}")]))
    proc = run_script("import_specmoe_shards", "--input", bad, "--output", tmp_path / "o1", "--num-layers", L,
                      check=False)
    assert_one_line_error(proc, "shard_000.pkl", f"refused global {os.system.__module__}.system")
    assert not flag.exists() and not (tmp_path / "o1" / "manifest.json").exists()

    (bad / "shard_000.pkl").write_bytes(pickle.dumps([legit, Evil(builtins.eval, f"open({str(flag)!r}, 'w')")]))
    with pytest.raises(UserError, match=r"shard_000.pkl: refused global builtins\.eval") as e:
        import_main(["--input", str(bad), "--output", str(tmp_path / "o2"), "--num-layers", str(L)])
    assert "\n" not in str(e.value) and not flag.exists()


def test_truncated_and_foreign_files(legacy, tmp_path):
    src, _ = legacy
    data = (src / "shard_000_8_traces.pkl").read_bytes()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "shard_000.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="shard_000.pkl: not a readable legacy shard") as e:
        import_main(["--input", str(cut), "--output", str(tmp_path / "o"), "--num-layers", str(L)])
    assert "\n" not in str(e.value)
    (cut / "shard_000.pkl").write_text("hello")
    with pytest.raises(UserError, match="not a pickle"):
        import_main(["--input", str(cut), "--output", str(tmp_path / "o"), "--num-layers", str(L)])
    with pytest.raises(UserError, match="no such file"):
        import_main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"), "--num-layers", "3"])


def test_other_dataclass_names_are_refused_with_a_hint(tmp_path, legacy):
    _, traces = legacy
    d = tmp_path / "other"
    d.mkdir()
    dump_shard(d / "s.pkl", traces[:3])
    with pytest.raises(UserError, match="refused global __main__.GatingDataPoint") as e:
        import_main(["--input", str(d), "--output", str(tmp_path / "o"), "--num-layers", "3",
                     "--class-module", "qwen15_moe_a27b.collect"])
    assert "--class-module __main__ --class-name GatingDataPoint" in str(e.value)
