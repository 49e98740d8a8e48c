"""Fuzzing the shard reader: damaged bytes give TraceFormatError naming the file, never anything else."""
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collection.format import SafetensorsFile, ShardInfo, TraceFormatError, TraceSet, TraceShard

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(params=["tiny_traces", "tiny_compact_traces", "tiny_pca_traces"])  # lossless, compact, fitted
def traces(request):
    return request.getfixturevalue(request.param)


def open_everything(path, manifest, codec_dir=None):
    """What a reader does with a shard: structure, manifest checks, and reading every tensor."""
    try:
        info = ShardInfo(file=path.name, sequences=manifest.shards[0].sequences, tokens=manifest.shards[0].tokens,
                         bytes=path.stat().st_size, sha256="")
        shard = TraceShard(path, info, manifest, verify=False)
        for name in shard.keys():
            np.asarray(shard.numpy(name)).sum()
        if "hidden_scale" in shard.keys():  # compact: decoding any codes and scales gives rows, never a crash
            from collection.format import read_codec
            from collection.hidden_format import FORMATS

            codec = read_codec(codec_dir, manifest)
            FORMATS[manifest.hidden_format].decode(shard.tensor("hidden", 0), shard.tensor("hidden_scale", 0),
                                                   codec=codec, layers=0)
    except TraceFormatError as e:
        assert path.name in str(e)




@FUZZ
@given(data=st.data())
def test_byte_flips_and_truncation(traces, tmp_path_factory, data):
    ts = TraceSet(traces)
    raw = bytearray((traces / ts.manifest.shards[0].file).read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    # most damage in the header, where parsing decisions are made; some anywhere
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.one_of(st.integers(0, min(len(raw) - 1, 8 + n)), st.integers(0, len(raw) - 1)))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    path = tmp_path_factory.mktemp("fuzz") / "shard_00000.safetensors"
    path.write_bytes(bytes(raw[:cut] if cut is not None else raw))
    open_everything(path, ts.manifest, traces)


@FUZZ
@given(data=st.data())
def test_structured_header_mutations(traces, tmp_path_factory, data):
    ts = TraceSet(traces)
    raw = (traces / ts.manifest.shards[0].file).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "junk"]))
    value = data.draw(st.one_of(st.integers(-2**63, 2**64), st.text(max_size=5), st.lists(st.integers(-5, 2**40), max_size=4),
                                st.none(), st.floats(allow_nan=True)))
    if field == "drop":
        del header[name]
    elif field == "junk":
        header[name] = value
    else:
        header[name][field] = value
    body = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("fuzz") / "shard_00000.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    open_everything(path, ts.manifest, traces)


@FUZZ
@given(blob=st.binary(max_size=300))
def test_arbitrary_bytes(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    path.write_bytes(blob)
    try:
        SafetensorsFile(path)
    except TraceFormatError as e:
        assert "x.safetensors" in str(e)
