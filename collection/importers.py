"""Routing that serving engines record, read into one shape that the trace format stores.

Every reader yields `Recorded` sequences: the expert ids of each token at each *layer slot* (T, S, k), in token
order, with the token ids and routing weights where the engine gives them. What a slot is depends on the engine
(every decoder layer, dense ones included, or the MoE layers only); `Assembler` turns slots into MoE layers,
maps physical expert ids to logical ones, and checks every sequence against the first. The layouts, and the
engine versions they were read from, are in docs/trace-format.md ("Imported routing"):

    vllm              per request .npy (T, S, k), or .npz {routed_experts, prompt_routed_experts, prompt_token_ids,
                      token_ids}; dense layer slots hold zeros
    sglang-meta       /generate responses (JSON lines, or a .json list): meta_info.routed_experts is base64 of the
                      flattened (T, S, k) ids (int32 unless meta_info.routed_experts_dtype says otherwise)
    sglang-recorder   torch.save dumps of the expert distribution recorder in per_token mode: records of
                      topk_ids_of_layer (S, n, 8) int32 (-1: dense layer or unused column), positions, input_ids;
                      last_physical_to_logical_map (S, P)
    llamacpp-csv      examples/moe-trace: one `layer,expert` row per routed activation, layer blocks per ubatch
    hf-logits         a torch.save dict or safetensors file of output_router_logits=True: router_logits (L, N, E)

Nothing read here is trusted: torch files load with weights_only=True after their archive has been checked, every
array's size comes from a header checked against the bytes present before anything is allocated, and any
damaged, truncated or inconsistent input is an `ImportFormatError`: one line naming the file.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from numba import njit

from collection.traces.format import (
    Manifest,
    SafetensorsFile,
    ShardInfo,
    ShardWriter,
    TraceFormatError,
    bytes_per_token,
    shard_name,
    shard_specs,
)
from common.errors import UserError

MAX_ARRAY_BYTES = 1 << 30     # one array (or all arrays of one request file): larger is refused before allocating
MAX_PICKLE_BYTES = 256 << 20  # the pickle inside a torch.save archive (its tensors are counted apart)
MAX_LINE_BYTES = 1 << 30      # one JSON line / one .json file / one CSV file
SHARD_BYTES = 256 << 20       # routing bytes per output shard (ids int16 + weights float16)
WIRE_DTYPES = {"int32": np.int32, "int16": np.int16, "uint8": np.uint8, "uint16": np.uint16, "int64": np.int64}


class ImportFormatError(UserError):
    """An input file that cannot be imported; the message names it."""


def _why(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


@dataclass
class Recorded:
    """One sequence as an engine recorded it."""
    ids: np.ndarray                      # (T, S, k) integer expert ids per token and layer slot
    where: str                           # file (and request) for messages
    token_ids: np.ndarray | None = None  # (T,) the token fed at each routed position
    weights: np.ndarray | None = None    # (T, S, k) float routing weights, where the format has them
    fill: int | None = None              # what a dense slot holds (0 or -1); None: every slot is a MoE layer
    slot_layers: list[int] | None = None  # decoder layer of each slot, when the format names them
    expert_map: np.ndarray | None = None  # (S, P) physical -> logical expert ids, when the file carries one
    dropped: int = 0                     # tokens the file holds without routing at every MoE layer


@dataclass(frozen=True)
class ImportFormat:
    name: str
    engine: str
    suffixes: tuple[str, ...]   # files taken from a directory given as input
    weights: bool               # the format carries routing weights
    summary: str


IMPORT_FORMATS = {f.name: f for f in (
    ImportFormat("vllm", "vLLM --enable-return-routed-experts", (".npz", ".npy"), False,
                 "one .npy or .npz per request (routed_experts, prompt_routed_experts, prompt_token_ids, token_ids)"),
    ImportFormat("sglang-meta", "SGLang return_routed_experts", (".jsonl", ".json"), False,
                 "/generate responses, meta_info.routed_experts in base64"),
    ImportFormat("sglang-recorder", "SGLang expert distribution recorder (per_token)", (".pt",), False,
                 "torch.save dumps of expert_distribution_recorder_mode=per_token"),
    ImportFormat("llamacpp-csv", "llama.cpp examples/moe-trace", (".csv",), False,
                 "one `layer,expert` row per routed activation"),
    ImportFormat("hf-logits", "Hugging Face output_router_logits=True", (".pt", ".safetensors"), True,
                 "torch.save dict or safetensors with router_logits (L, N, E), input_ids, attention_mask"),
)}


# ----------------------------------------------------------------------------------------------
# safe containers: .npy/.npz headers, torch.save archives, JSON, CSV


def _npy_array(f: Any, available: int, where: str, kinds: str) -> np.ndarray:
    """The array of an .npy stream `f` holding `available` bytes: numpy's format reader parses the header, and
    shape x itemsize must equal the bytes that follow it before they are read."""
    start = f.tell()
    try:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"npy format version {version}")
        shape, fortran, dtype = read_header(f)
    except Exception as e:  # a damaged header can fail in many ways inside numpy: all are the file's fault
        raise ImportFormatError(f"{where}: not a readable .npy array ({_why(e)})") from None
    if dtype.hasobject or dtype.kind not in kinds or dtype.fields is not None:
        raise ImportFormatError(f"{where}: array of dtype {dtype}, expected {'integers' if kinds == 'iu' else 'numbers'}")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    have = available - (f.tell() - start)
    if need != have:
        raise ImportFormatError(f"{where}: header says {list(shape)} {dtype} ({need} bytes), the file holds {have} "
                                "(truncated or damaged)")
    if need > MAX_ARRAY_BYTES:
        raise ImportFormatError(f"{where}: {need} bytes in one array, more than the {MAX_ARRAY_BYTES >> 20} MiB limit")
    data = f.read(need)
    if len(data) != need:
        raise ImportFormatError(f"{where}: ends after {len(data)} of {need} bytes (truncated)")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return arr if dtype.isnative else arr.astype(dtype.newbyteorder("="))


def read_npy(path: Path, kinds: str = "iu") -> np.ndarray:
    try:
        with open(path, "rb") as f:
            return _npy_array(f, path.stat().st_size, str(path), kinds)
    except OSError as e:
        raise ImportFormatError(f"{path}: cannot read ({e.strerror or e})") from None


def read_npz(path: Path, kinds: dict[str, str]) -> dict[str, np.ndarray]:
    """The arrays named in `kinds` that an .npz archive holds (others are not read), each checked as in `read_npy`,
    together at most MAX_ARRAY_BYTES as the archive's directory states them."""
    try:
        zf = zipfile.ZipFile(path)
    except Exception as e:  # a crafted archive directory fails in many ways inside zipfile: all are the file's
        raise ImportFormatError(f"{path}: not an .npz archive ({_why(e)})") from None
    out: dict[str, np.ndarray] = {}
    with zf:
        total = 0
        for name, kind in kinds.items():
            try:
                info = zf.getinfo(name + ".npy")
            except KeyError:
                continue
            total += info.file_size
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or total > MAX_ARRAY_BYTES:
                raise ImportFormatError(f"{path}: {name} is {info.file_size} bytes with compression "
                                        f"{info.compress_type}: not numpy's (savez / savez_compressed) or too large")
            try:
                with zf.open(info) as f:
                    out[name] = _npy_array(f, info.file_size, f"{path}[{name}]", kind)
            except ImportFormatError:
                raise
            except Exception as e:  # bad CRC, a cut deflate stream, an encrypted member, ...
                raise ImportFormatError(f"{path}: {name} is damaged ({_why(e)})") from None
    return out


