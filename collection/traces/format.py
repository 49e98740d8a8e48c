"""The trace format: the one definition every stage reads and writes.

A trace set is a directory (documented in docs/trace-format.md):

    manifest.json               model, routing shape, capture settings, sources, finished shards
    router_weights.safetensors  each MoE layer's router matrix, `router.{l}` of shape (E, H)
    shard_00000.safetensors     token rows of whole sequences, layer-major (below)

Shard tensors (N real tokens, S sequences, L MoE layers, Lh stored hidden layers, k top-k, E experts):

    token_ids      int32   (N,)
    seq_offsets    int64   (S + 1,)    sequence s owns token rows seq_offsets[s]:seq_offsets[s + 1]
    seq_ids        int64   (S,)        position of the sequence in the collection's sampling order
    seq_sources    int16   (S,)        index into manifest["sources"]
    topk_ids       int16   (L, N, k)   the router's chosen experts, in the router's order
    topk_weights   float16 (L, N, k)   their routing weights as the model applied them
    router_logits  float16 (L, N, E)   optional (capture.store_logits)
    hidden         (Lh, N, H)          optional: MoE-block input of the layers in capture.hidden_layers
                   (a compact capture.hidden_format stores uint8 codes (Lh, N, P) and hidden_scale
                   float16 (Lh, N, G) instead: collection/traces/hidden_format.py encodes and decodes them)

Shards are plain safetensors files (no pickle). Layer-major layout makes "layer l, token rows a:b" one
contiguous slice, so training memory-maps a shard and reads row ranges without loading it whole.
Every finished shard, and the router weights, are listed in the manifest with their byte size and SHA-256;
the reader checks both, so a truncated, corrupt or swapped file is an error naming it, never silent data.
A set whose collection has not finished (`complete: false`) is refused unless the caller allows it.
A set imported from a serving engine's routing (collection/importers.py) holds routing only: capture.imported
names its source, capture.token_ids / capture.topk_weights say whether those tensors hold real values.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import stat
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from collection.traces.durable import start_writeback
from collection.traces.hidden_format import CODEC_FILE, FORMATS, LOSSLESS, MAX_BITS, HiddenCodec
from collection.traces.locks import SetReadLock, read_fd
from common.atomic import PARTIAL_SUFFIX, atomic_write_bytes, atomic_write_json, commit_file, sha256_fd, sha256_file
from common.errors import DISK_FULL, UserError, disk_full
from common.paths import TRACE_MANIFEST, is_link, open_nofollow, plain_name_problem, refuse_symlink, set_file

FORMAT_VERSION = 1          # what a lossless trace set is written as (unchanged, so old readers read it)
COMPACT_FORMAT_VERSION = 2  # a compact hidden format: readers older than it must refuse, not misread
READABLE_VERSIONS = (FORMAT_VERSION, COMPACT_FORMAT_VERSION)
DEFAULT_TRACES = "routing_data/traces/qwen2moe-mini"  # where the embedded default's traces go (repository-relative)
MANIFEST = TRACE_MANIFEST
ROUTER_WEIGHTS = "router_weights.safetensors"
STAGING = ".incoming"  # a set replacing the one in a directory is written here until complete (collection/traces/output.py)
REPLACED = "replaced_manifest.json"  # inside STAGING: the old manifest, moved aside when a swap starts

# safetensors dtype codes <-> numpy storage dtypes (bfloat16 is stored as its raw 16 bits)
_ST_TO_NP = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAME_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
               "int16": "I16", "int8": "I8", "uint8": "U8", "float64": "F64", "bool": "BOOL"}
_ST_TO_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
HIDDEN_DTYPES = ("float16", "bfloat16", "float32")  # what capture.hidden_dtype may be
SHARD_NAME = re.compile(r"shard_\d{5,}\.safetensors")  # `shard_name`'s pattern: the only shard names a manifest may list
# Every place a manifest names a file of the set (a JSON path, "*" = each item of a list) and the names it may
# hold there. `Manifest.from_json` checks each against `plain_name_problem` and its pattern, and `Manifest.files()`
# (what writers replace and delete) lists exactly these: a new file field is added here or it is neither read
# nor deleted. tests/test_attacks.py walks written manifests for any other "file" key.
FILE_FIELDS: dict[tuple[str, ...], re.Pattern[str]] = {
    ("shards", "*", "file"): SHARD_NAME,
    ("router_weights", "file"): re.compile(re.escape(ROUTER_WEIGHTS)),
    ("capture", "hidden_codec", "file"): re.compile(re.escape(CODEC_FILE)),
}
# "file" keys a manifest also carries that name no file of the set (provenance of a legacy import's inputs,
# which are read from where the user named them, never from the trace directory)
FOREIGN_FILE_FIELDS = (("plan", "inputs", "*", "file"),)
# sizes no real model reaches, refused before anything is sized from them (topk_ids and seq_sources are int16)
MAX_LAYERS, MAX_EXPERTS, MAX_HIDDEN, MAX_SOURCES = 4096, 32767, 1 << 17, 32767


class TraceFormatError(UserError):
    """A trace set, shard or manifest that cannot be used; the message names the file."""


@dataclass
class FileInfo:
    """A file of the set that is not a shard (the router weights): its name, size and checksum."""
    file: str
    bytes: int
    sha256: str


def encode_tensors(name: str, tensors: dict[str, torch.Tensor]) -> tuple[bytes, FileInfo]:
    """A small safetensors file (the router weights) in memory, and its manifest entry: the checksum is of
    exactly the bytes that will be written, and equal tensors always give equal bytes."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    return data, FileInfo(file=name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


# ----------------------------------------------------------------------------------------------
# writing: a safetensors file laid out up front, filled in place, committed by rename


@dataclass
class TensorSpec:
    dtype: str  # "float16", "bfloat16", "int16", ...
    shape: tuple[int, ...]


