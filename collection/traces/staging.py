"""Reading byte ranges of shards into device memory at page-cache speed.

The shard tensors a block needs are a few long byte ranges per file (layer-major layout: one range per
tensor, or per (layer, run of sequences) when a split takes few of a shard's sequences). `StagedReader`
cuts them into chunks that worker threads read with `os.preadv` (large sequential reads, the GIL released)
into pinned host buffers, each then copied to the device asynchronously on the worker's own CUDA stream while
the next chunk is read: reading from the page cache, and the host-to-device copy overlap, and no pageable
copy is ever made. On a CPU device the chunks are read straight into the destination tensor.

`prefetch` runs a loader one item ahead on a background thread, so the next shard group is read while the
current one is trained or evaluated on.
"""
from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import torch

CHUNK_BYTES = 16 << 20  # per read and per host-to-device copy: long enough to run at full speed


def default_read_threads() -> int:
    """Reader threads: one thread copies out of the page cache at ~3 GB/s, and a lossless first epoch needs 8+ GB/s
    (4 KiB per row at 2M rows/s); half this process's share of the cores (under torchrun the node's processes share
    them), 4 to 12 (measured on a 16-core H200 host: 4 threads 13.6 GB/s, 8 17.7, 12 21.4, 16 22.1;
    docs/BENCHMARKS.md)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 4
    try:
        processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        processes = 1
    return min(12, max(4, cores // processes // 2))


READ_THREADS = default_read_threads()

T = TypeVar("T")


@dataclass
class _Slot:
    """One pinned staging buffer with the stream that drains it and the event marking the drain done."""
    host: torch.Tensor        # (CHUNK_BYTES,) uint8, pinned
    view: memoryview
    stream: torch.cuda.Stream
    done: torch.cuda.Event


class StagedReader:
    """Reads lists of (file offset, length) ranges into one contiguous uint8 tensor on `device`."""

    def __init__(self, device: torch.device, threads: int | None = None, chunk_bytes: int = CHUNK_BYTES):
        self.device, self.chunk = device, chunk_bytes
        threads = READ_THREADS if threads is None else threads
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="read")
        self.slots: queue.Queue[_Slot] | None = None
        if device.type == "cuda":
            self.slots = queue.Queue()
            for _ in range(2 * threads):  # two per thread: one is read into while the other drains
                host = torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True)
                self.slots.put(_Slot(host, memoryview(host.numpy()), torch.cuda.Stream(device), torch.cuda.Event()))

    def read(self, source: Path | int, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """The bytes of `ranges` of `source` (a path, or an open descriptor: a shard's, checked against its
        manifest entry, which is read and left open), concatenated in order, as a uint8 tensor on the device; every
        copy has completed when this returns."""
        total = sum(n for _, n in ranges)
        on_cuda = self.slots is not None
        dst = torch.empty(total, dtype=torch.uint8, device=self.device)
        if total == 0:
            return dst
        host_dst = None if on_cuda else memoryview(dst.numpy())
        allocated = None
        if on_cuda:  # `dst` may reuse memory that kernels queued on this stream still read: copy after them
            allocated = torch.cuda.Event()
            allocated.record(torch.cuda.current_stream(self.device))
        fd = source if isinstance(source, int) else os.open(source, os.O_RDONLY)
        try:
            jobs = [self.pool.submit(self._chunk_to_device, fd, pieces, start, size, dst, allocated) if on_cuda else
                    self.pool.submit(self._chunk_to_host, fd, pieces, start, host_dst)
                    for pieces, start, size in _chunks(ranges, self.chunk)]
            used = [job.result() for job in jobs]
        finally:
            if not isinstance(source, int):
                os.close(fd)
        if on_cuda:
            for slot in {id(s): s for s in used}.values():
                slot.done.synchronize()
        return dst

    def _chunk_to_host(self, fd: int, pieces: list[tuple[int, int, int]], start: int, dst: memoryview) -> None:
        for offset, n, at in pieces:
            _pread_into(fd, dst[start + at:start + at + n], offset)

    def _chunk_to_device(self, fd: int, pieces: list[tuple[int, int, int]], start: int, size: int,
                         dst: torch.Tensor, allocated: torch.cuda.Event) -> _Slot:
        slot = self.slots.get()
        try:
            slot.done.synchronize()  # its previous copy has left the buffer
            for offset, n, at in pieces:
                _pread_into(fd, slot.view[at:at + n], offset)
            with torch.cuda.stream(slot.stream):
                slot.stream.wait_event(allocated)
                dst[start:start + size].copy_(slot.host[:size], non_blocking=True)
                slot.done.record(slot.stream)
        finally:
            self.slots.put(slot)
        return slot

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _chunks(ranges: list[tuple[int, int]], chunk: int) -> Iterator[tuple[list[tuple[int, int, int]], int, int]]:
    """Ranges packed into chunks of at most `chunk` bytes: (pieces (file offset, length, offset in chunk),
    destination start, chunk size). Long ranges are split; short ones share a chunk (one copy for many)."""
    pieces: list[tuple[int, int, int]] = []
    start = fill = 0
    for offset, n in ranges:
        while n > 0:
            take = min(n, chunk - fill)
            pieces.append((offset, take, fill))
            fill += take
            offset += take
            n -= take
            if fill == chunk:
                yield pieces, start, fill
                start += fill
                pieces, fill = [], 0
    if fill:
        yield pieces, start, fill


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            raise OSError(f"unexpected end of file at byte {offset + got}")
        got += n


_READERS: dict[str, StagedReader] = {}
_READERS_LOCK = threading.Lock()


def reader_for(device: torch.device) -> StagedReader:
    """One reader (and one set of pinned buffers) per device for the whole process."""
    with _READERS_LOCK:
        key = str(device)
        if key not in _READERS:
            _READERS[key] = StagedReader(device)
        return _READERS[key]


def prefetch(loaders: Iterable[Callable[[], T]], device: torch.device) -> Iterator[T]:
    """Results of `loaders` in order, each produced on a background thread while the previous one is used.

    GPU work of a loader runs on the background thread's own stream and is complete when its result is
    handed over; the result's tensors are then marked as used by the consumer's stream, so the caching
    allocator cannot give their memory to the next load while the consumer's kernels still read it.
    """
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def run(load: Callable[[], T]) -> T:
        if stream is None:
            return load()
        with torch.cuda.stream(stream):
            out = load()
        stream.synchronize()
        return out

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as ex:
        it = iter(loaders)
        nxt = next(it, None)
        future = ex.submit(run, nxt) if nxt is not None else None
        while future is not None:
            out = future.result()
            nxt = next(it, None)
            future = ex.submit(run, nxt) if nxt is not None else None
            if stream is not None:
                _record(out, torch.cuda.current_stream(device))
            yield out


def _record(obj: object, stream: torch.cuda.Stream, depth: int = 2) -> None:
    """record_stream on every CUDA tensor of `obj`: a tensor, or the attributes of an object (and of the
    objects among them, such as a block's codec)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            obj.record_stream(stream)
    elif depth and hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            _record(value, stream, depth - 1)

