"""GPU memory for experts: the cache slots of every layer and the staging slots, in the layout Hugging Face's
experts code reads.

Rows: layer l's C cache slots are rows l*C .. l*C+C-1, then 2G staging slots (two banks of G) shared by all
layers, R = L*C + 2G rows in all. For a 16-bit format each per-expert tensor has one (R, *shape) tensor:
that IS the `gate_up_proj` / `down_proj` the experts implementation is given (rows as experts, ids remapped
to rows). For nf4 the rows hold blobs (R, stride) uint8, and `dequantize` expands the rows a call needs into
(W, *shape) work tensors in the compute dtype, which the experts implementation is given instead.

A copy of expert e into a row is one host-to-GPU copy per per-expert tensor (16-bit: the blob's sections are
contiguous in both places) or one copy of the whole blob (nf4).
"""
from __future__ import annotations

import math

import torch

from offload.store import NF4_BLOCK, ExpertLayout, HostExpertStore


class SlotBuffers:
    def __init__(self, layout: ExpertLayout, num_layers: int, cache: int, bank: int, work: int,
                 device: torch.device):
        self.layout, self.L, self.C, self.G, self.device = layout, num_layers, cache, bank, device
        self.rows = num_layers * cache + 2 * bank
        self.staging0 = num_layers * cache  # first staging row
        self.nf4 = layout.fmt == "nf4"
        # zeros, not empty: a row an implementation reads for a skipped (sentinel) id must be finite (0 * NaN = NaN)
        if self.nf4:
            self.blobs = torch.zeros((self.rows, layout.stride), dtype=torch.uint8, device=device)
            self.work = [torch.zeros((work, *s), dtype=layout.dtype, device=device) for s in layout.shapes]
            self.parts: list[torch.Tensor] = []
        else:
            self.parts = [torch.zeros((self.rows, *s), dtype=layout.dtype, device=device) for s in layout.shapes]
            self.work = []
        self._dst = [self._row_views(r) for r in range(self.rows)]
        self.code = self.code2 = None

    @property
    def nbytes(self) -> dict[str, int]:
        """GPU bytes: cache slots (all layers), staging slots, nf4 work tensors."""
        per_row = self.layout.stride if self.nf4 else sum(p[0].numel() * p.element_size() for p in self.parts)
        work = sum(w.numel() * w.element_size() for w in self.work)
        return {"cache": self.L * self.C * per_row, "staging": 2 * self.G * per_row, "work": work}

    def _row_views(self, r: int) -> list[torch.Tensor]:
        if self.nf4:
            return [self.blobs[r, :self.layout.nbytes]]
        return [p[r] for p in self.parts]

    def dst(self, row: int) -> list[torch.Tensor]:
        return self._dst[row]

    def cache_row(self, layer: int, slot: int) -> int:
        return layer * self.C + slot

    def staging_row(self, j: int) -> int:
        return self.staging0 + j

    def attach(self, store: HostExpertStore) -> None:
        """Source views of every host blob, made once (the copy path then only indexes a list)."""
        lay = self.layout
        if self.nf4:
            self._src = [[[store.host[l][e, :lay.nbytes]] for e in range(store.num_experts)]
                         for l in range(store.num_layers)]
            self.code, self.code2 = store.code.to(self.device), store.code2.to(self.device)
            return
        offsets = lay.raw_offsets
        self._src = [[[store.host[l][e, o:o + n * lay.element_size].view(lay.dtype).view(s)
                       for o, n, s in zip(offsets, lay.numels, lay.shapes)]
                      for e in range(store.num_experts)] for l in range(store.num_layers)]

    def src(self, layer: int, e: int) -> list[torch.Tensor]:
        return self._src[layer][e]

    def tensors(self, lo: int, hi: int) -> list[torch.Tensor]:
        """The per-expert tensors of rows lo..hi-1 (16-bit), as the experts implementation reads them."""
        return [p[lo:hi] for p in self.parts]

    # -- nf4

    def dequantize(self, rows: torch.Tensor, n: int) -> list[torch.Tensor]:
        """Work tensors [:n] filled from blob rows `rows` (n,) (a device tensor): every needed expert in one
        bitsandbytes call per quantized tensor. The second level of the double quantization is expanded here,
        vectorized over the n experts (absmax = code2[absmax_u8] * absmax2 + offset, in float32, as bitsandbytes
        computes it), so the first level runs as one call over n experts' codes."""
        import bitsandbytes.functional as bnbf

        lay, blobs = self.layout, self.blobs
        a, b, c, d = lay.nf4_sections
        nb = b - a
        absmax = self.code2[blobs[rows, a:b].long()]                           # (n, nb) float32
        absmax2 = blobs[rows, b:c].view(torch.float32)                        # (n, ceil(nb / 256))
        offset = blobs[rows, c:d].view(torch.float32)                         # (n, 1)
        absmax = absmax * absmax2.repeat_interleave(256, dim=1)[:, :nb] + offset
        start = 0
        for w, q, numel, off, shape in zip(self.work, lay.quantized, lay.numels, lay.raw_offsets, lay.shapes):
            if not q:  # stored raw after the NF4 sections
                nbytes = numel * lay.element_size
                w[:n].copy_(blobs[rows, off:off + nbytes].view(lay.dtype).view(n, *shape))
                continue
            end = start + numel
            out = w[:n].view(-1)
            if start % NF4_BLOCK == 0 and numel % NF4_BLOCK == 0:  # block-aligned: n experts' codes in one call
                state = bnbf.QuantState(absmax=absmax[:, start // NF4_BLOCK:end // NF4_BLOCK].reshape(-1),
                                        shape=torch.Size([n * numel]), code=self.code, blocksize=NF4_BLOCK,
                                        quant_type="nf4", dtype=lay.dtype)
                codes = blobs[rows, start // 2:end // 2].reshape(-1, 1)
                _dequantize_into(bnbf, codes, state, out)
            else:  # a tensor whose size is not a multiple of 64 shares blocks with its neighbour: expert by expert
                for i in range(n):
                    full = self._dequantize_one(bnbf, int(rows[i]), absmax[i])
                    out[i * numel:(i + 1) * numel].copy_(full[start:end])
            start = end
        return [w[:n] for w in self.work]

    def _dequantize_one(self, bnbf, row: int, absmax: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        p = lay.quantized_params
        state = bnbf.QuantState(absmax=absmax, shape=torch.Size([p]), code=self.code, blocksize=NF4_BLOCK,
                                quant_type="nf4", dtype=lay.dtype)
        return bnbf.dequantize_4bit(self.blobs[row, :math.ceil(p / 2)].reshape(-1, 1), state)


def _dequantize_into(bnbf, codes: torch.Tensor, state, out: torch.Tensor) -> None:
    if out.is_cuda:  # straight into the work tensor
        bnbf.dequantize_4bit(codes, state, out=out)
    else:  # bitsandbytes' CPU backend has no out= variant
        out.copy_(bnbf.dequantize_4bit(codes, state).reshape(-1))
