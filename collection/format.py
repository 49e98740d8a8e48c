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
                   float16 (Lh, N, G) instead: collection/hidden_format.py encodes and decodes them)

Shards are plain safetensors files (no pickle). Layer-major layout makes "layer l, token rows a:b" one
contiguous slice, so training memory-maps a shard and reads row ranges without loading it whole.
Every finished shard is listed in the manifest with its byte size and SHA-256; the reader checks
both, so a truncated, corrupt or swapped shard is an error naming the file, never silent data.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from collection.atomic import PARTIAL_SUFFIX, atomic_path, atomic_write_json, commit_file, sha256_file
from collection.durable import start_writeback
from collection.errors import UserError
from collection.hidden_format import CODEC_FILE, FORMATS, LOSSLESS, MAX_BITS, HiddenCodec

FORMAT_VERSION = 1          # what a lossless trace set is written as (unchanged, so old readers read it)
COMPACT_FORMAT_VERSION = 2  # a compact hidden format: readers older than it must refuse, not misread
READABLE_VERSIONS = (FORMAT_VERSION, COMPACT_FORMAT_VERSION)
DEFAULT_TRACES = "routing_data/traces/qwen2moe-mini"  # where the embedded default's traces go (repository-relative)
MANIFEST = "manifest.json"
ROUTER_WEIGHTS = "router_weights.safetensors"

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


