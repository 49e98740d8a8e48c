"""The trace format: shards round-trip, are real safetensors, and damage is caught and named."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from collection.traces.format import (
    SafetensorsFile,
    ShardWriter,
    TensorSpec,
    TraceFormatError,
    TraceSet,
    read_manifest,
    sha256_file,
)


def write_shard(path, n=10):
    specs = {"a": TensorSpec("float16", (2, n, 3)), "b": TensorSpec("int16", (n,)), "c": TensorSpec("bfloat16", (n, 2))}
    w = ShardWriter(path, specs, {"note": "x"})
    a = np.arange(2 * n * 3, dtype=np.float16).reshape(2, n, 3)
    w.write("a", a[0, :4], index=(0,), row=0)   # written in pieces, out of order
    w.write("a", a[1], index=(1,))
    w.write("a", a[0, 4:], index=(0,), row=4)
    w.write("b", np.arange(n, dtype=np.int16))
    c = torch.randn(n, 2).to(torch.bfloat16)
    w.write("c", c)
    assert not path.exists() and path.with_name(path.name + ".partial").exists()
    nbytes, digest = w.commit()
    return a, c, nbytes, digest


def test_shard_round_trip_and_safetensors_compatibility(tmp_path):
    path = tmp_path / "s.safetensors"
    a, c, nbytes, digest = write_shard(path)
    assert path.stat().st_size == nbytes and sha256_file(path) == digest
    f = SafetensorsFile(path)
    assert np.array_equal(f.numpy("a"), a)
    assert torch.equal(f.tensor("c"), c)
    assert torch.equal(f.tensor("a", (1, slice(2, 5))), torch.from_numpy(a[1, 2:5]))
    assert f.metadata == {"note": "x"}
    with safe_open(str(path), framework="pt") as g:  # the reference reader agrees
        assert torch.equal(g.get_tensor("c"), c)
        assert np.array_equal(g.get_tensor("a").numpy(), a)


def test_aborted_shard_leaves_nothing(tmp_path):
    w = ShardWriter(tmp_path / "s.safetensors", {"a": TensorSpec("int32", (4,))})
    w.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "header", "empty", "garbage"])
def test_damaged_files_raise_named_errors(tmp_path, damage):
    path = tmp_path / "s.safetensors"
    write_shard(path)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) - 7])
    elif damage == "header":
        path.write_bytes(raw[:8] + b"[" + raw[9:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"\xff" * 64)
    with pytest.raises(TraceFormatError, match="s.safetensors"):
        SafetensorsFile(path)


def test_trace_set_verifies_checksums_and_sizes(tiny_traces, tmp_path):
    import shutil

    copy = tmp_path / "t"
    shutil.copytree(tiny_traces, copy)
    ts = TraceSet(copy)
    table = ts.sequence_table()
    assert len(table["seq_id"]) == 72 and table["length"].min() >= 1
    shard = copy / ts.manifest.shards[1].file
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte in the data: same size, wrong checksum
    shard.write_bytes(bytes(raw))
    with pytest.raises(TraceFormatError, match="checksum mismatch"):
        TraceSet(copy).shard(1)
    TraceSet(copy, verify=False).shard(1)  # the opt-out skips the hash, not the structure checks
    shard.write_bytes(bytes(raw[:-100]))
    with pytest.raises(TraceFormatError, match="truncated"):
        TraceSet(copy, verify=False).shard(1)


def test_manifest_validation(tiny_traces, tmp_path):
    import shutil

    copy = tmp_path / "t"
    shutil.copytree(tiny_traces, copy)
    m = json.loads((copy / "manifest.json").read_text())
    assert read_manifest(copy).num_experts == 60
    m["routing"]["top_k"] = "four"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TraceFormatError, match="routing.top_k"):
        read_manifest(copy)
    m["routing"]["top_k"] = 4
    m["shards"][0]["file"] = "../../etc/passwd"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TraceFormatError, match="plain file name"):
        read_manifest(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(TraceFormatError, match="unreadable manifest"):
        read_manifest(copy)