class ShardWriter:
    """Streams one safetensors file to disk without holding it in memory.

    The header (names, dtypes, shapes, offsets) is fixed when the writer opens, so every batch is
    written with `os.pwrite` straight to its final place. The file lives under a `.partial` name
    until `commit()` fsyncs and renames it: a crash leaves only a `.partial`, which no reader takes.
    """

    def __init__(self, path: Path, specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None,
                 writeback: bool = False):
        self.path = Path(path)
        self.writeback = writeback  # start writing each range to disk at once (collection.traces.durable)
        self.tmp = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self.offsets: dict[str, int] = {}
        self.specs = specs
        offset = 0
        for name, spec in specs.items():
            st = _NAME_TO_ST[spec.dtype]
            nbytes = int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(_ST_TO_NP[st]).itemsize
            header[name] = {"dtype": st, "shape": list(spec.shape), "data_offsets": [offset, offset + nbytes]}
            self.offsets[name] = offset
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment
        self.data_start = 8 + len(raw)
        self.total_bytes = self.data_start + offset
        self.fd = -1
        refuse_symlink(self.tmp, "temporary shard file")  # never written through a planted link
        with self._cleanup_on_error():
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            os.pwrite(self.fd, struct.pack("<Q", len(raw)) + raw, 0)
            os.ftruncate(self.fd, self.total_bytes)  # holes read as zeros until written

    @contextlib.contextmanager
    def _cleanup_on_error(self) -> Iterator[None]:
        """Any failure removes the `.partial`; a full disk becomes one line naming the shard."""
        try:
            yield
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError) and e.errno in DISK_FULL:
                raise disk_full(self.path, e) from None
            raise

    def write(self, name: str, array: np.ndarray | torch.Tensor, index: tuple[int, ...] = (), row: int = 0,
              writeback: bool | None = None) -> None:
        """Write `array` into tensor `name` at [*index, row:row+len(array)] (C order, contiguous); `writeback`
        (default: the writer's) starts writing the range to disk at once (`start_writeback` does it for the
        whole file in one call)."""
        if isinstance(array, torch.Tensor):
            array = tensor_to_numpy(array)
        array = np.ascontiguousarray(array)
        spec = self.specs[name]
        shape = spec.shape
        lead = len(index)
        if array.shape[1:] != tuple(shape[lead + 1:]) or row + array.shape[0] > shape[lead]:
            raise ValueError(f"{name}: cannot write {array.shape} at {index}+{row} into {shape}")
        itemsize = np.dtype(_ST_TO_NP[_NAME_TO_ST[spec.dtype]]).itemsize
        strides = np.cumprod((shape[1:] + (1,))[::-1])[::-1]  # elements per step of each axis
        elem = sum(i * s for i, s in zip(index, strides)) + row * strides[lead]
        if array.size:
            # called from several threads at once: the caller aborts once they have all stopped
            # (closing the fd here could let a sibling's pwrite land in whatever file reuses its number)
            at = self.data_start + self.offsets[name] + int(elem) * itemsize
            try:
                os.pwrite(self.fd, memoryview(array).cast("B"), at)
            except OSError as e:
                if e.errno in DISK_FULL:
                    raise disk_full(self.path, e) from None
                raise
            if self.writeback if writeback is None else writeback:
                start_writeback(self.fd, at, array.nbytes)

    def start_writeback(self) -> None:
        """Start writing every dirty page of the file to disk, without waiting (one call after many writes)."""
        if self.writeback and self.fd >= 0:
            start_writeback(self.fd, 0, self.total_bytes)

    def commit(self) -> tuple[int, str]:
        """Flush, fsync, rename into place; returns (bytes, sha256)."""
        with self._cleanup_on_error():
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            digest = sha256_file(self.tmp)
            commit_file(self.tmp, self.path)
        return self.total_bytes, digest

    def hand_off(self) -> tuple[Path, Path, int, int]:
        """(partial path, final path, open fd, total bytes) for a `ShardCommitter`, which owns the fd from now on."""
        fd, self.fd = self.fd, -1
        return self.tmp, self.path, fd, self.total_bytes

    def abort(self) -> None:
        """Close and remove the `.partial` (safe to call twice, from any thread, and after commit)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
        self.tmp.unlink(missing_ok=True)


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy() if hasattr(torch, "uint16") else t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


# ----------------------------------------------------------------------------------------------
# reading: validated header, memory-mapped tensors


class SafetensorsFile:
    """A memory-mapped safetensors file whose header has been checked against the file.

    Every structural problem (short file, bad header, unknown dtype, offsets outside the file or
    overlapping, shape that disagrees with its bytes) raises TraceFormatError naming the file,
    so fuzzed or damaged input can fail in no other way.
    """

    def __init__(self, path: Path, fd: int | None = None):
        """`fd`: the file already open (and checked against its manifest entry by `open_listed_file`); it is
        adopted, and every later read, and the memory map, go through it, never through the name again."""
        self.path = Path(path)
        self.fd = -1
        try:
            self.fd = open_nofollow(self.path, "file", error=TraceFormatError) if fd is None else fd
            size = os.fstat(self.fd).st_size
            head = os.pread(self.fd, 8, 0)
            if len(head) < 8:
                raise self._error("file is shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise self._error("header length points past the end of the file (truncated?)")
            raw = os.pread(self.fd, n, 8)
        except OSError as e:
            self.close()
            raise TraceFormatError(f"{self.path}: cannot read ({e.strerror or e})") from None
        except BaseException:
            self.close()
            raise
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._error("header is not valid JSON") from None
        if not isinstance(header, dict):
            raise self._error("header is not a JSON object")
        meta = header.pop("__metadata__", {}) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise self._error("header metadata is not a string map")
        self.metadata: dict[str, str] = meta
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        spans = []
        for name, info in header.items():
            if not isinstance(info, dict):
                raise self._error(f"tensor {name!r} has no description")
            dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if not isinstance(dt, str) or dt not in _ST_TO_NP:
                raise self._error(f"tensor {name!r} has unsupported dtype {dt!r}")
            if (not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**48 for d in shape)
                    or not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)):
                raise self._error(f"tensor {name!r} has a malformed shape or offsets")
            begin, end = offs
            nbytes = int(np.prod(shape, dtype=object)) * np.dtype(_ST_TO_NP[dt]).itemsize
            if not (0 <= begin <= end <= data_len) or end - begin != nbytes:
                raise self._error(f"tensor {name!r} does not fit the file (truncated or corrupt)")
            self.entries[name] = (dt, tuple(shape), begin, end)
            spans.append((begin, end))
        spans.sort()
        for (_, e0), (b1, _) in zip(spans, spans[1:]):
            if b1 < e0:
                raise self._error("tensors overlap")
        self._mmap: np.ndarray | None = None
        self._size = size

    def _error(self, why: str) -> TraceFormatError:
        return TraceFormatError(f"{self.path}: not a valid shard: {why}")

    def close(self) -> None:
        """Close the descriptor (a memory map made from it stays valid)."""
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self.entries)

    def numpy(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view (bfloat16 comes back as uint16 bits; see `tensor`)."""
        if name not in self.entries:
            raise TraceFormatError(f"{self.path}: shard has no tensor {name!r}")
        dt, shape, begin, end = self.entries[name]
        if end == begin:
            return np.zeros(shape, dtype=_ST_TO_NP[dt])
        if self._mmap is None:  # the descriptor that was checked, mapped: the name is never opened again
            self._mmap = np.frombuffer(mmap.mmap(self.fd, self._size, access=mmap.ACCESS_READ), dtype=np.uint8)
        raw = self._mmap[self.data_start + begin:self.data_start + end]
        return raw.view(_ST_TO_NP[dt]).reshape(shape)

    def tensor(self, name: str, index: Any = slice(None)) -> torch.Tensor:
        """Tensor `name`, indexed before copying (reads only the pages the index touches)."""
        arr = self.numpy(name)[index]
        if not (arr.flags.writeable and arr.flags.c_contiguous):  # a view into the map: copy it out
            arr = np.array(arr, order="C")
        t = torch.from_numpy(arr)
        if self.entries[name][0] == "BF16":
            t = t.view(torch.bfloat16)
        return t

    def dtype(self, name: str) -> torch.dtype:
        return _ST_TO_TORCH[self.entries[name][0]]


