"""Hidden-state formats: the one module that encodes and decodes the stored MoE-input hidden states.

Storing every layer's hidden state losslessly dominates a trace set (Qwen1.5-MoE: 96 of 99 KiB per token),
so a compact format may be chosen at collection (`collect_traces.py --hidden-format`). A format turns each
stored layer's hidden rows (N, H) into fixed-width byte rows; every reader decodes them back to (R, H) here,
on the device that uses them (after the host-to-device copy of the compact bytes).

A format is a transform followed by a quantizer, both fixed by its name:

    lossless        the rows as computed (the manifest's hidden_dtype): the default, and every old trace set
    fp8             float8 e4m3 per element, one float16 scale per row (absmax / 448)            2x vs bf16
    int4            4-bit per element, one float16 scale per group of 32 (absmax)                 3.6x
    hadamard-int4   rotate by a randomized Hadamard transform, then 4 bits, one scale per row     ~4x
    hadamard-int3   the same at 3 bits (8 values in 3 bytes)                                      ~5.3x

The rotation spreads outlier channels over the whole row, so one scale per row fits every element
(the clipping is the mean-squared-error optimum of a Gaussian's uniform quantizer). Its signs come from a
closed-form sequence, so decoding needs nothing but the format's name.

Shard tensors of a compact format (replacing `hidden`):
    hidden        uint8    (Lh, N, payload_bytes)   the packed codes of each row
    hidden_scale  float16  (Lh, N, groups)          the scale(s) of each row
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOSSLESS = "lossless"
FP8_MAX = 448.0  # largest finite float8 e4m3fn
# Half-range, in standard deviations, of the uniform quantizer with 2^b levels that minimizes the mean squared
# error on a Gaussian (Max 1960, uniform case: steps 0.9957, 0.5860, 0.3352; errors 0.1188, 0.03744, 0.01154).
GAUSSIAN_CLIP = {2: 1.9914, 3: 2.3441, 4: 2.6806}


@dataclass(frozen=True)
class HiddenFormat:
    """One named format: an optional rotation, then `kind` (raw | fp8 | int) at `bits` per element.

    int formats split each row into len(bits) equal parts, part j coded at bits[j] bits per element (so
    (4, 3) is 3.5 bits per element). Rotated rows store one scale per row, their RMS, and every part clips
    at its bit width's Gaussian optimum; unrotated rows store the absmax of each group of `group` elements.
    """
    name: str
    rotate: bool = False
    kind: str = "raw"
    bits: tuple[int, ...] = ()
    group: int = 0        # unrotated int: elements per scale (0: one scale per row)

    @property
    def lossless(self) -> bool:
        return self.kind == "raw"

    def groups(self, hidden_size: int) -> int:
        return hidden_size // self.group if self.kind == "int" and self.group else 1

    def payload_bytes(self, hidden_size: int) -> int:
        if self.kind == "fp8":
            return hidden_size
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
        if self.group and hidden_size % self.group:
            return f"hidden size {hidden_size} is not a multiple of the group size {self.group}"
        return None

    # -- encode / decode ------------------------------------------------------------------------

    def encode(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., H) rows -> (payload uint8 (..., P), scales float16 (..., G)), on h's device.

        The rotation runs in h's own dtype (a bf16 matmul on the GPU: its rounding, ~2^-9 of each element, is
        far below the quantizer's step); the quantizer's arithmetic runs in float32."""
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

    def decode(self, payload: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(payload, scales) as `encode` returns them -> (..., H) rows in `dtype` (the inverse rotation runs in
        `dtype`: bf16 on the GPU keeps decoding cheap next to training)."""
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
    if bits == 4:
        c = codes.to(torch.uint8).unflatten(-1, (-1, 2))
        return c[..., 0] | (c[..., 1] << 4)
    words = codes.unflatten(-1, (-1, 8)).to(torch.int32)                    # 8 codes -> one word of 8*bits < 32 bits
    word = (words << _shifts(8, bits, codes.device)).sum(-1, keepdim=True, dtype=torch.int32)
    return ((word >> _shifts(bits, 8, codes.device)) & 0xFF).to(torch.uint8).flatten(-2)


def unpack_bits(payload: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_bits`: (..., P) uint8 -> (..., P * 8 / bits) uint8 codes."""
    if bits == 4:
        return torch.stack([payload & 0xF, payload >> 4], -1).flatten(-2)
    b = payload.unflatten(-1, (-1, bits)).to(torch.int32)
    word = (b << _shifts(bits, 8, payload.device)).sum(-1, keepdim=True, dtype=torch.int32)
    return ((word >> _shifts(8, bits, payload.device)) & (2 ** bits - 1)).to(torch.uint8).flatten(-2)


def _shifts(n: int, step: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=torch.int32) * step


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


FORMATS: dict[str, HiddenFormat] = {f.name: f for f in (
    HiddenFormat(LOSSLESS),
    HiddenFormat("fp8", kind="fp8"),
    HiddenFormat("int4", kind="int", bits=(4,), group=32),
    HiddenFormat("hadamard-4bit", rotate=True, kind="int", bits=(4,)),
    HiddenFormat("hadamard-3.5bit", rotate=True, kind="int", bits=(4, 3)),
    HiddenFormat("hadamard-3bit", rotate=True, kind="int", bits=(3,)),
)}
