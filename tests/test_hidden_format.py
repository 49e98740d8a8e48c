"""Compact hidden formats: hand-computed codes, the quantizers' known error, byte counts, manifests old and
new, damaged compact shards, and collection, transcoding and reading agreeing with the one encoder."""
import dataclasses
import json
import shutil
import time

import numpy as np
import pytest
import torch

from collection.traces.format import TraceFormatError, TraceSet, bytes_per_token, read_manifest
from collection.traces.hidden_format import (
    FORMATS,
    allocate_bits,
    fit_codec,
    lloyd_max_levels,
    pack_bits,
    rotate,
    rows_times_layer_matrix,
    unpack_bits,
    unrotate,
)
from collection.traces.rows import load_block
from collection.traces.staging import StagedReader

COMPACT = [name for name, f in FORMATS.items() if not f.lossless]


def test_pack_bits_known_bytes():
    # 3 bits: codes 1..7,0 little-endian in one 24-bit word = 2,054,353 = bytes 209, 88, 31
    assert pack_bits(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3).tolist() == [209, 88, 31]
    assert pack_bits(torch.tensor([1, 2]), 4).tolist() == [0x21]           # code 2i low nibble, 2i+1 high
    assert pack_bits(torch.tensor([3, 0, 1, 2, 0, 0, 0, 3]), 2).tolist() == [0b10010011, 0b11000000]
    g = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4):
        codes = torch.randint(0, 2 ** bits, (5, 48), generator=g, dtype=torch.uint8)
        assert torch.equal(unpack_bits(pack_bits(codes, bits), bits), codes)


@pytest.mark.parametrize("H", [128, 96])  # 96: block-diagonal, three blocks of 32
def test_hadamard_rotation_is_orthogonal_and_spreads_an_outlier(H):
    block = H & -H
    x = torch.zeros(2, H, dtype=torch.float64)
    x[0, 5] = 10.0  # one outlier channel: after rotation it is spread evenly over its block
    y = rotate(x)
    assert torch.allclose(y[0, :block].abs(), torch.full((block,), 10.0 / block ** 0.5, dtype=torch.float64))
    z = torch.randn(7, H, dtype=torch.float64)
    assert torch.allclose(unrotate(rotate(z)), z, atol=1e-12)
    assert torch.allclose(rotate(z).norm(dim=1), z.norm(dim=1))


def test_int4_group_codes_by_hand():
    # one group of 32: absmax 4 -> step 4 / 8 = 0.5; mid-rise levels (k + 1/2) * 0.5, k in [-8, 8)
    x = torch.zeros(1, 32)
    x[0, :3] = torch.tensor([4.0, -4.0, 1.0])
    payload, scale = FORMATS["int4"].encode(x)
    assert scale.tolist() == [[0.5]]
    # codes k + 8: 4.0 -> k = 8 clamped to 7 -> 15; -4.0 -> 0; 1.0 -> 10; 0.0 -> 8
    assert payload[0, :2].tolist() == [15 | 0 << 4, 10 | 8 << 4]
    expect = torch.full((32,), 0.25)
    expect[:3] = torch.tensor([3.75, -3.75, 1.25])
    assert torch.equal(FORMATS["int4"].decode(payload, scale)[0], expect)


def test_rotated_formats_store_the_row_rms():
    x = torch.full((2, 64), 3.0)
    x[1] *= -0.5
    for name in ("hadamard-4bit", "hadamard-3.5bit", "hadamard-3bit"):
        _, scale = FORMATS[name].encode(x)
        assert scale.float().squeeze(1).tolist() == [3.0, 1.5]  # rotation keeps the RMS; stored in float16