# ----------------------------------------------------------------------------------------------
# manifest and trace set


def _example(pattern: re.Pattern[str]) -> str:
    return shard_name(0) if pattern is SHARD_NAME else re.sub(r"\\(.)", r"\1", pattern.pattern)


def listed_file_entries(d: Any) -> Iterator[tuple[str, str | None]]:
    """(name, None) for every file name at a FILE_FIELDS path of a manifest's JSON, or (None, why) for one that
    is refused: not a plain file name, not the field's name, missing from its entry, or under a section that is
    present but of the wrong type. An absent (or null) optional section lists nothing."""
    for path, pattern in FILE_FIELDS.items():
        nodes: list[tuple[str, Any]] = [("", d)]
        for depth, key in enumerate(path):
            leaf = depth == len(path) - 1
            found = []
            for label, node in nodes:
                if key == "*":
                    if not isinstance(node, list):
                        yield None, f"{label} must be a list"
                        continue
                    found += [(f"{label}[{i}]", x) for i, x in enumerate(node)]
                    continue
                here = f"{label}.{key}" if label else key
                if not isinstance(node, dict):
                    yield None, f"{label} must be an object"
                elif leaf and key not in node:
                    yield None, f"{here} is missing"
                elif leaf:
                    name = node[key]
                    if (why := plain_name_problem(name)) is not None:
                        yield None, (f"{here} {name!r} {why}; the files of a set are plain file names inside its "
                                     f"directory ({_example(pattern)})")
                    elif not pattern.fullmatch(name):
                        yield None, f"{here} {name!r} must be a plain file name like {_example(pattern)}"
                    else:
                        yield name, None
                elif node.get(key) is not None:
                    found.append((here, node[key]))
            nodes = found