def checked_tensor(t: Any, where: str) -> torch.Tensor:
    """A loaded tensor that is plain, strided and no larger than its storage: a view with stride 0 could claim any
    number of elements, and converting it would allocate them."""
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_quantized:
        raise ImportFormatError(f"{where} is a {type(t).__name__}, not a dense tensor")
    nbytes = t.numel() * t.element_size()
    if nbytes > MAX_ARRAY_BYTES or nbytes > t.untyped_storage().nbytes():
        raise ImportFormatError(f"{where}: {list(t.shape)} elements are more than its storage holds or than the "
                                f"{MAX_ARRAY_BYTES >> 20} MiB limit")
    return t


def load_torch(path: Path) -> Any:
    """torch.load(weights_only=True) of a torch.save zip archive, after checking the archive: members stored as
    torch writes them (uncompressed, so no tensor holds more bytes than the file), a pickle of bounded size."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except Exception as e:  # as in read_npz
        raise ImportFormatError(f"{path}: not a torch.save archive ({_why(e)}); the legacy torch.save format and "
                                "pickles are not read") from None
    pickles = [i for i in infos if i.filename.endswith("data.pkl")]
    if len(pickles) != 1 or pickles[0].file_size > MAX_PICKLE_BYTES:
        raise ImportFormatError(f"{path}: not a torch.save archive (one data.pkl of at most "
                                f"{MAX_PICKLE_BYTES >> 20} MiB expected)")
    if any(i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size for i in infos):
        raise ImportFormatError(f"{path}: compressed members: not written by torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # whatever the unpickler or the archive reader raises: the file is not loadable
        why = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()  # torch's own advice is to trust it
        raise ImportFormatError(f"{path}: not loadable with torch.load(weights_only=True) "
                                f"({' '.join(why[:1])[:200] or type(e).__name__})") from None


class _Safetensors(SafetensorsFile):
    """format.py's checked reader, its messages naming the file as an input rather than a shard."""

    def _error(self, why: str) -> TraceFormatError:
        return ImportFormatError(f"{self.path}: not a valid safetensors file: {why}")


