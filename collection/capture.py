"""Capturing routing from a running MoE model without slowing it down.

A forward hook on each MoE router (`mlp.gate`) sees exactly what the model computes: its input
(the MoE-block input, i.e. the post-attention RMSNorm output, flattened to (B*T, H)) and its
outputs (router logits, routing weights, expert ids). Nothing is recomputed. For every hooked
layer the hook keeps only real-token rows of the hidden state (padding dropped with one
index_select), casts them to the storage dtype on the GPU, and queues a non-blocking copy into
pinned host memory on a side stream, so the copies overlap the next layers' compute; the router's
small outputs of all layers are stacked and copied once, after the forward. A compact hidden format
(collection/hidden_format.py) is encoded on the GPU after the forward, on the side stream, so only the
compact bytes cross PCIe. A background thread waits for each batch's copies and writes them into the shard
file; two sets of pinned buffers alternate so the GPU never waits for the disk unless the disk is the
bottleneck.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from collection.durable import ShardCommitter
from collection.format import ShardWriter
from collection.hidden_format import FORMATS, LOSSLESS, HiddenCodec, HiddenFormat
from collection.model import moe_blocks

ENCODE_LAYERS = 8  # hidden layers encoded per call: fewer launches than one by one, bounded scratch memory


def router_outputs(output: Any, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (N, E), weights (N, k), ids (N, k)) from whatever the router module returned.

    transformers >= 5: the router returns the tuple itself. transformers 4.x: the gate is an
    nn.Linear returning logits, so weights and ids are derived the way the 4.x MoE block did.
    """
    if isinstance(output, tuple) and len(output) == 3:
        return output
    logits = output
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, weights.to(logits.dtype), ids


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask) of token lists. Causal attention never lets a real
    token see the padding after it, so real tokens compute exactly as they would unpadded."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):  # per sequence, not per token: B small copies
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


@dataclass
class HostBatch:
    """One batch's captured rows in host memory (pinned on CUDA), valid once `ready` has completed."""
    hidden: torch.Tensor | None   # (Lh, max_rows, H), or (Lh, max_rows, P) uint8 codes of a compact format
    topk_ids: torch.Tensor        # (L, max_rows, k) int16
    topk_weights: torch.Tensor    # (L, max_rows, k) float16
    router_logits: torch.Tensor | None  # (L, max_rows, E) float16
    rows: int = 0
    ready: torch.cuda.Event | None = None
    sources: list[torch.Tensor] | None = None  # GPU tensors being copied: kept alive until `ready`
    hidden_scale: torch.Tensor | None = None   # (Lh, max_rows, G) float16 scales of a compact format