@dataclass
class ShardInfo:
    file: str
    sequences: int
    tokens: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    model: dict[str, Any]      # name_or_path, architecture, dtype, quantization
    routing: dict[str, Any]    # num_layers, num_experts, top_k, hidden_size, norm_topk_prob, moe_layer_indices,
    #                            family, router (trace sets before the families: no family/router keys)
    capture: dict[str, Any]    # hidden_layers, hidden_dtype, store_logits, max_length, batch_size, shard_size
    sources: list[dict[str, Any]]  # [{"name", "kind", "spec", "sequences"}]
    plan: dict[str, Any]       # target_traces, seed, ... : what a resumed run must match
    shards: list[ShardInfo] = field(default_factory=list)
    complete: bool = False
    format_version: int = FORMAT_VERSION
    router_weights: FileInfo | None = None  # None: no router weights (legacy import), or a set written before checksums

    @property
    def num_layers(self) -> int:
        return int(self.routing["num_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.routing["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.routing["top_k"])

    @property
    def hidden_size(self) -> int:
        return int(self.routing["hidden_size"])

    @property
    def moe_layer_indices(self) -> list[int]:
        """Decoder-layer index of each MoE layer (0..L-1 when an old manifest does not say)."""
        return [int(i) for i in self.routing.get("moe_layer_indices", range(self.num_layers))]

    @property
    def family(self) -> str:
        """The model's family (config.model_type); trace sets written before families existed all came
        from Qwen2-MoE models, the only family the collector then built."""
        return str(self.routing.get("family") or "qwen2_moe")

    @property
    def norm_topk_prob(self) -> bool:
        return bool(self.routing.get("norm_topk_prob", False))

    @property
    def hidden_layers(self) -> list[int]:
        return [int(x) for x in self.capture.get("hidden_layers", [])]

    @property
    def hidden_format(self) -> str:
        """How hidden states are stored (collection/traces/hidden_format.py); absent in older manifests: lossless."""
        return str(self.capture.get("hidden_format", LOSSLESS))

    @property
    def has_token_ids(self) -> bool:
        """Whether token_ids hold the tokens (imports without them, and legacy imports, store -1)."""
        legacy = self.capture.get("legacy")
        default = legacy.get("token_ids_recovered", True) if isinstance(legacy, dict) else True
        return bool(self.capture.get("token_ids", default))

    @property
    def has_topk_weights(self) -> bool:
        """Whether topk_weights are the model's (imports from engines that record ids only store 1/k)."""
        return bool(self.capture.get("topk_weights", True))

    @property
    def imported(self) -> dict[str, Any] | None:
        """capture.imported of a set imported from a serving engine's routing (collection/importers.py), else None."""
        return self.capture.get("imported")

    @property
    def source_names(self) -> list[str]:
        return [s["name"] for s in self.sources]

    def files(self) -> list[str]:
        """Every data file this manifest lists (FILE_FIELDS: shards, router weights, a fitted format's codec): the
        files that belong to the set, each a checked plain file name (a manifest built in code is checked too)."""
        names = []
        for name, why in listed_file_entries(self.to_json()):
            if why is not None:
                raise TraceFormatError(f"{MANIFEST}: {why}")
            names.append(name)
        return names

    def owned_files(self) -> list[str]:
        """`files()`, and the router weights of a set written before the manifest listed them (the collector always
        wrote them); a legacy import has none, so a file of that name beside it is the user's."""
        unlisted = self.router_weights is None and not self.plan.get("legacy_import")
        return self.files() + ([ROUTER_WEIGHTS] if unlisted else [])

    def to_json(self) -> dict[str, Any]:
        d = {"format_version": self.format_version, "complete": self.complete, "model": self.model,
             "routing": self.routing, "capture": self.capture, "sources": self.sources, "plan": self.plan,
             "shards": [vars(s) for s in self.shards]}
        if self.router_weights is not None:
            d["router_weights"] = vars(self.router_weights)
        return d

    @classmethod
    def from_json(cls, d: Any, where: Path) -> "Manifest":
        """A manifest checked field by field: a hand-edited or damaged one is one line naming the field,
        never a crash later in a reader."""
        def bad(why: str) -> TraceFormatError:
            return TraceFormatError(f"{where}: not a valid trace manifest: {why}")

        def is_int(x: Any, low: int = 0) -> bool:  # bool is an int in Python; a manifest's true is no count
            return type(x) is int and x >= low

        def is_sha(x: Any) -> bool:
            return isinstance(x, str) and re.fullmatch(r"[0-9a-f]{64}", x) is not None

        def optional(section: dict[str, Any], key: str, ok: Any, what: str, name: str) -> None:
            if key in section and not ok(section[key]):
                raise bad(f"{name}.{key} must be {what}")

        if not isinstance(d, dict):
            raise bad("not a JSON object")
        for _, why in listed_file_entries(d):  # first: these names decide what a writer replaces and deletes
            if why is not None:
                raise bad(why)
        if type(d.get("format_version")) is not int or d["format_version"] not in READABLE_VERSIONS:
            raise bad(f"format_version {d.get('format_version')!r}, this code reads "
                      f"{', '.join(map(str, READABLE_VERSIONS))}")
        if not isinstance(d.get("complete", False), bool):
            raise bad("complete must be true or false")
        for key in ("model", "routing", "capture", "plan"):
            if not isinstance(d.get(key), dict):
                raise bad(f"missing section {key!r}")
        model, routing, capture, plan = d["model"], d["routing"], d["capture"], d["plan"]
        if not isinstance(model.get("name_or_path"), str):
            raise bad("model.name_or_path must be a string")
        for key in ("architecture", "dtype", "quantization"):
            optional(model, key, lambda x: isinstance(x, str), "a string", "model")
        for key, most in (("num_layers", MAX_LAYERS), ("num_experts", MAX_EXPERTS), ("top_k", MAX_EXPERTS),
                          ("hidden_size", MAX_HIDDEN)):
            if not is_int(routing.get(key), 1) and not (key == "hidden_size" and routing.get(key) == 0
                                                        and not capture.get("hidden_layers")):
                raise bad(f"routing.{key} must be a positive integer (hidden_size 0: unknown, in a set without "
                          "hidden states)")
            if routing[key] > most:  # sizes are taken from here before any stored tensor bounds them
                raise bad(f"routing.{key} {routing[key]} is beyond any model's ({most} at most)")
        if routing["top_k"] > routing["num_experts"]:
            raise bad(f"routing.top_k {routing['top_k']} exceeds routing.num_experts {routing['num_experts']}")
        if (why := router_spec_problem(routing.get("router"), routing["num_experts"], routing["top_k"])):
            raise bad(f"routing.router {why}")
        optional(routing, "norm_topk_prob", lambda x: isinstance(x, bool), "true or false", "routing")
        optional(routing, "architecture", lambda x: isinstance(x, str), "a string", "routing")
        mli = routing.get("moe_layer_indices")
        if mli is not None and (not isinstance(mli, list) or len(mli) != routing["num_layers"]
                                or not all(is_int(x) for x in mli) or mli != sorted(set(mli))):
            raise bad("routing.moe_layer_indices must list num_layers increasing decoder-layer indices")
        hl = capture.get("hidden_layers", [])
        if (not isinstance(hl, list) or not all(is_int(x) and x < routing["num_layers"] for x in hl)
                or any(a >= b for a, b in zip(hl, hl[1:]))):
            raise bad("capture.hidden_layers must list increasing MoE layer indices")
        optional(capture, "hidden_dtype", lambda x: x in HIDDEN_DTYPES, " or ".join(HIDDEN_DTYPES), "capture")
        optional(capture, "store_logits", lambda x: isinstance(x, bool), "true or false", "capture")
        optional(capture, "bytes_per_token", lambda x: is_int(x, 1), "a positive integer", "capture")
        for key in ("token_ids", "topk_weights"):
            optional(capture, key, lambda x: isinstance(x, bool), "true or false", "capture")
        imported = capture.get("imported")
        if imported is not None:  # routing recorded by a serving engine: routing only, and the manifest says so
            if not (isinstance(imported, dict) and isinstance(imported.get("format"), str)):
                raise bad("capture.imported must be an object naming its format")
            if hl or capture.get("store_logits", True) or d.get("router_weights") is not None:
                raise bad("capture.imported: an imported set holds routing only (no hidden_layers, store_logits "
                          "false, no router_weights)")
        hf = capture.get("hidden_format", LOSSLESS)
        if not isinstance(hf, str) or hf not in FORMATS:
            raise bad(f"capture.hidden_format {hf!r} is not one of {', '.join(FORMATS)}")
        if (hf != LOSSLESS) != (d["format_version"] == COMPACT_FORMAT_VERSION):
            raise bad(f"capture.hidden_format {hf!r} needs format_version "
                      f"{FORMAT_VERSION if hf == LOSSLESS else COMPACT_FORMAT_VERSION}")
        if hf != LOSSLESS and (why := FORMATS[hf].check(routing["hidden_size"])):
            raise bad(f"capture.hidden_format {hf!r}: {why}")
        codec = capture.get("hidden_codec")
        if FORMATS[hf].fitted and hl and not (isinstance(codec, dict) and codec.get("file") == CODEC_FILE
                                              and is_sha(codec.get("sha256")) and is_int(codec.get("bytes"), 1)):
            raise bad(f"capture.hidden_format {hf!r} needs capture.hidden_codec "
                      f"{{file: {CODEC_FILE}, sha256, bytes}}, the fitted parameters")
        optional(plan, "tokens_sha256", lambda x: isinstance(x, str), "a string", "plan")
        sources = d.get("sources")
        if not isinstance(sources, list) or not sources or len(sources) > MAX_SOURCES:
            raise bad(f"sources must be a non-empty list (of at most {MAX_SOURCES})")
        for src in sources:
            if not isinstance(src, dict) or not isinstance(src.get("name"), str):
                raise bad(f"source {src!r} must be an object with a string name")
            optional(src, "sequences", is_int, "a count", "sources[]")
        if not isinstance(d.get("shards", []), list):
            raise bad("shards must be a list")
        shards = []
        for s in d.get("shards", []):
            if not (isinstance(s, dict) and isinstance(s.get("file"), str) and is_int(s.get("sequences"), 1)
                    and is_int(s.get("tokens"), 1) and is_int(s.get("bytes"), 1) and is_sha(s.get("sha256"))):
                raise bad(f"malformed shard entry {s!r} (needs file, sequences, tokens, bytes, sha256)")
            if s["tokens"] < s["sequences"]:
                raise bad(f"shard {s['file']}: fewer tokens than sequences")
            shards.append(ShardInfo(file=s["file"], sequences=s["sequences"], tokens=s["tokens"], bytes=s["bytes"],
                                    sha256=s["sha256"]))
        if len({s.file for s in shards}) != len(shards):
            raise bad("a shard file is listed twice")
        rw = d.get("router_weights")
        if rw is not None:
            if not (isinstance(rw, dict) and rw.get("file") == ROUTER_WEIGHTS and is_int(rw.get("bytes"), 1)
                    and is_sha(rw.get("sha256"))):
                raise bad(f"router_weights must be {{\"file\": \"{ROUTER_WEIGHTS}\", \"bytes\": ..., \"sha256\": ...}}")
            rw = FileInfo(file=rw["file"], bytes=rw["bytes"], sha256=rw["sha256"])
        return cls(model=model, routing=routing, capture=capture, sources=sources, plan=plan, shards=shards,
                   complete=d.get("complete", False), format_version=d["format_version"], router_weights=rw)


ROUTER_SCORING = ("softmax", "sigmoid", "logits")  # collection/families.py Family.scoring
GROUP_SCORES = ("max", "sum of top-2")              # collection/families.py router_spec


def router_spec_problem(spec: Any, num_experts: int, top_k: int) -> str | None:
    """Why a manifest's routing.router cannot drive `families.selection_scores`, or None (absent: the trace set
    predates families, and plain top-k of the logits is what its model did)."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        return "must be an object (how the router chose its experts)"
    if "scoring" in spec and spec["scoring"] not in ROUTER_SCORING:
        return f"scoring {spec['scoring']!r} is not one of {', '.join(ROUTER_SCORING)}"
    groups = spec.get("groups")
    if groups is None:
        return None
    if not isinstance(groups, dict):
        return "groups must be an object {n_group, topk_group, group_score} or null"
    n, keep, score = groups.get("n_group"), groups.get("topk_group"), groups.get("group_score")
    if not (type(n) is int and 1 <= n <= num_experts and num_experts % n == 0):
        return f"groups.n_group {n!r} must be a positive integer dividing the {num_experts} experts"
    if not (type(keep) is int and 1 <= keep <= n and keep * (num_experts // n) >= top_k):
        return f"groups.topk_group {keep!r} must be 1..{n} and its groups hold at least top-{top_k} experts"
    if score not in GROUP_SCORES or (score == "sum of top-2" and num_experts // n < 2):
        return f"groups.group_score {score!r} is not one of {', '.join(GROUP_SCORES)} (sum of top-2: 2+ experts a group)"
    return None


def encode_codec(codec: HiddenCodec, fit_tokens: int) -> tuple[bytes, dict[str, Any]]:
    """A fitted format's parameters as file bytes, and the manifest's capture.hidden_codec entry for them (listed
    in the manifest before the file is written, as the router weights are)."""
    tensors = {"basis": codec.basis, "rel_std": codec.rel_std, "bits": codec.bits, "levels": codec.levels}
    if codec.inverse is not None:
        tensors["inverse"] = codec.inverse
    data, info = encode_tensors(CODEC_FILE, tensors)
    return data, {"file": CODEC_FILE, "sha256": info.sha256, "bytes": info.bytes, "fit_tokens": fit_tokens}


def save_codec(directory: Path, codec: HiddenCodec, fit_tokens: int) -> dict[str, Any]:
    """Write a fitted format's parameters beside the manifest; returns the manifest's capture.hidden_codec entry."""
    data, entry = encode_codec(codec, fit_tokens)
    atomic_write_bytes(Path(directory) / CODEC_FILE, data)
    return entry


def read_codec(directory: Path, manifest: Manifest, verify: bool = True) -> HiddenCodec | None:
    """The fitted format's parameters, checked against the manifest (size, SHA-256) and the format's shape;
    None for a format that needs none."""
    fmt = FORMATS[manifest.hidden_format]
    if not fmt.fitted or not manifest.hidden_layers:
        return None
    entry = manifest.capture["hidden_codec"]
    path = set_file(directory, entry["file"])
    f = SafetensorsFile(path, open_listed_file(path, entry["bytes"], entry["sha256"], verify,
                                               f"parameters of hidden format {fmt.name!r}"))
    Lh, H = len(manifest.hidden_layers), manifest.hidden_size
    want = {"basis": ((Lh, H, H), "F32"), "rel_std": ((Lh, H), "F32"), "bits": ((H,), "U8"),
            "levels": ((MAX_BITS, 2 ** MAX_BITS), "F32")}
    if fmt.router_weight:  # scaled axes: the decoding matrices are stored too
        want["inverse"] = ((Lh, H, H), "F32")
    for name, (shape, dt) in want.items():
        if name not in f.entries or f.entries[name][1] != shape or f.entries[name][0] != dt:
            raise TraceFormatError(f"{path}: {name} missing or not {dt} of shape {shape}")
    codec = HiddenCodec(f.tensor("basis"), f.tensor("rel_std"), f.tensor("bits"), f.tensor("levels"),
                        f.tensor("inverse") if "inverse" in want else None)
    bits = codec.bits.long()
    blocks = bits.view(-1, 8)
    if (bits.max() > 8 or (blocks != blocks[:, :1]).any() or (bits[1:] > bits[:-1]).any()
            or bits.sum() != fmt.payload_bytes(H) * 8):
        raise TraceFormatError(f"{path}: bits are not non-increasing blocks of 8 summing to {fmt.payload_bytes(H) * 8}")
    if not all(torch.isfinite(t).all() for t in (codec.basis, codec.rel_std, codec.levels, codec.inverse)
               if t is not None):
        raise TraceFormatError(f"{path}: non-finite parameters")
    return codec


def require_token_ids(manifest: Manifest, directory: Path, who: str) -> None:
    """One line when a reader that needs token ids meets a set without them."""
    if not manifest.has_token_ids:
        how = (f"imported from {manifest.imported['format']} without token ids" if manifest.imported
               else "a legacy import")
        raise TraceFormatError(f"{directory}: no token ids ({how}); {who} needs them")


MAX_MANIFEST_BYTES = 64 << 20  # a manifest listing 100,000 shards takes ~20 MB


def missing_manifest(directory: Path) -> TraceFormatError:
    """The error for a directory without manifest.json: an interrupted replacement says how to finish it."""
    path, staging = directory / MANIFEST, directory / STAGING
    if (staging.is_dir() and not is_link(staging)
            and any(os.path.lexists(staging / n) for n in (MANIFEST, REPLACED))):
        return TraceFormatError(f"{path}: missing: the set is in an interrupted replacement (the new set waits in "
                                f"{staging}); --resume finishes it (collect_traces.py --resume, or the interrupted "
                                "command again with --overwrite)")
    return TraceFormatError(f"{path}: missing (not a trace directory, or collection never finished a shard)")


def manifest_json(directory: Path, lock: bool = False, name: str = MANIFEST) -> tuple[Any, SetReadLock | None]:
    """The parsed JSON of `directory`'s manifest (`name`; never read through a symbolic link, at most
    MAX_MANIFEST_BYTES), and with `lock` the reader's shared lock it was read under (collection/traces/locks.py)."""
    path = directory / name
    if not directory.is_dir():
        raise TraceFormatError(f"{directory}: " + ("a file, not a trace directory" if os.path.lexists(directory) else
                                                   "no such trace directory (collect one: python "
                                                   f"scripts/collect_traces.py --output {directory})"))
    held = None
    try:
        held = SetReadLock(path) if lock else None
        fd = held.fd if held is not None else open_nofollow(path, "manifest")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise TraceFormatError(f"{path}: not a regular file")
            if st.st_size > MAX_MANIFEST_BYTES:
                raise TraceFormatError(f"{path}: {st.st_size} bytes, more than any manifest ({MAX_MANIFEST_BYTES})")
            d = json.loads(read_fd(fd).decode("utf-8"))
        finally:
            if held is None:
                os.close(fd)
    except BaseException as e:
        if held is not None:
            held.close()
        if isinstance(e, FileNotFoundError):
            raise missing_manifest(directory) from None
        if isinstance(e, UserError) and not isinstance(e, TraceFormatError):  # a symbolic link
            raise TraceFormatError(str(e)) from None
        if isinstance(e, (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError)):
            raise TraceFormatError(f"{path}: unreadable manifest ({str(e)[:200] or type(e).__name__})") from None
        raise
    return d, held