def json_documents(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, document) of a .json file (one document) or JSON lines (one per non-empty line)."""
    try:
        with open(path, "rb") as f:
            if path.suffix == ".json":
                lines = [f.read(MAX_LINE_BYTES + 1)]
            else:
                lines = iter(lambda: f.readline(MAX_LINE_BYTES + 1), b"")
            for n, line in enumerate(lines, 1):
                where = f"{path}" if path.suffix == ".json" else f"{path}: line {n}"
                if len(line) > MAX_LINE_BYTES:
                    raise ImportFormatError(f"{where}: longer than {MAX_LINE_BYTES >> 20} MiB")
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except (ValueError, RecursionError) as e:
                    raise ImportFormatError(f"{where}: not JSON ({_why(e)})") from None
    except OSError as e:
        raise ImportFormatError(f"{path}: cannot read ({e.strerror or e})") from None


@njit(cache=True)
def _parse_int_pairs(data: np.ndarray, out: np.ndarray) -> tuple[int, int]:
    """Lines `a,b` (decimal integers, optional '-', '\\r\\n' or '\\n') of `data` (uint8) into out (n, 2).
    Returns (rows, 0), or (line, 1) for the first malformed line (1-based)."""
    rows, line, i, n = 0, 1, 0, len(data)
    while i < n:
        if data[i] == 10:  # an empty line
            i += 1
            line += 1
            continue
        for col in range(2):
            neg = i < n and data[i] == 45
            if neg:
                i += 1
            value, digits = 0, 0
            while i < n and 48 <= data[i] <= 57 and digits < 10:
                value = value * 10 + data[i] - 48
                digits += 1
                i += 1
            end = 44 if col == 0 else 10
            if digits == 0 or value > 2147483647 or not (i == n and col == 1 or i < n and (
                    data[i] == end or col == 1 and data[i] == 13 and i + 1 < n and data[i + 1] == 10)):
                return line, 1
            if i < n and data[i] == 13:
                i += 1
            i += 1
            out[rows, col] = -value if neg else value
        rows += 1
        line += 1
    return rows, 0


def read_int_pairs(path: Path) -> np.ndarray:
    """(rows, 2) int32 of a CSV of `a,b` integer lines (an optional `layer,expert` header line is skipped)."""
    try:
        size = path.stat().st_size
        if size > MAX_LINE_BYTES:
            raise ImportFormatError(f"{path}: {size} bytes, more than the {MAX_LINE_BYTES >> 20} MiB limit")
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ImportFormatError(f"{path}: cannot read ({e.strerror or e})") from None
    skip = 0
    if data[:12].tobytes() == b"layer,expert":
        skip = 12 + (data[12:14].tobytes() == b"\r\n") + 1
    out = np.empty((int(np.count_nonzero(data == 10)) + 1, 2), dtype=np.int32)  # at most one row per line
    rows, failed = _parse_int_pairs(data[skip:], out)
    if failed:
        raise ImportFormatError(f"{path}: line {rows + (skip > 0)} is not `layer,expert` (two integers)")
    return out[:rows]


# ----------------------------------------------------------------------------------------------
# the readers, one per format


def align_tokens(tokens: np.ndarray, T: int, where: str) -> np.ndarray:
    """Token ids of the T routed positions: the engines route every token fed to the model, so a sequence's last
    token (sampled, never fed) has no routing: one id more than routed positions drops it."""
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.dtype.kind not in "iu" or (tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max)):
        raise ImportFormatError(f"{where}: token ids are not non-negative 32-bit integers")
    if len(tokens) not in (T, T + 1):
        raise ImportFormatError(f"{where}: {len(tokens)} token ids for {T} routed positions (expected {T} or {T + 1})")
    return tokens[:T].astype(np.int32)


def _three_d(ids: np.ndarray, where: str) -> np.ndarray:
    if ids.ndim != 3 or 0 in ids.shape[1:]:
        raise ImportFormatError(f"{where}: routed experts of shape {list(ids.shape)}, expected [tokens, layers, top_k]")
    return ids


def read_vllm(path: Path, **_: Any) -> Iterator[Recorded]:
    """One request per file: .npy = routed_experts alone; .npz = the keys below, prompt rows first."""
    if path.suffix == ".npy":
        yield Recorded(_three_d(read_npy(path), str(path)), str(path), fill=0)
        return
    arrays = read_npz(path, {"prompt_routed_experts": "iu", "routed_experts": "iu", "prompt_token_ids": "iu",
                             "token_ids": "iu"})
    if "routed_experts" not in arrays:
        raise ImportFormatError(f"{path}: no routed_experts array (keys: routed_experts, prompt_routed_experts, "
                                "prompt_token_ids, token_ids)")
    parts = [_three_d(arrays[k], f"{path}[{k}]") for k in ("prompt_routed_experts", "routed_experts") if k in arrays]
    if len({p.shape[1:] for p in parts}) > 1:
        raise ImportFormatError(f"{path}: prompt_routed_experts {list(parts[0].shape)} and routed_experts "
                                f"{list(parts[1].shape)} differ in layers or top_k")
    ids = np.concatenate(parts) if len(parts) > 1 else parts[0]
    tok = [arrays[k].reshape(-1) for k in ("prompt_token_ids", "token_ids") if k in arrays]
    tokens = align_tokens(np.concatenate(tok), len(ids), str(path)) if tok else None
    yield Recorded(ids, str(path), token_ids=tokens, fill=0)


def read_sglang_meta(path: Path, top_k: int | None = None, slots: int | None = None, **_: Any) -> Iterator[Recorded]:
    """/generate responses: each one request; a line holding a list holds a batch of them."""
    if top_k is None:
        raise ImportFormatError(f"{path}: the ids are flattened; --top-k or --model-config says how to reshape them")
    for where, doc in json_documents(path):
        for i, resp in enumerate(doc if isinstance(doc, list) else [doc]):
            here = f"{where}: response {i}" if isinstance(doc, list) else where
            meta = resp.get("meta_info") if isinstance(resp, dict) else None
            b64 = meta.get("routed_experts") if isinstance(meta, dict) else None
            if not isinstance(b64, str):
                raise ImportFormatError(f"{here}: no meta_info.routed_experts string (send the request with "
                                        "return_routed_experts=True to a server started with "
                                        "--enable-return-routed-experts)")
            dtype = WIRE_DTYPES.get(str(meta.get("routed_experts_dtype", "int32")))
            if dtype is None or 3 * len(b64) // 4 > MAX_ARRAY_BYTES:
                raise ImportFormatError(f"{here}: routed_experts_dtype {meta.get('routed_experts_dtype')!r} unknown "
                                        "or payload too large")
            try:
                raw = base64.b64decode(b64.encode("ascii"), validate=True)
            except (binascii.Error, ValueError, UnicodeEncodeError) as e:
                raise ImportFormatError(f"{here}: routed_experts is not base64 ({_why(e)})") from None
            if len(raw) % np.dtype(dtype).itemsize:
                raise ImportFormatError(f"{here}: {len(raw)} bytes are not whole {np.dtype(dtype).name} ids")
            flat = np.frombuffer(raw, dtype=dtype)
            p, c = meta.get("prompt_tokens"), meta.get("completion_tokens")
            if type(p) is int and type(c) is int and p + c == 1 and flat.size == 0:
                yield Recorded(flat.reshape(0, 0, top_k), here)  # one token, never followed: nothing routed
                continue
            if type(p) is int and type(c) is int and p + c >= 2:
                T = p + c - 1  # the last token was sampled, never fed: SGLang returns rows [0, seqlen - 1)
                S = flat.size // max(T * top_k, 1)
            elif slots:
                S, T = slots, flat.size // (slots * top_k)
            else:
                raise ImportFormatError(f"{here}: meta_info has no prompt_tokens/completion_tokens; --model-config "
                                        "gives the layer count instead")
            if S * T * top_k != flat.size or flat.size == 0:
                raise ImportFormatError(f"{here}: {flat.size} ids are not {T} tokens x layers x top-{top_k}")
            tokens = None
            if isinstance(resp.get("input_ids"), list) and isinstance(resp.get("output_ids"), list):
                try:
                    tok = np.asarray(resp["input_ids"] + resp["output_ids"], dtype=np.int64)
                except (ValueError, TypeError, OverflowError):
                    raise ImportFormatError(f"{here}: input_ids/output_ids are not integer lists") from None
                tokens = align_tokens(tok, T, here)
            yield Recorded(flat.reshape(T, S, top_k), here, token_ids=tokens, fill=0)


def _int_vector(value: Any, n: int, where: str) -> np.ndarray:
    try:
        out = np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value, dtype=np.int64).reshape(-1)
    except (ValueError, TypeError, OverflowError, RuntimeError):
        raise ImportFormatError(f"{where} is not a list of integers") from None
    if out.size != n:
        raise ImportFormatError(f"{where} has {out.size} entries for {n} tokens")
    return out


def read_sglang_recorder(path: Path, **_: Any) -> Iterator[Recorded]:
    """One dump: forward passes in order; a request's tokens are a run of consecutive positions (prefill chunks,
    then one token per decode pass). The recorder does not name requests, so a pass holding several is refused."""
    obj = load_torch(path)
    records = obj.get("records") if isinstance(obj, dict) else None
    if not isinstance(records, list):
        raise ImportFormatError(f"{path}: no records list: not a dump of the expert distribution recorder")
    p2l = obj.get("last_physical_to_logical_map")
    if p2l is None:
        raise ImportFormatError(f"{path}: no last_physical_to_logical_map: the recorded (physical) expert ids "
                                "cannot be mapped to logical experts")
    p2l = checked_tensor(p2l, f"{path}: last_physical_to_logical_map").numpy()
    ids, pos, tok = [], [], []
    for i, rec in enumerate(records):  # one entry per forward pass: Python objects as torch.load gives them
        where = f"{path}: record {i}"
        if not isinstance(rec, dict) or "topk_ids_of_layer" not in rec:
            raise ImportFormatError(f"{where}: no topk_ids_of_layer (record with expert_distribution_recorder_mode "
                                    "per_token)")
        topk = checked_tensor(rec["topk_ids_of_layer"], f"{where}: topk_ids_of_layer")
        if topk.dim() != 3 or topk.dtype not in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
            raise ImportFormatError(f"{where}: topk_ids_of_layer {list(topk.shape)} {topk.dtype}, expected "
                                    "[layers, tokens, k] integers")
        n = topk.shape[1]
        esl = rec.get("extend_seq_lens")
        if n and esl is not None and (not isinstance(esl, (list, tuple)) or len(esl) > 1):
            raise ImportFormatError(f"{where}: a pass of {len(esl)} requests; the recorder does not name requests, so "
                                    "their tokens cannot be told apart: record with --max-running-requests 1")
        ids.append(topk.numpy().transpose(1, 0, 2))
        pos.append(_int_vector(rec.get("positions"), n, f"{where}: positions"))
        if rec.get("input_ids") is not None:
            tok.append(_int_vector(rec["input_ids"], n, f"{where}: input_ids"))
    if not ids or len({a.shape[1:] for a in ids}) > 1:
        raise ImportFormatError(f"{path}: no records, or records of different layer counts or top-k widths")
    ids_all, positions = np.concatenate(ids), np.concatenate(pos)
    record = np.repeat(np.arange(len(ids)), [len(a) for a in ids])
    follows = np.zeros(len(positions), dtype=bool)
    follows[1:] = positions[1:] == positions[:-1] + 1       # continues the previous token's request
    inside = np.zeros(len(positions), dtype=bool)
    inside[1:] = record[1:] == record[:-1]                  # same forward pass as the previous token
    if (inside & ~follows).any():
        bad = int(record[np.flatnonzero(inside & ~follows)[0]])
        raise ImportFormatError(f"{path}: record {bad} holds tokens of several requests (positions not consecutive); "
                                "the recorder does not name requests: record with --max-running-requests 1")
    tokens = np.concatenate(tok) if len(tok) == len(ids) else None
    starts = np.flatnonzero(~follows)
    for a, b in zip(starts, np.append(starts[1:], len(positions))):
        yield Recorded(ids_all[a:b], f"{path}: request at record {record[a]}",
                       token_ids=None if tokens is None else align_tokens(tokens[a:b], b - a, str(path)),
                       fill=-1, expert_map=p2l)


def read_llamacpp_csv(path: Path, top_k: int | None = None, **_: Any) -> Iterator[Recorded]:
    """One run (prompt + continuation) per file. Rows come per ubatch, layer block after layer block, each block
    `tokens x k` rows in token order; the last MoE layer sees only the ubatch's output tokens (llama.cpp drops the
    others before its last layer), so earlier tokens of a prefill ubatch lack it and are dropped (counted)."""
    if top_k is None:
        raise ImportFormatError(f"{path}: rows do not say how many experts a token has; give --top-k or --model-config")
    rows = read_int_pairs(path)
    if len(rows) == 0:
        raise ImportFormatError(f"{path}: no rows")
    layer, expert = rows[:, 0], rows[:, 1]
    if layer.min() < 0:
        raise ImportFormatError(f"{path}: negative layer numbers")
    edge = np.flatnonzero(np.diff(layer)) + 1
    b_start = np.concatenate([[0], edge])                              # blocks: runs of one layer
    b_len = np.diff(np.append(b_start, len(rows)))
    b_layer = layer[b_start]
    layers = np.unique(b_layer)                                        # the MoE layers, in decoder numbering
    li = np.searchsorted(layers, b_layer)                              # a block's position among them
    new_ubatch = np.ones(len(b_start), dtype=bool)
    new_ubatch[1:] = li[1:] <= li[:-1]
    ub = np.cumsum(new_ubatch) - 1
    first = np.flatnonzero(new_ubatch)
    L, last = len(layers), len(layers) - 1
    n_tok = b_len // top_k
    n_u = n_tok[first][ub]                                             # the ubatch's token count
    ok = (b_len % top_k == 0) & (li == np.arange(len(li)) - first[ub]) & np.where(li == last, n_tok <= n_u,
                                                                                     n_tok == n_u)
    if not ok.all():
        b = int(np.flatnonzero(~ok)[0])
        raise ImportFormatError(f"{path}: row {b_start[b] + 1}: a block of {b_len[b]} rows at layer {b_layer[b]} "
                                f"does not continue the ubatch's blocks of {n_u[b]} tokens x top-{top_k} in layer order")
    keep = np.zeros(len(first), dtype=np.int64)                        # complete tokens per ubatch (last layer's)
    keep[ub[li == last]] = n_tok[li == last] if L > 1 else n_u[li == last]
    skip = n_tok[first] - keep                                         # tokens without the last layer's routing
    if keep.sum() == 0:
        raise ImportFormatError(f"{path}: no token has routing at every MoE layer")
    out_start = np.cumsum(keep) - keep                                 # first output token of each ubatch
    b_keep = keep[ub]
    src = np.repeat(b_start + np.where(li == last, 0, skip[ub]) * top_k, b_keep)
    r = np.arange(int(b_keep.sum())) - np.repeat(np.cumsum(b_keep) - b_keep, b_keep)  # token within the block
    ids = np.empty((int(keep.sum()), L, top_k), dtype=np.int32)
    ids[np.repeat(out_start[ub], b_keep) + r, np.repeat(li, b_keep)] = expert[(src + r * top_k)[:, None]
                                                                             + np.arange(top_k)]
    yield Recorded(ids, str(path), slot_layers=[int(x) for x in layers], dropped=int(skip.sum()))


def _hf_tensors(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        f = _Safetensors(path)
        return {name: f.tensor(name) for name in f.keys()}
    obj = load_torch(path)
    if not isinstance(obj, dict):
        raise ImportFormatError(f"{path}: holds a {type(obj).__name__}, expected a dict with router_logits")
    return obj


def read_hf_logits(path: Path, top_k: int | None = None, normalized: bool = False, **_: Any) -> Iterator[Recorded]:
    """router_logits: (L, N, E), (L, B, T, E), a list of L (N, E), or router_logits.{l} keys; N = B*T rows of the
    batch (input_ids (B, T) gives B); attention_mask (B, T) drops padding. Ids are each row's top-k."""
    if top_k is None:
        raise ImportFormatError(f"{path}: top-k is the model's; give --top-k or --model-config")
    d = _hf_tensors(path)
    layers = d.get("router_logits")
    if layers is None:
        layers = [d[k] for k in sorted((k for k in d if re.fullmatch(r"router_logits\.\d+", str(k))),
                                       key=lambda k: int(k.split(".")[1]))]
    if isinstance(layers, torch.Tensor):
        layers = list(checked_tensor(layers, f"{path}: router_logits"))
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ImportFormatError(f"{path}: no router_logits (a tensor, a list of per-layer tensors, or "
                                "router_logits.<l> keys)")
    logits = [checked_tensor(x, f"{path}: router_logits[{i}]") for i, x in enumerate(layers)]
    if len({x.shape for x in logits}) > 1 or not logits[0].is_floating_point() or logits[0].dim() not in (2, 3):
        raise ImportFormatError(f"{path}: router_logits are not L float tensors of one shape [tokens, experts]")
    E = logits[0].shape[-1]
    if len(logits) * logits[0].numel() * 4 > MAX_ARRAY_BYTES or not 0 < top_k <= E:
        raise ImportFormatError(f"{path}: router_logits too large, or top-{top_k} of {E} experts")
    x = torch.stack([t.reshape(-1, E).float() for t in logits])          # (L, N, E)
    if not torch.isfinite(x).all():
        raise ImportFormatError(f"{path}: router_logits hold NaN or infinite values")
    ids_in = d.get("input_ids")
    batch = checked_tensor(ids_in, f"{path}: input_ids") if ids_in is not None else None
    B = batch.shape[0] if batch is not None and batch.dim() == 2 else (logits[0].shape[0] if logits[0].dim() == 3 else 1)
    N = x.shape[1]
    if N == 0 or B == 0 or N % B or (batch is not None and batch.numel() != N):
        raise ImportFormatError(f"{path}: {N} router rows do not fit input_ids {list(batch.shape) if batch is not None else ''}")
    mask = d.get("attention_mask")
    keep = (torch.ones(N, dtype=torch.bool) if mask is None
            else checked_tensor(mask, f"{path}: attention_mask").reshape(-1) != 0)
    if keep.numel() != N:
        raise ImportFormatError(f"{path}: attention_mask has {keep.numel()} entries for {N} router rows")
    from collection.traces.legacy import looks_like_probabilities  # the one test of "stored probabilities, not logits"

    probs = x if looks_like_probabilities(x[0]) else torch.softmax(x, dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)                           # (L, N, k), the router's order
    if normalized:
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
    ids, w = ids.permute(1, 0, 2).numpy(), w.permute(1, 0, 2).numpy()
    tokens = batch.reshape(-1).numpy() if batch is not None else None
    T = N // B
    for b in range(B):  # one sequence per batch row
        rows = np.flatnonzero(keep[b * T:(b + 1) * T].numpy()) + b * T
        if len(rows):
            yield Recorded(ids[rows], f"{path}: sequence {b}", weights=w[rows],
                           token_ids=None if tokens is None else align_tokens(tokens[rows], len(rows), str(path)))


