"""The offload engine (offload/) on a CPU: the same tokens and logits as the resident model, the simulator's
counts, and planted bugs caught. Models run in float32, so "the same" is within 1e-4 (bit for bit on the
decode path, which computes each layer in one call of the model's own experts kernel).

    pytest -q tests/test_engine.py
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from collection.families import FAMILIES, moe_layers
from common.errors import UserError
from offload import offload_experts
from offload.cache import COUNTED, cache_slots
from offload.store import make_layout, nf4_round_trip
from tests.conftest import run_script
from tests.test_families import tiny
from validation.prefetch.cost_model import CostModel, expert_bytes
from validation.prefetch.simulator import HITS, SPEC_WASTED, parse_policy, run_policy, static_experts

EMBEDDED = "models/embedded/qwen2moe-mini"
PROMPT = torch.tensor([[17, 233, 1009, 45, 7, 812]])
NEW = 8
# float32 on the CPU: the engine runs each expert on the rows routed to it, the resident model on other groupings,
# and a BLAS may block a matrix product of another row count differently, rounding its sums in another order
# (5e-6 to 1e-5 seen on one CPU, 0 on another). A wrong expert, weight or routing weight moves logits by 1e-2 or more.
ATOL = 1e-4


def embedded() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(EMBEDDED, dtype=torch.float32).eval()


def generate(model, ids=PROMPT, new=NEW, **kw):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits)


def assert_same_as_resident(ref, model, ids=PROMPT, new=NEW, **kw):
    """Tokens equal; each step's logits (the decode path) and a forward over the whole sequence (the prompt path)
    within ATOL."""
    want, want_logits = generate(ref, ids, new, **kw)
    got, got_logits = generate(model, ids, new, **kw)
    assert torch.equal(got, want), "greedy tokens differ from the resident model's"
    torch.testing.assert_close(got_logits, want_logits, atol=ATOL, rtol=0)
    with torch.no_grad():
        mask = kw.get("attention_mask")
        torch.testing.assert_close(model(want, attention_mask=None if mask is None else
                                         torch.cat([mask, torch.ones(mask.shape[0], new, dtype=mask.dtype)], 1)).logits,
                                   ref(want, attention_mask=None if mask is None else
                                       torch.cat([mask, torch.ones(mask.shape[0], new, dtype=mask.dtype)], 1)).logits,
                                   atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def anchored_checkpoint(tmp_path_factory, tiny_traces):
    """A random anchored predictor of the embedded default that reads every feature kind (past layers, own
    routing window, previous tokens' window, token id, context), its test split the tiny traces'."""
    return _checkpoint(tmp_path_factory, tiny_traces, "anchored", past_layers=1, own_layers=2, window=2,
                       token_vocab=8192, context=3)


@pytest.fixture(scope="module")
def hybrid_checkpoint(tmp_path_factory, tiny_traces):
    return _checkpoint(tmp_path_factory, tiny_traces, "hybrid")


@pytest.fixture(scope="module")
def hybrid_routing_only_checkpoint(tmp_path_factory, tiny_traces):
    """The hybrid's history part alone, over 2 finished layers and 3 previous tokens; no hidden size."""
    return _checkpoint(tmp_path_factory, tiny_traces, "hybrid", input_dim=0, routing_only=True, own_layers=2, window=3)


@pytest.fixture(scope="module")
def window_checkpoint(tmp_path_factory, tiny_traces):
    """A random next-tokens predictor (lookahead_tokens 4, d = 0 rows) for evict:<checkpoint>: the hybrid, which
    reads h_l, this token's routing at layer l - 1 and the previous token's at layer l itself."""
    return _checkpoint(tmp_path_factory, tiny_traces, "hybrid", lookahead=0, lookahead_tokens=4)


@pytest.fixture(scope="module")
def window_routing_checkpoint(tmp_path_factory, tiny_traces):
    """The same from routing alone (the routing-only hybrid) over this token's last 2 finished layers (l - 1 and
    l - 2 at d = 0) and the 2 previous tokens at layer l: the d = 0 rows' windows."""
    return _checkpoint(tmp_path_factory, tiny_traces, "hybrid", input_dim=0, routing_only=True, lookahead=0,
                       lookahead_tokens=4, own_layers=2, window=2)


def _checkpoint(tmp_path_factory, traces, kind, input_dim=128, lookahead=1, **extra):
    from collection.traces.format import TraceSet
    from collection.traces.rows import split_sequences
    from models.checkpoint import save_checkpoint
    from models.predictors import PredictorConfig, build_predictor

    cfg = PredictorConfig(kind=kind, input_dim=input_dim, num_experts=60, top_k=4, num_layers=8, lookahead=lookahead,
                          hidden_dim=32, **extra)
    torch.manual_seed(3)
    model = build_predictor(cfg)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised heads would make the features irrelevant
            p.normal_(0, 0.1)
    split = split_sequences(TraceSet(traces).sequence_table(), 0)
    path = tmp_path_factory.mktemp(kind) / "best_checkpoint.pth"
    save_checkpoint(path, model, cfg, split, {}, {}, {})
    return str(path)


def some_static_set(L=8, E=60, C=10, seed=0):
    rng = np.random.default_rng(seed)
    out = np.zeros((L, E), dtype=bool)
    for l in range(L):
        out[l, rng.choice(E, C, replace=False)] = True
    return out


# ----------------------------------------------------------------------------------------------
# the same output as the resident model

POLICY_RUNS = [  # (policy, C, extra)
    ("on-demand", 15, {}), ("on-demand", 0, {}), ("on-demand", 3, {}), ("lfu", 4, {}),
    ("static-popular", 10, {"static_experts": some_static_set()}), ("all-resident", None, {}),
    ("prefetch:router-reuse", 15, {}), ("prefetch:router-reuse", 4, {"lookahead": 2, "fetch_budget": 3}),
    ("prefetch:random", 6, {}),
]


@pytest.mark.parametrize("policy,cache,extra", POLICY_RUNS, ids=[f"{p}-C{c}" for p, c, _ in POLICY_RUNS])
def test_every_policy_generates_the_resident_models_tokens(policy, cache, extra):
    ref, model = embedded(), embedded()
    offload_experts(model, cache_experts=cache, policy=policy, **extra)
    assert_same_as_resident(ref, model)


def test_learned_eviction_runs_live_and_changes_nothing(window_checkpoint):
    """evict:<checkpoint> on the model's own routing: the resident model's tokens and logits, and its scores, not
    recency, choose what leaves (the same prompt under LRU copies other experts)."""
    ref, model = embedded(), embedded()
    h = offload_experts(model, cache_experts=6, policy=f"evict:{window_checkpoint}")
    assert_same_as_resident(ref, model)
    lru = embedded()
    g = offload_experts(lru, cache_experts=6, policy="on-demand")
    assert_same_as_resident(ref, lru)
    assert h.engine.cache.stats[HITS] != g.engine.cache.stats[HITS]
    # a batch of two with padding: each row's features, their scores merged per expert (its highest probability)
    ref, model = embedded(), embedded()
    offload_experts(model, cache_experts=6, policy=f"evict:{window_checkpoint}")
    ids = torch.tensor([[0, 0, 17, 233, 1009, 45], [8, 9, 10, 11, 12, 13]])
    assert_same_as_resident(ref, model, ids, attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]))