class RoutingCapture:
    """Hooks every MoE router of `model`; `capture(batch_fn)` runs one forward and returns HostBatch."""

    def __init__(self, model: nn.Module, hidden_layers: list[int], hidden_dtype: torch.dtype,
                 store_logits: bool, max_rows: int, top_k: int, norm_topk_prob: bool, num_experts: int,
                 hidden_size: int, num_buffers: int = 2, hidden_format: HiddenFormat = FORMATS[LOSSLESS],
                 hidden_codec: HiddenCodec | None = None):
        self.blocks = moe_blocks(model)
        self.L = len(self.blocks)
        self.slot = {layer: j for j, layer in enumerate(hidden_layers)}  # MoE layer -> hidden slot
        self.hidden_dtype, self.store_logits = hidden_dtype, store_logits
        self.top_k, self.norm = top_k, norm_topk_prob
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        pin = self.cuda

        def host(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype, pin_memory=pin)

        self.format = hidden_format
        self.codec = hidden_codec.to(self.device) if hidden_codec is not None else None  # a fitted format's
        if hidden_format.fitted and hidden_layers and self.codec is None:
            raise ValueError(f"hidden format {hidden_format.name} needs its fitted codec")
        self.free: queue.Queue[HostBatch] = queue.Queue()
        Lh, fmt = len(hidden_layers), hidden_format
        for _ in range(num_buffers if self.cuda else 1):
            self.free.put(HostBatch(
                hidden=(None if not hidden_layers else host(Lh, max_rows, hidden_size, dtype=hidden_dtype) if fmt.lossless
                        else host(Lh, max_rows, fmt.payload_bytes(hidden_size), dtype=torch.uint8)),
                topk_ids=host(self.L, max_rows, top_k, dtype=torch.int16),
                topk_weights=host(self.L, max_rows, top_k, dtype=torch.float16),
                router_logits=host(self.L, max_rows, num_experts, dtype=torch.float16) if store_logits else None,
                hidden_scale=(host(Lh, max_rows, fmt.groups(hidden_size), dtype=torch.float16)
                              if hidden_layers and not fmt.lossless else None)))
        self._hidden: dict[int, torch.Tensor] = {}  # compact formats: slot -> this forward's rows, encoded after it
        self._current: HostBatch | None = None
        self.last_output: Any = None
        self._rows_index: torch.Tensor | None = None
        self._router: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.handles = [mlp.gate.register_forward_hook(self._hook(j)) for j, (_, mlp) in enumerate(self.blocks)]

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def release(self, batch: HostBatch) -> None:
        """Give a batch's buffers back once its rows have been written."""
        batch.sources = None
        self.free.put(batch)

    def _hook(self, layer: int) -> Callable[..., None]:
        # The forward of a Hugging Face MoE block is bound by kernel launches (it syncs with the host to
        # find the experts hit), so every launch in a hook adds to the wall time. Per layer the hook only
        # copies the hidden state (the one big tensor, worth overlapping with later layers) and keeps a
        # reference to the router's small outputs; `_copy_router_outputs` moves all layers' at once.
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            batch = self._current
            if batch is None:
                return
            self._router[layer] = router_outputs(output, self.top_k, self.norm)
            if layer in self.slot and batch.hidden is not None:
                x = args[0]
                h = x.reshape(-1, x.shape[-1])
                if self._rows_index is not None:  # drop padding on the GPU: fewer bytes cross PCIe
                    h = h.index_select(0, self._rows_index)
                if self.format.lossless:
                    self._copy(batch, [(batch.hidden[self.slot[layer], :batch.rows], h.to(self.hidden_dtype))])
                else:  # a reference only: `_encode_hidden` encodes all layers at once after the forward
                    self._hidden[self.slot[layer]] = h
        return hook

    def _encode_hidden(self, batch: HostBatch) -> None:
        """Compact formats: the stored layers' rows encoded a few layers per call, on the side stream (the
        next forward runs meanwhile), then their codes and scales copied to pinned memory."""
        if len(self._hidden) != len(self.slot):
            raise RuntimeError(f"captured the hidden state of {len(self._hidden)} of {len(self.slot)} layers")
        n = batch.rows
        if self.cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream) if self.cuda else contextlib.nullcontext():
            for j0 in range(0, len(self.slot), ENCODE_LAYERS):
                slots = list(range(j0, min(j0 + ENCODE_LAYERS, len(self.slot))))
                hs = [self._hidden[j] for j in slots]
                payload, scale = self.format.encode(torch.stack(hs), self.codec, slots)
                j1 = j0 + len(slots)
                if n == batch.hidden.shape[1]:  # no padding dropped: the chunk's rows are one contiguous block
                    batch.hidden[j0:j1].copy_(payload, non_blocking=self.cuda)
                    batch.hidden_scale[j0:j1].copy_(scale, non_blocking=self.cuda)
                else:  # one contiguous copy per layer (fewer rows than the buffer leave a strided slice)
                    for i in range(len(slots)):
                        batch.hidden[j0 + i, :n].copy_(payload[i], non_blocking=self.cuda)
                        batch.hidden_scale[j0 + i, :n].copy_(scale[i], non_blocking=self.cuda)
                if self.cuda:
                    batch.sources.extend([*hs, payload, scale])

    def _copy(self, batch: HostBatch, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Queue device-to-host copies behind the work queued so far, on the side stream."""
        if not self.cuda:
            for dst, src in parts:
                dst.copy_(src)
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            for dst, src in parts:
                dst.copy_(src, non_blocking=True)
        # a reference (not record_stream) keeps each source alive until the batch's copies are done:
        # the allocator then never has to track cross-stream uses of short-lived blocks
        batch.sources.extend(src for _, src in parts)

    def _copy_router_outputs(self, batch: HostBatch) -> None:
        """All layers' (ids, weights, logits) in one stack, gather, cast and copy each: a handful of
        launches per forward instead of a dozen per layer."""
        if len(self._router) != self.L:
            raise RuntimeError(f"captured the router of {len(self._router)} of {self.L} MoE layers in one forward")
        n, idx = batch.rows, self._rows_index

        def stacked(i: int, dtype: torch.dtype) -> torch.Tensor:
            t = torch.stack([self._router[layer][i] for layer in range(self.L)])  # (L, B*T, .)
            return (t if idx is None else t.index_select(1, idx)).to(dtype)

        parts = [(batch.topk_ids[:, :n], stacked(2, torch.int16)), (batch.topk_weights[:, :n], stacked(1, torch.float16))]
        if batch.router_logits is not None:
            parts.append((batch.router_logits[:, :n], stacked(0, torch.float16)))
        self._copy(batch, parts)

    @torch.no_grad()
    def forward(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                **model_kwargs: Any) -> HostBatch:
        """Run one padded batch (on CPU tensors) and return its captured real-token rows.

        The buffers are reused: call `release` after the rows are written. The model's own output
        is kept in `last_output` (tests compare it with what was captured).
        """
        flat_mask = attention_mask.reshape(-1).bool()
        rows_index = flat_mask.nonzero().squeeze(1)  # computed on the host: no GPU sync
        batch = self.free.get()
        batch.rows = int(rows_index.numel())
        batch.sources = []
        # no padding: every row is kept and no gather is launched
        self._rows_index = None if batch.rows == flat_mask.numel() else rows_index.to(self.device, non_blocking=True)
        self._current = batch
        try:
            self.last_output = model(input_ids=input_ids.to(self.device, non_blocking=True),
                                     attention_mask=attention_mask.to(self.device, non_blocking=True), use_cache=False,
                                     **model_kwargs)
            self._copy_router_outputs(batch)
            if batch.hidden is not None and not self.format.lossless:
                self._encode_hidden(batch)
        finally:
            self._current = None
            self._router = {}
            self._hidden = {}
        if self.cuda:
            batch.ready = torch.cuda.Event()
            batch.ready.record(self.copy_stream)
        return batch


@torch.no_grad()
def hidden_moments(model: nn.Module, hidden_layers: list[int], batches: list[tuple[torch.Tensor, torch.Tensor]],
                   device: torch.device) -> tuple[torch.Tensor, int]:
    """(E[h h^T] of each stored layer's MoE input over the real tokens of `batches` (Lh, H, H) float64, tokens):
    what a fitted hidden format is fitted on. Each product is accumulated on the device, in float32 per batch."""
    blocks = moe_blocks(model)
    slot = {layer: j for j, layer in enumerate(hidden_layers)}
    acc: dict[int, torch.Tensor] = {}
    rows: list[torch.Tensor] = []

    def hook(layer: int) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if layer in slot:
                h = args[0].reshape(-1, args[0].shape[-1]).index_select(0, rows[0]).float()
                m = h.T @ h
                acc[slot[layer]] = acc[slot[layer]] + m.double() if slot[layer] in acc else m.double()
        return fn
    handles = [mlp.gate.register_forward_hook(hook(j)) for j, (_, mlp) in enumerate(blocks)]
    tokens = 0
    try:
        for input_ids, mask in batches:
            rows[:] = [mask.reshape(-1).bool().nonzero().squeeze(1).to(device)]
            tokens += int(mask.sum())
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([acc[j] for j in range(len(hidden_layers))]) / max(tokens, 1), tokens


class ShardFiller:
    """Background thread writing captured batches into shard files, in order, and handing each finished
    shard to a `ShardCommitter` (fsync, SHA-256, rename, manifest on other threads), so the next shard's
    batches are written while the previous one is committed.

    Work items are closures run on the thread; the queue is bounded by the number of host buffers,
    which is the back-pressure that keeps a slow disk from piling up memory. An exception on the
    thread is re-raised in the caller at the next submit or at `join`.
    """

    def __init__(self, capture: RoutingCapture, write_threads: int = 4, committer: ShardCommitter | None = None):
        self.capture = capture
        self.committer = committer or ShardCommitter()
        # pwrite releases the GIL: a batch's per-layer slices go to the page cache in parallel,
        # since one thread's memcpy (a few GB/s) is slower than a full-size model's output
        self.pool = ThreadPoolExecutor(max_workers=write_threads, thread_name_prefix="pwrite")
        self.q: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (task := self.q.get()) is not None:
            try:
                if self.error is None:
                    task()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e
            finally:
                self.q.task_done()
        self.q.task_done()

    def _check(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def submit(self, task: Callable[[], None]) -> None:
        self._check()
        self.q.put(task)

    def write_batch(self, writer: ShardWriter, batch: HostBatch, row: int) -> None:
        def task() -> None:
            try:
                if batch.ready is not None:
                    batch.ready.synchronize()
                n = batch.rows
                parts = [(name, t) for name, t in (("topk_ids", batch.topk_ids), ("topk_weights", batch.topk_weights),
                                                   ("router_logits", batch.router_logits), ("hidden", batch.hidden),
                                                   ("hidden_scale", batch.hidden_scale))
                         if t is not None]
                jobs = [self.pool.submit(writer.write, name, t[j, :n], (j,), row)
                        for name, t in parts for j in range(t.shape[0])]
                for job in jobs:
                    job.result()
            finally:
                self.capture.release(batch)
        self.submit(task)

    def commit(self, writer: ShardWriter, on_commit: Callable[[int, str], None]) -> None:
        """After the shard's last batch is written, commit it in the background; `on_commit(bytes, sha256)`
        runs once it is durable and renamed, in shard order (the manifest update)."""
        self.submit(lambda: self.committer.submit(*writer.hand_off(), on_commit))

    def join(self) -> None:
        """Wait until everything submitted has been written and committed."""
        self.q.join()
        self._check()
        self.committer.join()

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self.pool.shutdown()
        self.committer.close()