READERS: dict[str, Callable[..., Iterator[Recorded]]] = {
    "vllm": read_vllm, "sglang-meta": read_sglang_meta, "sglang-recorder": read_sglang_recorder,
    "llamacpp-csv": read_llamacpp_csv, "hf-logits": read_hf_logits,
}


def read_expert_map(path: Path) -> np.ndarray:
    """(S, P) physical -> logical expert map: an .npy, or a torch.save of the tensor or of a dict holding
    last_physical_to_logical_map (an SGLang recorder dump) or physical_to_logical_map."""
    if path.suffix == ".npy":
        return read_npy(path)
    obj = load_torch(path)
    if isinstance(obj, dict):
        obj = obj.get("last_physical_to_logical_map", obj.get("physical_to_logical_map"))
    t = checked_tensor(obj, f"{path}: expert map")
    if t.is_floating_point():
        raise ImportFormatError(f"{path}: the expert map holds {t.dtype}, not integers")
    return t.numpy()


# ----------------------------------------------------------------------------------------------
# slots -> MoE layers, physical -> logical, and every sequence checked against the first


@dataclass
class ModelFacts:
    """What a model config says about routing (from --model-config)."""
    name: str
    decoder_layers: int
    moe_layers: list[int]       # decoder indices of the MoE layers
    num_experts: int
    top_k: int
    hidden_size: int
    family: str
    normalized: bool            # the family renormalises its top-k weights
    why_not_topk: str = ""      # non-empty: top-k of the logits is not the family's choice