def read_manifest(directory: Path) -> Manifest:
    directory = Path(directory)
    d, _ = manifest_json(directory)
    return Manifest.from_json(d, directory / MANIFEST)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    atomic_write_json(Path(directory) / MANIFEST, manifest.to_json())


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def shard_specs(tokens: int, sequences: int, *, num_layers: int, top_k: int, num_experts: int, hidden_size: int,
                hidden_layers: int, hidden_dtype: str, store_logits: bool,
                hidden_format: str = LOSSLESS) -> dict[str, TensorSpec]:
    """Every tensor of one shard, its storage dtype and shape: the schema of this module's docstring, in code.
    Collection, legacy import, benchmarks and the reader all take the layout from here."""
    L, N, S, K = num_layers, tokens, sequences, top_k
    specs = {"token_ids": TensorSpec("int32", (N,)), "seq_offsets": TensorSpec("int64", (S + 1,)),
             "seq_ids": TensorSpec("int64", (S,)), "seq_sources": TensorSpec("int16", (S,)),
             "topk_ids": TensorSpec("int16", (L, N, K)), "topk_weights": TensorSpec("float16", (L, N, K))}
    if store_logits:
        specs["router_logits"] = TensorSpec("float16", (L, N, num_experts))
    if hidden_layers and hidden_format == LOSSLESS:
        specs["hidden"] = TensorSpec(hidden_dtype, (hidden_layers, N, hidden_size))
    elif hidden_layers:
        fmt = FORMATS[hidden_format]
        specs["hidden"] = TensorSpec("uint8", (hidden_layers, N, fmt.payload_bytes(hidden_size)))
        specs["hidden_scale"] = TensorSpec("float16", (hidden_layers, N, fmt.groups(hidden_size)))
    return specs