@pytest.mark.parametrize("kind", ["anchored", "hybrid"])
def test_learned_predictors_run_live_and_change_nothing(kind, anchored_checkpoint, hybrid_checkpoint):
    ref, model = embedded(), embedded()
    ckpt = anchored_checkpoint if kind == "anchored" else hybrid_checkpoint
    h = offload_experts(model, cache_experts=8, policy=f"prefetch:{ckpt}")
    assert_same_as_resident(ref, model)
    assert h.stats()["speculative"] > 0


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@pytest.mark.parametrize("policy,cache", [("on-demand", 1), ("on-demand", 0), ("prefetch:router-reuse", 2)])
def test_every_family_generates_the_resident_models_tokens(model_type, policy, cache):
    ref, model = tiny(model_type), tiny(model_type)
    h = offload_experts(model, cache_experts=cache, policy=policy)
    assert_same_as_resident(ref, model, torch.tensor([[5, 90, 700, 3]]), new=5)
    assert h.stats()["demand"] > 0


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("model_type", ["deepseek_v2", "qwen2_moe"])
def test_a_streamed_bf16_prompt_is_the_resident_models_bit_for_bit(model_type, impl):
    """C = 1: a prompt's experts stream through the staging banks in several calls. DeepSeek-V2's router weights are
    fp32 while its hidden states are bf16: weighted inside each call, a pair's fp32 product would be rounded to bf16
    before the sum over k (one bf16 step off the resident model, as a GPU run found); the engine weights and sums
    once, as the implementation does. Qwen's weights are in the hidden states' dtype."""
    ids = torch.tensor([[5, 90, 700, 3, 17, 44]])
    ref, model = tiny(model_type).to(torch.bfloat16), tiny(model_type).to(torch.bfloat16)
    for m in (ref, model):
        m.config._experts_implementation = impl
    h = offload_experts(model, cache_experts=1, policy="on-demand")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert h.engine.counters.prefill_copies > 0