def model_facts(name: str, cfg: Any) -> ModelFacts:
    """ModelFacts of a transformers config of a supported family (collection/families.py)."""
    from collection.families import family_of, num_experts

    fam = family_of(cfg)
    n = int(cfg.num_hidden_layers)
    why = ""
    if fam.scoring == "sigmoid" or (fam.grouped and int(getattr(cfg, "n_group", 1) or 1) > 1
                                    and getattr(cfg, "topk_method", "") != "greedy"):
        why = f"{fam.model_type} chooses with a score-correction bias or expert groups the logits alone do not give"
    return ModelFacts(name, n, [i for i in range(n) if fam.is_moe_layer(cfg, i)], num_experts(cfg),
                      int(cfg.num_experts_per_tok), int(cfg.hidden_size), fam.model_type, bool(fam.normalized(cfg)), why)


@dataclass
class Assembler:
    """Turns `Recorded` sequences into (T, L, k) int16 logical ids of the MoE layers; the first sequence fixes the
    layout (slots, k, which slots are dense), every later one must agree."""
    facts: ModelFacts | None = None
    num_experts: int | None = None      # --num-experts (or the model's); None: the largest id + 1 at the end
    top_k: int | None = None
    expert_map: np.ndarray | None = None  # --expert-map: (S, P)
    shape: tuple[int, ...] = ()         # (S, k) as recorded
    moe_slots: np.ndarray | None = None
    layer_indices: list[int] = field(default_factory=list)
    max_id: int = -1
    mapped: bool = False

    def layout(self, rec: Recorded) -> None:
        """Which slots are MoE layers: the slots a format names, else those not filled with its dense value."""
        T, S, k = rec.ids.shape
        f = self.facts
        if self.top_k is not None and k != self.top_k and rec.fill != -1:
            raise ImportFormatError(f"{rec.where}: top-{k} recorded, the model's top-k is {self.top_k}")
        dense = np.zeros(S, dtype=bool)
        if rec.fill is not None:
            dense = (rec.ids == rec.fill).all(axis=(0, 2))
            if rec.fill == 0 and k == 1 and dense.any() and f is None:
                raise ImportFormatError(f"{rec.where}: with top-1 a dense layer (zeros) and a layer that always chose "
                                        "expert 0 look alike; --model-config names the dense layers")
        if f is not None and rec.slot_layers is not None and rec.slot_layers != f.moe_layers:
            raise ImportFormatError(f"{rec.where}: routing at decoder layers {rec.slot_layers}; --model-config "
                                    f"{f.name} has MoE layers {f.moe_layers}")
        if f is not None and rec.slot_layers is None:
            if S == f.decoder_layers:
                want = np.array([i not in f.moe_layers for i in range(S)])
                if rec.fill is not None and (want & ~dense).any():
                    raise ImportFormatError(f"{rec.where}: --model-config {f.name} says decoder layers "
                                            f"{np.flatnonzero(want & ~dense).tolist()} are dense, but they hold routing")
                dense = want
            elif S == len(f.moe_layers):
                dense = np.zeros(S, dtype=bool)
            else:
                raise ImportFormatError(f"{rec.where}: {S} layer slots; --model-config {f.name} has "
                                        f"{f.decoder_layers} decoder layers of which {len(f.moe_layers)} are MoE")
        self.shape, self.moe_slots = (S, k), np.flatnonzero(~dense)
        if len(self.moe_slots) == 0:
            raise ImportFormatError(f"{rec.where}: every layer slot is empty (no routing recorded)")
        if rec.slot_layers is not None:
            self.layer_indices = list(rec.slot_layers)
        elif f is not None:
            self.layer_indices = list(f.moe_layers)
        else:  # slots are decoder layers when some are dense; else the MoE layers, numbered 0..L-1
            self.layer_indices = self.moe_slots.tolist()

    def add(self, rec: Recorded) -> np.ndarray:
        if self.moe_slots is None:
            self.layout(rec)
        ids, S = rec.ids, self.shape[0]
        if ids.shape[1:] != self.shape:
            raise ImportFormatError(f"{rec.where}: {ids.shape[1]} layer slots x top-{ids.shape[2]}, the first "
                                    f"sequence had {self.shape[0]} x top-{self.shape[1]}")
        dense = np.ones(S, dtype=bool)
        dense[self.moe_slots] = False
        if rec.fill is not None and dense.any() and not (ids[:, dense] == rec.fill).all():
            raise ImportFormatError(f"{rec.where}: a layer slot that is dense in the first sequence holds routing")
        moe = ids if not dense.any() else ids[:, self.moe_slots]
        if rec.fill == -1:  # unused columns (the recorder keeps 8) are -1 in every MoE layer
            used = (moe >= 0).any(axis=(0, 1))
            k = int(used.sum())
            if not used[:k].all() or (moe[:, :, :k] < 0).any() or (self.top_k is not None and k != self.top_k):
                raise ImportFormatError(f"{rec.where}: MoE layers hold {k} experts for some tokens and fewer for "
                                        "others (a top-k that differs per layer is not importable)"
                                        + (f"; the model's top-k is {self.top_k}" if self.top_k else ""))
            moe = moe[:, :, :k]
        emap = self.expert_map if self.expert_map is not None else rec.expert_map
        if emap is not None:
            if emap.ndim != 2 or emap.shape[0] != S or emap.dtype.kind not in "iu":
                raise ImportFormatError(f"{rec.where}: the expert map is {list(emap.shape)} {emap.dtype}, expected "
                                        f"[{S} layers, physical experts] integers")
            if moe.size and (moe.min() < 0 or moe.max() >= emap.shape[1]):
                raise ImportFormatError(f"{rec.where}: physical expert ids outside the map's 0..{emap.shape[1] - 1}")
            moe = emap[self.moe_slots[None, :, None], moe]   # (T, L, k) logical ids
            self.mapped = True
        low, high, twice = _id_stats(np.ascontiguousarray(moe).reshape(-1, moe.shape[2]))
        if low < 0:
            raise ImportFormatError(f"{rec.where}: negative expert ids")
        self.max_id = max(self.max_id, high)
        if self.num_experts is not None and self.max_id >= self.num_experts:
            raise ImportFormatError(f"{rec.where}: expert {self.max_id} >= {self.num_experts} experts"
                                    + ("" if emap is not None else ": physical ids of expert parallelism with "
                                       "redundant experts? give --expert-map"))
        if self.max_id > np.iinfo(np.int16).max:
            raise ImportFormatError(f"{rec.where}: expert ids above 32767")
        if twice:
            raise ImportFormatError(f"{rec.where}: a token chose the same expert twice in one layer (not top-k "
                                    "routing: a dense layer, or physical ids of one expert's replicas)")
        return moe.astype(np.int16)


