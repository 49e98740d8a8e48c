"""Routing recorded by serving engines, imported: each format built by hand with the libraries the engines use
(numpy .npy/.npz, torch.save dicts, JSON lines with base64, CSV, safetensors), imported, and read back id for id.

    pytest -q tests/test_import_routing.py
"""
from __future__ import annotations

import base64
import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collection.traces.format import Manifest, TraceFormatError, TraceSet, require_token_ids
from collection.traces.rows import load_block
from common.errors import UserError, one_line_errors
from tests.conftest import run_script
from tests.isolated_cli import IsolatedCLI

E, K = 16, 3


def routing(T: int, S: int, k: int = K, e: int = E, seed: int = 0) -> np.ndarray:
    """(T, S, k) distinct experts per token and layer, as a router's top-k gives them."""
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((T, S, e)), axis=2)[:, :, :k]


def run(capsys, *argv) -> types.SimpleNamespace:
    """import_routing's main as its __main__ block runs it: exit code and output."""
    from scripts.import_routing import main

    capsys.readouterr()
    code = 0
    try:
        with one_line_errors("import_routing"):
            main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return types.SimpleNamespace(code=code, out=out, err=err)


def ok(capsys, *argv) -> str:
    r = run(capsys, *argv)
    assert r.code == 0, r.err
    return r.out


def refused(capsys, *argv, says: str) -> str:
    r = run(capsys, *argv)
    last = r.err.strip().splitlines()[-1]  # under the progress bar, when there is one
    assert r.code == 2 and "Traceback" not in r.err and last.startswith("import_routing: error: "), r.err
    assert says in last, r.err
    return last


def read_back(out: Path) -> tuple[TraceSet, list[np.ndarray], list[np.ndarray]]:
    """Every sequence's (T, L, k) ids and token ids, from the shards as stored."""
    ts = TraceSet(out)
    seqs, toks = [], []
    for sh in ts.shards():
        off, ids, tid = sh.numpy("seq_offsets"), sh.numpy("topk_ids"), sh.numpy("token_ids")
        for a, b in zip(off[:-1], off[1:]):
            seqs.append(ids[:, a:b].transpose(1, 0, 2).astype(np.int64))
            toks.append(tid[a:b].astype(np.int64))
    return ts, seqs, toks


# ----------------------------------------------------------------------------------------------
# the formats, written as the engines (or their users) write them


def write_vllm(d: Path, seqs: list[np.ndarray], tokens: list[np.ndarray] | None = None) -> None:
    """One .npz per request: vLLM's prompt rows and generation rows (int16), token ids with the sampled last one."""
    d.mkdir(parents=True, exist_ok=True)
    for i, ids in enumerate(seqs):
        p = len(ids) // 2
        extra = {} if tokens is None else {"prompt_token_ids": tokens[i][:p],
                                           "token_ids": np.append(tokens[i][p:], 7)}  # + the never-fed last token
        np.savez(d / f"request_{i}.npz", prompt_routed_experts=ids[:p].astype(np.int16),
                 routed_experts=ids[p:].astype(np.int16), **extra)