def spec_bytes(specs: dict[str, TensorSpec]) -> int:
    return sum(int(np.prod(s.shape, dtype=np.int64)) * np.dtype(_ST_TO_NP[_NAME_TO_ST[s.dtype]]).itemsize
               for s in specs.values())


def bytes_per_token(**dims: Any) -> int:
    """Stored bytes per token for the dimensions `shard_specs` takes (everything but tokens and sequences)."""
    return spec_bytes(shard_specs(1, 0, **dims)) - spec_bytes(shard_specs(0, 0, **dims))


def manifest_dims(manifest: Manifest, store_logits: bool | None = None) -> dict[str, Any]:
    """The `shard_specs` dimensions a manifest records."""
    return {"num_layers": manifest.num_layers, "top_k": manifest.top_k, "num_experts": manifest.num_experts,
            "hidden_size": manifest.hidden_size, "hidden_layers": len(manifest.hidden_layers),
            "hidden_dtype": str(manifest.capture.get("hidden_dtype", "float16")),
            "store_logits": bool(manifest.capture.get("store_logits", True)) if store_logits is None else store_logits,
            "hidden_format": manifest.hidden_format}


NO_VERIFY_HINT = "--no-verify skips this check"  # every script that reads traces has the flag


def open_listed_file(path: Path, size: int, sha256: str, verify: bool, what: str, hint: str = NO_VERIFY_HINT) -> int:
    """A file the manifest lists, opened once (never through a symbolic link) and checked on that descriptor: of
    its listed size and (when `verify`) checksum; else one line naming it. The caller reads through the returned
    descriptor only, so the bytes it reads are the bytes that were checked, whatever the name points to later."""
    try:
        fd = open_nofollow(path, what, error=TraceFormatError)
    except FileNotFoundError:
        raise TraceFormatError(f"{path}: {what} listed in the manifest is missing") from None
    except OSError as e:
        raise TraceFormatError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TraceFormatError(f"{path}: {what} listed in the manifest is not a regular file")
        if st.st_size != size:
            raise TraceFormatError(f"{path}: size {st.st_size} bytes, manifest says {size} (truncated or replaced)")
        if verify and sha256_fd(fd) != sha256:
            raise TraceFormatError(f"{path}: checksum mismatch (corrupt or replaced {what})" + (f"; {hint}" if hint else ""))
    except BaseException:
        os.close(fd)
        raise
    return fd


