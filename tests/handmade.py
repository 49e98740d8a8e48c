"""Hand-built routing data with known contents, and hand computations of what the code should find.

`write_trace_set` writes a real trace set (manifest, shards, router matrices) through the project's own writer,
from per-token tables small enough to compute every metric by hand; `token_block` builds the same data as an
in-memory `TokenBlock`. Routing weights should be multiples of 1/8 so that float16 storage keeps them exact.
`baselines_by_hand` recomputes the baselines of a real trace set from its files, independently of the loader.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from collection.traces.format import (
    ROUTER_WEIGHTS,
    Manifest,
    ShardInfo,
    ShardWriter,
    TraceSet,
    encode_tensors,
    shard_name,
    shard_specs,
    write_manifest,
)
from collection.traces.rows import TokenBlock, split_sequences
from common.atomic import atomic_write_bytes


def write_trace_set(directory: Path, topk_ids: np.ndarray, topk_weights: np.ndarray, seq_lengths: list[int], *,
                    num_experts: int, hidden: np.ndarray | None = None, router: np.ndarray | None = None,
                    seq_sources: list[int] | None = None, shard_sequences: list[int] | None = None,
                    source_names: tuple[str, ...] = ("a", "b")) -> TraceSet:
    """A trace set of the sequences 0..S-1, in order.

    topk_ids, topk_weights: (L, N, K) for the N tokens of all sequences, sequence after sequence;
    hidden: (L, N, H) float32 (every layer stored) or None; router: (L, E, H) float32 or None;
    shard_sequences: how many consecutive sequences each shard holds (default: one shard).
    """
    directory = Path(directory)
    directory.mkdir(parents=True)
    topk_ids, topk_weights = np.asarray(topk_ids), np.asarray(topk_weights)
    L, N, K = topk_ids.shape
    H = hidden.shape[2] if hidden is not None else (router.shape[2] if router is not None else 1)
    S = len(seq_lengths)
    assert sum(seq_lengths) == N
    seq_sources = seq_sources or [0] * S
    shard_sequences = shard_sequences or [S]
    assert sum(shard_sequences) == S
    starts = np.concatenate([[0], np.cumsum(seq_lengths)])
    dims = dict(num_layers=L, top_k=K, num_experts=num_experts, hidden_size=H,
                hidden_layers=L if hidden is not None else 0, hidden_dtype="float32", store_logits=False)
    shards, first = [], 0
    for i, count in enumerate(shard_sequences):
        seqs = range(first, first + count)
        a, b = int(starts[first]), int(starts[first + count])
        w = ShardWriter(directory / shard_name(i), shard_specs(b - a, count, **dims))
        w.write("token_ids", np.arange(a, b, dtype=np.int32))
        w.write("seq_offsets", (starts[first:first + count + 1] - a).astype(np.int64))
        w.write("seq_ids", np.array(seqs, dtype=np.int64))
        w.write("seq_sources", np.array([seq_sources[s] for s in seqs], dtype=np.int16))
        for l in range(L):
            w.write("topk_ids", topk_ids[l, a:b].astype(np.int16), (l,))
            w.write("topk_weights", topk_weights[l, a:b].astype(np.float16), (l,))
            if hidden is not None:
                w.write("hidden", hidden[l, a:b].astype(np.float32), (l,))
        nbytes, digest = w.commit()
        shards.append(ShardInfo(file=shard_name(i), sequences=count, tokens=b - a, bytes=nbytes, sha256=digest))
        first += count
    router_info = None
    if router is not None:  # as collect_traces writes them: bytes, size and checksum listed in the manifest
        data, router_info = encode_tensors(ROUTER_WEIGHTS, {f"router.{l}": torch.from_numpy(
            np.asarray(router[l], dtype=np.float32)) for l in range(L)})
        atomic_write_bytes(directory / ROUTER_WEIGHTS, data)
    write_manifest(directory, Manifest(
        model={"name_or_path": "handmade", "architecture": "none", "dtype": "float32"},
        routing={"num_layers": L, "num_experts": num_experts, "top_k": K, "hidden_size": H},
        capture={"hidden_layers": list(range(L)) if hidden is not None else [], "hidden_dtype": "float32",
                 "store_logits": False},
        sources=[{"name": n} for n in source_names], plan={"tokens_sha256": "handmade"}, shards=shards,
        complete=True, router_weights=router_info))
    return TraceSet(directory)


def token_block(topk_ids, topk_weights, seq_lengths: list[int], hidden=None) -> TokenBlock:
    """The in-memory `TokenBlock` of the sequences, as `collection.traces.rows.load_block` would build it."""
    ids = torch.as_tensor(np.asarray(topk_ids), dtype=torch.long)
    L, N, _ = ids.shape
    starts = np.concatenate([[0], np.cumsum(seq_lengths)[:-1]])
    prev = torch.arange(N) - 1
    prev[torch.as_tensor(starts, dtype=torch.long)] = -1
    return TokenBlock(hidden=None if hidden is None else torch.as_tensor(np.asarray(hidden), dtype=torch.float32),
                      topk_ids=ids, topk_weights=torch.as_tensor(np.asarray(topk_weights), dtype=torch.float32),
                      prev=prev, source=torch.zeros(N, dtype=torch.long), hidden_slot=torch.arange(L))


def recall_by_hand(scores: np.ndarray, true: np.ndarray, k: int) -> float:
    """recall@k from its definition: a true expert is found if fewer than k experts score at least as high."""
    s_true = np.take_along_axis(scores, true, 1)
    ranks = (scores[:, None, :] >= s_true[:, :, None]).sum(2) - 1
    return float((ranks < k).mean())


def baselines_by_hand(traces: Path, d: int) -> dict[str, float]:
    """recall@K of the baselines at lookahead d on the test split, computed from the files with the reference
    safetensors reader and plain numpy, rows (token t, layer l) -> experts of layer l + d."""
    ts = TraceSet(traces)
    L, E, K = ts.manifest.num_layers, ts.manifest.num_experts, ts.manifest.top_k
    split = split_sequences(ts.sequence_table(), 0)
    router = load_file(str(traces / "router_weights.safetensors"))
    W = np.stack([router[f"router.{l}"] for l in range(L)]).astype(np.float32)      # (L, E, H)
    counts = np.zeros((L, E))
    rows = {"h": [], "true": [], "prev_ids": [], "prev_w": [], "has_prev": [], "layer": []}
    for info in ts.manifest.shards:
        t = load_file(str(traces / info.file))
        off = t["seq_offsets"]
        for s, seq in enumerate(t["seq_ids"]):
            a, b = off[s], off[s + 1]
            ids, w, h = t["topk_ids"][:, a:b].astype(np.int64), t["topk_weights"][:, a:b], t["hidden"][:, a:b]
            if seq in split["train"]:
                for l in range(L):
                    counts[l] += np.bincount(ids[l].ravel(), minlength=E)
            if seq not in split["test"]:
                continue
            n = b - a
            for l in range(L - d):
                rows["h"].append(h[l])
                rows["true"].append(ids[l + d])
                rows["layer"].append(np.full(n, l))
                rows["prev_ids"].append(np.roll(ids[l + d], 1, 0))  # row 0 gets the last token: masked below
                rows["prev_w"].append(np.roll(w[l + d], 1, 0))
                rows["has_prev"].append(np.arange(n) > 0)
    r = {k: np.concatenate(v) for k, v in rows.items()}
    pop = (counts / counts.sum(1, keepdims=True)).astype(np.float32)[r["layer"] + d]  # (R, E) at the target layer
    prev = np.zeros_like(pop)
    np.put_along_axis(prev, r["prev_ids"], r["prev_w"].astype(np.float32), 1)
    prev *= r["has_prev"][:, None]
    reuse = np.einsum("rh,reh->re", r["h"], W[r["layer"] + d])
    own = np.einsum("rh,reh->re", r["h"], W[r["layer"]])
    return {"router-reuse": recall_by_hand(reuse, r["true"], K), "own-router": recall_by_hand(own, r["true"], K),
            "previous-token": recall_by_hand(prev + np.float32(1e-3) * pop, r["true"], K),
            "popularity": recall_by_hand(pop, r["true"], K), "rows": len(r["true"])}