def sglang_response(ids: np.ndarray, tokens: np.ndarray | None, dtype=np.int32) -> dict:
    """A /generate response of a server started with --enable-return-routed-experts."""
    T = len(ids)
    meta = {"id": "r", "prompt_tokens": T // 2, "completion_tokens": T - T // 2 + 1,
            "routed_experts": base64.b64encode(ids.astype(dtype).tobytes()).decode()}
    if dtype is not np.int32:
        meta["routed_experts_dtype"] = np.dtype(dtype).name
    resp = {"text": "...", "meta_info": meta}
    if tokens is not None:
        resp |= {"input_ids": tokens[:T // 2].tolist(), "output_ids": np.append(tokens[T // 2:], 7).tolist()}
    return resp


def recorder_dump(path: Path, seqs: list[np.ndarray], p2l: np.ndarray | None, dense: tuple[int, ...] = (),
                  width: int = 8, tokens: list[np.ndarray] | None = None) -> None:
    """An expert distribution recorder dump (per_token): a prefill record, then one decode record per token,
    request after request; topk_ids_of_layer (S, n, 8) int32, -1 in unused columns and dense layers."""
    records = []
    for i, ids in enumerate(seqs):
        T, S, k = ids.shape
        p = max(1, T // 2)
        for a, b, mode in [(0, p, 1)] + [(t, t + 1, 2) for t in range(p, T)]:
            topk = np.full((S, b - a, width), -1, dtype=np.int32)
            topk[:, :, :k] = ids[a:b].transpose(1, 0, 2)
            topk[list(dense)] = -1
            records.append({"forward_pass_id": len(records), "rank": 0, "gatherer_key": "primary",
                            "input_ids": (tokens[i][a:b] if tokens else np.zeros(b - a, int)).tolist(),
                            "positions": list(range(a, b)), "extend_seq_lens": [b - a] if mode == 1 else None,
                            "forward_mode": mode, "topk_ids_of_layer": torch.from_numpy(topk), "misc_objects": []})
    dump = {"records": records}
    if p2l is not None:
        dump["last_physical_to_logical_map"] = torch.from_numpy(p2l)
    torch.save(dump, path)


def llamacpp_rows(ids: np.ndarray, layers: list[int], ubatches: list[int]) -> tuple[str, list[int]]:
    """examples/moe-trace's CSV of one run: per ubatch, one block per MoE layer of `tokens x k` rows; the last
    layer holds only the ubatch's last token (llama.cpp keeps just the output rows there). Returns the CSV and the
    tokens every layer routed."""
    rows, kept, t = [], [], 0
    for n in ubatches:
        for li, layer in enumerate(layers):
            toks = range(t + n - 1, t + n) if li == len(layers) - 1 else range(t, t + n)
            rows += [f"{layer},{ids[x, li, j]}" for x in toks for j in range(ids.shape[2])]
        kept.append(t + n - 1)
        t += n
    return "\n".join(rows) + "\n", kept


# ----------------------------------------------------------------------------------------------
# round trips: every id back


def test_vllm_round_trip_keeps_every_id_and_request_order(tmp_path, capsys):
    seqs = [routing(n, 4, seed=i) for i, n in enumerate([5, 9, 2, 7, 6, 3, 8, 4, 5, 6, 7, 3])]
    tokens = [np.arange(len(s)) + 100 * i for i, s in enumerate(seqs)]
    write_vllm(tmp_path / "in", seqs, tokens)
    ok(capsys, "--from", "vllm", tmp_path / "in", "--output", tmp_path / "out", "--num-experts", E)
    ts, back, toks = read_back(tmp_path / "out")
    assert len(back) == 12  # request_10 after request_9, not after request_1
    for a, b, t, u in zip(seqs, back, tokens, toks):
        assert np.array_equal(a, b) and np.array_equal(t, u)
    m = ts.manifest
    assert (m.num_layers, m.num_experts, m.top_k, m.moe_layer_indices) == (4, E, K, [0, 1, 2, 3])
    assert m.has_token_ids and not m.has_topk_weights and m.imported["format"] == "vllm"
    assert m.hidden_layers == [] and not m.capture["store_logits"] and m.router_weights is None
    assert (ts.shard(0).numpy("topk_weights") == np.float16(1 / K)).all()


def test_vllm_npy_and_dense_first_layer(tmp_path, capsys):
    """A DeepSeek-like model: decoder layer 0 is dense, so vLLM's slot 0 holds zeros; it is dropped and the MoE
    layers keep their decoder numbers."""
    ids = routing(6, 4)
    ids[:, 0] = 0
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "r.npy", ids.astype(np.int16))
    ok(capsys, "--from", "vllm", tmp_path / "in" / "r.npy", "--output", tmp_path / "out")
    ts, back, toks = read_back(tmp_path / "out")
    assert np.array_equal(back[0], ids[:, 1:]) and ts.manifest.moe_layer_indices == [1, 2, 3]
    assert not ts.manifest.has_token_ids and (toks[0] == -1).all()
    assert ts.manifest.num_experts == ids[:, 1:].max() + 1  # no --num-experts: the largest id + 1, and it says so
    assert "largest expert id" in ts.manifest.imported["num_experts_from"]


def test_dense_layers_from_the_model_config(tmp_path, capsys):
    """deepseek-v2-lite: 27 decoder layers, the first dense, 64 experts, top-6: the preset names the dense slot, and
    a recording whose 'dense' slot holds routing is refused."""
    ids = routing(5, 27, k=6, e=64)
    ids[:, 0] = 0
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "r.npy", ids.astype(np.int16))
    ok(capsys, "--from", "vllm", tmp_path / "in", "--output", tmp_path / "out", "--model-config", "deepseek-v2-lite")
    ts, back, _ = read_back(tmp_path / "out")
    m = ts.manifest
    assert np.array_equal(back[0], ids[:, 1:]) and m.moe_layer_indices == list(range(1, 27))
    assert (m.num_experts, m.top_k, m.family, m.hidden_size) == (64, 6, "deepseek_v2", 2048)
    np.save(tmp_path / "in" / "r.npy", routing(5, 27, k=6, e=64).astype(np.int16))
    refused(capsys, "--from", "vllm", tmp_path / "in", "--output", tmp_path / "out2", "--model-config",
            "deepseek-v2-lite", says="says decoder layers [0] are dense, but they hold routing")


def test_sglang_meta_round_trip(tmp_path, capsys):
    seqs = [routing(n, 3, seed=n) for n in (4, 7, 5)]
    tokens = [np.arange(len(s)) + 50 for s in seqs]
    lines = [json.dumps(sglang_response(s, t)) for s, t in zip(seqs, tokens)]
    lines[1] = json.dumps([sglang_response(seqs[1], tokens[1], np.uint8)])  # a batched request; a narrower wire dtype
    (tmp_path / "responses.jsonl").write_text("\n".join(lines) + "\n")
    ok(capsys, "--from", "sglang-meta", tmp_path / "responses.jsonl", "--output", tmp_path / "out", "--top-k", K,
       "--num-experts", E)
    _, back, toks = read_back(tmp_path / "out")
    assert all(np.array_equal(a, b) for a, b in zip(seqs, back)) and len(back) == 3
    assert all(np.array_equal(a, b) for a, b in zip(tokens, toks))


def test_sglang_recorder_maps_physical_ids_to_logical(tmp_path, capsys):
    """Expert-parallel load balancing with 2 redundant experts: physical ids E, E+1 are replicas of logical 0, 1;
    the dump's own map gives the logical ids back. Layer 0 is dense (-1), top-3 of the recorder's 8 columns."""
    seqs = [routing(n, 4, seed=n) for n in (5, 3, 6)]
    for s in seqs:
        s[:, 0] = 0
    p2l = np.tile(np.arange(E + 2) % E, (4, 1))
    rng = np.random.default_rng(1)
    physical = [np.where((s < 2) & (rng.random(s.shape) < 0.5), s + E, s) for s in seqs]
    assert any((p >= E).any() for p in physical)
    tokens = [np.arange(len(s)) + 9 for s in seqs]
    recorder_dump(tmp_path / "dump_0.pt", physical, p2l, dense=(0,), tokens=tokens)
    ok(capsys, "--from", "sglang-recorder", tmp_path / "dump_0.pt", "--output", tmp_path / "out", "--num-experts", E)
    ts, back, toks = read_back(tmp_path / "out")
    assert [len(b) for b in back] == [5, 3, 6]
    assert all(np.array_equal(s[:, 1:], b) for s, b in zip(seqs, back))
    assert all(np.array_equal(a, b) for a, b in zip(tokens, toks))
    assert ts.manifest.moe_layer_indices == [1, 2, 3] and "mapped" in ts.manifest.imported["expert_ids"]
    recorder_dump(tmp_path / "nomap.pt", physical, None, dense=(0,))
    refused(capsys, "--from", "sglang-recorder", tmp_path / "nomap.pt", "--output", tmp_path / "out2",
            says="no last_physical_to_logical_map")


def test_physical_ids_without_a_map_are_refused_and_a_given_map_applies(tmp_path, capsys):
    ids = routing(6, 3)
    physical = np.where(ids < 2, ids + E, ids)
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "r.npy", physical.astype(np.int16))
    refused(capsys, "--from", "vllm", tmp_path / "in", "--output", tmp_path / "out", "--num-experts", E,
            says="give --expert-map")
    np.save(tmp_path / "map.npy", np.tile(np.arange(E + 2) % E, (3, 1)))
    ok(capsys, "--from", "vllm", tmp_path / "in", "--output", tmp_path / "out", "--num-experts", E,
       "--expert-map", tmp_path / "map.npy")
    assert np.array_equal(read_back(tmp_path / "out")[1][0], ids)


