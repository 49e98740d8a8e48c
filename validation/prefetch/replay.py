"""The simulator's schedule executed for real: an offloaded batch-1 decode on a CUDA GPU.

What runs (tools/replay_offload.py; docs/PREFETCH.md):
  * `ExpertStore`: the E routed experts of one layer at full size (3 x H x I; random weights), each one
    contiguous blob in pinned host memory, in fp16 or NF4 (bitsandbytes quantize_4bit, blocksize 64,
    double quantization: 4-bit codes | uint8 absmax | fp32 second-level absmax | fp32 offset). Every
    replayed layer copies its experts from these same E blobs: the bytes that cross PCIe are the same
    as with one set per layer, and host memory stays at one layer's worth (1.0 GB in fp16).
  * `DecoderLayer`: the non-expert work of one layer at full size with its own random weights: RMSNorm,
    fused q/k/v with bias, attention over a KV cache of the current length (SDPA), o-projection,
    RMSNorm, the router (H -> E, softmax, top-k), whose choice the host reads, as an engine must before
    it can fetch the experts (the experts replayed are the trace's); the shared expert (H -> 2 x S -> H)
    with its sigmoid gate. Rotary embeddings are left out (elementwise, a few microseconds). The host
    read makes every layer wait for its attention, so the host never runs layers ahead of the GPU and
    a stall costs what the simulator says it costs.
  * `ReplayEngine`: per layer a GPU cache of slots; the schedule's copies run on their own CUDA stream,
    each waiting for an event recorded after the router (demand fetches) or after the predictor
    (prefetches) of the step that queued it, so the copy engine's FIFO order is the simulator's; the
    compute stream waits for the event recorded after the copy of each expert it needs, then really
    computes that expert from its slot (NF4: dequantized into a scratch buffer first). Each token ends
    with the host waiting for the compute stream, as a decode step that samples its next token does
    (copies still in flight go on, as in the simulator).

On a CPU the same code runs synchronously (no streams, no pinned memory): the tests use that to check
that a schedule delivers the right expert to every access.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from collection.quantize import NF4_BLOCKSIZE
from validation.prefetch.cost_model import NF4_BLOCK2, CostModel, expert_bytes, model_shape, nf4_layout

NF4_ALIGN = 256  # cache slots of NF4 blobs start on 256-byte boundaries (the payload copied is expert_bytes)


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    heads: int
    intermediate: int         # routed expert width I
    shared_intermediate: int  # shared expert width S (0: none)
    num_experts: int
    top_k: int
    max_len: int = 512
    expert_bias: bool = False  # the blob also holds the experts' biases (2I + H), copied, not applied

    @classmethod
    def from_preset(cls, preset: str, num_experts: int, top_k: int, max_len: int = 512) -> "ModelDims":
        """The preset's layer and expert shape (read through its family: validation/prefetch/cost_model.py); the
        number of experts and top-k are the traces'. Attention is replayed as multi-head attention with
        hidden / heads per head, whatever the preset's grouping or MLA."""
        s = model_shape(preset)
        return cls(s.hidden, s.heads, s.expert_width, s.shared_width, num_experts, top_k, max_len, s.expert_bias)

    @property
    def expert_params(self) -> int:
        H, I = self.hidden, self.intermediate
        return 3 * H * I + ((2 * I + H) if self.expert_bias else 0)


def _event(device: torch.device) -> Any:
    return torch.cuda.Event() if device.type == "cuda" else None