_warned_unverified: set[Path] = set()  # router weights said once per process to be unverified


class TraceShard(SafetensorsFile):
    """One finished shard, checked against its manifest entry and the schema of `shard_specs`."""

    def __init__(self, path: Path, info: ShardInfo, manifest: Manifest, verify: bool = True,
                 hint: str = NO_VERIFY_HINT):
        path = Path(path)
        super().__init__(path, open_listed_file(path, info.bytes, info.sha256, verify, "shard", hint))
        self.info = info
        N, E = info.tokens, manifest.num_experts
        dims = manifest_dims(manifest, store_logits="router_logits" in self.entries)
        if dims["hidden_dtype"] not in _NAME_TO_ST or dims["hidden_dtype"] not in ("float16", "bfloat16", "float32"):
            raise TraceFormatError(f"{self.path.parent / MANIFEST}: capture.hidden_dtype "
                                   f"{dims['hidden_dtype']!r} is not float16, bfloat16 or float32")
        for name, spec in shard_specs(N, info.sequences, **dims).items():
            if name not in self.entries:
                raise self._error(f"missing tensor {name!r}")
            if self.entries[name][1] != spec.shape:
                raise self._error(f"{name} has shape {self.entries[name][1]}, expected {spec.shape}")
            if self.entries[name][0] != _NAME_TO_ST[spec.dtype]:
                raise self._error(f"{name} has dtype {self.entries[name][0]}, expected {_NAME_TO_ST[spec.dtype]}")
        offsets = self.numpy("seq_offsets")
        if offsets[0] != 0 or offsets[-1] != N or np.any(np.diff(offsets) <= 0):
            raise self._error("seq_offsets are not increasing from 0 to the token count")
        ids = self.numpy("topk_ids")
        if ids.size and (ids.min() < 0 or ids.max() >= E):
            raise self._error(f"topk_ids outside [0, {E})")
        src = self.numpy("seq_sources")
        if src.size and (src.min() < 0 or src.max() >= len(manifest.sources)):
            raise self._error("seq_sources index an unknown source")