# relative mean squared error of each quantizer on Gaussian rows. Uniform quantizers clipped at the Gaussian
# optimum: 0.01154 with 16 levels, 0.03744 with 8 (Max 1960, uniform case), so 0.0245 at 3.5 bits (half of the
# row at each). fp8 e4m3 rounds to 3 mantissa bits: E[(err / x)^2] = 2^-6 / 12 / 2 = 0.00065. int4 with an absmax
# step per 32 elements: measured 0.0079 (no closed form: the step follows each group's maximum).
# pca-3.5bit on isotropic rows: every axis has the same variance, so half the axes get 4 bits and half 3, as in
# hadamard-3.5bit, but its levels are the Gaussian's Lloyd-Max levels: (0.009497 + 0.03454) / 2 = 0.0220.
EXPECTED_MSE = {"fp8": (0.0005, 0.0008), "int4": (0.006, 0.010), "hadamard-4bit": (0.0105, 0.0125),
                "hadamard-3.5bit": (0.0230, 0.0260), "hadamard-3bit": (0.0355, 0.0395), "pca-3.5bit": (0.0205, 0.0235)}


@pytest.mark.parametrize("name", [n for n in COMPACT if not FORMATS[n].router_weight])  # pca-router: below
def test_round_trip_error_is_the_quantizers_known_error(name):
    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 256, generator=g) * torch.rand(4096, 1, generator=g) * 5  # rows of varied scale
    codec = fit_codec(fmt, (x.T @ x / len(x))[None]) if fmt.fitted else None
    payload, scale = fmt.encode(x, codec, 0)
    assert payload.dtype == torch.uint8 and payload.shape == (4096, fmt.payload_bytes(256))
    assert scale.dtype == torch.float16 and scale.shape == (4096, fmt.groups(256))
    y = fmt.decode(payload, scale, torch.float32, codec, 0)
    rel = ((y - x).square().sum(1) / x.square().sum(1)).mean().item()
    lo, hi = EXPECTED_MSE[name]
    assert lo < rel < hi, rel
    y16 = fmt.decode(payload, scale, torch.bfloat16, codec, 0).float()
    assert torch.allclose(y16, y, atol=0.02 * x.abs().max().item())


def test_lloyd_max_levels_are_maxs_table():
    # Max (1960), Table I: the Gaussian's optimal 4- and 8-level quantizers and the errors for 1 to 4 bits
    assert np.allclose(lloyd_max_levels(2)[0], [-1.510, -0.4528, 0.4528, 1.510], atol=1e-3)
    assert np.allclose(lloyd_max_levels(3)[0][4:], [0.2451, 0.7560, 1.344, 2.152], atol=1e-3)
    assert np.allclose([lloyd_max_levels(b)[1] for b in range(5)], [1, 0.3634, 0.1175, 0.03454, 0.009497], atol=2e-5)


def test_bit_allocation_by_hand():
    # 4 blocks of 8 axes with variances 16, 4, 1, 1/4 (block energies 128, 32, 8, 2) and 2 bits per axis on
    # average: 8 block-bits, each to the block whose error it cuts most, energy x (MSE[b] - MSE[b + 1]):
    # A1 81.5, A2 31.3, B1 20.4, A3 10.4, B2 7.8, C1 5.1, A4 3.3, B3 2.6 (then C2 2.0 would come next)
    v = np.repeat([16.0, 4.0, 1.0, 0.25], 8)
    assert allocate_bits(v, 2.0).tolist() == [4] * 8 + [3] * 8 + [1] * 8 + [0] * 8


def test_fitted_axes_of_a_known_second_moment():
    # E[h h^T] = diag(1, 9, 4, 0.25, ...), all distinct: the axes are the coordinate axes, strongest first,
    # each pointing +
    lam = torch.tensor([1.0, 9.0, 4.0, 0.25, 2.0, 0.5, 3.0, 6.0, 1.5, 0.75, 7.0, 2.5, 0.1, 5.0, 8.0, 0.3])
    codec = fit_codec(FORMATS["pca-3.5bit"], torch.diag(lam)[None])
    order = lam.argsort(descending=True, stable=True)
    assert torch.equal(codec.basis[0], torch.eye(16)[:, order])
    assert torch.allclose(codec.rel_std[0], (lam[order] / lam.mean()).sqrt())
    assert codec.bits.sum() == 3.5 * 16 and codec.bits.tolist() == sorted(codec.bits.tolist(), reverse=True)