class TraceFormatError(UserError):
    """A trace set, shard or manifest that cannot be used; the message names the file."""


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A small safetensors file (e.g. router weights), written atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


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
        self.writeback = writeback  # start writing each range to disk at once (collection.durable)
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
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self.fd, self.total_bytes)  # holes read as zeros until written

    def write(self, name: str, array: np.ndarray | torch.Tensor, index: tuple[int, ...] = (), row: int = 0) -> None:
        """Write `array` into tensor `name` at [*index, row:row+len(array)] (C order, contiguous)."""
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
            at = self.data_start + self.offsets[name] + int(elem) * itemsize
            os.pwrite(self.fd, memoryview(array).cast("B"), at)
            if self.writeback:
                start_writeback(self.fd, at, array.nbytes)

    def commit(self) -> tuple[int, str]:
        """Flush, fsync, rename into place; returns (bytes, sha256)."""
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
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
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

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self._error("file is shorter than a safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise self._error("header length points past the end of the file (truncated?)")
                raw = f.read(n)
        except OSError as e:
            raise TraceFormatError(f"{self.path}: cannot read ({e.strerror or e})") from None
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
        self._mmap: np.memmap | None = None
        self._size = size

    def _error(self, why: str) -> TraceFormatError:
        return TraceFormatError(f"{self.path}: not a valid shard: {why}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def numpy(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view (bfloat16 comes back as uint16 bits; see `tensor`)."""
        if name not in self.entries:
            raise TraceFormatError(f"{self.path}: shard has no tensor {name!r}")
        dt, shape, begin, end = self.entries[name]
        if end == begin:
            return np.zeros(shape, dtype=_ST_TO_NP[dt])
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self._size,))
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
    routing: dict[str, Any]    # num_layers, num_experts, top_k, hidden_size, norm_topk_prob, moe_layer_indices
    capture: dict[str, Any]    # hidden_layers, hidden_dtype, store_logits, max_length, batch_size, shard_size
    sources: list[dict[str, Any]]  # [{"name", "kind", "spec", "sequences"}]
    plan: dict[str, Any]       # target_traces, seed, ... : what a resumed run must match
    shards: list[ShardInfo] = field(default_factory=list)
    complete: bool = False
    format_version: int = FORMAT_VERSION

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
    def hidden_layers(self) -> list[int]:
        return [int(x) for x in self.capture.get("hidden_layers", [])]

    @property
    def hidden_format(self) -> str:
        """How hidden states are stored (collection/hidden_format.py); absent in older manifests: lossless."""
        return str(self.capture.get("hidden_format", LOSSLESS))

    @property
    def source_names(self) -> list[str]:
        return [s["name"] for s in self.sources]

    def to_json(self) -> dict[str, Any]:
        d = {"format_version": self.format_version, "complete": self.complete, "model": self.model,
             "routing": self.routing, "capture": self.capture, "sources": self.sources, "plan": self.plan,
             "shards": [vars(s) for s in self.shards]}
        return d

    @classmethod
    def from_json(cls, d: Any, where: Path) -> "Manifest":
        def bad(why: str) -> TraceFormatError:
            return TraceFormatError(f"{where}: not a valid trace manifest: {why}")

        if not isinstance(d, dict):
            raise bad("not a JSON object")
        if d.get("format_version") not in READABLE_VERSIONS:
            raise bad(f"format_version {d.get('format_version')!r}, this code reads "
                      f"{', '.join(map(str, READABLE_VERSIONS))}")
        for key in ("model", "routing", "capture", "plan"):
            if not isinstance(d.get(key), dict):
                raise bad(f"missing section {key!r}")
        for key in ("num_layers", "num_experts", "top_k", "hidden_size"):
            if type(d["routing"].get(key)) is not int or d["routing"][key] <= 0:
                raise bad(f"routing.{key} must be a positive integer")
        if not isinstance(d.get("sources"), list) or not all(isinstance(s, dict) and "name" in s for s in d["sources"]):
            raise bad("sources must be a list of objects with a name")
        hl = d["capture"].get("hidden_layers", [])
        if not isinstance(hl, list) or not all(type(x) is int and 0 <= x < d["routing"]["num_layers"] for x in hl):
            raise bad("capture.hidden_layers must list layer indices")
        hf = d["capture"].get("hidden_format", LOSSLESS)
        if not isinstance(hf, str) or hf not in FORMATS:
            raise bad(f"capture.hidden_format {hf!r} is not one of {', '.join(FORMATS)}")
        if (hf != LOSSLESS) != (d["format_version"] == COMPACT_FORMAT_VERSION):
            raise bad(f"capture.hidden_format {hf!r} needs format_version "
                      f"{FORMAT_VERSION if hf == LOSSLESS else COMPACT_FORMAT_VERSION}")
        if hf != LOSSLESS and (why := FORMATS[hf].check(d["routing"]["hidden_size"])):
            raise bad(f"capture.hidden_format {hf!r}: {why}")
        codec = d["capture"].get("hidden_codec")
        if FORMATS[hf].fitted and hl and not (isinstance(codec, dict) and codec.get("file") == CODEC_FILE
                                              and isinstance(codec.get("sha256"), str)
                                              and type(codec.get("bytes")) is int):
            raise bad(f"capture.hidden_format {hf!r} needs capture.hidden_codec "
                      f"{{file: {CODEC_FILE}, sha256, bytes}}, the fitted parameters")
        shards = []
        for s in d.get("shards", []):
            try:
                shards.append(ShardInfo(file=str(s["file"]), sequences=int(s["sequences"]), tokens=int(s["tokens"]),
                                        bytes=int(s["bytes"]), sha256=str(s["sha256"])))
            except (KeyError, TypeError, ValueError):
                raise bad(f"malformed shard entry {s!r}") from None
            if "/" in shards[-1].file or "\\" in shards[-1].file or shards[-1].file.startswith("."):
                raise bad(f"shard file name {shards[-1].file!r} must be a plain file name")
        return cls(model=d["model"], routing=d["routing"], capture=d["capture"], sources=d["sources"],
                   plan=d["plan"], shards=shards, complete=bool(d.get("complete", False)),
                   format_version=d["format_version"])


def save_codec(directory: Path, codec: HiddenCodec, fit_tokens: int) -> dict[str, Any]:
    """Write a fitted format's parameters beside the manifest; returns the manifest's capture.hidden_codec entry."""
    path = Path(directory) / CODEC_FILE
    atomic_save_tensors(path, {"basis": codec.basis, "rel_std": codec.rel_std, "bits": codec.bits,
                               "levels": codec.levels})
    return {"file": CODEC_FILE, "sha256": sha256_file(path), "bytes": path.stat().st_size, "fit_tokens": fit_tokens}


