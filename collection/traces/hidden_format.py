"""Hidden-state formats: the one module that encodes and decodes the stored MoE-input hidden states.

Storing every layer's hidden state losslessly dominates a trace set (Qwen1.5-MoE: 96 of 99 KiB per token),
so a compact format may be chosen at collection (`collect_traces.py --hidden-format`). A format turns each
stored layer's hidden rows (N, H) into fixed-width byte rows; every reader decodes them back to (R, H) here,
on the device that uses them (after the host-to-device copy of the compact bytes).

A format is a transform followed by a quantizer, both fixed by its name (hidden bytes vs bf16 at H = 2048):

    lossless         the rows as computed (the manifest's hidden_dtype): the default, and every old trace set
    fp8              float8 e4m3 per element, one float16 scale per row (absmax / 448)               2.0x
    int4             4 bits per element, one float16 scale per group of 32 (absmax)                  3.6x
    hadamard-4bit    a randomized Hadamard rotation, then 4 bits per element, one scale per row       4.0x
    hadamard-3.5bit  the same, half of each rotated row at 4 bits and half at 3                       4.6x
    hadamard-3bit    the same at 3 bits                                                               5.3x
    pca-3.5bit       coordinates on each layer's principal axes (fitted on the first collected         4.6x
                     tokens), 3.5 bits per element on average, allocated by variance: up to 8 bits for the
                     strongest axes, down to 0 (dropped) for axes that carry nothing
    pca-router-3.5bit  the same, fitted to an error that also counts what the routers of this layer and    4.6x
                     the next three see of it (|W (h - h')|^2), so the directions that choose experts keep
                     more precision; needs the model's router weights to fit

The Hadamard rotation spreads outlier channels over the whole row, so one scale per row fits every element,
and needs nothing to decode but the format's name (its signs are a closed-form sequence). The principal axes
concentrate the variance instead, so bits go where it is (transform coding); they are fitted per layer and
stored beside the manifest (`hidden_codec.safetensors`, `HiddenCodec`). The Hadamard formats' quantizers are
uniform, clipped at the mean-squared-error optimum of a Gaussian of the row's scale; pca's are the Gaussian's
Lloyd-Max quantizers (15% less error at 3.5 bits on the embedded default), whose levels the codec stores.

Shard tensors of a compact format (replacing `hidden`):
    hidden        uint8    (Lh, N, payload_bytes)   the packed codes of each row
    hidden_scale  float16  (Lh, N, groups)          the scale(s) of each row
"""
from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch

LOSSLESS = "lossless"
CODEC_FILE = "hidden_codec.safetensors"  # a fitted format's parameters, beside the manifest
FP8_MAX = 448.0  # largest finite float8 e4m3fn
# Half-range, in standard deviations, of the uniform quantizer with 2^b levels that minimizes the mean squared
# error on a Gaussian (Max 1960, uniform case: steps 0.9957, 0.5860, 0.3352; errors 0.1188, 0.03744, 0.01154).
GAUSSIAN_CLIP = {2: 1.9914, 3: 2.3441, 4: 2.6806}
MAX_BITS = 8


@functools.lru_cache(maxsize=None)
def lloyd_max_levels(bits: int, iterations: int = 3000) -> tuple[np.ndarray, float]:
    """(the 2^bits reconstruction levels minimizing the mean squared error on a unit Gaussian, that error):
    Lloyd's algorithm (thresholds at midpoints, levels at the centroids of their cells) from uniform levels,
    in float64. Max (1960): errors 0.3634, 0.1175, 0.03454, 0.009497 for 1 to 4 bits. 0 bits: error 1."""
    if bits == 0:
        return np.zeros(1), 1.0
    n = 2 ** bits
    levels = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * (8.0 / n)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    for _ in range(iterations):
        edges = torch.cat([-inf, (levels[:-1] + levels[1:]) / 2, inf])
        mass = (torch.special.ndtr(edges[1:]) - torch.special.ndtr(edges[:-1])).clamp(min=1e-300)
        density = torch.exp(-edges.square() / 2) / math.sqrt(2 * math.pi)
        levels = (density[:-1] - density[1:]) / mass
    # at the centroids E[(x - Q(x))^2] = E[x^2] - E[Q(x)^2]
    return levels.numpy(), float(1 - (mass * levels.square()).sum())


