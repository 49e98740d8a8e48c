"""Importing the original SpecMoE pickle shards: layers recovered from trace order, trainable result,
and a restricted unpickler that refuses crafted pickles by name without running them, and every
crafted pickle below with one line and exit 2, never a crash."""
from __future__ import annotations

import builtins
import collections
import io
import json
import os
import pickle
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest
import torch

from collection.traces.format import TraceSet
from common.errors import UserError
from scripts.import_specmoe_shards import main as import_main
from tests.conftest import run_script
from tests.isolated_cli import IsolatedCLI

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


def test_numpy_fields_and_tensor_views_import(tmp_path, as_main):
    """Valid files the checks must keep: numpy arrays (protocol 4's _reconstruct and protocol 5's _frombuffer,
    big-endian, Fortran order), and tensors that are slices or transposes of a larger storage."""
    gen = torch.Generator().manual_seed(1)
    Bn, T, Hn, En, Kn = 2, 3, 5, 6, 2
    traces = []
    for p in range(2):
        big = torch.randn(Bn, T, Hn + 3, generator=gen).half()
        logits = torch.randn(En, T, Bn, generator=gen).transpose(0, 2)  # non-contiguous view
        topk = logits.topk(Kn, -1).indices
        traces.append({"hidden_states": big[:, :, 1:1 + Hn],  # a view at an offset into a larger storage
                       "input_embeddings": None, "target_routing": np.asfortranarray(logits.numpy().astype(">f4")),
                       "target_top_k": topk.numpy(), "prev_layer_gates": [], "sequence_length": T,
                       "token_ids": None, "dataset_name": "d", "sample_id": f"trace_{p}"})
    d = tmp_path / "in"
    d.mkdir()
    dump_shard(d / "s0.pkl", traces[:1], protocol=4)
    dump_shard(d / "s1.pkl", traces[1:], protocol=5)
    out = tmp_path / "out"
    import_main(["--input", str(d), "--output", str(out), "--num-layers", "1"])
    shards = list(TraceSet(out).shards())
    for t, shard in zip(traces, shards):
        n = Bn * T
        assert torch.equal(shard.tensor("hidden", (0, slice(0, n))), t["hidden_states"].reshape(n, Hn))
        want = torch.from_numpy(t["target_routing"].astype("<f4")).reshape(n, En).half()
        assert torch.equal(shard.tensor("router_logits", (0, slice(0, n))), want)
        assert torch.equal(shard.tensor("topk_ids", (0, slice(0, n))).long(),
                           torch.from_numpy(t["target_top_k"]).reshape(n, Kn))


def test_unreadable_training_config_is_reported(legacy, tmp_path, capsys):
    """An unreadable collector config was skipped silently: now it is counted in one line and recorded."""
    src, _ = legacy
    (src / "training_config.json").write_bytes(b"{not json\\xff")
    with pytest.raises(UserError, match=r"--num-layers is needed: .*training_config.json: not readable JSON"):
        import_main(["--input", str(src), "--output", str(tmp_path / "a")])
    assert not (tmp_path / "a").exists()  # a refused import leaves no --output it created
    capsys.readouterr()
    import_main(["--input", str(src), "--output", str(tmp_path / "b"), "--num-layers", str(L)])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "training_config.json" in ln]
    assert len(lines) == 1 and lines[0].startswith("1 training_config.json ignored: ")
    assert "not readable JSON" in lines[0]
    assert TraceSet(tmp_path / "b").manifest.capture["legacy"]["configs_ignored"] == [lines[0].split(": ", 1)[1]]
    (src / "training_config.json").write_text(json.dumps({"model_info": {"num_layers": "24"}}))
    with pytest.raises(UserError, match="num_layers is a str, not a positive integer"):
        import_main(["--input", str(src), "--output", str(tmp_path / "c")])


# ----------------------------------------------------------------------------------------------
# crafted pickles, written opcode by opcode as an attacker would