def test_router_weighted_axes_by_hand():
    """Isotropic rows (M = I, H = 16) and one router row e0 at the only layer: the router sees E|W h|^2 / E|h|^2
    = 1/16 of the rows, so A = I + 4 * 16 e0 e0^T = diag(65, 1, ..., 1). pca-router is plain pca of A^(1/2) h:
    its first axis is e0 scaled by sqrt(65) (with the 8 bits water-filling gives it), and decoding divides by
    it again."""
    fmt = FORMATS["pca-router-3.5bit"]
    W = torch.zeros(1, 1, 16)
    W[0, 0, 0] = 1.0
    with pytest.raises(ValueError, match="router weights"):
        fit_codec(fmt, torch.eye(16)[None])
    codec = fit_codec(fmt, torch.eye(16)[None], W, [0])
    assert codec.basis[0, 0, 0].item() == pytest.approx(65 ** 0.5, rel=1e-5)
    assert codec.inverse[0, 0, 0].item() == pytest.approx(65 ** -0.5, rel=1e-5)
    assert torch.allclose(codec.basis[0, 0, 1:], torch.zeros(15), atol=1e-6)  # e0 is an axis of its own
    assert torch.allclose(codec.basis[0] @ codec.inverse[0], torch.eye(16), atol=1e-5)
    assert codec.rel_std[0, 0].item() == pytest.approx((65 / (80 / 16)) ** 0.5, rel=1e-5)  # eigenvalues 65, 1 x 15
    assert codec.bits[0].item() > codec.bits[-1].item()


def test_router_weighting_trades_plain_error_for_what_the_routers_see():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2000, 64, generator=g) * torch.linspace(3, 0.1, 64)
    W = torch.randn(5, 12, 64, generator=g)  # MoE layers 0..4; slots 0..2 store layers 1, 2, 3
    M = torch.einsum("lnh,lng->lhg", x, x) / 2000
    err = {}
    for name in ("pca-3.5bit", "pca-router-3.5bit"):
        fmt = FORMATS[name]
        codec = fit_codec(fmt, M, W, [1, 2, 3])
        y = torch.stack([fmt.decode(*fmt.encode(x[j], codec, j), torch.float32, codec, j) for j in range(3)])
        seen = sum(((y[j] - x[j]) @ W[j + 1 + d].T).square().sum() for j in range(3) for d in range(4) if j + 1 + d < 5)
        err[name] = ((y - x).square().sum().item(), seen.item())
        payload, scale = fmt.encode(x, codec, [0, 1, 2])
        slots, rows = torch.tensor([2, 0, 1, 0]), torch.tensor([5, 6, 7, 8])
        mixed = fmt.decode(payload[slots, rows], scale[slots, rows], torch.float32, codec, slots)
        assert torch.allclose(mixed, y[slots, rows], atol=1e-4)  # rows of mixed layers decode as each layer's
    assert err["pca-router-3.5bit"][1] < 0.9 * err["pca-3.5bit"][1]  # the routers' view: less error
    assert err["pca-router-3.5bit"][0] > err["pca-3.5bit"][0]        # paid for by the rest