class TraceSet:
    """A directory of shards with its manifest; opens and checks shards lazily, once each."""

    def __init__(self, directory: Path, verify: bool = True, allow_incomplete: bool = False):
        self.dir = Path(directory)
        self._lock = None
        # a shared lock on the manifest for as long as the set is open: it is never swapped underneath this reader
        d, self._lock = manifest_json(self.dir, lock=True)
        self.manifest = Manifest.from_json(d, self.dir / MANIFEST)
        if not verify and self.dir.resolve() not in _warned_unverified:
            _warned_unverified.add(self.dir.resolve())
            print(f"warning: {self.dir}: --no-verify: checksums and the check for NaN or infinite hidden states are "
                  "skipped", file=sys.stderr)
        if not self.manifest.complete and not allow_incomplete:
            raise TraceFormatError(f"{self.dir}: incomplete trace set ({len(self.manifest.shards)} shards finished; its "
                                   "collection was interrupted or is still running); collect_traces.py --resume "
                                   "finishes it, --allow-incomplete reads the finished shards")
        if not self.manifest.shards:
            raise TraceFormatError(f"{self.dir / MANIFEST}: lists no finished shard")
        self.verify = verify
        self._open: dict[int, TraceShard] = {}
        self._table: dict[str, np.ndarray] | None = None
        self._router: SafetensorsFile | None = None
        self._codec: dict[str, HiddenCodec | None] = {}

    def close(self) -> None:
        """Close the shards and drop the reader's lock (also done when the set is garbage or the process ends)."""
        for sh in getattr(self, "_open", {}).values():
            sh.close()
        if getattr(self, "_router", None) is not None:
            self._router.close()
        if getattr(self, "_lock", None) is not None:
            self._lock.close()

    def __enter__(self) -> "TraceSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.manifest.shards)

    def shard(self, i: int) -> TraceShard:
        if i not in self._open:
            info = self.manifest.shards[i]
            self._open[i] = TraceShard(set_file(self.dir, info.file), info, self.manifest, verify=self.verify)
        return self._open[i]

    def shards(self, indices: Iterable[int] | None = None) -> Iterable[TraceShard]:
        for i in range(len(self)) if indices is None else indices:
            yield self.shard(i)

    def sequence_table(self) -> dict[str, np.ndarray]:
        """Per sequence over all shards: seq_id, source, shard, first row in its shard, length (read once)."""
        if self._table is not None:
            return self._table
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("seq_id", "source", "shard", "start", "length")}
        for i in range(len(self)):
            sh = self.shard(i)
            off = sh.numpy("seq_offsets").astype(np.int64)
            parts["seq_id"].append(sh.numpy("seq_ids").astype(np.int64))
            parts["source"].append(sh.numpy("seq_sources").astype(np.int64))
            parts["shard"].append(np.full(len(off) - 1, i, dtype=np.int64))
            parts["start"].append(off[:-1])
            parts["length"].append(np.diff(off))
        table = {k: np.concatenate(v) for k, v in parts.items()}
        if len(np.unique(table["seq_id"])) != len(table["seq_id"]):
            raise TraceFormatError(f"{self.dir}: the same sequence id appears in two shards")
        self._table = table
        return table

    def check_finite(self, sh: TraceShard, name: str, t: torch.Tensor, first: int = 0) -> torch.Tensor:
        """`t`, tensor `name` of shard `sh` as read (layer axis first, from stored layer `first` on); one line
        naming the shard and the MoE layer
        if it holds NaN or an infinity, which a valid checksum does not rule out and which would change every
        result computed from it without a word. Skipped (as the checksums are) under --no-verify."""
        if self.verify and t.is_floating_point() and t.numel():
            flat = t.flatten(1)
            bad = ~(torch.isfinite(flat.amax(1)) & torch.isfinite(flat.amin(1)))  # (layers,): NaN propagates
            if bool(bad.any()):
                j = first + int(bad.nonzero()[0])
                layer = self.manifest.hidden_layers[j] if name in ("hidden", "hidden_scale") else j
                raise TraceFormatError(f"{sh.path}: {name} of MoE layer {layer} hold NaN or infinite values (its "
                                       f"checksum matches: they were stored so); {NO_VERIFY_HINT}")
        return t

    def hidden_codec(self, device: torch.device | None = None) -> HiddenCodec | None:
        """A fitted hidden format's parameters (read and checked once, kept per device), else None."""
        key = str(device)
        if key not in self._codec:
            if "None" not in self._codec:
                self._codec["None"] = read_codec(self.dir, self.manifest, self.verify)
            base = self._codec["None"]
            self._codec[key] = base.to(device) if base is not None and device is not None else base
        return self._codec[key]

    def router_file(self) -> SafetensorsFile:
        """router_weights.safetensors, checked against its manifest entry (size and SHA-256) once per set."""
        path = self.dir / ROUTER_WEIGHTS
        if not os.path.lexists(path):
            raise TraceFormatError(f"{path}: missing (needed by router baselines)")
        if self._router is None:
            info = self.manifest.router_weights
            fd = None
            if info is not None:
                fd = open_listed_file(set_file(self.dir, info.file), info.bytes, info.sha256, self.verify,
                                      "router weights")
            elif path.resolve() not in _warned_unverified:  # a set written before the manifest listed them
                _warned_unverified.add(path.resolve())
                print(f"warning: {path}: the manifest predates router-weight checksums; the router weights are "
                      "unverified", file=sys.stderr)
            self._router = SafetensorsFile(path, fd)
        return self._router

    def router_weights(self) -> torch.Tensor:
        """(L, E, H) router matrices as stored (the model's own dtype)."""
        f = self.router_file()
        path = f.path
        L, E, H = self.manifest.num_layers, self.manifest.num_experts, self.manifest.hidden_size
        mats = []
        for layer in range(L):
            name = f"router.{layer}"
            if name not in f.entries or f.entries[name][1] != (E, H):
                raise TraceFormatError(f"{path}: {name} missing or not of shape ({E}, {H})")
            mats.append(f.tensor(name))
        mats = torch.stack(mats)
        if self.verify and not torch.isfinite(mats).all():  # router baselines and the anchored start apply them
            bad = int((~torch.isfinite(mats)).flatten(1).any(1).nonzero()[0])
            raise TraceFormatError(f"{path}: router.{bad} holds NaN or infinite weights; {NO_VERIFY_HINT}")
        return mats

    def router_extras(self) -> dict[str, torch.Tensor]:
        """(L, E) float32 router tensors some families add (collection/families.py): "router_bias"
        (GPT-OSS: part of the logits) and "score_correction_bias" (DeepSeek-V3: added to the sigmoid
        scores for the choice only). Empty for the other families and for older trace sets."""
        if not os.path.lexists(self.dir / ROUTER_WEIGHTS):
            return {}
        f = self.router_file()
        path = f.path
        L, E = self.manifest.num_layers, self.manifest.num_experts
        out = {}
        for kind in ("router_bias", "score_correction_bias"):
            names = [f"{kind}.{layer}" for layer in range(L)]
            if not any(n in f.entries for n in names):
                continue
            if not all(n in f.entries and f.entries[n][1] == (E,) for n in names):
                raise TraceFormatError(f"{path}: {kind}.l missing for some layer or not of shape ({E},)")
            out[kind] = torch.stack([f.tensor(n).float() for n in names])
        return out