def op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def op_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def op_bytes(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


def op_int(n: int) -> bytes:
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    enc = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8a" + bytes([len(enc)]) + enc


NONE, TRUE, FALSE = b"N", b"\x88", b"\x89"


def op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def op_list(*items: bytes) -> bytes:  # EMPTY_LIST, MARK, items, APPENDS: as pickle writes a list
    return b"](" + b"".join(items) + b"e"


def op_dict(pairs: dict[str, bytes]) -> bytes:  # EMPTY_DICT, MARK, pairs, SETITEMS
    return b"}(" + b"".join(op_str(k) + v for k, v in pairs.items()) + b"u"


def op_call(fn: bytes, *args: bytes) -> bytes:  # REDUCE
    return fn + op_tuple(*args) + b"R"


def op_build(obj: bytes, state: bytes) -> bytes:  # BUILD: obj.__setstate__(state), or fill obj.__dict__
    return obj + state + b"b"


def op_put(i: int) -> bytes:
    return b"r" + struct.pack("<I", i)


def op_get(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)


def value(obj) -> bytes:
    """A real object's opcodes as pickle writes them (protocol 2, no memo), to embed."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=2)
    pickler.fast = True  # no PUTs that would clash with the crafted ones
    pickler.dump(obj)
    return buf.getvalue()[2:-1]


def torch_payload(t: torch.Tensor) -> bytes:
    """What torch pickles a storage as: _load_from_bytes(these bytes)."""
    return t._typed_storage().__reduce__()[1][0]


def crafted_payload(kind: str = "HalfStorage", numel: int = 6, data: bytes = bytes(12), count: int | None = None,
                    first_pickle: bytes | None = None, root: bytes | None = None) -> bytes:
    """torch's legacy storage file, field by field: magic, protocol, system info, the storage as a
    persistent id, its keys, then the element count and the raw elements."""
    pk = lambda body: b"\x80\x02" + body + b"."  # noqa: E731
    pid = op_tuple(op_str("storage"), op_global("torch", kind), op_str("k"), op_str("cpu"), op_int(numel), NONE)
    return b"".join([first_pickle or pk(op_int(0x1950A86A20F9469CFC6C)), pk(op_int(1001)),
                     pk(op_dict({"protocol_version": op_int(1001), "little_endian": TRUE})),
                     pk(root if root is not None else pid + b"Q"), pk(op_list(op_str("k"))),
                     struct.pack("<q", numel if count is None else count), data])


def op_storage(payload: bytes) -> bytes:
    return op_call(op_global("torch.storage", "_load_from_bytes"), op_bytes(payload))


def op_tensor(storage: bytes, offset: int, size: tuple, stride: tuple, hooks: bytes | None = None,
              *extra: bytes) -> bytes:
    hooks = op_call(op_global("collections", "OrderedDict")) if hooks is None else hooks
    return op_call(op_global("torch._utils", "_rebuild_tensor_v2"), storage, op_int(offset),
                   op_tuple(*map(op_int, size)), op_tuple(*map(op_int, stride)), FALSE, hooks, *extra)


def op_dtype(code: str) -> bytes:
    return op_call(op_global("numpy", "dtype"), op_str(code), FALSE, TRUE)


NUMPY_DTYPE_STATE = op_tuple(op_int(3), op_str("<"), NONE, NONE, NONE, op_int(-1), op_int(-1), op_int(0))


def op_ndarray(dtype: bytes, shape: tuple, data: bytes, reconstruct_shape: tuple = (0,)) -> bytes:
    """numpy's own form: _reconstruct(ndarray, (0,), b'b'), then BUILD (1, shape, dtype, fortran, bytes)."""
    empty = op_call(op_global("numpy._core.multiarray", "_reconstruct"), op_global("numpy", "ndarray"),
                    op_tuple(*map(op_int, reconstruct_shape)), op_bytes(b"b"))
    return op_build(empty, op_tuple(op_int(1), op_tuple(*map(op_int, shape)), dtype, FALSE, data))


def op_record(**fields: bytes) -> bytes:
    """A GatingDataPoint as pickle writes a dataclass (NEWOBJ, BUILD with its field dict): a valid
    one-token trace (H = E = 4, k = 2) unless a field is given."""
    logits = torch.tensor([[[0.5, -1.0, 2.0, 0.0]]])
    valid = {"hidden_states": value(torch.ones(1, 1, 4, dtype=torch.float16)), "target_routing": value(logits),
             "target_top_k": value(logits.topk(2, -1).indices), "dataset_name": value("d"),
             "sample_id": value("trace_0")}
    return op_build(op_global("__main__", "GatingDataPoint") + b")\x81", op_dict({**valid, **fields}))


def as_pickle(*records: bytes, prefix: bytes = b"") -> bytes:
    return b"\x80\x03" + prefix + op_list(*records) + b"."


def nested_lists(depth: int) -> bytes:
    return b"]" * depth + b"a" * (depth - 1)  # each APPEND puts the innermost list into the next


def segfault_pickle() -> bytes:
    """The segfault found on 2026-11-28, byte for byte: numpy.ndarray((1,), 'O', b'A'*8) reads a pointer from the
    file's bytes."""
    A = type("A", (), {"__reduce__": lambda s: (np.ndarray, ((1,), "O", b"A" * 8))})
    Bc = type("B", (), {"__reduce__": lambda s: (collections.OrderedDict, (A(),))})
    return pickle.dumps([Bc()], protocol=4)


def shared_storage_bomb() -> bytes:
    """40 records whose hidden states all view one 1 MiB storage: 40 MiB of tensors from a 1 MiB file."""
    storage = op_storage(torch_payload(torch.zeros(512 * 1024, dtype=torch.float16))) + op_put(0)
    records = [op_record(hidden_states=op_tensor(storage if i == 0 else op_get(0), 0, (1, 1, 512 * 1024),
                                                 (512 * 1024, 512 * 1024, 1)), sample_id=value(f"trace_{i}"))
               for i in range(40)]
    return as_pickle(*records)


def tensor_build_grows_storage() -> bytes:
    """Tensor.__setstate__((storage, 0, size, stride)) calls set_, which grows the storage: uninitialised memory."""
    storage = op_storage(torch_payload(torch.ones(4, dtype=torch.float16))) + op_put(0)
    tensor = op_tensor(storage, 0, (1, 1, 4), (4, 4, 1))
    state = op_tuple(op_get(0), op_int(0), op_tuple(op_int(1), op_int(1), op_int(1 << 16)),
                     op_tuple(op_int(1 << 16), op_int(1 << 16), op_int(1)))
    return as_pickle(op_record(hidden_states=op_build(tensor, state)))


def big_endian_f8() -> bytes:
    return op_build(op_dtype("f8"), op_tuple(op_int(3), op_str(">"), NONE, NONE, NONE, op_int(-1), op_int(-1),
                                             op_int(0)))


def void_state(field_dtype: bytes, offset: int, itemsize: int) -> bytes:
    """numpy's state of a void dtype with one field 'a' (big-endian, so converting the array copies it)."""
    return op_tuple(op_int(3), op_str("|"), NONE, op_tuple(op_str("a")),
                    op_dict({"a": op_tuple(field_dtype, op_int(offset))}), op_int(itemsize), op_int(1), op_int(0))


def dtype_grown_after_use() -> bytes:
    """A real dtype object BUILT with a larger itemsize after an array used it: the array's element 1 now
    lies 1 GiB past its 16 bytes."""
    dtype = op_build(op_dtype("V8"), void_state(big_endian_f8() + op_put(0), 0, 8)) + op_put(1)
    return as_pickle(op_record(hidden_states=op_ndarray(dtype, (2,), op_bytes(b"A" * 16)),
                               input_embeddings=op_build(op_get(1), void_state(op_get(0), 0, 1 << 30))))


def dtype_field_outside() -> bytes:
    """A void dtype of 8 bytes given (by BUILD) a field at offset 2**30."""
    dtype = op_build(op_dtype("V8"), void_state(big_endian_f8(), 1 << 30, 8))
    return as_pickle(op_record(hidden_states=op_ndarray(dtype, (1,), op_bytes(b"A" * 8))))


def stride0_bomb() -> bytes:
    """A one-element storage viewed as 2**32 tokens: every later step would allocate terabytes."""
    storage = op_storage(torch_payload(torch.zeros(1, dtype=torch.float16)))
    huge = (1 << 16, 1 << 16, 4)
    return as_pickle(op_record(hidden_states=op_tensor(storage, 0, huge, (0, 0, 0)),
                               target_routing=op_tensor(storage, 0, huge, (0, 0, 0)),
                               target_top_k=value(torch.zeros(1, 1, 2, dtype=torch.long).expand(*huge[:2], 2))))


def mk(records=None, **fields) -> bytes:
    return as_pickle(*(records or [op_record(**fields)]))


def tensor_field(payload: bytes, offset: int = 0, size: tuple = (1, 1, 4), stride: tuple = (4, 4, 1),
                 hooks: bytes | None = None, *extra: bytes) -> bytes:
    """A hidden_states tensor over a storage payload; valid with the defaults and a 6-element payload."""
    return mk(hidden_states=op_tensor(op_storage(payload), offset, size, stride, hooks, *extra))


def numpy_call(name: str, *args: bytes) -> bytes:
    return op_call(op_global(f"numpy._core.{name.split('.')[0]}", name.split(".")[1]), *args)


MAGIC = op_int(0x1950A86A20F9469CFC6C)
HALF6 = crafted_payload()
HOOKS_WITH_ITEMS = op_call(op_global("collections", "OrderedDict")) + b"(" + op_int(1) + op_int(2) + b"u"
DTYPE_WITH_FIELDS = op_tuple(op_int(3), op_str("<"), NONE, op_tuple(op_str("a")),
                             op_dict({"a": op_tuple(op_dtype("f8"), op_int(0))}), op_int(8), op_int(1), op_int(0))
OBJECT_LIST = op_list(op_str("x"))
# id: (the shard, made in the test: nothing here runs torch at import, see tests/isolated_cli.py;
#      what its one error line must say)
ATTACKS = {
    "ndarray-object-dtype": (segfault_pickle, "numpy.ndarray called directly"),
    "ndarray-call-negative-strides": (lambda: mk(hidden_states=op_call(
        op_global("numpy", "ndarray"), op_tuple(op_int(1)), op_str("f8"), op_bytes(b"A" * 8), op_int(0),
        op_tuple(op_int(-8)))), "numpy.ndarray called directly"),
    "dtype-object": (lambda: mk(hidden_states=op_ndarray(op_dtype("O8"), (1,), op_bytes(b"A" * 8))),
                     "numpy dtype 'O8' is not a number type"),
    "dtype-structured-with-object-field": (lambda: mk(hidden_states=value(np.dtype([("a", "O")]))),
                                           "'V8' is not a number type"),
    "dtype-subarray-of-objects": (lambda: mk(hidden_states=value(np.dtype(("O", (2,))))),
                                  "'V16' is not a number type"),
    "dtype-state-with-fields": (lambda: mk(hidden_states=op_build(op_dtype("f8"), DTYPE_WITH_FIELDS)),
                                "given fields, a subarray or a size"),
    "dtype-itemsize-grown-after-use": (dtype_grown_after_use, "'V8' is not a number type"),
    "dtype-field-offset-outside-itemsize": (dtype_field_outside, "'V8' is not a number type"),
    "dtype-spec-depth-bomb": (lambda: mk(hidden_states=op_call(op_global("numpy", "dtype"), nested_lists(20_000))),
                              "numpy dtype given by a list is not a number type"),
    "ndarray-setstate-object-list": (lambda: mk(hidden_states=op_ndarray(
        op_build(op_dtype("f8"), NUMPY_DTYPE_STATE), (1,), OBJECT_LIST)), "not bytes (an object array?)"),
    "ndarray-huge-shape": (lambda: mk(hidden_states=op_ndarray(op_dtype("f8"), (1 << 40,), op_bytes(b"A" * 8),
                                                               reconstruct_shape=(1 << 40,))),
                           "needs 8796093022208 bytes, the file holds 8"),
    "frombuffer-object-dtype": (lambda: mk(hidden_states=numpy_call(
        "numeric._frombuffer", op_bytes(b"A" * 8), op_dtype("O8"), op_tuple(op_int(1)), op_str("C"))),
        "numpy dtype 'O8' is not a number type"),
    "scalar-object-dtype": (lambda: mk(sample_id=numpy_call("multiarray.scalar", op_dtype("O8"), op_str("x"))),
                            "numpy dtype 'O8' is not a number type"),
    "scalar-short-data": (lambda: mk(sample_id=numpy_call("multiarray.scalar", op_dtype("f8"), op_bytes(b"AAA"))),
                          "numpy scalar that is not a number"),
    "ordered-dict-with-items": (lambda: mk(prev_layer_gates=op_call(
        op_global("collections", "OrderedDict"), op_list(op_tuple(op_int(1), op_int(2))))),
        "collections.OrderedDict called with 1 arguments"),
    "tensor-hooks-setitems": (lambda: tensor_field(HALF6, hooks=HOOKS_WITH_ITEMS), "tensor carries backward hooks"),
    "tensor-python-metadata": (lambda: tensor_field(HALF6, 0, (1, 1, 4), (4, 4, 1), None, op_dict({"a": op_int(1)})),
                               "Python metadata"),
    "tensor-past-end-of-storage": (lambda: tensor_field(HALF6, offset=4), "reaches past the end of its storage"),
    "tensor-negative-stride": (lambda: tensor_field(HALF6, offset=5, stride=(4, 4, -1)),
                               "tensor stride is not a tuple of at most 32 non-negative integers"),
    "tensor-negative-offset": (lambda: tensor_field(HALF6, offset=-2),
                               "tensor has a malformed shape, stride or offset"),
    "tensor-stride0-bomb": (stride0_bomb, "repeats elements (stride 0)"),
    "tensors-share-one-storage-bomb": (shared_storage_bomb, "views repeat the same storage"),
    "tensor-build-grows-storage": (tensor_build_grows_storage, "BUILD on a torch tensor"),
    "record-dunder-key": (lambda: mk(__setstate__=op_global("collections", "OrderedDict")), "not a field dictionary"),
    "record-built-twice": (lambda: as_pickle(op_build(op_record(), op_dict({"hidden_states": value(torch.zeros(3))}))),
                           "state is set twice"),
    "build-on-allowed-function": (lambda: mk(prev_layer_gates=op_build(
        op_global("torch._utils", "_rebuild_tensor_v2"), op_dict({"x": op_int(1)}))),
        "BUILD on torch._utils._rebuild_tensor_v2"),
    "torch-size-not-ints": (lambda: mk(prev_layer_gates=op_call(op_global("torch", "Size"), op_tuple(op_str("a")))),
                            "torch.Size is not a tuple"),
    "torch-size-huge-int": (lambda: mk(prev_layer_gates=op_call(op_global("torch", "Size"), op_tuple(op_int(1 << 70)))),
                            "torch.Size is not a tuple"),
    "codecs-other-codec": (lambda: mk(sample_id=op_call(op_global("_codecs", "encode"), op_str("x"),
                                                        op_str("zlib_codec"))),
                           "_codecs.encode used for something other than protocol-2 bytes"),
    "codecs-not-latin1": (lambda: mk(sample_id=op_call(op_global("_codecs", "encode"), op_str("\u20ac"),
                                                       op_str("latin1"))),
                          "_codecs.encode of text that is not latin-1"),
    "storage-wrong-byte-length": (lambda: tensor_field(crafted_payload(data=bytes(14))), "wrong byte length"),
    "storage-huge-declared-size": (lambda: tensor_field(crafted_payload(numel=1 << 40)), "wrong byte length"),
    "storage-inner-global": (lambda: tensor_field(crafted_payload(root=op_call(op_global("os", "system"),
                                                                              op_str("true")))),
                             "refused global os.system (inside a tensor's storage)"),
    "storage-not-a-storage": (lambda: tensor_field(crafted_payload(root=op_int(7))), "storage has a malformed header"),
    "storage-memo-index-bomb": (lambda: tensor_field(crafted_payload(
        first_pickle=b"\x80\x02" + MAGIC + op_put(0x7FFFFFFF) + b".")), "memo index 2147483647"),
    "memo-index-bomb": (lambda: as_pickle(op_record(), prefix=NONE + op_put(0x7FFFFFFF) + b"0"),
                        "memo index 2147483647"),
    "frame-length-bomb": (lambda: as_pickle(op_record(), prefix=b"\x95" + struct.pack("<Q", 1 << 40)),
                          "a frame of 1099511627776 bytes at byte 2 runs past the end of the file"),
    "sample-id-depth-bomb": (lambda: mk(sample_id=nested_lists(20_000)), "sample_id a list"),
}


def test_crafted_control_imports(tmp_path):
    """The assembler's valid record (tensors written with crafted_payload too) imports: the attacks below
    fail for what they change, not because the crafted files are broken anyway."""
    d = tmp_path / "in"
    d.mkdir()
    hidden = op_tensor(op_storage(crafted_payload(data=struct.pack("<6e", *range(6)))), 2, (1, 1, 4), (4, 4, 1))
    (d / "s.pkl").write_bytes(mk(hidden_states=hidden, prev_layer_gates=op_call(op_global("torch", "Size"),
                                                                                 op_tuple(op_int(2)))))
    import_main(["--input", str(d), "--output", str(tmp_path / "out"), "--num-layers", "1"])
    shard = next(TraceSet(tmp_path / "out").shards())
    assert shard.tensor("hidden", (0, slice(0, 1))).tolist() == [[2.0, 3.0, 4.0, 5.0]]


@pytest.fixture(scope="module")
def isolated():
    """Each case in its own process: a segfault fails that case instead of ending the test run."""
    yield IsolatedCLI("scripts.import_specmoe_shards")
    os.environ.pop("TQDM_DISABLE", None)


@pytest.mark.parametrize("case", list(ATTACKS))
def test_crafted_pickle_is_refused_in_one_line(case, tmp_path, isolated):
    make, says = ATTACKS[case]
    data = make()
    shard = tmp_path / "in" / "shard_000.pkl"
    shard.parent.mkdir()
    shard.write_bytes(data)
    out = tmp_path / "out"
    code, err = isolated(["--input", str(shard.parent), "--output", str(out), "--num-layers", "1"],
                         tmp_path / "stderr")
    assert code == 2, f"exit {code} (-11: segfault, -9: killed, None: hung)\n{err[-2000:]}"
    assert err.count("\n") == 1 and err.startswith("import_specmoe_shards: error: "), err[-2000:]
    assert str(shard) in err and says in err, err
    assert not out.exists()


def test_the_segfault_command_gives_one_line(tmp_path):
    """The reproduction command, through the real script in a fresh interpreter."""
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "s.pkl").write_bytes(segfault_pickle())
    proc = run_script("import_specmoe_shards", "--input", ev, "--output", tmp_path / "ev_out", "--num-layers", "2",
                      check=False)
    assert_one_line_error(proc, "s.pkl", "numpy.ndarray called directly")
    assert not (tmp_path / "ev_out").exists()