def test_pca_decodes_rows_of_mixed_layers_in_their_order():
    fmt = FORMATS["pca-3.5bit"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 200, 64, generator=g) * torch.linspace(3, 0.1, 64)  # anisotropic: bits follow variance
    codec = fit_codec(fmt, torch.einsum("lnh,lng->lhg", x, x) / 200)
    payload, scale = fmt.encode(x, codec, [0, 1, 2])
    slots, rows = torch.tensor([2, 0, 1, 0, 2, 2]), torch.tensor([5, 6, 7, 8, 9, 0])
    mixed = fmt.decode(payload[slots, rows], scale[slots, rows], torch.float32, codec, slots)
    each = torch.stack([fmt.decode(payload[s], scale[s], torch.float32, codec, s)[r] for s, r in zip(slots.tolist(),
                                                                                                     rows.tolist())])
    assert torch.allclose(mixed, each, atol=1e-6)
    y = torch.stack([fmt.decode(payload[j], scale[j], torch.float32, codec, j) for j in range(3)])
    pca_err = ((y - x).square().sum() / x.square().sum()).item()
    had = FORMATS["hadamard-3.5bit"]
    had_err = ((had.decode(*had.encode(x)) - x).square().sum() / x.square().sum()).item()
    assert pca_err < 0.5 * had_err  # the point of fitting: bits where the variance is


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_of_mixed_layers_each_times_their_layers_matrix(dtype):
    """bf16 takes the grouped GEMM (group ends on the device, no host sync), float32 the loop; both must give
    every row its own layer's product, in the rows' order, with a layer that has no row in between."""
    if dtype == torch.bfloat16:
        try:
            torch._grouped_mm(torch.ones(2, 16, dtype=dtype), torch.ones(1, 16, 16, dtype=dtype),
                              offs=torch.tensor([2], dtype=torch.int32))
        except (AttributeError, RuntimeError, NotImplementedError):
            pytest.skip("no grouped GEMM for bf16 on this device")
    g = torch.Generator().manual_seed(3)
    mats = torch.randn(4, 32, 16, generator=g).to(dtype)
    x = torch.randn(50, 32, generator=g).to(dtype)
    layers = torch.randint(0, 4, (50,), generator=g)
    layers[layers == 2] = 3  # layer 2 has no row
    want = torch.stack([x[i].float() @ mats[int(layers[i])].float() for i in range(50)])
    got = rows_times_layer_matrix(x, layers, mats).float()
    tol = 1e-4 if dtype == torch.float32 else 0.05 * want.abs().max().item()
    assert got.shape == (50, 16) and (got - want).abs().max().item() < tol
    assert rows_times_layer_matrix(x[:0], layers[:0], mats).shape == (0, 16)


def test_bytes_per_token_and_the_seed_recipe():
    # Qwen1.5-MoE-A2.7B: L = 24, E = 60, k = 4, H = 2048, bf16; token id 4 B, ids + weights 24*4*(2+2) = 384 B,
    # logits 24*60*2 = 2880 B; hidden per layer 2048*2 = 4096 B lossless, 7*2048/16 + 2 = 898 B at 3.5 bits
    dims = dict(num_layers=24, top_k=4, num_experts=60, hidden_size=2048, hidden_layers=24, hidden_dtype="bfloat16",
                store_logits=True)
    assert bytes_per_token(**dims) == 4 + 384 + 2880 + 24 * 4096 == 101_572
    assert bytes_per_token(**dims, hidden_format="hadamard-3.5bit") == 4 + 384 + 2880 + 24 * 898 == 24_820
    from models.moe_configs import seed_recipe_table

    row = {r["format"]: r for r in seed_recipe_table()}["hadamard-3.5bit"]
    assert row["hidden_vs_bf16"] >= 4 and row["record_vs_bf16"] >= 4 and row["seed_recipe_gb"] <= 32
    assert row["seed_recipe_gb"] == pytest.approx(24_820 * 5000 * 256 / 1e9)


