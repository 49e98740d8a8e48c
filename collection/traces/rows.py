"""The one row loader: splits, shard groups, and (token, layer) row batches for every stage.

A *row* pairs a token's MoE input at layer l with its experts at the target layer l + d
(d = lookahead). Rows are drawn from a `TokenBlock`: the tokens of whole sequences from a group
of shards, read from memory-mapped shards and kept on the training device, so a batch is a
single gather, never a Python loop over tokens. Training, validation, baselines and the prefetch
simulator all read rows through here; what a predictor may see of a row is `models.features`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

from collection.traces.format import TraceSet, TraceShard
from collection.traces.hidden_format import FORMATS, LOSSLESS, HiddenCodec, HiddenFormat
from collection.traces.staging import prefetch, reader_for
from common.errors import UserError

SPLITS = ("train", "val", "test")
RANGE_MIN_BYTES = 256 << 10  # byte ranges at least this long read as fast as one sequential read


def split_sequences(table: dict[str, np.ndarray], seed: int, val_fraction: float = 0.1,
                    test_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """Sequence ids per split, stratified by source and seeded: the same traces and seed always give
    the same split, which is stored in every checkpoint and recomputed by baselines."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {k: [] for k in SPLITS}
    for src in np.unique(table["source"]):
        ids = rng.permutation(np.sort(table["seq_id"][table["source"] == src]))
        n_test = int(round(len(ids) * test_fraction))
        n_val = int(round(len(ids) * val_fraction))
        if len(ids) >= 3:  # every split gets every source, however small the trace set
            n_test, n_val = max(n_test, 1), max(n_val, 1)
        out["test"].append(ids[:n_test])
        out["val"].append(ids[n_test:n_test + n_val])
        out["train"].append(ids[n_test + n_val:])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in out.items()}


