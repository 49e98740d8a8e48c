"""Capturing routing from a running MoE model without slowing it down.

A forward hook on each MoE router (found through collection/families.py) sees exactly what the model
computes: its input (the MoE-block input, i.e. the post-attention norm output, (B*T, H) or (B, T, H))
and its outputs (router logits, routing weights, expert ids). Nothing is recomputed. For every hooked
layer the hook keeps only real-token rows of the hidden state (padding dropped with one
index_select), casts them to the storage dtype on the GPU, and queues a non-blocking copy into
pinned host memory on a side stream, so the copies overlap the next layers' compute; the router's
small outputs of all layers are stacked and copied once, after the forward. A compact hidden format
(collection/traces/hidden_format.py) is encoded on the GPU after the forward, on the side stream, so only the
compact bytes cross PCIe. A background thread waits for each batch's copies and writes them into the shard
file; two sets of pinned buffers alternate so the GPU never waits for the disk unless the disk is the
bottleneck.

A model spread over several GPUs by a device map (collection/placement.py) is captured the same way, device
by device: each GPU has its own copy stream, each layer's tensors are copied (or encoded) on the GPU that
computed them, the router outputs are stacked per run of consecutive layers on one device, and a batch is
ready when the copies of every GPU involved are done.
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

from collection.families import family_of, moe_layers, router_outputs
from collection.placement import device_runs
from collection.traces.durable import ShardCommitter
from collection.traces.format import ShardWriter
from collection.traces.hidden_format import FORMATS, LOSSLESS, HiddenCodec, HiddenFormat

ENCODE_LAYERS = 8  # hidden layers encoded per call: fewer launches than one by one, bounded scratch memory


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


class CopiesDone:
    """The events marking one batch's device-to-host copies finished: one per GPU that copied."""

    def __init__(self, events: list[torch.cuda.Event]):
        self.events = events

    def synchronize(self) -> None:
        for event in self.events:
            event.synchronize()


@dataclass
class HostBatch:
    """One batch's captured rows in host memory (pinned on CUDA), valid once `ready` has completed."""
    hidden: torch.Tensor | None   # (Lh, max_rows, H), or (Lh, max_rows, P) uint8 codes of a compact format
    topk_ids: torch.Tensor        # (L, max_rows, k) int16
    topk_weights: torch.Tensor    # (L, max_rows, k) float16
    router_logits: torch.Tensor | None  # (L, max_rows, E) float16
    rows: int = 0
    ready: CopiesDone | None = None
    sources: list[torch.Tensor] | None = None  # GPU tensors being copied: kept alive until `ready`
    hidden_scale: torch.Tensor | None = None   # (Lh, max_rows, G) float16 scales of a compact format