def test_old_trace_sets_still_load(tiny_traces, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(tiny_traces, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["capture"].pop("hidden_format", None)  # as written before the field existed
    assert m["format_version"] == 1
    (copy / "manifest.json").write_text(json.dumps(m))
    old, new = TraceSet(copy), TraceSet(tiny_traces)
    assert old.manifest.hidden_format == "lossless"
    ids = old.sequence_table()["seq_id"]
    a = load_block(old, [0, 1], ids, torch.device("cpu"))
    b = load_block(new, [0, 1], ids, torch.device("cpu"))
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.topk_ids, b.topk_ids)


@pytest.mark.parametrize("change,why", [
    (lambda m: m["capture"].__setitem__("hidden_format", "zip"), "is not one of"),
    (lambda m: m["capture"].__setitem__("hidden_format", ["x"]), "is not one of"),
    (lambda m: m.__setitem__("format_version", 1), "needs format_version 2"),
    (lambda m: m.__setitem__("format_version", 3), "format_version 3"),
    (lambda m: m["routing"].__setitem__("hidden_size", 100), "not a multiple of 16"),
])
def test_manifest_checks_the_format(tiny_compact_traces, tmp_path, change, why):
    copy = tmp_path / "t"
    shutil.copytree(tiny_compact_traces, copy)
    m = json.loads((copy / "manifest.json").read_text())
    assert m["format_version"] == 2 and m["capture"]["hidden_format"] == "hadamard-3.5bit"
    change(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TraceFormatError, match=why):
        read_manifest(copy)


def test_damaged_compact_shards_are_named(tiny_compact_traces, tmp_path):
    copy = tmp_path / "t"
    shutil.copytree(tiny_compact_traces, copy)
    ts = TraceSet(copy)
    path = copy / ts.manifest.shards[0].file
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10  # the last bytes belong to hidden_scale
    path.write_bytes(bytes(raw))
    with pytest.raises(TraceFormatError, match="checksum mismatch"):
        TraceSet(copy).shard(0)
    # a shard whose hidden codes have the lossless shape: the schema check names the tensor
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    L, N, _ = header["hidden"]["shape"]
    begin = header["hidden"]["data_offsets"][0]
    header["hidden"] = {"dtype": "U8", "shape": [L, N // 2, 56], "data_offsets": [begin, begin + L * (N // 2) * 56]}
    body = json.dumps(header).encode()
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n:])
    ts = TraceSet(copy, verify=False)
    ts.manifest.shards[0].bytes = path.stat().st_size
    with pytest.raises(TraceFormatError, match=r"shard_00000.*hidden has shape"):
        ts.shard(0)


def test_fitted_codec_is_checked_against_the_manifest(tiny_pca_traces, tmp_path):
    copy = tmp_path / "t"
    shutil.copytree(tiny_pca_traces, copy)
    ts = TraceSet(copy)
    codec = ts.hidden_codec()
    assert codec.basis.shape == (8, 128, 128) and codec.bits.sum() == 3.5 * 128
    assert ts.manifest.capture["hidden_codec"]["fit_tokens"] == ts.manifest.shards[0].tokens  # < 65,536
    raw = bytearray((copy / "hidden_codec.safetensors").read_bytes())
    raw[-1] ^= 0x01
    (copy / "hidden_codec.safetensors").write_bytes(bytes(raw))
    with pytest.raises(TraceFormatError, match="hidden_codec.safetensors: checksum mismatch"):
        TraceSet(copy).hidden_codec()
    m = json.loads((copy / "manifest.json").read_text())
    del m["capture"]["hidden_codec"]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TraceFormatError, match="needs capture.hidden_codec"):
        read_manifest(copy)


def test_a_resumed_fitted_collection_reuses_its_fit(tiny_model, tmp_path):
    """Interrupted after its first shard, a pca-3.5bit collection resumes with the codec it fitted, so every
    shard is byte-identical to an uninterrupted run's."""
    from scripts.collect_traces import main

    common = ["--model", str(tiny_model), "--datasets", "bundled", "--target_traces", "24", "--shard_size", "8",
              "--batch_size", "4", "--max_length", "32", "--device", "cpu", "--dtype", "float32",
              "--hidden-format", "pca-3.5bit"]
    main([*common, "--output", str(tmp_path / "ref")])
    shutil.copytree(tmp_path / "ref", tmp_path / "cut")
    m = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    for info in m["shards"][1:]:  # as if killed after the first shard's commit
        (tmp_path / "cut" / info["file"]).unlink()
    m["shards"], m["complete"] = m["shards"][:1], False
    (tmp_path / "cut" / "manifest.json").write_text(json.dumps(m))
    main([*common, "--output", str(tmp_path / "cut"), "--resume"])
    a, b = TraceSet(tmp_path / "ref"), TraceSet(tmp_path / "cut")
    assert [s.sha256 for s in a.manifest.shards] == [s.sha256 for s in b.manifest.shards] and len(b) == 3
    assert a.manifest.capture["hidden_codec"] == b.manifest.capture["hidden_codec"]


