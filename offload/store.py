"""The host expert store: every routed expert of every MoE layer as one blob in (pinned) host memory.

A blob holds one expert's per-expert tensors back to back, in the order of `ExpertLayout.names`: the family's
fused matrices (`Family.fused`, e.g. gate_up_proj (2I, H) then down_proj (H, I)) and any other per-expert
tensor of the experts module (GPT-OSS: its biases). Formats:

    fp16 / bf16 / fp32   the tensors as the model holds them (the format must be the model's dtype, so the
                         engine computes with exactly the resident model's weights)
    nf4                  the fused matrices, flattened and concatenated, quantized as ONE tensor by bitsandbytes
                         (quantize_4bit, blocksize 64, double quantization):
                             codes   uint8 (P/2)      two 4-bit codes per byte
                             absmax  uint8 (P/64)     one per block of 64, itself quantized
                             absmax2 fp32 (ceil(P/16384))  one per 256 first-level blocks
                             offset  fp32 (1)          the second level's offset
                         then the other per-expert tensors raw, in the compute dtype

Bytes per expert (what one copy moves) equal validation/cost_model.expert_bytes: 2P for fp16/bf16 and
P/2 + P/64 + 4 ceil(P/16384) + 4 for nf4 (P = 3 H I for a Qwen expert: 17,301,504 and 4,462,660 bytes).
Rows are padded to 512 bytes (`stride`) so every blob starts aligned; the padding is never copied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.device import host_memory_available
from common.errors import UserError
from validation.prefetch.cost_model import expert_bytes

ROW_ALIGN = 512
NF4_BLOCK, NF4_BLOCK2 = 64, 256
FORMAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_FORMATS = {v: k for k, v in FORMAT_DTYPES.items()}
HOST_MARGIN = 1 << 30  # host memory left free beyond the store, for the process itself


@dataclass(frozen=True)
class ExpertLayout:
    """What one expert is made of, and how its blob is laid out."""
    names: tuple[str, ...]              # per-expert tensors of the experts module, in blob order
    shapes: tuple[tuple[int, ...], ...]  # each one's shape for one expert
    quantized: tuple[bool, ...]         # nf4: which are NF4-coded (the fused 3-D ones); all False otherwise
    dtype: torch.dtype                  # the model's compute dtype (what the slots / work buffers hold)
    fmt: str                            # fp16 | bf16 | fp32 | nf4

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def quantized_params(self) -> int:
        return sum(n for n, q in zip(self.numels, self.quantized) if q)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nf4_sections(self) -> tuple[int, int, int, int]:
        """Byte offsets in an nf4 blob: end of codes, of absmax, of absmax2, of the offset."""
        p = self.quantized_params
        blocks = math.ceil(p / NF4_BLOCK)
        a = math.ceil(p / 2)
        b = a + blocks
        c = b + 4 * math.ceil(blocks / NF4_BLOCK2)
        return a, b, c, c + 4

    @property
    def raw_offsets(self) -> tuple[int, ...]:
        """Byte offset of each tensor stored raw in the blob (-1 for NF4-coded ones)."""
        pos = self.nf4_sections[3] if self.fmt == "nf4" else 0
        out = []
        for n, q in zip(self.numels, self.quantized):
            out.append(-1 if q else pos)
            pos += 0 if q else n * self.element_size
        return tuple(out)

    @property
    def nbytes(self) -> int:
        """Bytes one expert moves over the link (module docstring)."""
        raw = sum(n for n, q in zip(self.numels, self.quantized) if not q) * self.element_size
        if self.fmt == "nf4":
            return expert_bytes(self.quantized_params, "nf4") + raw
        return raw

    @property
    def stride(self) -> int:
        return math.ceil(self.nbytes / ROW_ALIGN) * ROW_ALIGN


def expert_tensors(experts: nn.Module, fused: tuple[str, ...]) -> list[str]:
    """The per-expert tensors of an experts module: the family's fused 3-D matrices, then every other
    parameter with one row per expert (biases)."""
    E = getattr(experts, fused[0]).shape[0]
    extra = sorted(n for n, p in experts.named_parameters(recurse=False) if n not in fused and p.shape[:1] == (E,))
    return list(fused) + extra


def make_layout(experts: nn.Module, fused: tuple[str, ...], fmt: str) -> ExpertLayout:
    names = expert_tensors(experts, fused)
    params = [getattr(experts, n) for n in names]
    dtype = params[0].dtype
    if fmt != "nf4" and FORMAT_DTYPES.get(fmt) != dtype:
        have = DTYPE_FORMATS.get(dtype, str(dtype))
        raise UserError(f"--expert-format {fmt}: the model's experts are {have}; load the model in {fmt} "
                        f"(the engine computes with the resident model's own weights) or pick --expert-format {have}")
    quantized = tuple(fmt == "nf4" and n in fused for n in names)
    return ExpertLayout(tuple(names), tuple(tuple(p.shape[1:]) for p in params), quantized, dtype, fmt)


def available_host_bytes() -> int:
    """Host memory a new allocation can get (common/device.py: MemAvailable)."""
    return host_memory_available()


def check_host_memory(need: int, freed_on_the_way: int, what: str) -> None:
    """One line if the store cannot fit: `need` bytes, of which `freed_on_the_way` come back as the model's
    own host copies of the experts are released layer by layer."""
    have = available_host_bytes()
    if need + HOST_MARGIN > have + freed_on_the_way:
        raise UserError(f"not enough host memory for the expert store: {what} need {need / 2**30:.2f} GiB of pinned "
                        f"host memory (+{HOST_MARGIN / 2**30:.0f} GiB margin), {have / 2**30:.2f} GiB available"
                        + (f" (+{freed_on_the_way / 2**30:.2f} GiB freed from the model)" if freed_on_the_way else "")
                        + "; use --expert-format nf4 or a machine with more memory")


def nf4_quantize(flat: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """bitsandbytes NF4 of a 1-D tensor, blocksize 64, double quantization (collection/quantize.py's recipe)."""
    import bitsandbytes.functional as bnbf

    return bnbf.quantize_4bit(flat.contiguous(), blocksize=NF4_BLOCK, compress_statistics=True, quant_type="nf4")


def nf4_blob(layout: ExpertLayout, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(blob uint8 (nbytes,), code (16,), code2 (256,)) of one expert's tensors, on their device."""
    flat = torch.cat([t.reshape(-1) for t, q in zip(tensors, layout.quantized) if q])
    packed, st = nf4_quantize(flat)
    parts = [packed.reshape(-1), st.absmax.reshape(-1), st.state2.absmax.reshape(-1).float().view(torch.uint8),
             st.offset.reshape(1).float().view(torch.uint8)]
    parts += [t.reshape(-1).to(layout.dtype).view(torch.uint8) for t, q in zip(tensors, layout.quantized) if not q]
    blob = torch.cat(parts)
    assert blob.numel() == layout.nbytes, (blob.numel(), layout.nbytes)
    return blob, st.code, st.state2.code


class HostExpertStore:
    """Every MoE layer's E experts as rows of one (E, stride) uint8 host tensor per layer, pinned when CUDA is
    available. Built from the experts modules (whose per-expert tensors the caller then releases)."""

    def __init__(self, experts: list[nn.Module], layout: ExpertLayout, pin: bool, work_device: torch.device,
                 release: Any = None):
        self.layout = layout
        self.num_layers = len(experts)
        self.num_experts = getattr(experts[0], layout.names[0]).shape[0]
        self.nbytes, self.stride = layout.nbytes, layout.stride
        E, L = self.num_experts, self.num_layers
        on_host = sum(getattr(m, n).numel() * getattr(m, n).element_size() for m in experts for n in layout.names
                      if getattr(m, n).device.type == "cpu")
        check_host_memory(L * E * self.stride, on_host, f"{L} layers x {E} experts x {self.nbytes:,} bytes ({layout.fmt})")
        self.pinned = pin
        self.code = self.code2 = None  # the NF4 code tables (same for every expert)
        self.host: list[torch.Tensor] = []
        self.work_device = work_device  # where NF4 quantization runs (the GPU)
        for m in experts:
            rows = torch.zeros((E, self.stride), dtype=torch.uint8, pin_memory=pin)
            self._fill(rows, [getattr(m, n).detach() for n in layout.names])
            self.host.append(rows)
            if release is not None:  # the model's own copy goes as soon as the layer is stored
                release(m)

    def _fill(self, rows: torch.Tensor, params: list[torch.Tensor]) -> None:
        lay = self.layout
        if lay.fmt != "nf4":
            pos = 0
            for p in params:  # one strided copy per tensor: every expert's bytes at once
                n = p[0].numel() * p.element_size()
                rows[:, pos:pos + n].copy_(p.reshape(p.shape[0], -1).view(torch.uint8))
                pos += n
            return
        for e in range(self.num_experts):  # quantized one expert at a time, where the weights are (the GPU)
            blob, self.code, self.code2 = nf4_blob(lay, [p[e].to(self.work_device) for p in params])
            rows[e, :lay.nbytes].copy_(blob)

    @classmethod
    def from_store(cls, source: "HostExpertStore", layout: ExpertLayout, work_device: torch.device
                   ) -> "HostExpertStore":
        """An nf4 store made from a 16-bit one (same experts), quantized on `work_device` expert by expert."""
        self = cls.__new__(cls)
        self.layout, self.num_layers, self.num_experts = layout, source.num_layers, source.num_experts
        self.nbytes, self.stride, self.pinned = layout.nbytes, layout.stride, source.pinned
        self.work_device = work_device
        E, L = self.num_experts, self.num_layers
        check_host_memory(L * E * self.stride, 0, f"{L} layers x {E} experts x {self.nbytes:,} bytes (nf4)")
        lay = source.layout
        self.host = []
        for l in range(L):
            rows = torch.zeros((E, self.stride), dtype=torch.uint8, pin_memory=self.pinned)
            for e in range(E):
                blob = source.expert(l, e).to(work_device)
                parts, pos = [], 0
                for n, shape in zip(lay.numels, lay.shapes):
                    parts.append(blob[pos:pos + n * lay.element_size].view(lay.dtype).view(shape))
                    pos += n * lay.element_size
                out, self.code, self.code2 = nf4_blob(layout, parts)
                rows[e, :layout.nbytes].copy_(out)
            self.host.append(rows)
        return self

    @property
    def total_bytes(self) -> int:
        return sum(h.numel() for h in self.host)

    def expert(self, layer: int, e: int) -> torch.Tensor:
        """The blob of expert `e` of MoE layer `layer` (nbytes,)."""
        return self.host[layer][e, :self.nbytes]


def nf4_round_trip(model: nn.Module, device: torch.device | None = None) -> None:
    """Replace every routed expert of a resident `model` by its NF4 round trip, quantized per expert exactly as
    the store's nf4 blobs are (the fused tensors of one expert as one tensor): the resident reference an nf4
    engine must equal. (collection/quantize.py quantizes each layer's fused tensor whole: its double
    quantization's offset and second-level scales then differ slightly from these, per layer, not per expert.)"""
    import bitsandbytes.functional as bnbf

    from collection.families import family_of, moe_layers

    fam = family_of(model)
    for m in moe_layers(model):
        layout = make_layout(m.experts, fam.fused, "nf4")
        params = [getattr(m.experts, n) for n, q in zip(layout.names, layout.quantized) if q]
        for e in range(params[0].shape[0]):
            flat = torch.cat([p[e].reshape(-1) for p in params]).to(device or params[0].device)
            packed, state = nf4_quantize(flat)
            back = bnbf.dequantize_4bit(packed, state).reshape(-1).to(params[0].device, params[0].dtype)
            pos = 0
            with torch.no_grad():
                for p in params:
                    n = p[e].numel()
                    p[e].copy_(back[pos:pos + n].view_as(p[e]))
                    pos += n