@dataclass
class HiddenCodec:
    """A fitted format's parameters: each stored layer's principal axes and their standard deviations relative
    to the row RMS; the bits of each axis rank, shared by the layers (their spectra are alike, and one
    allocation lets every layer be coded in the same vectorized pass); and the quantizer's levels, stored so
    decoding never depends on recomputing them."""
    basis: torch.Tensor    # (Lh, H, H) float32, column i = axis i, in order of decreasing variance (row @ basis)
    rel_std: torch.Tensor  # (Lh, H) float32
    bits: torch.Tensor     # (H,) uint8, non-increasing, constant over blocks of 8 axes
    levels: torch.Tensor   # (MAX_BITS, 2^MAX_BITS) float32: row b - 1 holds the 2^b Lloyd-Max levels of b bits
    # (Lh, H, H) float32 taking coordinates back to rows (coords @ inverse) when the axes are not orthonormal
    # (pca-router's are scaled); None: the transpose of `basis`
    inverse: torch.Tensor | None = None

    def to(self, device: torch.device) -> "HiddenCodec":
        return HiddenCodec(self.basis.to(device), self.rel_std.to(device), self.bits.to(device),
                           self.levels.to(device), None if self.inverse is None else self.inverse.to(device))

    def basis_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The axes in `dtype` (converted once: decoding multiplies by them every batch)."""
        cache = self.__dict__.setdefault("_basis", {})
        if dtype not in cache:
            cache[dtype] = self.basis if self.basis.dtype == dtype else self.basis.to(dtype)
        return cache[dtype]

    def decode_matrices(self, dtype: torch.dtype) -> torch.Tensor:
        """(Lh, H, H) the matrices taking coordinates back to hidden rows (row @ matrix), in `dtype`, contiguous."""
        cache = self.__dict__.setdefault("_decode", {})
        if dtype not in cache:
            cache[dtype] = (self.basis_as(dtype).transpose(1, 2) if self.inverse is None else
                            self.inverse.to(dtype)).contiguous()
        return cache[dtype]

    def quantizer(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels (2^bits,), thresholds between them (2^bits - 1,)) of a unit-variance axis coded at `bits`."""
        lv = self.levels[bits - 1, :2 ** bits]
        return lv, (lv[:-1] + lv[1:]) / 2

    def segments(self) -> list[tuple[int, int, int]]:
        """(first axis, end axis, bits) of each run of axes with equal bits, 0-bit runs left out."""
        if "_segments" not in self.__dict__:
            b = self.bits.cpu().numpy()
            cuts = [0, *(np.flatnonzero(np.diff(b)) + 1).tolist(), len(b)]
            self.__dict__["_segments"] = [(a, e, int(b[a])) for a, e in zip(cuts, cuts[1:]) if b[a]]
        return self.__dict__["_segments"]