def test_an_implementation_switched_after_conversion_never_sees_the_sentinel():
    """generate() may switch the experts implementation (transformers 5.24 decodes with batched_mm on a GPU where
    the model asks for grouped_mm): the engine reads the implementation at every call, so one that cannot skip the
    sentinel id (here a strict one, as 5.17's batched_mm clamps without masking) gets row 0 with weight 0 instead,
    and the tokens stay the resident model's. C = 0: every call holds sentinel ids."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, batched_mm_experts_forward

    def strict(self, hidden, ids, w):
        assert not bool((ids >= self.num_experts).any()), "a sentinel id reached an implementation that cannot skip it"
        return batched_mm_experts_forward(self, hidden, ids, w)
    ALL_EXPERTS_FUNCTIONS.register("strict_mm", strict)
    ref, model = embedded(), embedded()
    model.config._experts_implementation = "grouped_mm"
    h = offload_experts(model, cache_experts=0, policy="on-demand")
    model.config._experts_implementation = ref.config._experts_implementation = "strict_mm"
    assert h.engine.impl == "strict_mm"
    assert_same_as_resident(ref, model, new=4)


def test_a_batch_of_two_with_padding_uses_the_union_of_its_experts():
    ref, model = embedded(), embedded()
    h = offload_experts(model, cache_experts=6, policy="prefetch:router-reuse", record=True)
    ids = torch.tensor([[0, 0, 17, 233, 1009, 45], [8, 9, 10, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert_same_as_resident(ref, model, ids, attention_mask=mask)
    s = h.stats()
    assert s["decode_tokens"] == 2 * (NEW - 1)  # generate's first forward is the prompt
    # a step's access is the union: more than one row's top-k, never more than both rows' (2 x 4)
    assert 4 * (NEW - 1) * 8 < s["hits"] + s["demand"] <= 8 * (NEW - 1) * 8


def test_a_batch_wider_than_an_upload_row_remaps_on_the_device():
    """The common decode step sends its ids as slot numbers in one upload row (E + 2G + 8 values: 76 here); a batch
    of 20 x top-4 = 80 ids is wider, and its step takes the expert -> slot table instead. C = E: every step is
    the common one."""
    ref, model = embedded(), embedded()
    h = offload_experts(model, cache_experts=60, policy="on-demand")
    assert h.engine.uploads.width < 20 * 4
    ids = torch.randint(1, 8000, (20, 3), generator=torch.Generator().manual_seed(1))
    assert_same_as_resident(ref, model, ids, new=3)
    assert h.stats()["demand"] > 0


def test_a_long_prompt_streams_through_both_staging_banks():
    ref, model = embedded(), embedded()
    h = offload_experts(model, cache_experts=3, staging_experts=2, policy="on-demand")
    ids = torch.randint(1, 8000, (1, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=ATOL, rtol=0)
    s = h.stats()
    assert s["prefill_tokens"] == 150 and s["prefill_copies"] > 8 * 2 * 2  # more than two banks a layer
    assert s["demand"] == 0  # a prompt leaves the cache as it was


# ----------------------------------------------------------------------------------------------
# the simulator's counts, for forced routing

FORCED_POLICIES = ["on-demand", "lfu", "static-popular", "oracle", "belady", "all-resident", "prefetch:router-reuse",
                   "prefetch:previous-token", "prefetch:popularity", "anchored", "hybrid", "lfu+prefetch:router-reuse",
                   "evict"]
FORCED_T = 40


def decode_steps(model, steps: int) -> list[int]:
    """`steps` forwards of one token each (the first at position 0): every step through the cache. The tokens are
    on the model's device (the GPU tests share this helper)."""
    dev = next(model.parameters()).device
    cache, tok, out = DynamicCache(), torch.tensor([[1]], device=dev), []
    with torch.no_grad():
        for _ in range(steps):
            tok = model(input_ids=tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            out.append(int(tok))
    return out


def assert_counts_equal(h, sim: np.ndarray) -> None:
    """The engine's recorded counts (cumulative per decode step) equal the simulator's per-step statistics `sim`
    in every column the engine counts, step by step (the GPU tests share this helper)."""
    got = np.diff(np.concatenate([np.zeros((1, sim.shape[1])), h.recorded()["stats"]]), axis=0)
    got[-1, SPEC_WASTED] += h.engine.cache.pending_count()  # the simulator counts unused prefetches at the end
    for col in COUNTED:
        assert np.array_equal(got[:, col], sim[:, col]), f"column {col} differs"


class ForcedResident:
    """The resident model with the same forced routing (router outputs replaced by the stream's rows)."""

    def __init__(self, model, ids: np.ndarray, weights: np.ndarray):
        self.ids, self.w, self.pos, self.start = torch.from_numpy(ids), torch.from_numpy(weights), 0, 0
        model.register_forward_pre_hook(self.begin, with_kwargs=True)
        for l, m in enumerate(moe_layers(model)):
            m.router.register_forward_hook(lambda mod, a, o, l=l: (
                o[0], self.w[self.start:self.pos, l].to(o[1].device, o[1].dtype), self.ids[self.start:self.pos, l].to(o[2].device)))

    def begin(self, module, args, kwargs):
        self.start = self.pos
        self.pos += kwargs["input_ids"].numel()


@pytest.mark.parametrize("policy", FORCED_POLICIES)
def test_counts_equal_the_simulators_for_forced_routing(policy, tiny_traces, anchored_checkpoint, hybrid_checkpoint,
                                                        window_checkpoint):
    """C = 15 of 60 on the embedded default, routing forced from its traces' test split: the engine's hits,
    demand copies, staged experts, speculative copies (used, wasted) equal the simulator kernel's, token by
    token, and its tokens equal the resident model's under the same forced routing."""
    name = {"anchored": f"prefetch:{anchored_checkpoint}", "hybrid": f"prefetch:{hybrid_checkpoint}",
            "evict": f"evict:{window_checkpoint}"}.get(policy, policy)
    model = embedded()
    h = offload_experts(model, cache_experts=None if policy == "all-resident" else 15, policy=name,
                        routing_from=tiny_traces, routing_tokens=FORCED_T, record=True)
    e = h.engine
    stream = e.forced.stream
    assert stream.tokens == FORCED_T
    if policy == "evict":  # a trace sequence starts mid-run: its first step evicts by no score, here as there
        stream.first[FORCED_T // 2] = True
    tokens = decode_steps(model, FORCED_T)
    ref = embedded()
    ForcedResident(ref, stream.ids, stream.weights)
    assert tokens == decode_steps(ref, FORCED_T)

    pol = parse_policy(name)
    resident = None
    if pol.name == "static-popular":
        from collection.traces.format import TraceSet
        from collection.traces.rows import split_sequences

        ts = TraceSet(tiny_traces)
        resident = static_experts(ts, split_sequences(ts.sequence_table(), 0)["train"], 15)
    sim, _ = run_policy(pol, 15, stream, CostModel(e.layout.nbytes, 1e9), 1, 4, 60, resident=resident)
    assert_counts_equal(h, sim)
    if pol.prefetch:
        assert sim[:, 3].sum() > 0  # the policy did prefetch
    if policy == "evict":  # the scores decided: LRU on the same stream counts otherwise
        lru, _ = run_policy(parse_policy("on-demand"), 15, stream, CostModel(e.layout.nbytes, 1e9), 1, 4, 60)
        assert not np.array_equal(lru[:, HITS], sim[:, HITS])


# ----------------------------------------------------------------------------------------------
# planted bugs

@pytest.mark.parametrize("policy,forced", [("on-demand", False), ("prefetch:router-reuse", False), ("oracle", True),
                                           ("static-popular", True)])
def test_copies_that_run_only_when_waited_for_change_nothing(policy, forced, tiny_traces):
    """DelayedCopies: a copy runs only when the compute side waits for it, so a missed wait computes with a stale
    slot (oracle: every expert arrives by prefetch)."""
    model = embedded()
    kw = {"routing_from": tiny_traces, "routing_tokens": 24} if forced else {}
    h = offload_experts(model, cache_experts=6, policy=policy, delayed_copies=True, **kw)
    if forced:
        ref = embedded()
        ForcedResident(ref, h.engine.forced.stream.ids, h.engine.forced.stream.weights)
        assert decode_steps(model, 24) == decode_steps(ref, 24)
    else:
        assert_same_as_resident(embedded(), model)
    assert h.engine.copies.waits > 0


def test_a_failing_copy_raises_at_once():
    model = embedded()
    h = offload_experts(model, cache_experts=4)
    for e in range(60):  # layer 0's host blobs broken: the first copy fails
        h.engine.slots._src[0][e] = [torch.zeros(3)] * len(h.engine.layout.names)
    with pytest.raises(RuntimeError), torch.no_grad():
        model(torch.tensor([[5]]))


# ----------------------------------------------------------------------------------------------
# NF4 and the store

def test_nf4_blob_is_the_cost_models_bytes_and_dequantizes_as_bitsandbytes():
    import bitsandbytes.functional as bnbf

    from offload.slots import SlotBuffers
    from offload.store import HostExpertStore, nf4_quantize

    model = embedded()
    m = moe_layers(model)[0].experts
    want = [torch.cat([m.gate_up_proj[e].reshape(-1), m.down_proj[e].reshape(-1)]) for e in range(60)]
    layout = make_layout(m, ("gate_up_proj", "down_proj"), "nf4")
    assert layout.nbytes == expert_bytes(3 * 128 * 48, "nf4") == 9516
    store = HostExpertStore([m], layout, pin=False, work_device=torch.device("cpu"))
    slots = SlotBuffers(layout, 1, 4, 2, 4, torch.device("cpu"))
    slots.attach(store)
    for row, e in enumerate([7, 0, 59, 31]):
        slots.dst(row)[0].copy_(slots.src(0, e)[0])
    gate_up, down = slots.dequantize(torch.tensor([2, 0, 3]), 3)
    for i, e in enumerate([59, 7, 31]):
        packed, state = nf4_quantize(want[e])
        ref = bnbf.dequantize_4bit(packed, state).reshape(-1)
        assert torch.equal(torch.cat([gate_up[i].reshape(-1), down[i].reshape(-1)]), ref)


def test_nf4_engine_equals_the_per_expert_nf4_resident_model():
    ref, model = embedded(), embedded()
    nf4_round_trip(ref)
    offload_experts(model, cache_experts=6, policy="prefetch:router-reuse", expert_format="nf4", nf4_on_cpu=True)
    assert_same_as_resident(ref, model)


def test_cache_gib_gives_slots_per_layer_by_hand():
    # 8 layers x 73,728 bytes (fp32 embedded expert) = 589,824 bytes per slot across layers
    per = 8 * 73728 / 2**30
    assert cache_slots(8, 60, 73728, None, 15 * per) == 15
    assert cache_slots(8, 60, 73728, None, 15.99 * per) == 15
    assert cache_slots(8, 60, 73728, 0, None) == 0
    with pytest.raises(UserError, match="one slot per layer"):
        cache_slots(8, 60, 73728, None, 0.9 * per)
    with pytest.raises(UserError, match="more than the 60 experts"):
        cache_slots(8, 60, 73728, None, 61 * per)
    with pytest.raises(UserError, match="0..60"):
        cache_slots(8, 60, 73728, 61, None)


# ----------------------------------------------------------------------------------------------
# live features = the training features

@pytest.mark.parametrize("kind", ["anchored", "hybrid", "hybrid-routing-only", "window", "window-routing"])
def test_live_predictions_equal_the_predictor_on_the_same_rows(kind, request):
    """What the engine predicts at decode time from its live state equals what the project's scorer predicts from
    a TokenBlock of the same tokens (models/features.make_features): no feature is assembled differently (the
    routing-only hybrid: from routing alone, its checkpoint of no hidden size run on this model's; the next-tokens
    predictor of evict:<checkpoint>: its d = 0 rows, each expert's rank in the scores)."""
    from collection.traces.rows import TokenBlock
    from models.checkpoint import load_checkpoint
    from validation.coverage.scorers import predictor_scorer

    ckpt = request.getfixturevalue(f"{kind.replace('-', '_')}_checkpoint")
    model = embedded()
    window = kind.startswith("window")
    policy = f"evict:{ckpt}" if window else f"prefetch:{ckpt}"
    h = offload_experts(model, cache_experts=12 if window else 60, policy=policy, fetch_budget=4, record=True)
    seen = {l: [] for l in range(8)}
    for l, m in enumerate(moe_layers(model)):
        getattr(m.block, "experts").register_forward_pre_hook(lambda mod, a, l=l: seen[l].append(a))
    T = 12
    tokens = [1]
    cache, tok = DynamicCache(), torch.tensor([[1]])
    with torch.no_grad():
        for _ in range(T):
            tok = model(input_ids=tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            tokens.append(int(tok))
    block = TokenBlock(hidden=torch.stack([torch.cat([a[0] for a in seen[l]]) for l in range(8)]),
                       topk_ids=torch.stack([torch.cat([a[1] for a in seen[l]]) for l in range(8)]),
                       topk_weights=torch.stack([torch.cat([a[2] for a in seen[l]]) for l in range(8)]).float(),
                       prev=torch.arange(T) - 1, source=torch.zeros(T, dtype=torch.long),
                       hidden_slot=torch.arange(8), token_ids=torch.tensor(tokens[:T]))
    predictor, _, _ = load_checkpoint(ckpt)
    if hasattr(predictor, "set_router"):
        predictor.set_router(torch.stack([m.router.weight.detach() for m in moe_layers(model)]))
    if window:
        score = predictor_scorer(predictor, 0, 60)
        live = h.recorded()["score"]  # (T, L, E) the ranks step t evicted by at layer l: row (t-1, l)'s, none at t0
        assert not live[0].any()
        for l in range(8):
            v = score(block, torch.arange(T), torch.full((T,), l))
            want = torch.searchsorted(v.sort(dim=1).values, v)
            assert np.array_equal(live[1:, l], want[:-1].numpy()), f"layer {l}"
        return
    score = predictor_scorer(predictor, 1, 60)
    live = h.recorded()["pred"]  # (T, L, m) by target layer
    for l in range(7):
        want = score(block, torch.arange(T), torch.full((T,), l)).topk(4, dim=1).indices
        assert torch.equal(torch.from_numpy(live[:, l + 1]), want), f"input layer {l}"


def test_the_eviction_scorer_runs_after_the_copies_marker(window_checkpoint):
    """Learned eviction's scorer is queued after the router's read and after the marker its layer's copies wait
    behind: the copies never wait for the scorer's kernels (on a GPU a marker is an event recorded on the compute
    stream, and a copy group starts only once everything queued before it has run)."""
    model = embedded()
    h = offload_experts(model, cache_experts=6, policy=f"evict:{window_checkpoint}")
    e, order = h.engine, []
    mark, score = e.copies.mark, e.evictor.__call__
    e.copies.mark = lambda: order.append("mark") or mark()
    e.evictor = type("Logged", (), {"__call__": lambda self, l, x: order.append("score") or score(l, x)})()
    decode_steps(model, 2)
    assert order == ["mark", "score"] * 16  # two decode steps of 8 layers


def test_the_benchs_replay_of_a_recorded_learned_eviction_gives_the_engines_counts(window_checkpoint):
    """The bench predicts a row from the stream the engine recorded: for learned eviction on the model's own
    routing, the simulator's replay of it hits, fetches and evicts exactly as the engine did, step by step (the
    recorded ranks are what each step evicted by, the previous token's; replayed one row off, the counts differ)."""
    from tools.bench_offload import recorded_stream

    model = embedded()
    pol = parse_policy(f"evict:{window_checkpoint}")
    h = offload_experts(model, cache_experts=6, policy=pol.name, record=True)
    generate(model, new=12)
    e = h.engine
    sim, _ = run_policy(pol, e.C, recorded_stream(e, pol, h.recorded(), 0), CostModel(e.layout.nbytes, 1e9), e.d,
                        e.m, e.E)
    assert_counts_equal(h, sim)


def test_a_new_sequence_evicts_by_no_ranks_of_the_last_one(window_checkpoint):
    """Learned eviction reads the previous token's ranks: a new sequence's first step has none (all equal: LRU
    decides), never the last sequence's final ones; its second step has its own first token's."""
    model = embedded()
    h = offload_experts(model, cache_experts=6, policy=f"evict:{window_checkpoint}", record=True)
    decode_steps(model, 3)
    decode_steps(model, 3)
    used = h.recorded()["score"]  # (6, L, E): two sequences of three steps
    assert [bool(used[t].any()) for t in range(6)] == [False, True, True, False, True, True]


@pytest.mark.parametrize("padded", [False, True])
def test_live_eviction_ranks_equal_the_predictor_after_a_prompt_and_merge_a_batch_by_its_highest(
        window_routing_checkpoint, padded):
    """evict:<checkpoint> after a 6-token prompt, two rows: each decode step evicts by the previous step's ranks at
    every layer (none at the first: the prompt's last token is not scored), those of the two rows' scores
    (make_features' d = 0 rows over each row's own tokens, the prompt's included) merged by their maximum: the
    prompt's history is read as the decode's, and a batch keeps what any row needs soon. Padded: one
    row whose prompt is one token after 5 of left padding, which are no earlier tokens of it (its window of 2
    previous tokens reaches them at the first steps)."""
    from collection.traces.rows import TokenBlock
    from models.checkpoint import load_checkpoint
    from validation.coverage.scorers import predictor_scorer

    model = embedded()
    h = offload_experts(model, cache_experts=12, policy=f"evict:{window_routing_checkpoint}", record=True)
    seen = {l: [] for l in range(8)}
    for l, m in enumerate(moe_layers(model)):
        m.block.experts.register_forward_pre_hook(lambda mod, a, l=l: seen[l].append(a))
    prompts = torch.tensor([[0, 0, 0, 0, 0, 812]] if padded else [[17, 233, 1009, 45, 7, 812], [8, 9, 10, 11, 12, 13]])
    mask = (prompts > 0).long() if padded else torch.ones_like(prompts)
    B, P = prompts.shape
    toks, cache, tok = [prompts], DynamicCache(), prompts
    with torch.no_grad():
        for _ in range(6):
            tok = model(input_ids=tok, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            toks.append(tok)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
    tokens = torch.cat(toks, 1)

    def rows_of(l, b, i, pad):  # sequence b's rows of the experts module's argument i at layer l, pads left out
        return torch.cat([a[i].view(B, a[i].shape[0] // B, *a[i].shape[1:])[b] for a in seen[l]])[pad:]
    score = predictor_scorer(load_checkpoint(window_routing_checkpoint)[0], 0, 60)
    per_row = []
    for b in range(B):
        pad = 5 if padded and b == 0 else 0
        T = tokens.shape[1] - 1 - pad  # the row's real tokens the model computed
        block = TokenBlock(hidden=torch.stack([rows_of(l, b, 0, pad) for l in range(8)]),
                           topk_ids=torch.stack([rows_of(l, b, 1, pad) for l in range(8)]),
                           topk_weights=torch.stack([rows_of(l, b, 2, pad) for l in range(8)]).float(),
                           prev=torch.arange(T) - 1, source=torch.zeros(T, dtype=torch.long),
                           hidden_slot=torch.arange(8), token_ids=tokens[b, pad:pad + T])
        steps = torch.arange(P - pad, T)  # the decode steps
        per_row.append(torch.stack([score(block, steps, torch.full((len(steps),), l)) for l in range(8)], 1))
    merged = torch.stack(per_row).amax(0)
    live = h.engine.evict_learned.current  # each row's earlier tokens: its real ones only
    assert live.seen.tolist() == [tokens.shape[1] - 1 - (5 if padded and b == 0 else 0) for b in range(B)]
    want = torch.searchsorted(merged.sort(dim=-1).values, merged)
    used = h.recorded()["score"]
    assert len(used) == len(want) and not used[0].any()
    assert np.array_equal(used[1:], want[:-1].numpy())


@pytest.mark.parametrize("policy,cache", [("all-resident", None), ("on-demand", 15)])
def test_a_decode_step_on_its_own_slots_runs_no_sentinel_masking(policy, cache):
    """Where every id of a step is a row (all-resident, or every expert of the step in this layer's slots), the
    experts implementation is told that none is absent: transformers' expert-parallel masking (a compare, a
    clamp, masked fills: seven small kernels per call in grouped_mm, three in batched_mm) would run for nothing in
    every layer of every token."""
    from torch.profiler import ProfilerActivity, profile

    model = embedded()
    offload_experts(model, cache_experts=cache, policy=policy)
    kv, tok = DynamicCache(), torch.tensor([[17, 233]])
    with torch.no_grad():
        tok = model(input_ids=tok, cache=kv, use_cache=True).logits[:, -1:].argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(input_ids=tok, cache=kv, use_cache=True)
    masking = [e.name for e in prof.events() if e.name in ("aten::masked_fill", "aten::masked_fill_", "aten::clamp_")]
    assert masking == []


def test_the_eviction_scorer_is_timed_as_the_predictor(window_checkpoint):
    """measure_costs' predictor time (the bench's predictor target) covers learned eviction's scorer, not only a
    prefetch predictor; a policy with neither has none."""
    from offload.costs import measure_predictor_us

    assert measure_predictor_us(offload_experts(embedded(), cache_experts=6, policy=f"evict:{window_checkpoint}"),
                                n=5) > 0
    assert measure_predictor_us(offload_experts(embedded(), cache_experts=6, policy="on-demand"), n=5) is None


def test_the_engines_cache_refuses_a_score_eviction_joined_to_a_prefetch():
    """Its prefetch victims would need the target layer's scores, which a step does not carry: refused where the
    tables are made, not only by the policy check in front of it."""
    from offload.cache import CacheState
    from validation.prefetch.simulator import PREDICTED, SCORE

    with pytest.raises(ValueError, match="not implemented"):
        CacheState(8, 60, 15, SCORE, PREDICTED)


# ----------------------------------------------------------------------------------------------
# bad input: one line

def test_bad_inputs_of_the_library_are_one_line(tiny_traces, tmp_path, monkeypatch):
    from transformers import LlamaConfig

    dense = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    cases = [
        (lambda: offload_experts(dense, cache_experts=1), "not a supported MoE family; supported: qwen2_moe"),
        (lambda: offload_experts(embedded(), cache_experts=61), "0..60"),
        (lambda: offload_experts(embedded(), cache_gib=1e-4), "cannot hold one slot per layer"),
        (lambda: offload_experts(embedded(), cache_experts=4, expert_format="nf4"), "needs a CUDA GPU"),
        (lambda: offload_experts(tiny("qwen2_moe"), cache_experts=4, routing_from=tiny_traces),
         "traces of another shape"),
        (lambda: offload_experts(embedded(), cache_experts=4, policy="oracle"), "--routing-from TRACES only"),
        (lambda: offload_experts(embedded(), cache_experts=4, expert_format="bf16"), "load the model in bf16"),
        (lambda: offload_experts(embedded(), cache_gib=float("nan")), "--cache-gib nan: must be a number in (0"),
        (lambda: offload_experts(embedded(), cache_gib=float("inf")), "--cache-gib inf: must be a number in (0"),
        (lambda: offload_experts(embedded(), cache_experts=4, staging_experts=0), "--staging-experts 0: experts "
         "per staging bank, within 1..60"),
        (lambda: offload_experts(embedded(), cache_experts=4, staging_experts=61), "within 1..60"),
        (lambda: offload_experts(embedded(), cache_experts=4, policy="bogus"),  # the engine's list, not the simulator's
         "unknown policy 'bogus'; the engine runs on-demand"),
        (lambda: offload_experts(embedded(), cache_experts=4, policy=f"prefetch:{empty}"),
         f"policy prefetch:{empty}: not a loadable checkpoint"),  # named as the user named it, not as a flag
    ]
    for fn, message in cases:
        with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(")):
            fn()
    monkeypatch.setattr("offload.store.available_host_bytes", lambda: 1 << 29)
    with pytest.raises(UserError, match=r"need 0\.03 GiB of pinned host memory"):
        offload_experts(embedded(), cache_experts=4)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    from models.checkpoint import save_checkpoint
    from models.predictors import PredictorConfig, build_predictor

    cfg = PredictorConfig(kind="layer-aware", input_dim=128, num_experts=60, top_k=4, num_layers=3, lookahead=1)
    path = tmp_path / "other.pth"
    save_checkpoint(path, build_predictor(cfg), cfg, {"test": np.arange(3)}, {}, {}, {})
    with pytest.raises(UserError, match="predicts for 3 layers x 60 experts, top-4, hidden 128; this model is 8 "
                                        "layers x 60 experts"):
        offload_experts(embedded(), cache_experts=4, policy=f"prefetch:{path}")


@pytest.mark.parametrize("argv,message", [
    (["--cache-experts", "61"], "0..60"),
    (["--cache-gib", "0.00001"], "cannot hold one slot per layer"),
    (["--expert-format", "nf4"], "needs a CUDA GPU"),
    (["--model", "Qwen/Qwen1.5-MoE-A2.7B"], "needs the Hugging Face hub"),
    (["--policy", "belady"], "--routing-from TRACES only"),
    (["--policy", "lfru"], "policy lfru evicts by a rule the engine does not have"),
    (["--prompt", ""], "an empty prompt"),
    (["--prompts-file", "BINARY"], "not UTF-8 text"),
    (["--prompts-file", "EMPTY"], "holds no prompt"),
    (["--prompts-file", "TMP"], "a directory, not a text file of prompts"),
    (["--seed", "-1"], "--seed -1: must be in 0.."),
    (["--json", "FILE/out.json"], "--json"),
])
def test_the_script_answers_bad_input_in_one_line(argv, message, tmp_path):
    (tmp_path / "b").write_bytes(bytes(range(128, 256)))
    (tmp_path / "e").write_text("\n  \n")
    (tmp_path / "f").write_text("a file\n")
    paths = {"BINARY": tmp_path / "b", "EMPTY": tmp_path / "e", "TMP": tmp_path, "FILE/out.json": tmp_path / "f/o.json"}
    argv = [str(paths.get(a, a)) for a in argv]
    proc = run_script("generate_offloaded", "--device", "cpu", "--expert-format", "fp32", *argv, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("generate_offloaded: error: ") and message in lines[-1]
    assert "Traceback" not in proc.stderr
    if "--cache" not in argv[0] and argv[1] != "belady":  # what needs no model is refused before it loads
        assert "Loading weights" not in proc.stderr


def test_the_script_refuses_a_run_longer_than_its_forced_routing_before_generating(tiny_traces):
    """Every forward takes B x T rows of the forced stream: a run that may need more than the test split holds is
    refused before the first token, in one line with both counts (it used to fail when the stream ran out)."""
    proc = run_script("generate_offloaded", "--device", "cpu", "--expert-format", "fp32", "--cache-experts", "4",
                      "--routing-from", str(tiny_traces), "--max-new-tokens", "100000", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"its test split holds \d+ tokens of routing and this run may need 10000\d ", line), line
    assert "The history of" not in proc.stdout  # nothing generated


def test_the_script_prints_text_and_the_table(tmp_path):
    js = tmp_path / "out.json"
    proc = run_script("generate_offloaded", "--device", "cpu", "--expert-format", "fp32", "--cache-experts", "15",
                      "--max-new-tokens", "4", "--policy", "prefetch:router-reuse", "--json", str(js))
    for row in ("decode tokens/s", "hit rate", "stall ms/token", "MB moved/token", "MB wasted/token",
                "non-expert weights", "expert slots", "KV cache"):
        assert row in proc.stdout
    import json

    res = json.loads(js.read_text())
    assert res["stats"]["decode_tokens"] == 3 and res["texts"][0].startswith("The history of the city")


# ----------------------------------------------------------------------------------------------
# the simulator's --measure: the costs measured on this engine (offload/costs.py measure_on_engine)


def test_the_simulators_measured_costs_come_from_the_engine(tiny_traces, hybrid_checkpoint,
                                                             hybrid_routing_only_checkpoint):
    """The preset with random weights at the traces' layer count, the traces' routing forced into it: the cost
    model charges the engine's own expert bytes, and every layer of every decode step is timed; each prefetch
    policy is timed too, a checkpoint of another hidden size at this model's size (forced routing); a preset of
    another routing shape is refused in one line."""
    from models.moe_configs import make_config
    from offload.costs import measure_on_engine
    from validation.prefetch.cost_model import model_shape

    pols = ["prefetch:router-reuse", f"prefetch:{hybrid_routing_only_checkpoint}", f"prefetch:{hybrid_checkpoint}"]
    out = measure_on_engine("qwen2moe-tiny", str(tiny_traces), "fp16", 8, pols, torch.device("cpu"), tokens=4)
    assert out["cost"].expert_bytes == 4 * model_shape("qwen2moe-tiny").expert_params  # on a CPU: fp32 experts
    assert out["raw"]["layer_steps"] == 8 * 3  # every MoE layer of the traces (8), 3 decode steps after the prompt
    assert set(out["predictor_ms"]) == set(pols) and all(v >= 0 for v in out["predictor_ms"].values())
    assert make_config("tiny-mixtral").num_local_experts != 60
    with pytest.raises(UserError, match="needs the traces' experts and top-k"):
        measure_on_engine("tiny-mixtral", str(tiny_traces), "fp16", 8, [], torch.device("cpu"))


def test_costs_are_measured_warm_on_the_rows_the_timed_runs_decode(tiny_traces):
    """measure_costs decodes once untimed (an engine's first decode ran 2.6x slower per token than the timed
    rounds), then measures a decode that starts where a timed run starts: the forced stream's first rows."""
    from offload.costs import WARM_TOKENS, measure_costs

    model = embedded()
    h = offload_experts(model, cache_experts=15, policy="on-demand", routing_from=tiny_traces, record=True)
    calls, generate = [], model.generate
    model.generate = lambda *a, **kw: calls.append(kw["max_new_tokens"]) or generate(*a, **kw)
    rec = measure_costs(h, PROMPT, tokens=6, copies=2)["raw"]["recorded"]
    assert calls == [WARM_TOKENS, 6]
    P = PROMPT.shape[1]  # the prompt's forward takes the stream's first P rows, each decode step the next one
    assert np.array_equal(rec["ids"], h.engine.forced.stream.ids[P:P + 5])


@pytest.mark.parametrize("policy", ["lfru", "least-stale", "static-frequency", "lowbit-on-miss", "cpu-compute",
                                    "cpu-compute+prefetch", "evict:frequency-window", "evict:oracle-window",
                                    "evict:/no/such/checkpoint.pth+prefetch:router-reuse",
                                    "lfru+prefetch:router-reuse", "prefetch:recency", "prefetch:frequency"])
def test_a_policy_the_engine_does_not_run_is_refused_not_run_as_lru(policy):
    """The simulator's registry is larger than the engine: a policy the engine cannot run is one line naming what
    it runs, never LRU's numbers under another name (the checkpoint of a learned eviction joined to a prefetch is
    never opened)."""
    with pytest.raises(UserError, match=f"policy {re.escape(policy)} .*the engine runs on-demand"):
        offload_experts(tiny("qwen2_moe"), cache_experts=2, policy=policy)


def test_a_predictor_given_for_the_other_use_is_one_line(hybrid_checkpoint, window_checkpoint):
    """evict: takes a next-tokens predictor and prefetch: one of the layers ahead; each is refused in the other's
    place in one line."""
    with pytest.raises(UserError, match="not the next tokens'"):
        offload_experts(embedded(), cache_experts=4, policy=f"evict:{hybrid_checkpoint}")
    with pytest.raises(UserError, match="use it as evict:"):
        offload_experts(embedded(), cache_experts=4, policy=f"prefetch:{window_checkpoint}")


def test_forced_routing_loaded_for_one_model_is_checked_again_for_another(tiny_traces):
    """Forced streams are cached by their arguments within a process: a second model of another shape, given
    the same traces and options, is still refused (the cache once handed it the first model's stream)."""
    offload_experts(embedded(), cache_experts=4, routing_from=tiny_traces)
    with pytest.raises(UserError, match="traces of another shape"):
        offload_experts(tiny("qwen2_moe"), cache_experts=4, routing_from=tiny_traces)