@dataclass
class TokenBlock:
    """Tokens of whole sequences (N rows), every layer's routing, and the stored hidden states.

    Hidden states stay on the device as stored (compact formats: 4x+ fewer bytes resident) and are decoded
    batch by batch by `hidden_at`, the one way every predictor and baseline reads them."""
    hidden: torch.Tensor | None   # (Lh, N, H) storage dtype, or (Lh, N, P) uint8 codes of a compact format
    topk_ids: torch.Tensor        # (L, N, K) int64
    topk_weights: torch.Tensor    # (L, N, K) float32
    prev: torch.Tensor            # (N,) row of the previous token of the same sequence, -1 at its start
    source: torch.Tensor          # (N,) source index
    hidden_slot: torch.Tensor     # (L,) slot of layer l in `hidden`, -1 if not stored
    token_ids: torch.Tensor | None = None      # (N,) int64 token id of each row
    router_logits: torch.Tensor | None = None  # (L, N, E) float16, when loaded with_logits (distillation targets)
    hidden_scale: torch.Tensor | None = None  # (Lh, N, G) float16 scales of a compact format
    hidden_format: HiddenFormat = FORMATS[LOSSLESS]
    hidden_codec: HiddenCodec | None = None   # a fitted format's parameters, on the block's device

    @property
    def tokens(self) -> int:
        return self.topk_ids.shape[1]

    def hidden_at(self, layer: torch.Tensor, tok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(R, H) hidden states of token rows `tok` at layers `layer`, decoded, in `dtype`."""
        slot = self.hidden_slot[layer]
        if self.hidden_format.lossless:
            return self.hidden[slot, tok].to(dtype)
        return self.hidden_format.decode(self.hidden[slot, tok], self.hidden_scale[slot, tok], dtype,
                                         self.hidden_codec, slot)


def shard_groups(num_shards: int, per_group: int, rng: np.random.Generator | None = None) -> list[list[int]]:
    """Shards in groups of `per_group` (shuffled order when an rng is given, as in training)."""
    order = rng.permutation(num_shards) if rng is not None else np.arange(num_shards)
    return [sorted(order[i:i + per_group].tolist()) for i in range(0, num_shards, per_group)]


def _ranges(sh: TraceShard, name: str, runs: np.ndarray | None) -> list[tuple[int, int]]:
    """File byte ranges of tensor `name` (layer axis first) restricted to token-row `runs` (start, length),
    layer after layer; the whole tensor is one range."""
    _, shape, begin, end = sh.entries[name]
    if runs is None:
        return [(sh.data_start + begin, end - begin)]
    lead, n = shape[0], shape[1]
    row = (end - begin) // max(lead * n, 1)
    starts = sh.data_start + begin + ((np.arange(lead)[:, None] * n + runs[None, :, 0]) * row).ravel()
    lengths = np.tile(runs[:, 1] * row, lead)
    return list(zip(starts.tolist(), lengths.tolist()))


def _read(sh: TraceShard, name: str, runs: np.ndarray | None, rows: np.ndarray | None,
          device: torch.device) -> torch.Tensor:
    """Tensor `name` (layer axis first) restricted to token `rows` (given also as `runs`), on `device`.

    A subset reads only its sequences' byte ranges, unless it is most of the shard and those ranges are short
    (routing: a few bytes per row): then the whole tensor is read sequentially and the rows are selected on the
    device. A training split's hidden states (runs of whole sequences, ~1 MiB per layer at full size) are read
    by ranges, so the other splits' rows cost no read bandwidth. Either way the bytes go
    from the page cache through pinned buffers to the device (`collection.traces.staging`), never through a
    pageable copy.
    """
    dt, shape, begin, end = sh.entries[name]
    whole = rows is None or (len(rows) > sh.info.tokens // 2 and _short_pieces(runs, end - begin, shape))
    raw = reader_for(device).read(sh.fd, _ranges(sh, name, None if whole else runs))  # the descriptor checked
    n = shape[1] if whole else len(rows)
    t = raw.view(sh.dtype(name)).view(shape[0], n, *shape[2:])
    if whole and rows is not None:
        t = t.index_select(1, torch.from_numpy(rows).to(device))
    return t


def _short_pieces(runs: np.ndarray, nbytes: int, shape: tuple[int, ...]) -> bool:
    """Whether the byte ranges of `runs` average under 256 KiB: too short to read one by one at full speed."""
    row = nbytes // max(shape[0] * shape[1], 1)
    return float(runs[:, 1].mean()) * row < RANGE_MIN_BYTES


def _merge_runs(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """(start, length) runs of token rows, adjacent runs merged (consecutive sequences are contiguous)."""
    new = np.ones(len(starts), dtype=bool)
    new[1:] = starts[1:] != starts[:-1] + lens[:-1]
    first = np.flatnonzero(new)
    return np.stack([starts[first], np.add.reduceat(lens, first)], 1)


def load_block(ts: TraceSet, shards: list[int], seq_ids: np.ndarray, device: torch.device,
               with_hidden: bool = True, with_logits: bool = False) -> TokenBlock | None:
    """Rows of the sequences `seq_ids` that live in `shards`, moved to `device` (None if there are none).
    `with_logits` also loads the full router logits (training targets for distillation)."""
    if with_logits and not ts.manifest.capture.get("store_logits", False):
        raise UserError(f"{ts.dir}: router logits were not stored (collected with --no-logits); "
                        "distillation needs them")
    hidden, scale, ids, weights, prev, source, token_ids, logits = [], [], [], [], [], [], [], []
    fmt = hidden_format_of(ts)
    base = 0
    for sh in ts.shards(shards):
        off = sh.numpy("seq_offsets").astype(np.int64)
        keep = np.isin(sh.numpy("seq_ids"), seq_ids)
        if not keep.any():
            continue
        starts, lens = off[:-1][keep], np.diff(off)[keep]
        first = np.repeat(np.cumsum(lens) - lens, lens)          # block row of each token's sequence start
        rows = None if keep.all() else np.repeat(starts, lens) + np.arange(lens.sum()) - first  # shard rows
        runs = None if rows is None else _merge_runs(starts, lens)
        if with_hidden and ts.manifest.hidden_layers:
            hidden.append(ts.check_finite(sh, "hidden", _read(sh, "hidden", runs, rows, device)))
            if not fmt.lossless:
                scale.append(ts.check_finite(sh, "hidden_scale", _read(sh, "hidden_scale", runs, rows, device)))
        ids.append(_read(sh, "topk_ids", runs, rows, device).long())
        weights.append(ts.check_finite(sh, "topk_weights", _read(sh, "topk_weights", runs, rows, device).float()))
        if with_logits:
            logits.append(ts.check_finite(sh, "router_logits", _read(sh, "router_logits", runs, rows, device)))
        tid = sh.numpy("token_ids")
        token_ids.append(torch.from_numpy((tid if rows is None else tid[rows]).astype(np.int64)))
        pos = np.arange(lens.sum()) - first
        prev.append(torch.from_numpy(np.where(pos > 0, base + np.arange(lens.sum()) - 1, -1)))
        source.append(torch.from_numpy(np.repeat(sh.numpy("seq_sources")[keep].astype(np.int64), lens)))
        base += int(lens.sum())
    if not ids:
        return None
    L = ts.manifest.num_layers
    slot = torch.full((L,), -1, dtype=torch.long)
    for j, layer in enumerate(ts.manifest.hidden_layers):
        slot[layer] = j
    cat = lambda parts: (parts[0] if len(parts) == 1 else torch.cat(parts, 1)) if parts else None  # noqa: E731
    return TokenBlock(hidden=cat(hidden), topk_ids=cat(ids), topk_weights=cat(weights),
                      prev=torch.cat(prev).to(device), source=torch.cat(source).to(device),
                      hidden_slot=slot.to(device), token_ids=torch.cat(token_ids).to(device),
                      router_logits=cat(logits), hidden_scale=cat(scale), hidden_format=fmt,
                      hidden_codec=ts.hidden_codec(device) if hidden else None)


def hidden_format_of(ts: TraceSet) -> HiddenFormat:
    """The trace set's hidden format (`capture.hidden_format`; trace sets written before it existed: lossless)."""
    return FORMATS[ts.manifest.hidden_format]


def block_bytes(ts: TraceSet, seq_fraction: float, with_hidden: bool = True, with_logits: bool = False) -> int:
    """Device bytes the blocks of a split take (estimate from the manifest): per token, a TokenBlock holds
    int64 ids + float32 weights for each (layer, k) slot, int64 `prev`, `source` and token id, the hidden
    states as stored (compact formats stay compact on the device), and (with_logits) float16 router logits
    for each (layer, expert)."""
    m = ts.manifest
    tokens = sum(s.tokens for s in m.shards) * seq_fraction
    routing = m.num_layers * m.top_k * (8 + 4)   # topk_ids int64 + topk_weights float32
    per_token_index = 8 + 8 + 8                  # prev, source, token id: int64
    hidden_item = torch.empty((), dtype=getattr(torch, m.capture.get("hidden_dtype", "float16"))).element_size()
    row = hidden_format_of(ts).row_bytes(m.hidden_size, hidden_item)
    hidden = len(m.hidden_layers) * row if with_hidden else 0
    logits = m.num_layers * m.num_experts * 2 if with_logits else 0
    return int(tokens * (routing + per_token_index + hidden + logits))


def cache_budget(device: torch.device) -> int:
    """How many bytes of blocks may stay resident across epochs: half the free GPU memory, or a
    quarter of the host's memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 2 << 30


class SplitBlocks:
    """The blocks of one split, `shards_per_group` shards at a time; after the first pass they stay on
    the device when the whole split fits `cache_budget` (then later epochs read no disk at all:
    the groups are kept and only their order and rows are reshuffled)."""

    def __init__(self, ts: TraceSet, seq_ids: np.ndarray, device: torch.device, shards_per_group: int,
                 with_hidden: bool = True, keep: bool | None = None, with_logits: bool = False):
        self.ts, self.seq_ids, self.device = ts, seq_ids, device
        self.per_group, self.with_hidden, self.with_logits = shards_per_group, with_hidden, with_logits
        fraction = len(seq_ids) / max(len(ts.sequence_table()["seq_id"]), 1)
        self.keep = (block_bytes(ts, fraction, with_hidden, with_logits) <= cache_budget(device)
                     if keep is None else keep)
        self.groups: list[list[int]] | None = None
        self.cache: dict[int, TokenBlock | None] = {}

    def __iter__(self) -> Iterator[TokenBlock]:
        return self.epoch(None)

    def epoch(self, rng: np.random.Generator | None) -> Iterator[TokenBlock]:
        """The split's blocks, in a shuffled group order when an rng is given. Groups not cached are read
        one ahead on a background thread (`staging.prefetch`): group i + 1 is read while group i is used."""
        if self.groups is None or not self.keep:
            self.groups = shard_groups(len(self.ts), self.per_group, rng)
        order = rng.permutation(len(self.groups)) if rng is not None else range(len(self.groups))

        def loader(i: int):
            if i in self.cache:
                return lambda: self.cache[i]
            return lambda: load_block(self.ts, self.groups[i], self.seq_ids, self.device, self.with_hidden,
                                      self.with_logits)

        for i, block in zip(order, prefetch((loader(i) for i in order), self.device)):
            if self.keep:
                self.cache[i] = block
            if block is not None:
                yield block


def input_layers(ts: TraceSet, lookahead: int, need_hidden: bool = True) -> list[int]:
    """Layers l whose rows exist for this lookahead: l + d is a layer, and h_l is stored if needed."""
    L = ts.manifest.num_layers
    if not 0 <= lookahead < L:
        raise UserError(f"--lookahead {lookahead}: the model has {L} MoE layers, so 0 <= d <= {L - 1}")
    stored = set(ts.manifest.hidden_layers) if need_hidden else set(range(L))
    layers = [l for l in range(L - lookahead) if l in stored]
    if not layers:
        raise UserError(f"no layer has its hidden state stored with a layer {lookahead} ahead "
                        f"(stored: {ts.manifest.hidden_layers}); collect with --hidden-layers all")
    return layers


def row_batches(block: TokenBlock, layers: list[int], batch_rows: int,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(token rows, input layers) index batches over every (token, layer) pair; shuffled if a
    generator is given, else in order (evaluation)."""
    N = block.tokens
    layer_t = torch.tensor(layers, device=block.topk_ids.device)
    total = N * len(layers)
    order = (torch.randperm(total, generator=generator, device="cpu").to(layer_t.device)
             if generator is not None else torch.arange(total, device=layer_t.device))
    for i in range(0, total, batch_rows):
        r = order[i:i + batch_rows]
        yield r % N, layer_t[r // N]


def routing_vector(block: TokenBlock, layer: torch.Tensor, tok: torch.Tensor, E: int) -> torch.Tensor:
    """(R, E) routing weights of token rows `tok` at layers `layer` (rows with tok < 0 or layer < 0: zeros)."""
    valid = (tok >= 0) & (layer >= 0)
    t, l = tok.clamp(min=0), layer.clamp(min=0)
    out = torch.zeros(tok.shape[0], E, device=tok.device)
    out.scatter_(1, block.topk_ids[l, t], block.topk_weights[l, t])
    return out * valid.unsqueeze(1)


def earlier_token(block: TokenBlock, tok: torch.Tensor, back: int) -> torch.Tensor:
    """(R,) row of the token `back` positions before `tok` in the same sequence, -1 past its start
    (back = 0 is the token itself)."""
    rows = tok
    for _ in range(back):  # `back` is a small window size: a few vectorized gathers, no loop over tokens
        rows = torch.where(rows >= 0, block.prev[rows.clamp(min=0)], rows)
    return rows


def hidden_at(block: TokenBlock, layer: torch.Tensor, tok: torch.Tensor, dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
    """(R, H) MoE input of token rows `tok` at layers `layer`, decoded (`TokenBlock.hidden_at`), in `dtype`;
    zeros where tok < 0, layer < 0 or the layer's hidden state is not stored."""
    stored = torch.where(layer >= 0, block.hidden_slot[layer.clamp(min=0)], -1) >= 0
    valid = (tok >= 0) & stored
    # rows without a stored state read some stored layer's row 0 (decoded like any row), then are zeroed
    some_layer = torch.argmax((block.hidden_slot >= 0).long())
    h = block.hidden_at(torch.where(stored, layer.clamp(min=0), some_layer), tok.clamp(min=0), dtype)
    return torch.where(valid.unsqueeze(1), h, torch.zeros((), dtype=h.dtype, device=h.device))


# per-block prefix sums, keyed by the block's hidden tensor (a block whose tensors are replaced gets new sums)
# (by identity: tensors compare elementwise, so an ordinary weak dictionary cannot hold them)
_PREFIX = WeakIdKeyDictionary()


def _prefix_sums(block: TokenBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """(position of each row in its sequence (N,), exclusive within-sequence prefix sums of the hidden states
    (Lh, N, H) float32): prefix[:, t] = sum of hidden[:, s] over the earlier tokens s of t's sequence.
    Computed once per block (float64 running sums, so long blocks lose no precision)."""
    hit = _PREFIX.get(block.hidden)
    if hit is not None:
        return hit
    N = block.tokens
    dev = block.prev.device
    starts = block.prev < 0
    seq = torch.cumsum(starts.long(), 0) - 1                       # sequence index of each row
    first = torch.nonzero(starts).squeeze(1)                       # first row of each sequence
    position = torch.arange(N, device=dev) - first[seq]
    rows = torch.arange(N, device=dev)
    prefix = None
    for layer in torch.nonzero(block.hidden_slot >= 0).squeeze(1).tolist():  # one stored layer at a time
        j = int(block.hidden_slot[layer])
        # decoded as every reader decodes it (a compact format's codes are not the hidden state), in float64
        # running sums: long blocks lose no precision; only one layer's float64 copy exists at a time
        h = block.hidden_at(torch.full((N,), layer, device=dev), rows, torch.float32).double()
        if prefix is None:
            prefix = torch.empty(block.hidden.shape[0], N, h.shape[1], dtype=torch.float32, device=h.device)
        total = torch.cumsum(h, 0) - h                             # sum of every earlier row of the block
        prefix[j] = (total - total[first[seq]]).float()
    _PREFIX[block.hidden] = (position, prefix)
    return position, prefix


def context_mean(block: TokenBlock, layer: torch.Tensor, tok: torch.Tensor, tokens: int) -> torch.Tensor:
    """(R, H) mean MoE input at layers `layer` over the `tokens` tokens before each row `tok` in its sequence
    (fewer at the start of a sequence, zeros for its first token; zeros where the layer is not stored)."""
    position, prefix = _prefix_sums(block)
    slot = block.hidden_slot[layer]
    n = position[tok].clamp(max=tokens)                            # earlier tokens inside the window
    s = slot.clamp(min=0)
    total = prefix[s, tok] - prefix[s, tok - n]                    # rows tok-n .. tok-1: one sequence, contiguous
    mean = total / n.clamp(min=1).unsqueeze(1).to(total.dtype)
    return torch.where((slot >= 0).unsqueeze(1), mean, torch.zeros((), dtype=mean.dtype, device=mean.device))


def targets(block: TokenBlock, tok: torch.Tensor, layer: torch.Tensor, lookahead: int) -> torch.Tensor:
    """(R, K) true experts at the target layer."""
    return block.topk_ids[layer + lookahead, tok]


def later_token(block: TokenBlock, tok: torch.Tensor, ahead: int) -> torch.Tensor:
    """(R,) row of the token `ahead` positions after `tok` in the same sequence, -1 past its end
    (ahead = 0 is the token itself); the mirror of `earlier_token`."""
    return _later_rows(block, tok, ahead)[-1] if ahead else tok


def _next_rows(block: TokenBlock) -> torch.Tensor:
    """(N,) row of each token's successor in its sequence, -1 at a sequence's last token: `prev` inverted, so a
    successor is never a row of the next sequence, however the block's rows are laid out."""
    nxt = torch.full_like(block.prev, -1)
    has_prev = torch.nonzero(block.prev >= 0).squeeze(1)
    return nxt.index_put_((block.prev[has_prev],), has_prev)


def _later_rows(block: TokenBlock, tok: torch.Tensor, tokens: int) -> list[torch.Tensor]:
    """[rows of the tokens 1, 2, .., `tokens` positions after `tok` in its sequence], each (R,), -1 past its end."""
    nxt = _next_rows(block)
    rows, out = tok, []
    for _ in range(tokens):  # `tokens` is a small window: a few vectorized gathers, no loop over tokens
        rows = torch.where(rows >= 0, nxt[rows.clamp(min=0)], rows)
        out.append(rows)
    return out


def expert_set(block: TokenBlock, layer: torch.Tensor, tok: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(R, E) bool: the experts token rows `tok` used at layers `layer`; no expert where tok < 0."""
    valid = (tok >= 0).unsqueeze(1)
    ids = block.topk_ids[layer, tok.clamp(min=0)]                  # (R, K)
    out = torch.zeros(tok.shape[0], num_experts, dtype=torch.bool, device=tok.device)
    return out.scatter_(1, ids, valid.expand_as(ids)) & valid


def window_targets(block: TokenBlock, tok: torch.Tensor, layer: torch.Tensor, tokens: int,
                   num_experts: int) -> torch.Tensor:
    """(R, E) float 0/1: the experts used at layer l by the next `tokens` tokens of the same sequence,
    t+1 .. t+W (what a cache at layer l will be asked for soon; token t's own experts are not in it). Near a
    sequence's end the window holds what remains of it; a row with no later token has an empty set."""
    used = torch.zeros(tok.shape[0], num_experts, dtype=torch.bool, device=tok.device)
    for rows in _later_rows(block, tok, tokens):
        used |= expert_set(block, layer, rows, num_experts)
    return used.float()


def has_later_token(block: TokenBlock, tok: torch.Tensor) -> torch.Tensor:
    """(R,) bool: whether `tok` has a later token in its sequence (a window row exists only then)."""
    return _next_rows(block)[tok] >= 0


def mean_tokens_per_sequence(table: dict[str, np.ndarray], seq_ids: np.ndarray) -> float:
    return float(table["length"][np.isin(table["seq_id"], seq_ids)].mean())