def test_transcoded_set_is_the_encoder_applied_to_the_lossless_rows(tiny_traces, tiny_compact_traces):
    src, dst = TraceSet(tiny_traces), TraceSet(tiny_compact_traces)
    fmt = FORMATS["hadamard-3.5bit"]
    assert dst.manifest.capture["transcoded_from"]["hidden_format"] == "lossless"
    for i in range(len(src)):
        a, b = src.shard(i), dst.shard(i)
        for name in ("token_ids", "seq_offsets", "topk_ids", "topk_weights", "router_logits"):
            assert np.array_equal(a.numpy(name), b.numpy(name))
        payload, scale = fmt.encode(a.tensor("hidden", 1))
        assert torch.equal(b.tensor("hidden", 1), payload) and torch.equal(b.tensor("hidden_scale", 1), scale)
    ratio = sum(s.bytes for s in src.manifest.shards) / sum(s.bytes for s in dst.manifest.shards)
    assert ratio > 2  # fp32 -> 3.5 bits; the logits, ids and weights are unchanged


def test_a_router_weighted_set_is_fitted_with_its_routers_and_decodes_through_its_inverse(tiny_traces, tmp_path):
    """transcode_traces.py --hidden-format pca-router-3.5bit: the codec is fitted with the set's own router
    weights, its decoding matrices travel in the codec file, and a codec file without them is refused."""
    from scripts.transcode_traces import main

    out = tmp_path / "router"
    main(["--traces", str(tiny_traces), "--hidden-format", "pca-router-3.5bit", "--output", str(out), "--device", "cpu"])
    src, dst = TraceSet(tiny_traces), TraceSet(out)
    fmt, codec = FORMATS["pca-router-3.5bit"], dst.hidden_codec()
    rows = slice(0, min(65536, src.shard(0).info.tokens))
    xs = [src.shard(0).tensor("hidden", (j, rows)).double() for j in range(len(src.manifest.hidden_layers))]
    want = fit_codec(fmt, torch.stack([x.T @ x / x.shape[0] for x in xs]), src.router_weights().float(),
                     src.manifest.hidden_layers)
    assert torch.allclose(codec.basis, want.basis, atol=1e-5) and torch.allclose(codec.inverse, want.inverse, atol=1e-5)
    h = src.shard(1).tensor("hidden", 2).float()
    decoded = fmt.decode(dst.shard(1).tensor("hidden", 2), dst.shard(1).tensor("hidden_scale", 2), torch.float32, codec, 2)
    assert ((decoded - h).square().sum() / h.square().sum()).item() < 0.05
    # the same file without its decoding matrices (and the manifest updated to match) is refused
    from collection.traces.format import SafetensorsFile, encode_codec
    bare = dataclasses.replace(codec, inverse=None)
    data, entry = encode_codec(bare, dst.manifest.capture["hidden_codec"]["fit_tokens"])
    (out / "hidden_codec.safetensors").write_bytes(data)
    m = json.loads((out / "manifest.json").read_text())
    m["capture"]["hidden_codec"] = entry
    (out / "manifest.json").write_text(json.dumps(m))
    assert "inverse" not in SafetensorsFile(out / "hidden_codec.safetensors").entries
    with pytest.raises(TraceFormatError, match="inverse missing"):
        TraceSet(out).hidden_codec()


@pytest.mark.parametrize("fixture", ["tiny_traces", "tiny_compact_traces"])
def test_a_subset_read_by_ranges_equals_the_whole_read_then_selected(fixture, request):
    ts = TraceSet(request.getfixturevalue(fixture))
    table = ts.sequence_table()
    every = load_block(ts, [1], table["seq_id"], torch.device("cpu"))
    in_shard = table["seq_id"][table["shard"] == 1]
    few = in_shard[[0, 1, 2, 7, 9]]  # 5 of 24 sequences: read as 3 runs of byte ranges per layer
    sub = load_block(ts, [1], few, torch.device("cpu"))
    starts = table["start"][table["shard"] == 1]
    lens = table["length"][table["shard"] == 1]
    rows = np.concatenate([np.arange(starts[j], starts[j] + lens[j]) for j in [0, 1, 2, 7, 9]])
    for name in ("hidden", "hidden_scale", "topk_ids", "topk_weights"):
        full = getattr(every, name)
        if full is not None:
            assert torch.equal(getattr(sub, name), full[:, rows]), name
    tok, layer = torch.arange(sub.tokens), torch.full((sub.tokens,), 2)
    h = sub.hidden_at(layer, tok, torch.float32)
    assert h.shape == (sub.tokens, ts.manifest.hidden_size) and torch.isfinite(h).all()