def test_a_top_k_that_differs_per_layer_is_refused(tmp_path, capsys):
    ids = routing(4, 3)
    recorder_dump(tmp_path / "d.pt", [ids], np.tile(np.arange(E), (3, 1)))
    data = torch.load(tmp_path / "d.pt", weights_only=True)
    for rec in data["records"]:
        rec["topk_ids_of_layer"][1, :, K - 1] = -1  # layer 1 routes one expert fewer
    torch.save(data, tmp_path / "d.pt")
    refused(capsys, "--from", "sglang-recorder", tmp_path / "d.pt", "--output", tmp_path / "out",
            says="top-k that differs per layer")


def test_recorder_pass_of_several_requests_is_refused(tmp_path, capsys):
    ids = routing(4, 2)
    recorder_dump(tmp_path / "d.pt", [ids], np.tile(np.arange(E), (2, 1)))
    data = torch.load(tmp_path / "d.pt", weights_only=True)
    data["records"][0]["positions"] = [0, 5]  # two requests' tokens in one pass
    torch.save(data, tmp_path / "d.pt")
    refused(capsys, "--from", "sglang-recorder", tmp_path / "d.pt", "--output", tmp_path / "out",
            says="holds tokens of several requests")


def test_llamacpp_csv_keeps_tokens_routed_at_every_layer(tmp_path, capsys):
    """A prefill ubatch of 4 tokens (the last MoE layer sees only its output token), then 3 decode tokens; MoE
    layers 1..3 (decoder layer 0 is dense, so absent)."""
    ids = routing(7, 3)
    csv, kept = llamacpp_rows(ids, [1, 2, 3], [4, 1, 1, 1])
    (tmp_path / "moe_trace.csv").write_text(csv)
    out = ok(capsys, "--from", "llamacpp-csv", tmp_path / "moe_trace.csv", "--output", tmp_path / "out", "--top-k", K,
             "--num-experts", E)
    ts, back, _ = read_back(tmp_path / "out")
    assert kept == [3, 4, 5, 6] and np.array_equal(back[0], ids[kept])
    assert ts.manifest.moe_layer_indices == [1, 2, 3] and ts.manifest.imported["dropped_tokens"] == 3
    assert "3 tokens without routing at every MoE layer dropped" in out
    (tmp_path / "bad.csv").write_text(csv.replace("2,", "x,", 1))
    refused(capsys, "--from", "llamacpp-csv", tmp_path / "bad.csv", "--output", tmp_path / "o2", "--top-k", K,
            says="is not `layer,expert`")


