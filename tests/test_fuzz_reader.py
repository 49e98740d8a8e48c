"""Fuzzing the shard reader: damaged bytes give TraceFormatError naming the file, never anything else;
and every valid file the writer makes, of any shape and dtype, reads back exactly (so a reader that
refused everything would fail here, not pass)."""
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collection.traces.format import (
    _NAME_TO_ST,
    _ST_TO_NP,
    Manifest,
    SafetensorsFile,
    ShardInfo,
    ShardWriter,
    TensorSpec,
    TraceFormatError,
    TraceSet,
    TraceShard,
    shard_name,
    shard_specs,
    write_manifest,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(params=["tiny_traces", "tiny_compact_traces", "tiny_pca_traces", "tiny_pca_router_traces"])
# lossless, compact, fitted, fitted with decoding matrices
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
            from collection.traces.format import read_codec
            from collection.traces.hidden_format import FORMATS

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


VALID = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def storage(dtype: str) -> np.dtype:
    return np.dtype(_ST_TO_NP[_NAME_TO_ST[dtype]])


def draw_array(data, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Any bytes (NaNs, infinities, subnormals included), except that bool holds only 0 and 1."""
    n = int(np.prod(shape, dtype=np.int64)) * storage(dtype).itemsize
    raw = np.frombuffer(data.draw(st.binary(min_size=n, max_size=n)), dtype=np.uint8)
    if dtype == "bool":
        raw = raw & 1
    return raw.view(storage(dtype)).reshape(shape)


def write_in_pieces(data, w: ShardWriter, name: str, a: np.ndarray) -> None:
    """As collection writes: whole, in two row ranges out of order, or per leading index in row ranges."""
    how = data.draw(st.sampled_from(["whole", "rows", "index"] if a.ndim >= 2 else ["whole", "rows"]))
    if how == "whole":
        w.write(name, a)
    elif how == "rows":
        cut = data.draw(st.integers(0, a.shape[0]))
        w.write(name, a[cut:], row=cut)
        w.write(name, a[:cut], row=0)
    else:
        for i in reversed(range(a.shape[0])):
            cut = data.draw(st.integers(0, a.shape[1]))
            w.write(name, a[i, cut:], index=(i,), row=cut)
            w.write(name, a[i, :cut], index=(i,), row=0)


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.ascontiguousarray(a).tobytes() == b.tobytes()


@VALID
@given(data=st.data())
def test_any_valid_file_reads_back_exactly(tmp_path_factory, data):
    specs = data.draw(st.dictionaries(
        st.text(st.characters(min_codepoint=48, max_codepoint=122), min_size=1, max_size=6),
        st.builds(TensorSpec, st.sampled_from(sorted(_NAME_TO_ST)), st.lists(st.integers(0, 4), min_size=1,
                                                                              max_size=3).map(tuple)),
        min_size=1, max_size=4))
    metadata = data.draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
    arrays = {name: draw_array(data, spec.dtype, spec.shape) for name, spec in specs.items()}
    path = tmp_path_factory.mktemp("valid") / "f.safetensors"
    w = ShardWriter(path, specs, metadata)
    for name in data.draw(st.permutations(list(specs))):
        write_in_pieces(data, w, name, arrays[name])
    w.commit()
    f = SafetensorsFile(path)
    assert f.keys() == list(specs) and f.metadata == metadata
    for name, a in arrays.items():
        assert same_bytes(f.numpy(name), a), name


@VALID
@given(data=st.data())
def test_any_valid_trace_set_opens_and_reads_back_exactly(tmp_path_factory, data):
    L, K = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    E, H = data.draw(st.integers(K, 8)), data.draw(st.integers(1, 4))
    hidden_layers = data.draw(st.lists(st.integers(0, L - 1), unique=True, max_size=L).map(sorted))
    hidden_dtype = data.draw(st.sampled_from(["float16", "bfloat16", "float32"]))
    store_logits = data.draw(st.booleans())
    dims = dict(num_layers=L, top_k=K, num_experts=E, hidden_size=H, hidden_layers=len(hidden_layers),
                hidden_dtype=hidden_dtype, store_logits=store_logits)
    directory = tmp_path_factory.mktemp("valid") / "set"
    directory.mkdir()
    shards, written, seq = [], [], 0
    for i in range(data.draw(st.integers(1, 2))):
        lengths = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
        S, N = len(lengths), sum(lengths)
        specs = shard_specs(N, S, **dims)
        arrays = {name: draw_array(data, spec.dtype, spec.shape) for name, spec in specs.items()}
        # the values the reader checks must be valid: offsets, expert ids and source indices
        arrays["seq_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        arrays["seq_ids"] = np.arange(seq, seq + S, dtype=np.int64)
        arrays["seq_sources"] = np.array(data.draw(st.lists(st.integers(0, 1), min_size=S, max_size=S)), np.int16)
        arrays["topk_ids"] = np.array(data.draw(st.lists(st.integers(0, E - 1), min_size=L * N * K,
                                                         max_size=L * N * K)), np.int16).reshape(L, N, K)
        w = ShardWriter(directory / shard_name(i), specs)
        for name in data.draw(st.permutations(list(specs))):
            write_in_pieces(data, w, name, arrays[name])
        nbytes, digest = w.commit()
        shards.append(ShardInfo(shard_name(i), S, N, nbytes, digest))
        written.append(arrays)
        seq += S
    write_manifest(directory, Manifest(
        model={"name_or_path": "fuzz"}, routing={"num_layers": L, "num_experts": E, "top_k": K, "hidden_size": H},
        capture={"hidden_layers": hidden_layers, "hidden_dtype": hidden_dtype, "store_logits": store_logits},
        sources=[{"name": "a"}, {"name": "b"}], plan={}, shards=shards, complete=True))
    ts = TraceSet(directory)
    for i, arrays in enumerate(written):
        sh = ts.shard(i)  # checksum, size and schema all verified
        assert sorted(sh.keys()) == sorted(arrays)
        for name, a in arrays.items():
            assert same_bytes(sh.numpy(name), a), (i, name)
    assert ts.sequence_table()["seq_id"].tolist() == list(range(seq))

