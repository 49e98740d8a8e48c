"""The offload engine: a Hugging Face MoE whose routed experts live in host memory, with a GPU expert cache.

`offload_experts(model, ...)` converts a loaded model in place (every family of collection/families.py) and
returns an `OffloadHandle`; the user then calls `model.generate()` as usual. Per MoE layer:

  * the router runs early (a pre-hook on the MoE block, before the shared expert), its top-k ids are copied to
    pinned host memory behind an event (with the prefetch predictor's top-m of layer l+d); the host blocks
    only there, when the experts module asks for them;
  * `OffloadedExperts` (the block's new experts module) runs the cache's bookkeeping (offload/cache.py, the
    simulator's rules), queues the demand copies and then the prefetch copies on the copy stream
    (offload/copies.py), makes the compute stream wait for the newest copy its rows need, remaps the
    router's expert ids to GPU rows (on the host, which holds them, sent through pinned memory; a call with
    staged experts, or a wide batch, sends the expert -> row table and gathers it on the GPU), and calls
    the model's own experts implementation (grouped_mm, batched_mm or eager) on the rows, presented as the
    experts' tensors. Ids of experts not in a call map to the "sentinel" row count, which grouped_mm skips
    (the expert-parallel convention, `_is_expert_parallel`); other implementations get row 0 with weight 0.

A forward of one token per sequence is a decode step: its access is the batch's experts (union) and goes
through the cache. A forward of more tokens per sequence (a prompt) streams the layer's missing experts through
the staging banks, G at a time, double-buffered (bank b+1's copies run under bank b's compute), and leaves the
cache as it was; cached experts are read where they are.

All-resident (C = E, every expert loaded once) skips the host read and the remap: the model's own computation
on per-layer views of the slots.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from collection.families import family_of, moe_layers, router_spec
from common.errors import UserError
from offload.cache import NO_SCORE, CacheState
from offload.clock import ForwardClock, forward_shape
from offload.copies import HostReader, SyncCopies, make_copies
from offload.prefetch import LivePredictor, eviction_ranks, learned, router_reuse
from offload.routing import ForcedRouting
from offload.slots import SlotBuffers
from offload.store import DTYPE_FORMATS, ExpertLayout, HostExpertStore, make_layout
from offload.uploads import Uploads
from validation.prefetch.simulator import BELADY, HITS, NO_PREFETCH, ORACLE, PREDICTED, SCORE, STATIC, Policy

EMPTY = np.zeros(0, dtype=np.int64)
ZERO_USE = np.zeros(0, dtype=np.int64)


class OffloadedExperts(nn.Module):
    """Replaces a MoE block's experts module: same call, (hidden (N, H), top_k_index (N, k), weights (N, k))."""

    def __init__(self, engine: "OffloadEngine", layer: int):
        super().__init__()
        object.__setattr__(self, "engine", engine)  # not a submodule: the engine is not part of the model
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        return self.engine.experts(self.layer, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, {self.engine.describe()}"


@dataclass
class Counters:
    """Everything the engine counts, summed over the run (times in ns or ms)."""
    steps: int = 0                    # (decode forward, layer) cache steps
    host_ns: int = 0                  # the engine's own host time in cache steps (Python, launches, bookkeeping)
    predictor_host_ns: int = 0
    predictor_calls: int = 0
    prefill_hits: int = 0
    prefill_copies: int = 0


class OffloadEngine:
    def __init__(self, model: nn.Module, device: torch.device, delayed_copies: bool = False, timing: bool = True,
                 graphs: bool = True, seed: int = 0):
        fam = family_of(model)
        layers = moe_layers(model)
        self.model, self.fam, self.device, self.seed, self.graphs = model, fam, device, seed, graphs
        cfg = model.config
        self.L, self.E = len(layers), int(getattr(cfg, fam.num_experts))
        self.K, self.H = int(cfg.num_experts_per_tok), int(cfg.hidden_size)
        self.blocks = [m.block for m in layers]
        self.inner = [m.experts for m in layers]
        self.routers = [m.router for m in layers]
        self.decoder_index = [m.decoder_index for m in layers]
        self.copies: SyncCopies = make_copies(device, delayed_copies, timing)
        self.reader = HostReader(device)
        self.timing = timing and device.type == "cuda"
        self.stores: dict[str, HostExpertStore] = {}
        self.slots: SlotBuffers | None = None
        self.uploads: Uploads | None = None
        self.record_on = False
        self.forced: ForcedRouting | None = None
        self.learned = self.predictor = self.policy = None
        self.evict_learned = self.evictor = None
        self.prev_ranks: list[torch.Tensor | None] = [None] * self.L  # learned eviction: the last token's, by layer
        self.no_ranks = torch.zeros(self.E, dtype=torch.int64, device=device)  # none yet: all equal, LRU decides
        self.live: list[Any] = []  # the learned parts' live state (prefetch, eviction): fed at every forward and layer
        self.resident_fast = False
        # per-forward state
        self.counters = Counters()
        self.N = self.B = self.T = 0
        self.row0 = 0
        self.decode = False
        self.phase = "prefill"
        self.early: list[Any] = [None] * self.L   # the router's output computed early, by layer
        self.markers: list[Any] = [None] * self.L
        self.log: dict[str, list] = {"ids": [], "pred": [], "stats": [], "score": []}
        self.clock = ForwardClock(device, timing)
        self.kv_bytes = 0
        self.predictor_events: list[tuple[Any, Any]] = []
        self.profile: list[tuple[int, str, Any]] | None = None  # measure_costs: (layer, tag, stamp) per decode step
        self.latency_ns, self.latency_n = 0, 0                  # host time from the router read to the copies queued
        self._t_read = 0
        self._fused = fam.fused
        self.layout0 = make_layout(layers[0].experts, fam.fused, DTYPE_FORMATS.get(
            getattr(layers[0].experts, fam.fused[0]).dtype, "fp32"))  # the model's own format, before release
        self._install()

    def configure(self, cache: int, policy: Policy, lookahead: int, fetch_budget: int, expert_format: str,
                  bank: int, forced: ForcedRouting | None, resident: np.ndarray | None,
                  popularity: np.ndarray | None, record: bool) -> None:
        """(Re)build everything a configuration owns: the prefetch source, the store of its format (kept for
        later configurations), the GPU slots, the cache tables. The model's hooks stay."""
        for m in self.inner:  # the previous configuration's slot views, set by _call: freed before new slots exist
            for name in self.layout0.names:
                m.__dict__.pop(name, None)
        self.policy, self.C, self.d, self.m, self.G = policy, cache, lookahead, fetch_budget, bank
        self.forced, self.record_on = forced, record
        self.W = max(self.K, bank, 2)  # nf4 work rows: one call's experts at most (and never one: see _call_rows)
        # the prefetch source first: a checkpoint of another model is refused before any memory is taken
        self.predictor: LivePredictor | None = None
        self.learned = None
        if policy.prefetch == PREDICTED:
            self.predictor = self._live_predictor(policy, popularity, self.graphs)
        self.evictor: LivePredictor | None = None
        self.evict_learned = None
        if policy.eviction == SCORE:
            self.evictor = self._live_evictor(policy.evict_source, self.graphs)
        self.live = [x for x in (self.learned, self.evict_learned) if x is not None]
        self.prev_ranks = [None] * self.L  # ranks of another configuration's scorer (and its graphs' outputs) go
        self._rank = np.zeros(self.E, dtype=np.float64)
        self.store = self._store(expert_format)
        self.layout = self.store.layout
        # all-resident in 16 bits: no host read, no remap (nf4 still dequantizes the needed experts only)
        self.resident_fast = policy.all_resident and expert_format != "nf4"
        self.slots = self.local = self.glob = None
        self.slots = SlotBuffers(self.layout, self.L, cache, bank, self.W, self.device)
        self.slots.attach(self.store)
        nf4 = self.slots.nf4
        self.local = [] if nf4 else [self.slots.tensors(l * cache, (l + 1) * cache) for l in range(self.L)]
        self.glob = [] if nf4 else self.slots.tensors(0, self.slots.rows)
        self.row_seq = np.zeros(self.slots.rows, dtype=np.int64)  # newest copy group into each row
        self.uploads = Uploads(self.device, self.E + max(self.W, 2 * bank) + 8)
        self.cache = CacheState(self.L, self.E, cache, policy.eviction, policy.prefetch,
                                forced.tokens if forced is not None else 0)
        if policy.all_resident or policy.eviction == STATIC:
            self.cache.preload(np.ones((self.L, self.E), dtype=bool) if policy.all_resident else resident)
            self._load_cached()
        self.n_pred = (min(fetch_budget, cache) if policy.prefetch == PREDICTED else
                       min(self.K, cache) if policy.prefetch == ORACLE else 0)

    def _store(self, fmt: str) -> HostExpertStore:
        """The host store of `fmt`: built from the model's experts the first time (which are then released), a
        later nf4 store from a 16-bit one (quantized on the device, expert by expert)."""
        if fmt in self.stores:
            return self.stores[fmt]
        lay0 = self.layout0
        if not self.stores:
            layout = make_layout(self.inner[0], self._fused, fmt)

            def release(m: nn.Module) -> None:  # the experts now live in the store: the model's copies go
                for name in layout.names:
                    del m._parameters[name]
                m._is_expert_parallel = True  # ids >= num_experts are skipped (the sentinel)
            store = HostExpertStore(self.inner, layout, self.device.type == "cuda", self.device, release)
            self.model.to(self.device)  # a model loaded on the host moves to the GPU without its experts
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            source = next((s for f, s in self.stores.items() if f != "nf4"), None)
            if fmt != "nf4" or source is None:
                raise UserError(f"expert format {fmt}: this model's experts are stored as "
                                f"{', '.join(self.stores)} already; a {fmt} store can only come from its own weights")
            layout = ExpertLayout(lay0.names, lay0.shapes, tuple(n in self._fused for n in lay0.names), lay0.dtype,
                                  "nf4")
            store = HostExpertStore.from_store(source, layout, self.device)
        self.stores[fmt] = store
        return store

    # ------------------------------------------------------------------------------------------
    # setup

    def _live_predictor(self, policy: Policy, popularity: np.ndarray | None, graphs: bool) -> LivePredictor:
        src, dev = policy.source, self.device
        if src == "router-reuse":
            spec = router_spec(self.model)
            run = router_reuse(self.routers, spec, self.d, self.fam.router_bias, self.fam.correction_bias)
            pred = LivePredictor(policy.name, self.m, run)
        elif src in ("popularity", "previous-token", "random"):
            pred = self._table_predictor(src, popularity)
        else:
            self.learned = self._learned(src, self.d, evict=False)
            pred = LivePredictor(policy.name, self.m, self.learned, reads_x=False, features=self.learned.features)
        # a random predictor draws from its own generator, which a CUDA graph cannot replay: it runs eagerly
        pred.use_graphs = graphs and dev.type == "cuda" and src != "random"
        return pred

    def _live_evictor(self, path: str, graphs: bool) -> LivePredictor:
        """evict:<checkpoint>: a next-tokens predictor run live at layer l (d = 0 rows), read as every expert's
        rank from least to most likely used in the next tokens (the order is all eviction reads; equal scores keep
        equal ranks). With routing forced from traces, the stream's scores are used and this runs for its cost."""
        self.evict_learned = self._learned(path, 0, evict=True)
        pred = LivePredictor(f"evict:{path}", self.E, self.evict_learned, reads_x=False,
                             features=self.evict_learned.features, reduce=eviction_ranks)
        pred.use_graphs = graphs and self.device.type == "cuda"
        return pred

    def _learned(self, path: str, lookahead: int, evict: bool) -> Any:
        """A checkpoint's predictor on this model's device and dtype (offload/prefetch.py `learned`): checked to fit
        the model, or with forced routing a random one of its kind for its time; the anchored kind gets the routers."""
        routers = torch.stack([r.weight.detach() for r in self.routers])
        return learned(path, self.L, self.E, self.K, self.H, lookahead, int(self.model.config.vocab_size), routers,
                       self.device, next(self.model.parameters()).dtype, check=self.forced is None, seed=self.seed,
                       evict=evict)

    def _table_predictor(self, src: str, popularity: np.ndarray | None) -> LivePredictor:
        if src != "random" and popularity is None and self.forced is None:
            raise UserError(f"policy prefetch:{src} needs expert frequencies: give static_from= (--static-from) "
                            "a trace set of this model")
        dev = self.device
        pop = torch.as_tensor(popularity if popularity is not None else np.zeros((self.L, self.E)),
                              dtype=torch.float32, device=dev)
        if src == "popularity":
            return LivePredictor("popularity", self.m, lambda l, x: pop[l + self.d].expand(x.shape[0], -1))
        if src == "random":
            gen = torch.Generator(device=dev).manual_seed(self.seed)
            return LivePredictor("random", self.m, lambda l, x: torch.rand(x.shape[0], self.E, generator=gen, device=dev))
        # previous-token: the previous token's routing at l+d (the history of LiveFeatures), popularity below it
        from models.features import FeatureSpec
        from offload.prefetch import LiveFeatures

        holder: dict[int, LiveFeatures] = {}

        class History:
            current: LiveFeatures | None = None

            def features(self, rows: int) -> LiveFeatures:
                if rows not in holder:
                    holder[rows] = LiveFeatures(FeatureSpec(history=True), self_.L, self_.E, self_.H, self_.d, rows,
                                                dev, torch.float32)
                self.current = holder[rows]
                return self.current
        self_ = self
        self.learned = History()

        def run(l: int, x: torch.Tensor) -> torch.Tensor:
            live = self.learned.current
            return live.hist_routing[l + self.d, :, 0] * (live.seen > 0).unsqueeze(-1) + 1e-3 * pop[l + self.d]
        return LivePredictor("previous-token", self.m, run, reads_x=False, features=self.learned.features)

    def _load_cached(self) -> None:
        """Copy every cached expert (static and all-resident caches) into its slot, before the first token."""
        pairs = []
        for l in range(self.L):
            for e in np.flatnonzero(self.cache.slot_of[l] >= 0):
                row = self.slots.cache_row(l, int(self.cache.slot_of[l, e]))
                pairs += list(zip(self.slots.dst(row), self.slots.src(l, int(e))))
        for i in range(0, len(pairs), 64):
            for dst, src in pairs[i:i + 64]:
                dst.copy_(src)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _install(self) -> None:
        from collection.families import decoder_layers

        fam, decoder = self.fam, decoder_layers(self.model)
        for l, (block, router) in enumerate(zip(self.blocks, self.routers)):
            setattr(block, fam.experts, OffloadedExperts(self, l))
            original = router.forward
            router._offload_original_forward = original
            router.forward = self._router_forward(l, original)
            block.register_forward_pre_hook(self._block_pre_hook(l, original))
            decoder[self.decoder_index[l]].register_forward_pre_hook(lambda *a, l=l: self._stamp(l, "start"))
        self.model.register_forward_pre_hook(self._begin_forward, with_kwargs=True)
        self.model.register_forward_hook(self._end_forward, with_kwargs=True)

    def _router_forward(self, l: int, original: Any) -> Any:
        def forward(x: torch.Tensor) -> Any:
            early = self.early[l]
            if early is not None and early[0] == x.data_ptr() and early[1] == x.numel():
                self.early[l] = None
                return early[2]
            return self.route(l, original, x)
        return forward

    def _block_pre_hook(self, l: int, original: Any) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            self.early[l] = (x.data_ptr(), x.numel(), self.route(l, original, x.reshape(-1, x.shape[-1])))
        return hook

    # ------------------------------------------------------------------------------------------
    # a forward

    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids, self.B, self.T, new_sequence = forward_shape(args, kwargs)
        self.N = self.B * self.T
        self.decode = self.T == 1
        self.phase = "prefill" if new_sequence else "decode"
        if self.forced is not None:
            self.row0 = self.forced.take(self.N)
        pads = None
        mask = kwargs.get("attention_mask")
        if new_sequence and self.live and mask is not None and tuple(mask.shape) == (self.B, self.T):
            pads = (mask == 0).sum(1)  # left padding (generate's, for decoder-only models)
        for live in self.live:
            live.features(self.B).begin(ids, new_sequence, pads)
        if new_sequence:  # the prompt's last token is not scored: a new sequence's first step evicts by LRU
            self.prev_ranks = [None] * self.L
        self.clock.begin(self.phase, self.N)

    def _end_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.clock.end()
        for live in self.live:
            live.features(self.B).end(self.T)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.24 / 5.17 names
        if cache is None and hasattr(output, "keys"):
            names = [k for k in ("cache", "past_key_values") if k in output.keys()]
            cache = output[names[0]] if names else None
        if cache is not None:
            self.kv_bytes = max(self.kv_bytes, cache_bytes(cache))
        if self.record_on and self.decode:
            self.log["stats"].append(self.cache.stats.copy())

    # ------------------------------------------------------------------------------------------
    # a layer

    def route(self, l: int, router_forward: Any, x: torch.Tensor) -> Any:
        """The router on x (N, H), its output forced when routing comes from traces, the predictor of layer l+d,
        and the host read of what the experts module will need."""
        out = router_forward(x)
        t0 = time.perf_counter_ns()
        logits, w, ids = out
        if self.forced is not None:
            rows = slice(self.row0, self.row0 + x.shape[0])
            ids, w = self.forced.ids[rows, l], self.forced.weights[rows, l].to(w.dtype)
            out = (logits, w, ids)
        if self.live:  # the live features' state: part of the predictor's cost
            tp = time.perf_counter_ns()
            for live in self.live:
                live.current.record(l, x, ids, w)
            tp = time.perf_counter_ns() - tp
            t0 += tp
            self.counters.predictor_host_ns += tp
        if self.resident_fast:
            self._stamp(l, "routed")
            return out
        evict = self.decode and self.evictor is not None
        if self.decode:
            pred = None
            if self.predictor is not None and l + self.d < self.L:
                pred, tp = self._timed_call(self.predictor, l, x)
                t0 += tp  # reported on its own
                if self.forced is not None:
                    pred = None  # forced routing: the stream's predictions are used; the work above is its cost
            # learned eviction: this step's misses evict by the previous token's ranks of layer l, read with the
            # router's choice (forced routing: the stream's scores are used)
            prev = None
            if evict and self.forced is None:
                prev = self.prev_ranks[l] if self.prev_ranks[l] is not None else self.no_ranks
            self.reader.stage(ids, *[t for t in (pred, prev) if t is not None])
        else:
            self.reader.stage(torch.bincount(ids.reshape(-1), minlength=self.E))
        self.markers[l] = self.copies.mark()
        self._stamp(l, "routed")
        if evict:  # this token's scorer, after the read and the copies' marker: it runs beside the copies
            self.prev_ranks[l], tp = self._timed_call(self.evictor, l, x)
            t0 += tp
        self.counters.host_ns += time.perf_counter_ns() - t0
        return out

    def _timed_call(self, live: LivePredictor, l: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """A live predictor's call at layer l, counted as the predictor's (timed events on a GPU, host ns); returns
        its output and its host ns."""
        tp = time.perf_counter_ns()
        ev = self._timed_start()
        out = live(l, x)
        self._timed_end(ev)
        tp = time.perf_counter_ns() - tp
        self.counters.predictor_host_ns += tp
        self.counters.predictor_calls += 1
        return out, tp

    def _stamp(self, l: int, tag: str) -> None:
        """A timestamp for measure_costs (a timed CUDA event on the compute stream; the host clock on a CPU)."""
        if self.profile is None or not self.decode:
            return
        if tag == "ready" and not self.resident_fast and self.profile and self.profile[-1][1] == "routed":
            self.latency_ns += time.perf_counter_ns() - self._t_read
            self.latency_n += 1
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.profile.append((l, tag, ev))
        else:
            self.profile.append((l, tag, time.perf_counter()))

    def _timed_start(self) -> Any:
        if not self.timing:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _timed_end(self, start: Any) -> None:
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.predictor_events.append((start, end))

    def experts(self, l: int, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.resident_fast:  # every expert in its slot, slot = expert id: the model's own computation
            if self.decode:
                self.counters.steps += 1
                self.cache.stats[HITS] += ids.numel()  # every (token, k) access is a hit
            self._stamp(l, "ready")
            self._stamp(l, "waited")
            out = self._call(l, hidden, ids, w, self.local[l] if self.local else None, self.E, None, sentinel=False)
            self._stamp(l, "done")
            return out
        host = self.reader.get()
        t0 = self._t_read = time.perf_counter_ns()
        self._inner_ns = 0
        if self.decode:
            out = self._decode_step(l, hidden, ids, w, host)
        else:
            out = self._prefill(l, hidden, ids, w, host[0])
        self.counters.host_ns += time.perf_counter_ns() - t0 - self._inner_ns
        self._stamp(l, "done")
        return out

    def _decode_step(self, l: int, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                     host: list[np.ndarray]) -> torch.Tensor:
        cache, slots = self.cache, self.slots
        self.counters.steps += 1
        flat = host[0]
        access = flat if self.N == 1 else _first_appearance(flat)
        pred, next_use, score = self._prediction(l, host), ZERO_USE, NO_SCORE
        if self.policy.eviction == BELADY:
            next_use = self._belady_next_use(l)
        elif self.policy.eviction == SCORE:
            score = self._eviction_score(l, host)
        n_dem, n_fetch, n_staged = cache.step(l, access, pred, self.n_pred, self.d, next_use, score)
        if self.record_on:
            self._log_step(l, access, pred, score)
        need = cache.need[:len(access)]
        base, base_t = l * self.C, (l + self.d) * self.C  # the layers' first cache rows (SlotBuffers.cache_row)
        fetch = [(e, base_t + s) for e, s in cache.fetch[:n_fetch].tolist()]
        if n_staged == 0 and not slots.nf4 and self.C > 1:  # the common case: one call on this layer's own slots
            self._issue(l, [(e, base + s) for e, s in cache.demand[:n_dem].tolist()], self.markers[l])
            self._issue(l + self.d, fetch, self.markers[l])
            self._stamp(l, "ready")
            self.copies.wait(int(self.row_seq[base + need].max()))  # the newest copy into any row it reads
            self._stamp(l, "waited")
            # every expert of the step is in a slot of this layer: its ids become slot numbers on the host (the host
            # copy of the same ids), one upload, no table and no gather on the GPU
            if flat.size <= self.uploads.width:
                rows = self.uploads.send(cache.slot_of[l, flat]).view(ids.shape)
            else:  # a batch wider than an upload row: the expert -> slot table, gathered on the device
                rows = self._remap(cache.slot_of[l], ids)
            return self._call(l, hidden, rows, w, self.local[l], self.C, None, sentinel=False)
        pairs = list(zip(access.tolist(), need.tolist()))
        cached = [(e, base + s) for e, s in pairs if s >= 0]
        staged = [e for e, s in pairs if s < 0]
        # demand copies into cache slots (the staged ones go with their bank)
        into_cache = [(e, base + s) for e, s in cache.demand[:n_dem].tolist() if s >= 0]
        return self._staged_calls(l, hidden, ids, w, cached, staged, into_cache, fetch)

    def _prediction(self, l: int, host: list[np.ndarray]) -> np.ndarray:
        if self.n_pred == 0 or l + self.d >= self.L:
            return EMPTY
        if self.forced is None:
            return host[1]
        if self.N != 1:
            raise UserError(f"policy {self.policy.name} with routing from traces runs at batch size 1")
        stream = self.forced.stream
        src = stream.ids if self.policy.prefetch == ORACLE else stream.predictions[self.policy.prefetch_key]
        return src[self.row0, l + self.d]

    def _eviction_score(self, l: int, host: list[np.ndarray]) -> np.ndarray:
        """(E,) this step's eviction score at layer l (higher: kept): the previous token's live ranks (`route`), or
        with forced routing the stream's scores of the previous row (the simulator's, from the same checkpoint on
        the traces; at a sequence's first row, all equal)."""
        if self.forced is None:
            self._rank[:] = host[-1]
            return self._rank
        if self.N != 1:
            raise UserError(f"policy {self.policy.name} with routing from traces runs at batch size 1")
        stream = self.forced.stream
        if self.row0 == 0 or stream.first[self.row0]:  # a sequence's first step: none (the simulator's rule)
            return np.zeros(self.E)
        return stream.scores[self.policy.evict_key][self.row0 - 1, l].astype(np.float64)

    def _belady_next_use(self, l: int) -> np.ndarray:
        if self.forced is None or self.N != 1:
            raise UserError("policy belady needs routing from traces (routing_from=) at batch size 1")
        return self.forced.next_use[self.row0, l]

    def _log_step(self, l: int, access: np.ndarray, pred: np.ndarray, score: np.ndarray) -> None:
        if l == 0:
            self.log["ids"].append(np.full((self.L, self.K), -1, dtype=np.int64))
            self.log["pred"].append(np.full((self.L, max(self.m, 1)), -1, dtype=np.int64))
            if len(score):
                self.log["score"].append(np.zeros((self.L, self.E)))
        if len(score):
            self.log["score"][-1][l] = score
        self.log["ids"][-1][l, :min(len(access), self.K)] = access[:self.K]
        if len(pred) and l + self.d < self.L:
            self.log["pred"][-1][l + self.d, :len(pred[:self.m])] = pred[:self.m]

    def _issue(self, layer: int, pairs: list[tuple[int, int]], after: Any) -> int:
        """Queue copies of (expert, row) of MoE layer `layer`; returns the group's number (0: nothing queued)."""
        if not pairs:
            return 0
        slots = self.slots
        seq = self.copies.copy([p for e, r in pairs for p in zip(slots.dst(r), slots.src(layer, e))], after)
        for _, r in pairs:
            self.row_seq[r] = seq
        return seq

    def _staged_calls(self, l: int, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                      cached: list[tuple[int, int]], staged: list[int], into_cache: list[tuple[int, int]],
                      fetch: list[tuple[int, int]]) -> torch.Tensor:
        """Cached rows plus experts streamed through the two staging banks, G per call, double-buffered."""
        slots, G = self.slots, self.G
        groups = [staged[i:i + G] for i in range(0, len(staged), G)]
        banks = [[(e, slots.staging_row((g % 2) * G + i)) for i, e in enumerate(grp)] for g, grp in enumerate(groups)]
        cap = self.W if slots.nf4 else 1 << 30
        calls: list[list[tuple[int, int]]] = []
        first = list(cached)
        while len(first) + (len(banks[0]) if banks else 0) > cap:
            calls.append(first[:cap])
            first = first[cap:]
        calls.append(first + (banks[0] if banks else []))
        calls += banks[1:]
        bank_call = len(calls) - len(banks)  # the call that computes bank 0
        after = self.markers[l]
        self._issue(l, into_cache + (banks[0] if banks else []), after)
        if len(banks) > 1:
            self._issue(l, banks[1], after)
        self._issue(l + self.d, fetch, after)
        N, K = ids.shape
        weights = w
        if len(calls) > 1:
            # each (token, k) pair as its own row with top-1 routing and weight 1: every call returns the pairs'
            # expert outputs (zero for pairs of other calls) in the model's dtype, exactly; the weighting and the sum
            # over k are done once below as transformers' grouped_mm and batched_mm do them (product in the weights'
            # dtype, fp32 for some routers, then one cast): the same result, bit for bit. Weighted inside each call,
            # a pair's fp32 product would be rounded to bf16 before the sum.
            hidden, ids, w = hidden.repeat_interleave(K, dim=0), ids.reshape(-1, 1), torch.ones_like(w).reshape(-1, 1)
        out = None
        for i, call in enumerate(calls):
            rows = [r for _, r in call]
            if i == 0:
                self._stamp(l, "ready")
            self.copies.wait(int(self.row_seq[rows].max()) if rows else 0)
            if i == 0:
                self._stamp(l, "waited")
            y = self._call_rows(l, hidden, ids, w, call)
            out = y if out is None else out + y  # exact: each pair is non-zero in one call only
            g = i - bank_call
            if 0 <= g and g + 2 < len(banks):  # bank g is free once this call has run: queue group g + 2 into it
                self._issue(l, banks[g + 2], self.copies.mark())
        if len(calls) == 1:
            return out
        return (out * weights.reshape(-1, 1)).view(N, K, -1).sum(dim=1).to(out.dtype)

    def _call_rows(self, l: int, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                   call: list[tuple[int, int]]) -> torch.Tensor:
        """One experts call over the rows of `call` [(expert, row)]; other experts map to the sentinel."""
        n = len(call)
        if self.slots.nf4:  # rows dequantized into work rows 0..n-1
            # never one expert: transformers' grouped_mm counts rows per expert with histc(bins=n, min=0, max=n-1),
            # which for n = 1 (min = max) takes its range from the data and counts the sentinels too
            view = max(n, 2)
            table = np.full(self.E, view, dtype=np.int64)
            table[[e for e, _ in call]] = np.arange(n)
            dev = self.uploads.send(np.concatenate([table, [r for _, r in call]]))
            ids, w = self._absent(torch.take(dev[:self.E], ids), w, view)
            return self._call(l, hidden, ids, w, None, view, (dev[self.E:], n))
        R = self.slots.rows
        table = np.full(self.E, R, dtype=np.int64)
        table[[e for e, _ in call]] = [r for _, r in call]
        ids, w = self._absent(self._remap(table, ids), w, R)
        return self._call(l, hidden, ids, w, self.glob, R, None)

    @property
    def impl(self) -> str:
        """The experts implementation the model runs now: read at every call, because generate() may switch it
        (transformers 5.24 decodes with batched_mm on a GPU where the model asks for grouped_mm)."""
        return getattr(self.model.config, "_experts_implementation", None) or "eager"

    def _absent(self, ids: torch.Tensor, w: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids of experts outside a call are the sentinel n, which grouped_mm skips (transformers 5.17 and 5.24).
        batched_mm and the eager loops do not skip it in every transformers 5.x (5.17's eager one-hot has no
        sentinel class, its batched_mm clamps without masking): for them an absent pair reads row 0 with weight 0,
        whose product is an exact zero (the rows hold finite weights)."""
        if self.impl == "grouped_mm":
            return ids, w
        absent = ids >= n
        return ids.masked_fill(absent, 0), w.masked_fill(absent, 0)

    def _remap(self, table: np.ndarray, ids: torch.Tensor) -> torch.Tensor:
        return torch.take(self.uploads.send(table), ids)  # (N, k) rows; take: fewer host steps than indexing

    def _call(self, l: int, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, tensors: list | None,
              n: int, dequantize: tuple[torch.Tensor, int] | None, sentinel: bool = True) -> torch.Tensor:
        """The model's experts implementation on `n` rows presented as its experts (sentinel: id n). sentinel=False:
        every id is a row (all-resident, or a decode step whose experts are all in this layer's slots), so the
        implementation is told that no id is absent and skips its sentinel masking (three to five small kernels
        per call in transformers 5.24)."""
        t0 = time.perf_counter_ns()
        inner = self.inner[l]
        if dequantize is not None:
            tensors = [t[:n] for t in self.slots.work]
            self.slots.dequantize(*dequantize)
        for name, t in zip(self.layout.names, tensors):
            inner.__dict__[name] = t
        inner.num_experts = n
        inner._is_expert_parallel = sentinel
        out = inner(hidden, ids, w)
        self._inner_ns += time.perf_counter_ns() - t0
        return out

    _inner_ns = 0

    def _prefill(self, l: int, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, counts: np.ndarray
                 ) -> torch.Tensor:
        """A prompt: the layer's needed experts, cached ones from their slots, the rest streamed through staging."""
        needed = np.flatnonzero(counts)
        slot = self.cache.slot_of[l, needed]
        cached = [(int(e), self.slots.cache_row(l, int(s))) for e, s in zip(needed, slot) if s >= 0]
        staged = [int(e) for e, s in zip(needed, slot) if s < 0]
        self.counters.prefill_hits += len(cached)
        self.counters.prefill_copies += len(staged)
        return self._staged_calls(l, hidden, ids, w, cached, staged, [], [])

    # ------------------------------------------------------------------------------------------
    # reports

    def describe(self) -> str:
        m = f"m={self.m}" + (f" (at most C = {self.C} fetched)" if 0 < self.C < self.m and self.n_pred else "")
        ahead = f", d={self.d}, {m}" if self.policy.prefetch != NO_PREFETCH else ""  # no prefetch: d and m unused
        return (f"{self.L} MoE layers x {self.E} experts (top-{self.K}), {self.C} cache slots per layer, policy "
                f"{self.policy.name}{ahead}, {self.layout.fmt} ({self.layout.nbytes:,} bytes/expert), "
                f"experts implementation {self.impl}")


def _first_appearance(flat: np.ndarray) -> np.ndarray:
    """The distinct experts of a batch's top-k ids (row-major), in order of first appearance."""
    _, first = np.unique(flat, return_index=True)
    return flat[np.sort(first)]


def cache_bytes(cache: Any) -> int:
    """Bytes of the tensors a transformers Cache holds: keys and values, or any other per-layer state."""
    total = 0
    for layer in getattr(cache, "layers", []) or []:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        tensors = [keys, values] if isinstance(keys, torch.Tensor) else list(vars(layer).values())
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total