@pytest.mark.parametrize("container", ["torch", "safetensors"])
def test_hf_router_logits_top_k_weights_and_padding(tmp_path, capsys, container):
    """output_router_logits=True: per layer (B*T, E) logits (Qwen-MoE / OLMoE: softmax probabilities); ids are each
    row's top-k, weights the probabilities there; left padding (attention_mask 0) is not a token."""
    from safetensors.torch import save_file

    B, T, L = 2, 5, 3
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(B * T, E, generator=g) for _ in range(L)]
    input_ids = torch.arange(B * T).reshape(B, T)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0
    path = tmp_path / f"batch.{'pt' if container == 'torch' else 'safetensors'}"
    if container == "torch":
        torch.save({"router_logits": tuple(logits), "input_ids": input_ids, "attention_mask": mask}, path)
    else:  # safetensors holds no tuples: one key per layer, and these store probabilities
        save_file({**{f"router_logits.{l}": torch.softmax(x, -1) for l, x in enumerate(logits)},
                   "input_ids": input_ids, "attention_mask": mask}, str(path))
    ok(capsys, "--from", "hf-logits", path, "--output", tmp_path / "out", "--top-k", K)
    ts, back, toks = read_back(tmp_path / "out")
    probs = torch.softmax(torch.stack(logits), -1)                       # (L, B*T, E)
    w, want = torch.topk(probs, K, -1)
    rows = [np.arange(0, T), np.arange(T + 2, 2 * T)]
    for b in range(B):
        assert np.array_equal(back[b], want[:, rows[b]].permute(1, 0, 2).numpy())
        assert np.array_equal(toks[b], input_ids.reshape(-1)[rows[b]].numpy())
    stored = ts.shard(0).numpy("topk_weights").astype(np.float32)
    assert np.allclose(stored[:, :T], w[:, :T].numpy(), atol=1e-3) and ts.manifest.has_topk_weights