@njit(cache=True)
def _id_stats(rows: np.ndarray) -> tuple[int, int, bool]:
    """(smallest id, largest id, whether a row (one token at one layer, k ids) names an expert twice)."""
    low, high, twice = 1 << 40, -(1 << 40), False
    for r in range(rows.shape[0]):
        for i in range(rows.shape[1]):
            x = rows[r, i]
            low, high = min(low, x), max(high, x)
            for j in range(i):
                twice = twice or rows[r, j] == x
    return low, high, twice


class RoutingShards:
    """Sequences buffered in memory and written as shards of about SHARD_BYTES through ShardWriter."""

    def __init__(self, dest: Path, num_layers: int, top_k: int, num_experts_hint: int, max_shards: int):
        self.dest, self.L, self.K, self.max_shards = Path(dest), num_layers, top_k, max_shards
        self.max_tokens = max(1, SHARD_BYTES // (num_layers * top_k * 4 + 4))
        self.E = num_experts_hint  # shard_specs needs E only for logits, which imported sets never store
        self.buf: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = []
        self.shards: list[ShardInfo] = []
        self.sequences = self.tokens = 0
        self.writer: ShardWriter | None = None

    def add(self, ids: np.ndarray, tokens: np.ndarray | None, weights: np.ndarray | None) -> None:
        self.buf.append((ids, tokens, weights))
        if sum(len(b[0]) for b in self.buf) >= self.max_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        lengths = np.array([len(b[0]) for b in self.buf])
        N, S, i = int(lengths.sum()), len(self.buf), len(self.shards)
        if i >= self.max_shards:  # the names checked against the user's files before the run are used up
            raise UserError(f"{self.dest}: more shards than the {self.max_shards} planned from the input sizes")
        ids = np.empty((self.L, N, self.K), dtype=np.int16)   # layer-major, as the format stores it
        w = np.full((self.L, N, self.K), 1.0 / self.K, dtype=np.float16)
        row = 0
        for seq_ids, _, seq_w in self.buf:  # one copy per sequence: (T, L, k) -> (L, T, k)
            ids[:, row:row + len(seq_ids)] = seq_ids.transpose(1, 0, 2)
            if seq_w is not None:
                w[:, row:row + len(seq_ids)] = seq_w.transpose(1, 0, 2)
            row += len(seq_ids)
        tok = np.concatenate([b[1] if b[1] is not None else np.full(len(b[0]), -1, np.int32) for b in self.buf])
        self.writer = ShardWriter(self.dest / shard_name(i), shard_specs(
            N, S, num_layers=self.L, top_k=self.K, num_experts=self.E, hidden_size=0, hidden_layers=0,
            hidden_dtype="float16", store_logits=False), {"format_version": "1", "shard": str(i)})
        self.writer.write("token_ids", tok.astype(np.int32))
        self.writer.write("seq_offsets", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        self.writer.write("seq_ids", np.arange(self.sequences, self.sequences + S, dtype=np.int64))
        self.writer.write("seq_sources", np.zeros(S, dtype=np.int16))
        self.writer.write("topk_ids", ids)
        self.writer.write("topk_weights", w)
        nbytes, digest = self.writer.commit()
        self.writer = None
        self.shards.append(ShardInfo(file=shard_name(i), sequences=S, tokens=N, bytes=nbytes, sha256=digest))
        self.sequences, self.tokens, self.buf = self.sequences + S, self.tokens + N, []

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def imported_manifest(fmt: ImportFormat, asm: Assembler, out: RoutingShards, *, facts: ModelFacts | None,
                      model: str, num_experts: int, top_k: int, tokens: bool, weights: bool, plan: dict[str, Any],
                      notes: dict[str, Any]) -> Manifest:
    """The manifest of an imported set: routing only, and it says so (capture.imported); `notes` says where E, k and
    the layer numbering came from and what the import had to drop."""
    L = len(asm.layer_indices)
    unknown = "unknown (imported routing)"
    routing = {"architecture": facts.family if facts else unknown, "num_layers": L, "num_experts": num_experts,
               "top_k": top_k, "hidden_size": facts.hidden_size if facts else 0,
               "norm_topk_prob": facts.normalized if facts else False, "moe_layer_indices": asm.layer_indices,
               "family": facts.family if facts else "unknown"}
    imported = {"format": fmt.name, "engine": fmt.engine, "importer": "scripts/import_routing.py",
                "hidden_states": False, "router_logits": False, "router_weights": False,
                "topk_weights_are": (notes.pop("weights_from") if weights else
                                     f"absent: the engine records ids only; stored as the constant 1/k = 1/{top_k}"),
                "token_ids_are": "the token fed at each routed position" if tokens else "absent: stored as -1",
                "expert_ids": ("logical: the recorded physical ids mapped through the expert map" if asm.mapped
                               else "as recorded"),
                "layer_slots": asm.shape[0], **notes}
    capture = {"hidden_layers": [], "hidden_dtype": "float16", "store_logits": False,
               "bytes_per_token": bytes_per_token(num_layers=L, top_k=top_k, num_experts=num_experts, hidden_size=0,
                                                  hidden_layers=0, hidden_dtype="float16", store_logits=False),
               "token_ids": tokens, "topk_weights": weights, "imported": imported}
    return Manifest(model={"name_or_path": model, "architecture": routing["architecture"],
                           "quantization": unknown, "dtype": unknown},
                    routing=routing, capture=capture,
                    sources=[{"name": fmt.name, "kind": "import", "spec": fmt.engine, "sequences": out.sequences}],
                    plan={**plan, "sequences": out.sequences, "tokens": out.tokens}, shards=out.shards, complete=True)