class ExpertStore:
    """E experts as blobs in (pinned) host memory, and how to read one back from a GPU slot."""

    def __init__(self, dims: ModelDims, fmt: str, device: torch.device, seed: int = 0):
        self.dims, self.fmt, self.device = dims, fmt, device
        n, E = dims.expert_params, dims.num_experts
        self.nbytes = expert_bytes(n, fmt)
        self.stride = self.nbytes if fmt != "nf4" else math.ceil(self.nbytes / NF4_ALIGN) * NF4_ALIGN
        pin = device.type == "cuda"
        self.host = torch.zeros((E, self.stride), dtype=torch.uint8, pin_memory=pin)
        gen = torch.Generator(device=device).manual_seed(seed)
        self.code = self.code2 = None
        for e in range(E):  # generated and quantized on the device, one expert at a time
            w = (torch.randn(n, generator=gen, device=device) * 0.02).half()
            if fmt == "nf4":
                import bitsandbytes.functional as bnbf

                packed, st = bnbf.quantize_4bit(w, blocksize=NF4_BLOCKSIZE, compress_statistics=True,
                                                quant_type="nf4")
                blob = torch.cat([packed.view(-1), st.absmax.view(-1), st.state2.absmax.view(-1).view(torch.uint8),
                                  st.offset.reshape(1).float().view(torch.uint8)])
                self.code, self.code2 = st.code, st.state2.code
                if e == 0:
                    self.reference_state = st
                    self.reference_packed = packed
            else:
                blob = w.view(torch.uint8)
            assert blob.numel() == self.nbytes, (fmt, blob.numel(), self.nbytes)
            self.host[e, :self.nbytes].copy_(blob)
            if e == 0:
                self.reference_weights = w  # expert 0 as generated, for the correctness checks

    def weights(self, blob: torch.Tensor, scratch: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up (2I, H), down (H, I)) fp16 views of an expert blob on the device."""
        H, I, n = self.dims.hidden, self.dims.intermediate, self.dims.expert_params
        if self.fmt == "nf4":
            import bitsandbytes.functional as bnbf

            a, b, c, _ = nf4_layout(n)
            state2 = bnbf.QuantState(absmax=blob[b:c].view(torch.float32), code=self.code2, blocksize=NF4_BLOCK2,
                                     dtype=torch.float32)
            state = bnbf.QuantState(absmax=blob[a:b], shape=torch.Size([n]), code=self.code, blocksize=NF4_BLOCKSIZE,
                                    quant_type="nf4", dtype=torch.float16, offset=blob[c:c + 4].view(torch.float32),
                                    state2=state2)
            # into the scratch buffer on the GPU (bitsandbytes' CPU backend has no out= variant)
            w = bnbf.dequantize_4bit(blob[:a].view(-1, 1), state, out=scratch if blob.is_cuda else None).view(-1)
        else:
            w = blob[:self.nbytes].view(torch.float16)
        return w[:2 * I * H].view(2 * I, H), w[2 * I * H:3 * I * H].view(H, I)  # biases (if any) follow, unused


def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A Qwen2-MoE expert on x (1, H): down(silu(gate x) * up x)."""
    gu = F.linear(x, gate_up)
    i = down.shape[1]
    return F.linear(F.silu(gu[:, :i]) * gu[:, i:], down)