# ----------------------------------------------------------------------------------------------
# what an imported set is to the rest of the project


def test_imported_set_loads_without_hidden_states_and_readers_refuse_what_it_lacks(tmp_path, capsys):
    from validation.coverage.scorers import baseline_scorer

    ids = routing(8, 3)
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "r.npy", ids.astype(np.int16))
    ok(capsys, "--from", "vllm", tmp_path / "in", "--output", tmp_path / "out", "--num-experts", E)
    ts = TraceSet(tmp_path / "out")
    block = load_block(ts, [0], ts.sequence_table()["seq_id"], torch.device("cpu"))
    assert block.hidden is None and np.array_equal(block.topk_ids.permute(1, 0, 2).numpy(), ids)
    with pytest.raises(UserError, match="needs stored hidden states"):
        baseline_scorer("router-reuse", ts, 1, np.array([0]), torch.device("cpu"))
    with pytest.raises(UserError, match="router logits were not stored"):
        load_block(ts, [0], np.array([0]), torch.device("cpu"), with_logits=True)
    with pytest.raises(TraceFormatError, match="no token ids .imported from vllm without token ids.; x needs them"):
        require_token_ids(ts.manifest, ts.dir, "x")
    d = ts.manifest.to_json()
    d["capture"]["store_logits"] = True
    with pytest.raises(TraceFormatError, match="an imported set holds routing only"):
        Manifest.from_json(d, tmp_path / "m.json")


def test_a_failed_import_leaves_the_output_as_it_was(tmp_path, capsys):
    """--overwrite of an existing set: a broken second input stops the run, and the old set is untouched."""
    from tests.test_safety import snapshot

    write_vllm(tmp_path / "in", [routing(4, 2), routing(3, 2)])
    ok(capsys, "--from", "vllm", tmp_path / "in", "--output", tmp_path / "out")
    before = snapshot(tmp_path / "out")
    (tmp_path / "in" / "request_1.npz").write_bytes(b"PK\x03\x04 not a zip")
    refused(capsys, "--from", "vllm", tmp_path / "in", "--output", tmp_path / "out", "--overwrite",
            says="request_1.npz: not an .npz archive")
    assert snapshot(tmp_path / "out") == before
    refused(capsys, "--from", "vllm", tmp_path / "in", "--output", tmp_path / "fresh", says="request_1.npz")
    assert not (tmp_path / "fresh").exists()


# ----------------------------------------------------------------------------------------------
# hostile and damaged input: one line naming the file, exit 2, no traceback, no hang, bounded memory