class RoutingCapture:
    """Hooks every MoE router of `model`; `forward(...)` runs one forward and returns a HostBatch.

    `top_k` and `num_experts` size the host buffers. `norm_topk_prob` is not used: every supported
    router returns the weights it applied, and those are stored (kept in the signature for callers).
    """

    def __init__(self, model: nn.Module, hidden_layers: list[int], hidden_dtype: torch.dtype,
                 store_logits: bool, max_rows: int, top_k: int, norm_topk_prob: bool, num_experts: int,
                 hidden_size: int, num_buffers: int = 2, hidden_format: HiddenFormat = FORMATS[LOSSLESS],
                 hidden_codec: HiddenCodec | None = None):
        self.family = family_of(model)
        self.layers = moe_layers(model)
        self.L = len(self.layers)
        self.slot = {layer: j for j, layer in enumerate(hidden_layers)}  # MoE layer -> hidden slot
        self.hidden_dtype, self.store_logits = hidden_dtype, store_logits
        self.top_k = top_k
        self.device = model.get_input_embeddings().weight.device  # where the input ids go
        # one copy stream per GPU holding a layer: a copy is queued on the GPU that computed its source
        self.copy_streams = {d: torch.cuda.Stream(d) for d in {p.device for p in model.parameters()} if d.type == "cuda"}
        self.cuda = bool(self.copy_streams)
        pin = self.cuda

        def host(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype, pin_memory=pin)

        self.format = hidden_format
        # a fitted format's parameters, on the input device; moved to each other device that encodes (`_codec_on`)
        self.codec = hidden_codec.to(self.device) if hidden_codec is not None else None
        self._codecs: dict[torch.device, HiddenCodec] = {} if self.codec is None else {self.device: self.codec}
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
        self._rows_index: torch.Tensor | None = None  # real-token rows (host), None when no padding
        self._rows_on: dict[torch.device, torch.Tensor] = {}  # ... copied to each device that needed it
        self._copied_on: set[torch.device] = set()  # GPUs that queued copies for the current batch
        self._router: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.handles = [m.router.register_forward_hook(self._hook(j)) for j, m in enumerate(self.layers)]

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
            self._router[layer] = router_outputs(self.family, output)
            if layer in self.slot and batch.hidden is not None:
                x = args[0]
                h = x.reshape(-1, x.shape[-1])
                if self._rows_index is not None:  # drop padding on the GPU: fewer bytes cross PCIe
                    h = h.index_select(0, self._rows(x.device))
                if self.format.lossless:
                    self._copy(batch, [(batch.hidden[self.slot[layer], :batch.rows], h.to(self.hidden_dtype))])
                else:  # a reference only: `_encode_hidden` encodes all layers at once after the forward
                    self._hidden[self.slot[layer]] = h
        return hook

    def _rows(self, device: torch.device) -> torch.Tensor:
        """The real-token row index on `device` (copied there once per batch)."""
        if device not in self._rows_on:
            self._rows_on[device] = self._rows_index.to(device, non_blocking=True)
        return self._rows_on[device]

    def _codec_on(self, device: torch.device) -> HiddenCodec | None:
        """The fitted codec on `device` (moved there once: a device map spreads the layers)."""
        if self.codec is None:
            return None
        if device not in self._codecs:
            self._codecs[device] = self.codec.to(device)
        return self._codecs[device]

    def _encode_hidden(self, batch: HostBatch) -> None:
        """Compact formats: the stored layers' rows encoded a few layers per call, on the side stream of the GPU
        that computed them (the next forward runs meanwhile), then their codes and scales copied to pinned memory."""
        if len(self._hidden) != len(self.slot):
            raise RuntimeError(f"captured the hidden state of {len(self._hidden)} of {len(self.slot)} layers")
        n = batch.rows
        for device, a, b in device_runs([self._hidden[j].device for j in range(len(self.slot))]):
            stream = self._stream(device)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for j0 in range(a, b, ENCODE_LAYERS):
                    slots = list(range(j0, min(j0 + ENCODE_LAYERS, b)))
                    hs = [self._hidden[j] for j in slots]
                    payload, scale = self.format.encode(torch.stack(hs), self._codec_on(device), slots)
                    j1 = j0 + len(slots)
                    if n == batch.hidden.shape[1]:  # no padding dropped: the chunk's rows are one contiguous block
                        batch.hidden[j0:j1].copy_(payload, non_blocking=stream is not None)
                        batch.hidden_scale[j0:j1].copy_(scale, non_blocking=stream is not None)
                    else:  # one contiguous copy per layer (fewer rows than the buffer leave a strided slice)
                        for i in range(len(slots)):
                            batch.hidden[j0 + i, :n].copy_(payload[i], non_blocking=stream is not None)
                            batch.hidden_scale[j0 + i, :n].copy_(scale[i], non_blocking=stream is not None)
                    if stream is not None:
                        batch.sources.extend([*hs, payload, scale])

    def _stream(self, device: torch.device) -> torch.cuda.Stream | None:
        """`device`'s copy stream, ordered after the work queued on it so far (None on the CPU); marks the
        device as one whose copies the batch must wait for."""
        if device.type != "cuda":
            return None
        if device not in self.copy_streams:  # a layer whose weights live elsewhere (host offload) computing here
            self.copy_streams[device] = torch.cuda.Stream(device)
        stream = self.copy_streams[device]
        stream.wait_stream(torch.cuda.current_stream(device))
        self._copied_on.add(device)
        return stream

    def _copy(self, batch: HostBatch, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Queue device-to-host copies behind the work queued so far, on the side stream of the sources' GPU
        (all sources of one call live on one device)."""
        device = parts[0][1].device
        if device.type != "cuda":
            for dst, src in parts:
                dst.copy_(src)
            return
        stream = self._stream(device)
        with torch.cuda.stream(stream):
            for dst, src in parts:
                dst.copy_(src, non_blocking=True)
        # a reference (not record_stream) keeps each source alive until the batch's copies are done:
        # the allocator then never has to track cross-stream uses of short-lived blocks
        batch.sources.extend(src for _, src in parts)

    def _copy_router_outputs(self, batch: HostBatch) -> None:
        """All layers' (ids, weights, logits) in one stack, gather, cast and copy each: a handful of
        launches per forward instead of a dozen per layer (per device: one stack per run of consecutive
        layers on one device, so a model on one GPU has a single run)."""
        if len(self._router) != self.L:
            raise RuntimeError(f"captured the router of {len(self._router)} of {self.L} MoE layers in one forward")
        n = batch.rows
        for device, a, b in device_runs([self._router[layer][2].device for layer in range(self.L)]):
            idx = None if self._rows_index is None else self._rows(device)

            def stacked(i: int, dtype: torch.dtype) -> torch.Tensor:
                t = torch.stack([self._router[layer][i] for layer in range(a, b)])  # (b - a, B*T, .)
                return (t if idx is None else t.index_select(1, idx)).to(dtype)

            parts = [(batch.topk_ids[a:b, :n], stacked(2, torch.int16)),
                     (batch.topk_weights[a:b, :n], stacked(1, torch.float16))]
            if batch.router_logits is not None:
                parts.append((batch.router_logits[a:b, :n], stacked(0, torch.float16)))
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
        self._rows_index = None if batch.rows == flat_mask.numel() else rows_index
        batch.ready = None
        self._current = batch
        try:
            if self._rows_index is not None:  # to every GPU before the forward, not as a launch between layers
                for device in self.copy_streams:
                    self._rows(device)
            self.last_output = model(input_ids=input_ids.to(self.device, non_blocking=True),
                                     attention_mask=attention_mask.to(self.device, non_blocking=True), use_cache=False,
                                     **model_kwargs)
            self._copy_router_outputs(batch)
            if batch.hidden is not None and not self.format.lossless:
                self._encode_hidden(batch)
            if self._copied_on:
                events = []
                for device in sorted(self._copied_on, key=str):
                    events.append(torch.cuda.Event())
                    events[-1].record(self.copy_streams[device])
                batch.ready = CopiesDone(events)
        finally:
            self._current = None
            self._router = {}
            self._hidden = {}
            self._rows_on = {}
            self._copied_on = set()
        return batch


@torch.no_grad()
def hidden_moments(model: nn.Module, hidden_layers: list[int], batches: list[tuple[torch.Tensor, torch.Tensor]],
                   device: torch.device) -> tuple[torch.Tensor, int]:
    """(E[h h^T] of each stored layer's MoE input over the real tokens of `batches` (Lh, H, H) float64, tokens):
    what a fitted hidden format is fitted on. Each product is accumulated on the device, in float32 per batch."""
    layers = moe_layers(model)
    slot = {layer: j for j, layer in enumerate(hidden_layers)}
    acc: dict[int, torch.Tensor] = {}
    rows: list[torch.Tensor] = []

    def hook(layer: int) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if layer in slot:
                x = args[0]
                h = x.reshape(-1, x.shape[-1]).index_select(0, rows[0].to(x.device)).float()
                m = (h.T @ h).double().to(device)  # one device for all layers under a device map
                acc[slot[layer]] = acc[slot[layer]] + m if slot[layer] in acc else m
        return fn
    handles = [m.router.register_forward_hook(hook(j)) for j, m in enumerate(layers)]
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


WRITE_BYTES_PER_JOB = 96 << 20  # at a few GB/s per thread into the page cache, about one forward's time (30-40 ms)


def write_jobs(nbytes: int, slices: int, threads: int) -> int:
    """Parallel write jobs for a batch of `nbytes` in `slices` slices: one per WRITE_BYTES_PER_JOB (rounded up),
    at most `threads`. A full-size lossless batch (200 MB) needs three to keep up with the forward; a compact one
    (50 MB) one, and more would only take the GIL more often (measured on an H200: hadamard-3.5bit collection
    25.7k tokens/s with one writer thread, 23.4k with four)."""
    return max(1, min(threads, slices, -(-nbytes // WRITE_BYTES_PER_JOB)))


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
        self.threads = write_threads
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
                slices = [(name, t[j, :n], (j,)) for name, t in parts for j in range(t.shape[0])]
                # a few jobs, each writing every k-th slice (a few MiB to a few bytes each) in a loop, and one
                # writeback call for the file after all: every Python step on these threads takes the GIL from the
                # main thread, which launches the next forward, so they take it as few times as they can
                jobs = write_jobs(sum(t.numel() * t.element_size() for _, t, _ in slices), len(slices), self.threads)

                def write_every(k: int) -> None:
                    for name, t, index in slices[k::jobs]:
                        writer.write(name, t, index, row, writeback=False)
                for job in [self.pool.submit(write_every, k) for k in range(jobs)]:
                    job.result()
                writer.start_writeback()
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