@dataclass(frozen=True)
class HiddenFormat:
    """One named format: an optional rotation, then `kind` (raw | fp8 | int | pca) at `bits` per element.

    int formats split each row into len(bits) equal parts, part j coded at bits[j] bits per element (so
    (4, 3) is 3.5 bits per element). Rotated rows store one scale per row, their RMS, and every part clips
    at its bit width's Gaussian optimum; unrotated rows store the absmax of each group of `group` elements.
    pca formats code each row's coordinates on the layer's fitted axes, `avg_bits` per element on average,
    with one scale per row, its RMS (`HiddenCodec` holds the rest).
    """
    name: str
    rotate: bool = False
    kind: str = "raw"     # raw | fp8 | int | pca
    bits: tuple[int, ...] = ()
    group: int = 0        # unrotated int: elements per scale (0: one scale per row)
    avg_bits: float = 0.0  # pca: bits per element on average
    router_weight: float = 0.0  # pca: weight of the routers' view in the error the fit minimizes (0: plain error)

    @property
    def lossless(self) -> bool:
        return self.kind == "raw"

    @property
    def fitted(self) -> bool:
        """Needs a `HiddenCodec` fitted on the data to encode and decode."""
        return self.kind == "pca"

    def groups(self, hidden_size: int) -> int:
        return hidden_size // self.group if self.kind == "int" and self.group else 1

    def payload_bytes(self, hidden_size: int) -> int:
        if self.kind == "fp8":
            return hidden_size
        if self.kind == "pca":
            return int(round(self.avg_bits * hidden_size)) // 8
        return sum(hidden_size // len(self.bits) * b // 8 for b in self.bits)

    def row_bytes(self, hidden_size: int, raw_itemsize: int) -> int:
        """Stored bytes of one token's hidden state at one layer (payload + float16 scales)."""
        if self.lossless:
            return hidden_size * raw_itemsize
        return self.payload_bytes(hidden_size) + 2 * self.groups(hidden_size)

    def check(self, hidden_size: int) -> str | None:
        """Why this format cannot store rows of `hidden_size`, or None."""
        if self.kind == "int" and hidden_size % (8 * len(self.bits)):
            return f"hidden size {hidden_size} is not a multiple of {8 * len(self.bits)}"
        if self.kind == "pca" and (hidden_size % 8 or (self.avg_bits * hidden_size / 8) % 1):
            return f"hidden size {hidden_size} does not split into blocks of 8 at {self.avg_bits} bits"
        if self.group and hidden_size % self.group:
            return f"hidden size {hidden_size} is not a multiple of the group size {self.group}"
        return None

    # -- encode / decode ------------------------------------------------------------------------

    def encode(self, h: torch.Tensor, codec: HiddenCodec | None = None,
               layers: list[int] | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., H) rows -> (payload uint8 (..., P), scales float16 (..., G)), on h's device. A fitted format
        also takes its codec and the stored layer of the rows: `layers[j]` for h[j] when h is (Lh', N, H),
        or one int for rows (N, H) of one layer.

        The rotation runs in h's own dtype (a bf16 matmul on the GPU: its rounding, ~2^-9 of each element, is
        far below the quantizer's step); the quantizer's arithmetic runs in float32."""
        if self.kind == "pca":
            if isinstance(layers, int):
                payload, scale = self._encode_pca(h[None], codec, [layers])
                return payload[0], scale[0]
            return self._encode_pca(h, codec, list(layers))
        x = (rotate(h) if self.rotate else h).float()
        if self.kind == "fp8":
            scale = _scale16(x.abs().amax(-1, keepdim=True) / FP8_MAX)
            q = (x / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            return q.view(torch.uint8), scale
        if self.rotate:
            scale = _scale16(x.square().mean(-1, keepdim=True).sqrt())        # (..., 1) row RMS
            parts = x.chunk(len(self.bits), -1)
            return torch.cat([pack_bits(_codes(p, _step(scale, b), b), b) for p, b in zip(parts, self.bits)], -1), scale
        (b,) = self.bits
        xg = x.unflatten(-1, (self.groups(x.shape[-1]), -1))
        scale = _scale16(xg.abs().amax(-1) / 2 ** (b - 1))                     # (..., G) step of each group
        return pack_bits(_codes(xg, scale.unsqueeze(-1).float(), b).flatten(-2), b), scale

    def decode(self, payload: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
               codec: HiddenCodec | None = None, layers: torch.Tensor | int | None = None) -> torch.Tensor:
        """(payload, scales) as `encode` returns them -> (..., H) rows in `dtype` (the inverse rotation runs in
        `dtype`: bf16 on the GPU keeps decoding cheap next to training). A fitted format also takes its codec
        and the stored layer of each row: one int, or a tensor (R,) for rows (R, P) of mixed layers."""
        if self.kind == "pca":
            return self._decode_pca(payload, scale, codec, layers, dtype)
        if self.kind == "fp8":
            x = payload.view(torch.float8_e4m3fn).float() * scale.float()
        elif self.rotate:
            sizes = [payload.shape[-1] // sum(self.bits) * b for b in self.bits]
            x = torch.cat([_levels(unpack_bits(p, b), b) * _step(scale, b)
                           for p, b in zip(payload.split(sizes, -1), self.bits)], -1)
        else:
            (b,) = self.bits
            G = scale.shape[-1]
            x = (_levels(unpack_bits(payload, b), b).unflatten(-1, (G, -1)) * scale.float().unsqueeze(-1)).flatten(-2)
        x = x.to(dtype)
        return unrotate(x) if self.rotate else x

    def _encode_pca(self, h: torch.Tensor, codec: HiddenCodec, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (Lh', N, H) of stored layers `slots` -> their coordinates on the layer's axes (a matmul in h's
        dtype, like the rotation), each divided by its expected scale (row RMS x the axis's relative standard
        deviation: unit variance) and quantized to the nearest Lloyd-Max level of its bits."""
        x = (h @ codec.basis_as(h.dtype)[slots]).float()                      # (Lh', N, H) coordinates
        scale = _scale16(x.square().mean(-1, keepdim=True).sqrt())             # (Lh', N, 1) row RMS
        z = x / (scale.float() * codec.rel_std[slots].unsqueeze(1))            # unit variance per axis
        parts = [pack_bits(torch.bucketize(z[..., a:e].contiguous(), codec.quantizer(b)[1]).to(torch.uint8), b)
                 for a, e, b in codec.segments()]
        return torch.cat(parts, -1), scale

    def _decode_pca(self, payload: torch.Tensor, scale: torch.Tensor, codec: HiddenCodec,
                    layers: torch.Tensor | int, dtype: torch.dtype) -> torch.Tensor:
        rel = codec.rel_std[layers]                                            # (H,) or (R, H)
        x = torch.zeros(*payload.shape[:-1], rel.shape[-1], device=payload.device)  # 0-bit axes decode to 0
        at = 0
        for a, e, b in codec.segments():
            n = (e - a) * b // 8
            x[..., a:e] = codec.quantizer(b)[0][unpack_bits(payload[..., at:at + n], b).long()] * rel[..., a:e]
            at += n
        x = x * scale.float()
        x = x.to(dtype)
        if isinstance(layers, int):
            return x @ codec.decode_matrices(dtype)[layers]
        return rows_times_layer_matrix(x, layers, codec.decode_matrices(dtype))


def rows_times_layer_matrix(x: torch.Tensor, layers: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """Rows (R, H) of mixed layers, each times its layer's matrix: x[r] @ mats[layers[r]] (mats (Lh, H, H')).

    The rows are sorted by layer and multiplied group by group. In bf16 one grouped GEMM does it with the group
    ends on the device; otherwise one matmul per layer present, whose sizes the host must read (a sync per call,
    which stalls the training loop that decodes every step)."""
    if not x.shape[0]:
        return x.new_zeros(0, mats.shape[2])
    order = layers.argsort()
    xs = x[order]
    counts = torch.bincount(layers, minlength=mats.shape[0])
    if x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        out = torch._grouped_mm(xs, mats, offs=counts.cumsum(0).to(torch.int32))
    else:
        sizes = counts.tolist()
        out = torch.cat([chunk @ mats[slot] for slot, chunk in enumerate(xs.split(sizes)) if sizes[slot]])
    return out[order.argsort()]


def _step(rms: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantizer step for rotated rows of RMS `rms`: 2^bits levels spanning the Gaussian-optimal range."""
    return rms.float() * (GAUSSIAN_CLIP[bits] / 2 ** (bits - 1))


def _codes(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Mid-rise uniform quantizer: level (k + 1/2) * step, k in [-2^(b-1), 2^(b-1)), stored as k + 2^(b-1)
    (every one of the 2^b codes is a level; none is spent on an exact zero)."""
    half = 2 ** (bits - 1)
    return (x / step).floor().clamp(-half, half - 1).add(half).to(torch.uint8)


def _levels(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return codes.float() - (2 ** (bits - 1) - 0.5)


def _scale16(s: torch.Tensor) -> torch.Tensor:
    """Scales as stored (float16), kept positive and finite; quantization divides by the stored value, so
    decoding multiplies by exactly the scale that was used."""
    return s.clamp(min=2.0 ** -24, max=65504.0).to(torch.float16)


# ----------------------------------------------------------------------------------------------
# bit packing: 8 codes of b bits <-> b bytes (b = 2, 3, 4), little-endian within the 8-code word


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., H) integer codes in [0, 2^bits) -> (..., H * bits / 8) uint8: every 8 codes, little-endian, fill
    `bits` bytes (at 4 bits: code 2i in the low nibble of byte i, code 2i + 1 in its high nibble)."""
    if bits == 8:
        return codes.to(torch.uint8)
    if bits == 4:
        c = codes.to(torch.uint8).unflatten(-1, (-1, 2))
        return c[..., 0] | (c[..., 1] << 4)
    word_t = torch.int32 if bits <= 3 else torch.int64                      # 8 codes -> one word of 8 * bits
    words = codes.unflatten(-1, (-1, 8)).to(word_t)
    word = (words << _shifts(8, bits, codes.device, word_t)).sum(-1, keepdim=True, dtype=word_t)
    return ((word >> _shifts(bits, 8, codes.device, word_t)) & 0xFF).to(torch.uint8).flatten(-2)


def unpack_bits(payload: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_bits`: (..., P) uint8 -> (..., P * 8 / bits) uint8 codes."""
    if bits == 8:
        return payload
    if bits == 4:
        return torch.stack([payload & 0xF, payload >> 4], -1).flatten(-2)
    word_t = torch.int32 if bits <= 3 else torch.int64
    b = payload.unflatten(-1, (-1, bits)).to(word_t)
    word = (b << _shifts(bits, 8, payload.device, word_t)).sum(-1, keepdim=True, dtype=word_t)
    return ((word >> _shifts(8, bits, payload.device, word_t)) & (2 ** bits - 1)).to(torch.uint8).flatten(-2)


def _shifts(n: int, step: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=dtype) * step


# ----------------------------------------------------------------------------------------------
# randomized Hadamard rotation


def hadamard_block(hidden_size: int) -> int:
    """Block of the block-diagonal transform: the largest power of two dividing H (all of H when H is one)."""
    return hidden_size & -hidden_size


_CACHE: dict[tuple[int, str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _hadamard_factors(hidden_size: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(the +-1 Hadamard matrix of one block, the H signs), in `dtype`: both exact in any float dtype, so a bf16
    matmul rotates without a systematic error; the 1 / sqrt(n) normalization is applied in float32 afterwards."""
    key = (hidden_size, str(device), dtype)
    if key not in _CACHE:
        n = hadamard_block(hidden_size)
        m = torch.ones(1, 1)
        while m.shape[0] < n:  # Sylvester construction
            m = torch.cat([torch.cat([m, m], 1), torch.cat([m, -m], 1)], 0)
        # signs from a fixed linear congruential sequence: closed form, identical on every machine and version
        i = torch.arange(hidden_size, dtype=torch.int64)
        signs = 1.0 - 2.0 * (((i * 1103515245 + 12345) >> 16) & 1).float()
        _CACHE[key] = (m.to(device, dtype), signs.to(device, dtype))
    return _CACHE[key]


def rotate(x: torch.Tensor) -> torch.Tensor:
    """Rows x (..., H) -> (x * s) M / sqrt(n): fixed random signs s, then the block Hadamard matrix M (+-1,
    symmetric, M M = n I), so norms and inner products are preserved and `unrotate` inverts it. An outlier
    channel is spread over its whole block, so one scale per row then fits every element."""
    m, signs = _hadamard_factors(x.shape[-1], x.device, x.dtype)
    return ((x * signs).unflatten(-1, (-1, m.shape[0])) @ m).flatten(-2) * (1 / math.sqrt(m.shape[0]))


def unrotate(y: torch.Tensor) -> torch.Tensor:
    """Inverse of `rotate`: (y M / sqrt(n)) * s, since M M = n I and s * s = 1."""
    m, signs = _hadamard_factors(y.shape[-1], y.device, y.dtype)
    return (y.unflatten(-1, (-1, m.shape[0])) @ m).flatten(-2) * (1 / math.sqrt(m.shape[0])) * signs


# ----------------------------------------------------------------------------------------------
# fitting a codec: principal axes of each layer's second moment, bits by reverse water-filling


def allocate_bits(variances: np.ndarray, avg_bits: float) -> np.ndarray:
    """Bits per axis (H,) for axes of the given variances (decreasing), avg_bits on average, in blocks of 8
    axes of equal bits (so every block packs into whole bytes): each block-bit goes where it removes the most
    squared error, the Gaussian Lloyd-Max quantizer's error (`lloyd_max_levels`) times the block's variance.
    Greedy is optimal here because each block's error falls by less with every added bit."""
    energy = np.asarray(variances, dtype=np.float64).reshape(-1, 8).sum(1)
    bits = np.zeros(len(energy), dtype=np.int64)
    mse = [lloyd_max_levels(b)[1] for b in range(MAX_BITS + 1)]
    gain = lambda k: energy[k] * (mse[bits[k]] - mse[bits[k] + 1]) if bits[k] < MAX_BITS else -1.0  # noqa: E731
    heap = [(-gain(k), k) for k in range(len(energy))]  # ties go to the lower index: the stronger axes
    heapq.heapify(heap)
    for _ in range(int(round(avg_bits * len(energy)))):
        _, k = heapq.heappop(heap)
        bits[k] += 1
        heapq.heappush(heap, (-gain(k), k))
    return np.repeat(bits, 8).astype(np.uint8)


ROUTER_LOOKAHEAD = 4  # pca-router weighs the routers of the stored layer and of the next three (d = 0..3)


def router_metric(second_moment: torch.Tensor, router_weights: torch.Tensor, hidden_layers: list[int],
                  weight: float) -> torch.Tensor:
    """(Lh, H, H) the quadratic form A = I + weight * mean_d W_d^T W_d / c_d of the error |h - h'|_A^2 that
    pca-router minimizes, W_d the router of MoE layer l + d (d = 0..3, those that exist) for the layer l stored
    in each slot, c_d = E|W_d h|^2 / E|h|^2 on this layer's states (so `weight` is the routers' share of the
    error whatever their scale). router_weights: (L, E, H) of all MoE layers."""
    L, H = router_weights.shape[0], second_moment.shape[-1]
    out = []
    for m, layer in zip(second_moment.double(), hidden_layers):
        ws = [router_weights[layer + d].double() for d in range(ROUTER_LOOKAHEAD) if layer + d < L]
        seen = sum(w.T @ w / (torch.trace(w @ m @ w.T) / torch.trace(m).clamp(min=1e-30)).clamp(min=1e-30) for w in ws)
        out.append(torch.eye(H, dtype=torch.float64) + weight * seen / len(ws))
    return torch.stack(out)


def fit_codec(fmt: HiddenFormat, second_moment: torch.Tensor, router_weights: torch.Tensor | None = None,
              hidden_layers: list[int] | None = None) -> HiddenCodec:
    """The codec of a fitted format from each stored layer's second moment E[h h^T] (Lh, H, H): its eigenvectors
    in order of decreasing eigenvalue (each with its largest entry positive, so the fit is reproducible) and
    their standard deviations relative to the row RMS; the bits `allocate_bits` gives the layers' mean
    relative spectrum (measured on the embedded default: per-layer bits would cut the error by 1%, 0.0140
    against 0.0142 relative).

    A format with a router weight (pca-router) minimizes |h - h'|_A^2 instead (`router_metric`, which needs the
    model's (L, E, H) `router_weights` and the MoE layer of each stored slot): it is plain pca of y = A^(1/2) h,
    so its axes are A^(1/2) U (U: the eigenvectors of A^(1/2) M A^(1/2)) and decoding applies U^T A^(-1/2)."""
    second_moment = second_moment.double().cpu()  # fitted on the host, whatever device accumulated the moments
    roots = None
    if fmt.router_weight:
        if router_weights is None or hidden_layers is None:
            raise ValueError(f"hidden format {fmt.name} is fitted with the model's router weights")
        roots = []
        for a in router_metric(second_moment, router_weights.double().cpu(), hidden_layers, fmt.router_weight):
            values, vectors = torch.linalg.eigh(a)
            roots.append(((vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T))
        second_moment = torch.stack([r @ m @ r for (r, _), m in zip(roots, second_moment)])
    bases, rel = [], []
    for m in second_moment:
        values, vectors = torch.linalg.eigh((m + m.T) / 2)
        values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
        pick = vectors.abs().argmax(0)
        vectors = vectors * torch.where(vectors[pick, torch.arange(vectors.shape[1])] < 0, -1.0, 1.0)
        bases.append(vectors.float().cpu())
        rel.append((values / values.mean().clamp(min=1e-30)).sqrt().float().cpu())
    rel_std = torch.stack(rel)
    bits = torch.from_numpy(allocate_bits(rel_std.double().square().mean(0).numpy(), fmt.avg_bits))
    levels = torch.zeros(MAX_BITS, 2 ** MAX_BITS)
    for b in range(1, MAX_BITS + 1):
        levels[b - 1, :2 ** b] = torch.from_numpy(lloyd_max_levels(b)[0])
    basis, inverse = torch.stack(bases), None
    if roots is not None:  # axes in y = A^(1/2) h: coordinates h A^(1/2) U, rows back as coords U^T A^(-1/2)
        inverse = torch.stack([(u.double().T @ ri).float() for u, (_, ri) in zip(basis, roots)])
        basis = torch.stack([(r @ u.double()).float() for u, (r, _) in zip(basis, roots)])
    return HiddenCodec(basis, rel_std, bits, levels, inverse)


FORMATS: dict[str, HiddenFormat] = {f.name: f for f in (
    HiddenFormat(LOSSLESS),
    HiddenFormat("fp8", kind="fp8"),
    HiddenFormat("int4", kind="int", bits=(4,), group=32),
    HiddenFormat("hadamard-4bit", rotate=True, kind="int", bits=(4,)),
    HiddenFormat("hadamard-3.5bit", rotate=True, kind="int", bits=(4, 3)),
    HiddenFormat("hadamard-3bit", rotate=True, kind="int", bits=(3,)),
    HiddenFormat("pca-3.5bit", kind="pca", avg_bits=3.5),
    HiddenFormat("pca-router-3.5bit", kind="pca", avg_bits=3.5, router_weight=4.0),
)}