@pytest.mark.parametrize("range_min", [0, 1 << 40])
def test_most_of_a_shard_reads_long_ranges_only_and_equals_the_whole_read(tiny_traces, monkeypatch, range_min):
    """A training split (most sequences of a shard): when its per-layer byte ranges are long, only they are read
    (the other splits' rows cost no bandwidth); when short, the whole tensor is. Both give the same rows."""
    import collection.traces.rows as rows_mod

    ts = TraceSet(tiny_traces)
    table = ts.sequence_table()
    every = load_block(ts, [1], table["seq_id"], torch.device("cpu"))
    in_shard = np.flatnonzero(table["shard"] == 1)
    pick = np.delete(np.arange(len(in_shard)), [3, 10])  # all but 2 of the shard's sequences
    read_bytes = []
    real_read = rows_mod.reader_for(torch.device("cpu")).read
    monkeypatch.setattr(rows_mod, "reader_for", lambda dev: type("R", (), {
        "read": staticmethod(lambda path, ranges: read_bytes.append(sum(n for _, n in ranges)) or real_read(path, ranges))}))
    monkeypatch.setattr(rows_mod, "RANGE_MIN_BYTES", range_min)
    sub = load_block(ts, [1], table["seq_id"][in_shard[pick]], torch.device("cpu"))
    rows = np.concatenate([np.arange(table["start"][j], table["start"][j] + table["length"][j]) for j in in_shard[pick]])
    assert torch.equal(sub.hidden, every.hidden[:, rows]) and torch.equal(sub.topk_ids, every.topk_ids[:, rows])
    hidden_bytes = every.hidden.element_size() * every.hidden[0, 0].numel() * len(ts.manifest.hidden_layers)
    expect = hidden_bytes * (len(rows) if range_min == 0 else every.tokens)
    assert read_bytes[0] == expect  # the hidden tensor is read first