def valid_inputs(d: Path) -> dict[str, tuple[Path, list[str]]]:
    """One small valid file per format, and the flags its import needs."""
    d.mkdir(parents=True, exist_ok=True)
    ids = routing(6, 3)
    np.savez(d / "r.npz", routed_experts=ids.astype(np.int16), token_ids=np.arange(7))
    (d / "r.jsonl").write_text(json.dumps(sglang_response(ids, np.arange(6))) + "\n")
    recorder_dump(d / "r.pt", [ids], np.tile(np.arange(E), (3, 1)))
    (d / "r.csv").write_text(llamacpp_rows(ids, [0, 1, 2], [2, 1, 1])[0])
    torch.save({"router_logits": tuple(torch.randn(6, E) for _ in range(3))}, d / "h.pt")
    k = ["--top-k", str(K)]
    return {"vllm": (d / "r.npz", []), "sglang-meta": (d / "r.jsonl", k), "sglang-recorder": (d / "r.pt", []),
            "llamacpp-csv": (d / "r.csv", k), "hf-logits": (d / "h.pt", k)}


def crafted(d: Path) -> dict[str, tuple[str, Path, list[str], str]]:
    """Files that lie about their sizes or hold what no engine writes: (format, file, flags, what the line says)."""
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "huge.npy", "wb") as f:  # a header claiming 2**41 int16 ids over 16 bytes of data
        np.lib.format.write_array_header_1_0(f, {"descr": "<i2", "fortran_order": False, "shape": (1 << 40, 2, 1)})
        f.write(bytes(16))
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object))
    torch.save({"records": [{"topk_ids_of_layer": torch.zeros(1, dtype=torch.int32).expand(2, 10**8, 8),
                             "positions": [0]}], "last_physical_to_logical_map": torch.zeros(2, 4, dtype=torch.long)},
               d / "bomb.pt")
    (d / "legacy.pt").write_bytes(b"\x80\x02}q\x00.")
    (d / "wide.csv").write_text("0,123456789012\n")
    meta = {"meta_info": {"routed_experts": "!!!!", "prompt_tokens": 1, "completion_tokens": 1}}
    (d / "b64.jsonl").write_text(json.dumps(meta) + "\n")
    return {"npy-shape-bomb": ("vllm", d / "huge.npy", [], "the file holds"),
            "npy-object-dtype": ("vllm", d / "objects.npy", [], "expected integers"),
            "stride0-view-bomb": ("sglang-recorder", d / "bomb.pt", [], "more than its storage holds"),
            "pickle-not-archive": ("sglang-recorder", d / "legacy.pt", [], "not a torch.save archive"),
            "csv-overlong-number": ("llamacpp-csv", d / "wide.csv", ["--top-k", "1"], "is not `layer,expert`"),
            "base64-garbage": ("sglang-meta", d / "b64.jsonl", ["--top-k", "1"], "not base64")}


@pytest.fixture(scope="module")
def isolated():
    yield IsolatedCLI("scripts.import_routing")
    os.environ.pop("TQDM_DISABLE", None)


def assert_one_line_or_fine(code: int | None, err: str, path: Path) -> None:
    assert code in (0, 2), f"exit {code} (-11: segfault, -9: killed, None: hung)\n{err[-2000:]}"
    assert "Traceback" not in err, err[-2000:]
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("import_routing: error: ") and str(path) in err, err


@pytest.mark.parametrize("case", ["npy-shape-bomb", "npy-object-dtype", "stride0-view-bomb", "pickle-not-archive",
                                  "csv-overlong-number", "base64-garbage"])
def test_crafted_input_is_refused_in_one_line(case, tmp_path, isolated):
    fmt, path, flags, says = crafted(tmp_path / "in")[case]
    code, err = isolated(["--from", fmt, str(path), "--output", str(tmp_path / "out"), *flags], tmp_path / "err")
    assert code == 2, f"exit {code}\n{err[-2000:]}"
    assert_one_line_or_fine(code, err, path)
    assert says in err and not (tmp_path / "out").exists(), err


MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("ints"), st.floats(0, 1), st.sampled_from([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80",
                                                                b"999999999999", b"-1"])))


def mutate(data: bytes, how: tuple) -> bytes:
    at = int(how[1] * len(data))
    if how[0] == "truncate":
        return data[:at]
    if how[0] == "flip":
        return data[:at] + bytes([data[at % len(data)] ^ how[2]]) + data[at + 1:]
    return data[:at] + how[2] + data[at + (len(how[2]) if how[0] == "ints" else 0):]


@pytest.mark.parametrize("fmt", ["vllm", "sglang-meta", "sglang-recorder", "llamacpp-csv", "hf-logits"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=MUTATIONS)
def test_fuzzed_input_gives_one_line_or_a_valid_set(fmt, how, tmp_path, isolated):
    """Truncated, flipped, oversized and inserted bytes: each import ends in one line naming the file (or, where the
    damage left a valid file, a valid set), in a child with a memory limit and a timeout."""
    path, flags = valid_inputs(tmp_path / "in")[fmt]
    path.write_bytes(mutate(path.read_bytes(), how))
    code, err = isolated(["--from", fmt, str(path), "--output", str(tmp_path / "out"), "--overwrite", *flags],
                         tmp_path / "err", timeout=120)
    assert_one_line_or_fine(code, err, path)
    if code == 0:
        TraceSet(tmp_path / "out")


def test_the_import_benchmark_prints_its_rates(tmp_path):
    """tools/bench_import.py's seconds-long command, smaller: it imports a vLLM dump, analyses it, and prints both."""
    proc = run_script("bench_import", "--ids", "20000", "--rows", "4000", "--repeats", "1", "--workdir",
                      str(tmp_path / "work"), "--json", str(tmp_path / "bench.json"))
    import json

    res = json.loads((tmp_path / "bench.json").read_text())
    assert "ids/s" in proc.stdout and res


def test_the_simulator_runs_every_routing_only_policy_on_an_imported_set(tmp_path):
    """Every request routes each token to experts {0, 1, 2} at both layers. At C = 3 the cache policies miss only
    the first token's 6 accesses (hit rate 1 - 1/T over the T streamed tokens); oracle and previous-token prefetch
    fetch its layer 1 while layer 0 runs (1 - 1/(2T)); static placement, counted on the training split, holds
    {0, 1, 2} from the start (1.0), and so does CPU compute's. A policy that reads hidden states is refused."""
    (tmp_path / "in").mkdir()
    for r in range(12):
        np.save(tmp_path / "in" / f"r{r:02d}.npy", np.tile(np.array([0, 1, 2], dtype=np.int16), (20, 2, 1)))
    run_script("import_routing", "--from", "vllm", tmp_path / "in", "--output", tmp_path / "set", "--num-experts", E)
    policies = "on-demand,lfu,belady,oracle,prefetch:previous-token,static-popular,cpu-compute"
    run_script("simulate_prefetch", "--traces", tmp_path / "set", "--policies", policies, "--cache-experts", "3",
               "--cpu-expert-ms", "0.3", "--output-dir", tmp_path / "sim")
    res = json.loads((tmp_path / "sim" / "prefetch.json").read_text())
    T = res["tokens"]
    hit = {r["policy"]: r["hit_rate"] for r in res["rows"]}
    assert T == 20 and hit == pytest.approx({"on-demand": 1 - 1 / T, "lfu": 1 - 1 / T, "belady": 1 - 1 / T,
                                             "oracle": 1 - 1 / (2 * T), "prefetch:previous-token": 1 - 1 / (2 * T),
                                             "static-popular": 1.0, "cpu-compute": 1.0})
    proc = run_script("simulate_prefetch", "--traces", tmp_path / "set", "--policies", "on-demand,prefetch:router-reuse",
                      "--cache-experts", "3", "--output-dir", tmp_path / "sim2", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "needs the stored MoE input" in proc.stderr
    assert not (tmp_path / "sim2").exists()