def read_codec(directory: Path, manifest: Manifest, verify: bool = True) -> HiddenCodec | None:
    """The fitted format's parameters, checked against the manifest (size, SHA-256) and the format's shape;
    None for a format that needs none."""
    fmt = FORMATS[manifest.hidden_format]
    if not fmt.fitted or not manifest.hidden_layers:
        return None
    entry = manifest.capture["hidden_codec"]
    path = Path(directory) / CODEC_FILE
    if not path.is_file():
        raise TraceFormatError(f"{path}: missing (the parameters of capture.hidden_format {fmt.name!r})")
    if path.stat().st_size != entry["bytes"] or (verify and sha256_file(path) != entry["sha256"]):
        raise TraceFormatError(f"{path}: size or checksum differs from the manifest (corrupt or replaced)")
    f = SafetensorsFile(path)
    Lh, H = len(manifest.hidden_layers), manifest.hidden_size
    want = {"basis": ((Lh, H, H), "F32"), "rel_std": ((Lh, H), "F32"), "bits": ((H,), "U8"),
            "levels": ((MAX_BITS, 2 ** MAX_BITS), "F32")}
    for name, (shape, dt) in want.items():
        if name not in f.entries or f.entries[name][1] != shape or f.entries[name][0] != dt:
            raise TraceFormatError(f"{path}: {name} missing or not {dt} of shape {shape}")
    codec = HiddenCodec(f.tensor("basis"), f.tensor("rel_std"), f.tensor("bits"), f.tensor("levels"))
    bits = codec.bits.long()
    blocks = bits.view(-1, 8)
    if (bits.max() > 8 or (blocks != blocks[:, :1]).any() or (bits[1:] > bits[:-1]).any()
            or bits.sum() != fmt.payload_bytes(H) * 8):
        raise TraceFormatError(f"{path}: bits are not non-increasing blocks of 8 summing to {fmt.payload_bytes(H) * 8}")
    if not all(torch.isfinite(t).all() for t in (codec.basis, codec.rel_std, codec.levels)):
        raise TraceFormatError(f"{path}: non-finite parameters")
    return codec


def read_manifest(directory: Path) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise TraceFormatError(f"{directory}: no such trace directory")
    if not path.is_file():
        raise TraceFormatError(f"{path}: missing (not a trace directory, or collection never finished a shard)")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceFormatError(f"{path}: unreadable manifest ({e})") from None
    return Manifest.from_json(d, path)


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


class TraceShard(SafetensorsFile):
    """One finished shard, checked against its manifest entry and the schema of `shard_specs`."""

    def __init__(self, path: Path, info: ShardInfo, manifest: Manifest, verify: bool = True):
        path = Path(path)
        if not path.is_file():
            raise TraceFormatError(f"{path}: shard listed in the manifest is missing")
        if path.stat().st_size != info.bytes:
            raise TraceFormatError(f"{path}: size {path.stat().st_size} bytes, manifest says {info.bytes} (truncated or replaced)")
        if verify and sha256_file(path) != info.sha256:
            raise TraceFormatError(f"{path}: checksum mismatch (corrupt or replaced shard); --no-verify skips this check")
        super().__init__(path)
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

    def __init__(self, directory: Path, verify: bool = True):
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir)
        if not self.manifest.shards:
            raise TraceFormatError(f"{self.dir / MANIFEST}: lists no finished shard")
        self.verify = verify
        self._open: dict[int, TraceShard] = {}
        self._table: dict[str, np.ndarray] | None = None
        self._codec: dict[str, HiddenCodec | None] = {}

    def __len__(self) -> int:
        return len(self.manifest.shards)

    def shard(self, i: int) -> TraceShard:
        if i not in self._open:
            info = self.manifest.shards[i]
            self._open[i] = TraceShard(self.dir / info.file, info, self.manifest, verify=self.verify)
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

    def hidden_codec(self, device: torch.device | None = None) -> HiddenCodec | None:
        """A fitted hidden format's parameters (read and checked once, kept per device), else None."""
        key = str(device)
        if key not in self._codec:
            if "None" not in self._codec:
                self._codec["None"] = read_codec(self.dir, self.manifest, self.verify)
            base = self._codec["None"]
            self._codec[key] = base.to(device) if base is not None and device is not None else base
        return self._codec[key]

    def router_weights(self) -> torch.Tensor:
        """(L, E, H) router matrices as stored (the model's own dtype)."""
        path = self.dir / ROUTER_WEIGHTS
        if not path.is_file():
            raise TraceFormatError(f"{path}: missing (needed by router baselines)")
        f = SafetensorsFile(path)
        L, E, H = self.manifest.num_layers, self.manifest.num_experts, self.manifest.hidden_size
        mats = []
        for layer in range(L):
            name = f"router.{layer}"
            if name not in f.entries or f.entries[name][1] != (E, H):
                raise TraceFormatError(f"{path}: {name} missing or not of shape ({E}, {H})")
            mats.append(f.tensor(name))
        return torch.stack(mats)