def test_reader_threads_are_half_the_usable_cores_from_4_to_12(monkeypatch):
    import collection.traces.staging as staging

    for cores, threads in [(2, 4), (9, 4), (16, 8), (20, 10), (64, 12)]:
        monkeypatch.setattr(staging.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert staging.default_read_threads() == threads
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 processes share this node's 64 cores
    assert staging.default_read_threads() == 8
    assert StagedReader(torch.device("cpu"), threads=None).pool._max_workers == staging.READ_THREADS


def test_staged_reader_reads_ranges_across_chunks(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8)
    path = tmp_path / "f.bin"
    path.write_bytes(data.tobytes())
    reader = StagedReader(torch.device("cpu"), threads=3, chunk_bytes=1000)  # ranges split and packed across chunks
    ranges = [(0, 10), (5000, 2500), (17, 3), (9990, 10), (100, 0), (200, 999)]
    got = reader.read(path, ranges).numpy()
    assert np.array_equal(got, np.concatenate([data[o:o + n] for o, n in ranges]))
    with pytest.raises(OSError, match="end of file"):
        reader.read(path, [(9995, 10)])
    reader.close()


def test_collected_compact_rows_are_the_encoded_lossless_rows(tiny_model, tmp_path):
    from scripts.collect_traces import main

    common = ["--model", str(tiny_model), "--datasets", "bundled", "--target_traces", "24", "--shard_size", "12",
              "--batch_size", "5", "--max_length", "40", "--device", "cpu", "--dtype", "float32"]
    main([*common, "--output", str(tmp_path / "raw")])
    main([*common, "--output", str(tmp_path / "c"), "--hidden-format", "hadamard-3.5bit"])
    raw, c = TraceSet(tmp_path / "raw"), TraceSet(tmp_path / "c")
    assert c.manifest.format_version == 2 and c.manifest.capture["bytes_per_token"] < raw.manifest.capture["bytes_per_token"]
    fmt = FORMATS["hadamard-3.5bit"]
    for i in range(len(raw)):
        assert np.array_equal(raw.shard(i).numpy("topk_ids"), c.shard(i).numpy("topk_ids"))
        payload, scale = fmt.encode(raw.shard(i).tensor("hidden"))
        assert torch.equal(c.shard(i).tensor("hidden_scale"), scale)
        # the same rows encoded in a batch of another shape: float rounding may move a value across a level
        assert (c.shard(i).tensor("hidden") != payload).float().mean() < 1e-3


def test_format_losses_are_paired_by_seed_and_averaged(tiny_traces, tiny_pca_traces, tmp_path):
    """compare_hidden_formats.py --seeds: each seed's format run is held against the bf16 run of the same seed."""
    import argparse

    from tools.compare_hidden_formats import report, result_dir

    out = tmp_path / "formats"
    (out / "traces").mkdir(parents=True)
    (out / "traces" / "bf16").symlink_to(tiny_traces)
    (out / "traces" / "pca-3.5bit").symlink_to(tiny_pca_traces)
    recall = {("bf16", 0): 0.80, ("bf16", 1): 0.70, ("pca-3.5bit", 0): 0.79, ("pca-3.5bit", 1): 0.67}
    for (name, seed), r in recall.items():
        d = result_dir(out, name, seed)
        d.mkdir()
        (d / "comparison.json").write_text(json.dumps({"top_k": 4, "device": "cpu", "rows": [
            {"predictor": "layer-aware", "lookahead": 0, "recall@4": r, "rows": 100}]}))
    res = report(out, ["bf16", "pca-3.5bit"], argparse.Namespace(seeds=[0, 1], formats=["pca-3.5bit"]))
    pca = res["formats"]["pca-3.5bit"]
    assert pca["recall@4"]["layer-aware@d0"] == pytest.approx(0.73)
    assert [x["layer-aware@d0"] for x in pca["loss_vs_bf16_per_seed"]] == pytest.approx([0.01, 0.03])
    assert pca["loss_vs_bf16"]["layer-aware@d0"] == pytest.approx(0.02)
    assert "+0.0100 to +0.0300" in (out / "formats.md").read_text()


def test_the_codec_is_read_once_before_the_first_epoch_is_timed(tiny_pca_traces, tmp_path, monkeypatch):
    """A fitted format's codec is a per-run constant: it is read once, before the first epoch's reading starts, and
    its load (here made to take at least 0.2 s) is reported on its own as codec_load_seconds."""
    import collection.traces.format as fmt_mod
    from collection.traces.rows import SplitBlocks
    from scripts.train_simple_predictor import main

    real_read, real_epoch, events = fmt_mod.read_codec, SplitBlocks.epoch, []

    def slow_read_codec(*a, **k):
        events.append("codec read")
        time.sleep(0.2)
        return real_read(*a, **k)

    def epoch(self, *a, **k):
        if self.with_logits is not None and "epoch" not in events:
            events.append("epoch")
        return real_epoch(self, *a, **k)
    monkeypatch.setattr(fmt_mod, "read_codec", slow_read_codec)
    monkeypatch.setattr(SplitBlocks, "epoch", epoch)
    out = tmp_path / "ck"
    main(["--traces", str(tiny_pca_traces), "--epochs", "1", "--batch-rows", "4096", "--output", str(out), "--device", "cpu"])
    res = json.loads((out / "results.json").read_text())
    assert events == ["codec read", "epoch"]  # once, and before the first epoch reads a shard
    assert res["codec_load_seconds"] >= 0.2  # the reported load is the read's own (a sleep of 0.2 s inside it)