class DecoderLayer:
    """The non-expert work of one decoder layer, full size, random weights (module docstring)."""

    def __init__(self, dims: ModelDims, device: torch.device, gen: torch.Generator):
        H, S, E = dims.hidden, dims.shared_intermediate, dims.num_experts

        def w(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen, device=device) * 0.02).half()

        self.dims = dims
        self.ln1 = torch.ones(H, device=device, dtype=torch.float16)
        self.ln2 = torch.ones(H, device=device, dtype=torch.float16)
        self.qkv_w, self.qkv_b, self.o_w = w(3 * H, H), w(3 * H), w(H, H)
        self.router_w = w(E, H)
        self.sh_gate_up, self.sh_down, self.sh_gate = w(2 * S, H), w(H, S), w(1, H)
        hd = H // dims.heads
        self.k_cache = torch.zeros(dims.heads, dims.max_len, hd, device=device, dtype=torch.float16)
        self.v_cache = torch.zeros_like(self.k_cache)

    def pre(self, x: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention at position `pos` (KV cache of length pos + 1) and the router: (residual h, MoE input)."""
        d = self.dims
        hd = d.hidden // d.heads
        a = F.rms_norm(x, (d.hidden,), self.ln1, 1e-6)
        q, k, v = F.linear(a, self.qkv_w, self.qkv_b).view(3, d.heads, 1, hd)
        self.k_cache[:, pos:pos + 1] = k
        self.v_cache[:, pos:pos + 1] = v
        att = F.scaled_dot_product_attention(q.unsqueeze(0), self.k_cache[:, :pos + 1].unsqueeze(0),
                                             self.v_cache[:, :pos + 1].unsqueeze(0))
        h = x + F.linear(att.reshape(1, d.hidden), self.o_w)
        moe_in = F.rms_norm(h, (d.hidden,), self.ln2, 1e-6)
        # the router, and its choice read on the host: an engine must know the experts to fetch them (the host
        # waits here for the layer's attention). The experts replayed are the trace's, not these.
        torch.topk(torch.softmax(F.linear(moe_in, self.router_w).float(), -1), d.top_k).indices.cpu()
        return h, moe_in

    def shared(self, moe_in: torch.Tensor) -> torch.Tensor:
        S = self.dims.shared_intermediate
        if S == 0:  # a family without a shared expert
            return torch.zeros_like(moe_in)
        gu = F.linear(moe_in, self.sh_gate_up)
        y = F.linear(F.silu(gu[:, :S]) * gu[:, S:], self.sh_down)
        return y * torch.sigmoid(F.linear(moe_in, self.sh_gate))


@dataclass
class HostSchedule:
    """A Schedule (validation/prefetch/simulator.py) as Python lists, read without numpy overhead in the timed loop."""
    need: list    # [t][l] -> K slots
    demand: list  # [t][l] -> [(expert, slot)]
    prefetch: list  # [t][l] -> [(expert, slot)] for layer l + d
    weights: list  # [t][l] -> K routing weights
    position: list  # [t]


def host_schedule(schedule: Any, weights: np.ndarray, position: np.ndarray, tokens: int) -> HostSchedule:
    def pairs(a: np.ndarray) -> list:
        return [[[(int(e), int(s)) for e, s in step if e >= 0] for step in tok] for tok in a[:tokens]]
    return HostSchedule(schedule.need[:tokens].tolist(), pairs(schedule.demand), pairs(schedule.prefetch),
                        weights[:tokens].tolist(), position[:tokens].tolist())


class ReplayEngine:
    """L full-size layers, per-format expert stores and GPU caches, and the loop that executes a schedule."""

    def __init__(self, dims: ModelDims, num_layers: int, device: torch.device, formats: list[str], seed: int = 0):
        self.dims, self.L, self.device = dims, num_layers, device
        gen = torch.Generator(device=device).manual_seed(seed)
        self.layers = [DecoderLayer(dims, device, gen) for _ in range(num_layers)]
        self.stores = {f: ExpertStore(dims, f, device, seed + 1) for f in formats}
        E, K = dims.num_experts, dims.top_k
        # every layer has E slots (all-resident needs them); a policy with C slots uses the first C
        self.cache = {f: torch.empty((num_layers, E, s.stride), dtype=torch.uint8, device=device)
                      for f, s in self.stores.items()}
        self.staging = {f: torch.empty((K, s.stride), dtype=torch.uint8, device=device) for f, s in self.stores.items()}
        self.scratch = torch.empty((K, dims.expert_params), dtype=torch.float16, device=device)
        self.inputs = torch.randn(64, 1, dims.hidden, generator=gen, device=device).half()
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.ready = [[_event(device) for _ in range(E + K)] for _ in range(num_layers)]  # per slot, then staging
        self.after_router = [_event(device) for _ in range(num_layers)]
        self.after_predictor = [_event(device) for _ in range(num_layers)]

    # -- pieces the loop is made of
    def _slot(self, fmt: str, l: int, s: int) -> torch.Tensor:
        return self.cache[fmt][l, s] if s >= 0 else self.staging[fmt][-1 - s]

    def _copy(self, fmt: str, l: int, pairs: list, after: Any) -> None:
        """Queue copies behind everything already on the copy stream, not before `after` has fired."""
        store = self.stores[fmt]
        n = store.nbytes
        if self.copy_stream is None:  # CPU: in order by construction
            for e, s in pairs:
                self._slot(fmt, l, s)[:n].copy_(store.host[e, :n])
            return
        main = torch.cuda.current_stream(self.device)
        after.record(main)
        self.copy_stream.wait_event(after)
        with torch.cuda.stream(self.copy_stream):
            for e, s in pairs:
                self._slot(fmt, l, s)[:n].copy_(store.host[e, :n], non_blocking=True)
                self.ready[l][s if s >= 0 else self.dims.num_experts - 1 - s].record(self.copy_stream)

    def _experts(self, fmt: str, l: int, moe_in: torch.Tensor, slots: list, weights: list) -> torch.Tensor:
        store = self.stores[fmt]
        y = None
        for k, s in enumerate(slots):
            if self.copy_stream is not None:
                self.ready[l][s if s >= 0 else self.dims.num_experts - 1 - s].wait()
            gate_up, down = store.weights(self._slot(fmt, l, s), self.scratch[k])
            out = expert_forward(moe_in, gate_up, down) * weights[k]
            y = out if y is None else y + out
        return y

    def preload(self, fmt: str, slots: dict[int, list[tuple[int, int]]]) -> None:
        """Copy (expert, slot) pairs of each layer into the cache before a timed run (static caches)."""
        n = self.stores[fmt].nbytes
        for l, pairs in slots.items():
            for e, s in pairs:
                self.cache[fmt][l, s, :n].copy_(self.stores[fmt].host[e, :n])
        self.sync()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, fmt: str, sched: HostSchedule, lookahead: int, prefetching: bool,
            predictor: Callable[[torch.Tensor, int], Any] | None = None, keep_outputs: bool = False
            ) -> tuple[float, list[torch.Tensor]]:
        """Decode the schedule's tokens; returns (seconds, each token's last hidden state if kept)."""
        L, d = self.L, lookahead
        outputs = []
        main = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self.sync()
        t0 = time.perf_counter()
        for t, pos in enumerate(sched.position):
            x = self.inputs[t % self.inputs.shape[0]]
            for l in range(L):
                layer = self.layers[l]
                h, moe_in = layer.pre(x, pos)
                if sched.demand[t][l]:
                    self._copy(fmt, l, sched.demand[t][l], self.after_router[l])
                if prefetching and l + d < L:
                    if predictor is not None:
                        predictor(moe_in, l)
                    if sched.prefetch[t][l]:
                        self._copy(fmt, l + d, sched.prefetch[t][l], self.after_predictor[l])
                y = layer.shared(moe_in) + self._experts(fmt, l, moe_in, sched.need[t][l], sched.weights[t][l])
                x = h + y
            if keep_outputs:
                outputs.append(x.float().cpu())
            if main is not None:  # the decode step hands its token to the host; copies in flight go on
                main.synchronize()
        return time.perf_counter() - t0, outputs


# ----------------------------------------------------------------------------------------------
# predictor work during the replay, and the measured cost model


def predictor_work(kind: str, engine: ReplayEngine, lookahead: int, config: dict[str, Any] | None = None
                   ) -> Callable[[torch.Tensor, int], Any] | None:
    """The real per-layer work of a policy's predictor at full size (its answers come from the trace's
    predictions, made with the real predictor on the traces): a learned predictor of the checkpoint's kind
    and width with H = the replay's hidden size, random weights, fp16; router reuse: layer l+d's router on
    the MoE input. Table look-ups (popularity, previous token, random, oracle) do no GPU work."""
    dims, dev = engine.dims, engine.device
    if kind == "router-reuse":
        return lambda moe_in, l: F.linear(moe_in, engine.layers[l + lookahead].router_w)
    if kind != "learned":
        return None
    from models.features import example_features, feature_spec
    from models.predictors import PredictorConfig, build_predictor

    cfg = PredictorConfig(**{**(config or {}), "input_dim": dims.hidden, "num_experts": dims.num_experts,
                             "top_k": dims.top_k, "num_layers": engine.L, "lookahead": lookahead})
    model = build_predictor(cfg).to(dev).half().eval()
    # every input the kind reads (past layers, windows, token id, ...), in its shapes; the MoE input is the replay's
    inputs = [replace(example_features(feature_spec(model), dims.hidden, dims.num_experts, cfg.token_vocab, 1, l, dev,
                                       torch.float16), hidden=None) for l in range(engine.L)]
    # the anchored kind runs one target layer's trunk and heads (no host sync, so it is graph-capturable)
    one_layer = getattr(model, "predict_layer", None)

    @torch.no_grad()
    def run(moe_in: torch.Tensor, l: int) -> torch.Tensor:
        f = replace(inputs[l], hidden=moe_in)
        logits = one_layer(f, l + lookahead)[0] if one_layer is not None else model(f)
        return logits.topk(dims.top_k, dim=1).indices
    if dev.type != "cuda" or os.environ.get("MOE_REPLAY_EAGER_PREDICTOR") == "1":  # eager: a debugging switch
        return run
    try:
        # layers 0..L-d-1 only: the replay predicts from layer l while l + d < L, and a target layer past the
        # last one is out of range (an embedding index on the GPU, a trunk of the anchored kind)
        return as_cuda_graphs(run, engine.L - lookahead, (1, dims.hidden), dev)
    except RuntimeError as e:  # a predictor whose forward syncs with the host cannot be captured: run it eagerly
        print(f"predictor {cfg.kind}: not capturable as a CUDA graph ({str(e).splitlines()[0][:120]}); runs eagerly")
        torch.cuda.synchronize(dev)
        return run


def as_cuda_graphs(run: Callable[[torch.Tensor, int], torch.Tensor], num_layers: int, shape: tuple[int, ...],
                   dev: torch.device) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """`run(x, l)` as one captured CUDA graph per layer, replayed on the current stream: a predictor of a dozen
    small kernels then costs one launch instead of a dozen, as a serving engine would run it (eager PyTorch at
    batch 1 is bound by kernel launches: 0.5-0.6 ms per call measured on an H200)."""
    static_in = torch.zeros(shape, device=dev, dtype=torch.float16)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graph asks
        for l in range(num_layers):
            for _ in range(3):
                run(static_in, l)
    torch.cuda.current_stream(dev).wait_stream(side)
    graphs, outs = [], []
    for l in range(num_layers):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs.append(run(static_in, l))
        graphs.append(g)

    def replay(x: torch.Tensor, l: int) -> torch.Tensor:
        static_in.copy_(x)
        graphs[l].replay()
        return outs[l]
    # the graphs read the predictor's weights and inputs at their addresses: `run` (which holds them) must live as
    # long as the graphs, or the allocator hands that memory to other tensors and the graphs read garbage (on the
    # H200: a token id out of its table, a device-side assert in the replay)
    replay.keep_alive = run  # type: ignore[attr-defined]
    return replay


def _per_call_ms(fn: Callable[[], Any], engine: ReplayEngine, n: int, warmup: int = 10) -> float:
    """Wall-clock ms per call of `fn` issued back to back (host and GPU as they come), after a warm-up."""
    for _ in range(warmup):
        fn()
    engine.sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    engine.sync()
    return (time.perf_counter() - t0) / n * 1e3


def measure_copy_ms(engine: ReplayEngine, fmt: str, n: int = 40) -> float:
    """ms per expert of back-to-back pinned host-to-GPU copies on the copy stream (as queued copies run)."""
    store, cache = engine.stores[fmt], engine.cache[fmt]
    E, nb = engine.dims.num_experts, store.nbytes
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(engine.copy_stream):
        for i in range(5):
            cache[0, i % E, :nb].copy_(store.host[i % E, :nb], non_blocking=True)
        start.record(engine.copy_stream)
        for i in range(n):
            cache[0, i % E, :nb].copy_(store.host[i % E, :nb], non_blocking=True)
        end.record(engine.copy_stream)
    end.synchronize()
    return start.elapsed_time(end) / n


@torch.no_grad()
def measure_costs(engine: ReplayEngine, formats: list[str], predictors: dict[str, tuple[str, dict[str, Any]]],
                  lookahead: int, position: int = 64, calls: int = 200,
                  calibration: HostSchedule | None = None) -> dict[str, Any]:
    """The cost model measured on this GPU: copy ms per expert per format, and per-layer compute phases,
    each timed as a loop of the replay's own code. With `calibration` (an all-resident schedule), the
    all-resident replay's time per token minus the phases' sum is spread over the layers' pre phase: the
    per-layer overhead of the replay loop itself (event records, waits, Python). Returns the CostModels,
    predictor ms per policy and the raw numbers."""
    dev = engine.device
    layer = engine.layers[0]
    x = engine.inputs[0]
    K = engine.dims.top_k
    raw: dict[str, Any] = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"}
    h, moe_in = layer.pre(x, position)
    raw["pre_ms"] = _per_call_ms(lambda: layer.pre(x, position), engine, calls)
    raw["shared_ms"] = _per_call_ms(lambda: layer.shared(moe_in), engine, calls)
    pred_ms = {}
    for name, (kind, config) in predictors.items():
        work = predictor_work(kind, engine, lookahead, config)
        pred_ms[name] = _per_call_ms(lambda: work(moe_in, 0), engine, calls) if work is not None else 0.0
    raw["predictor_ms"] = pred_ms
    costs = {}
    for fmt in formats:
        store = engine.stores[fmt]
        engine.cache[fmt][0, 0, :store.nbytes].copy_(store.host[0, :store.nbytes])
        slot = engine.cache[fmt][0, 0]

        def one_expert() -> torch.Tensor:
            return expert_forward(moe_in, *store.weights(slot, engine.scratch[0]))
        expert_ms = _per_call_ms(one_expert, engine, calls)
        copy_ms = measure_copy_ms(engine, fmt) if dev.type == "cuda" else float("nan")
        raw[f"{fmt}/expert_ms"], raw[f"{fmt}/copy_ms"] = expert_ms, copy_ms
        cost = CostModel(store.nbytes, store.nbytes / (copy_ms / 1e3), raw["pre_ms"], raw["shared_ms"], expert_ms,
                         0.0, source=f"measured on {raw['device']}")
        if calibration is not None:
            hs = calibration
            engine.preload(fmt, {l: [(e, e) for e in range(engine.dims.num_experts)] for l in range(engine.L)})
            engine.run(fmt, replace(hs, position=hs.position[:32]), lookahead, False)  # warm-up
            # the faster of two runs: a one-off stall of the host (another process, the allocator) is not the loop
            seconds = min(engine.run(fmt, hs, lookahead, False)[0] for _ in range(2))
            token_ms = seconds / len(hs.position) * 1e3
            per_layer = (token_ms / engine.L) - cost.layer_ms(K)
            raw[f"{fmt}/all_resident_ms_per_token"] = token_ms
            raw[f"{fmt}/loop_overhead_ms_per_layer"] = per_layer
            cost = replace(cost, pre_ms=cost.pre_ms + max(per_layer, 0.0),
                           source=f"measured on {raw['device']}, pre phase calibrated on the all-resident replay")
        costs[fmt] = cost
    return {"costs": costs, "predictor_ms": pred_ms, "raw": raw}


# ----------------------------------------------------------------------------------------------
# correctness, checked before anything is timed


@torch.no_grad()
def check_engine(engine: ReplayEngine, stream: Any, formats: list[str], lookahead: int, tokens: int = 6,
                 slots: int | None = None) -> dict[str, float]:
    """Raise unless (1) an expert computed from its GPU slot after a copy on the copy stream equals the same
    expert computed from the host's weights (fp16: the generated weights; NF4: bitsandbytes' own dequantization
    of the same quantization, and close to the fp16 weights), and (2) replaying on-demand LRU, a prefetching
    policy (oracle) and no cache at all (every expert through the staging buffers) on the first `tokens`
    tokens gives every token the same output as all experts resident. Returns the largest differences seen."""
    from validation.prefetch.cost_model import CostModel
    from validation.prefetch.simulator import POLICIES, Stream, run_policy

    dims = engine.dims
    E, K, L = dims.num_experts, dims.top_k, engine.L
    out: dict[str, float] = {}
    x = engine.inputs[1]
    for fmt in formats:
        store = engine.stores[fmt]
        engine.sync()
        engine._copy(fmt, 0, [(0, 0)], engine.after_router[0])
        got = engine._experts(fmt, 0, x, [0], [1.0])
        if fmt == "nf4":
            import bitsandbytes.functional as bnbf

            deq = bnbf.dequantize_4bit(store.reference_packed, store.reference_state).view(-1)
            ref_w = deq
        else:
            ref_w = store.reference_weights
        H, I = dims.hidden, dims.intermediate
        ref = expert_forward(x, ref_w[:2 * I * H].view(2 * I, H), ref_w[2 * I * H:3 * I * H].view(H, I))
        err = (got.float() - ref.float()).abs().max().item()
        scale = ref.float().abs().max().item()
        out[f"{fmt}/slot_vs_host_max_abs"] = err
        if not err <= 1e-3 * max(scale, 1e-3):
            raise RuntimeError(f"{fmt}: the expert computed from its GPU slot differs from the host weights by {err:.3e} "
                               f"(output scale {scale:.3e})")
        if fmt == "nf4":  # the blob layout is right only if dequantization lands near the original weights
            w = store.reference_weights
            exact = expert_forward(x, w[:2 * I * H].view(2 * I, H), w[2 * I * H:3 * I * H].view(H, I)).float()
            cos = F.cosine_similarity(exact.view(1, -1), got.float().view(1, -1)).item()
            out["nf4/cosine_vs_fp16_weights"] = cos
            if cos < 0.98:
                raise RuntimeError(f"nf4: the dequantized expert is far from its fp16 weights (cosine {cos:.4f})")
    n = min(tokens, stream.tokens)
    short = Stream(ids=stream.ids[:n], weights=stream.weights[:n], first=stream.first[:n], position=stream.position[:n])
    cost = CostModel(engine.stores[formats[0]].nbytes, 25e9)
    few = slots if slots is not None else K
    for fmt in formats:
        _, full = run_policy(POLICIES["all-resident"], E, short, cost, lookahead, K, E, record=True)
        engine.preload(fmt, {l: [(e, e) for e in range(E)] for l in range(L)})
        _, want = engine.run(fmt, host_schedule(full, short.weights, short.position, n), lookahead, False,
                             keep_outputs=True)
        for name, c in (("on-demand", few), ("oracle", few + 1), ("on-demand", 0)):  # 0: all through staging
            engine.cache[fmt].fill_(0)  # stale slots would hide a missing copy
            _, sched = run_policy(POLICIES[name], c, short, cost, lookahead, K, E, record=True)
            _, got_out = engine.run(fmt, host_schedule(sched, short.weights, short.position, n), lookahead,
                                    POLICIES[name].prefetch != 0, keep_outputs=True)
            diff = max((a - b).abs().max().item() for a, b in zip(got_out, want))
            out[f"{fmt}/{name}@C{c}_vs_all_resident_max_abs"] = diff
            if diff > 1e-3:
                raise RuntimeError(f"{fmt}: replaying {name} with {c} slots changed the outputs by {diff:.3e} "
                                   "(a copy missing, late or into the wrong slot)")
    return out
