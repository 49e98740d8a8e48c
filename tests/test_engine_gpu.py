"""The offload engine on a CUDA GPU: what the CPU tests cannot reach (pinned memory, the copy stream and its
events, NF4 through bitsandbytes' CUDA kernels, predictors as CUDA graphs, timing). Skipped without CUDA.

    pytest -q -m gpu tests/test_engine_gpu.py

NF4 is compared with a resident model whose experts are quantized per expert exactly as the engine's host blobs
are (offload/store.py nf4_round_trip): collection/quantize.py quantizes each layer's fused tensor whole, whose
double quantization (offset, second-level scales) differs from per-expert quantization by a little, per layer.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from collection.families import moe_layers
from offload import offload_experts
from offload.copies import CudaCopies
from tests.test_engine import (
    EMBEDDED,
    PROMPT,
    ForcedResident,
    _checkpoint,
    assert_counts_equal,
    decode_steps,
    some_static_set,
)
from validation.prefetch.cost_model import CostModel
from validation.prefetch.simulator import parse_policy, run_policy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEV = torch.device("cuda", 0)
NEW = 12
ATOL = 1e-3  # target: logits within 1e-3 of the resident model with the same experts kernels


def embedded(dtype=torch.bfloat16) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED, dtype=dtype).to(DEV).eval()
    model.config._experts_implementation = "grouped_mm"
    return model


def generate(model, ids, new=NEW):
    with torch.no_grad():
        out = model.generate(ids.to(DEV), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits).float()


def assert_same(ref, model, ids=PROMPT, new=NEW):
    want, wl = generate(ref, ids, new)
    got, gl = generate(model, ids, new)
    assert torch.equal(got, want), "greedy tokens differ from the resident model's"
    assert (gl - wl).abs().max().item() <= ATOL
    with torch.no_grad():
        full = (model(want).logits.float() - ref(want).logits.float()).abs().max().item()
    assert full <= ATOL, f"a prompt forward differs by {full}"


RUNS = [("on-demand", 15, {}), ("on-demand", 0, {}), ("on-demand", 1, {}), ("lfu", 4, {}),
        ("static-popular", 10, {"static_experts": some_static_set()}), ("all-resident", None, {}),
        ("prefetch:router-reuse", 15, {}), ("prefetch:router-reuse", 4, {"lookahead": 2, "fetch_budget": 3}),
        ("prefetch:random", 6, {})]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("policy,cache,extra", RUNS, ids=[f"{p}-C{c}" for p, c, _ in RUNS])
def test_cuda_every_policy_generates_the_resident_models_tokens(policy, cache, extra, dtype):
    ref, model = embedded(dtype), embedded(dtype)
    h = offload_experts(model, cache_experts=cache, policy=policy, **extra)
    assert isinstance(h.engine.copies, CudaCopies) and h.engine.store.pinned
    assert all(t.is_pinned() for t in h.engine.store.host)
    assert_same(ref, model)
    s = h.stats()
    assert s["decode_tokens_per_s"] > 0 and s["stall_ms_per_token"] >= 0
    assert s["memory"]["peak"] > 0


@pytest.mark.parametrize("policy,cache", [("on-demand", 6), ("prefetch:router-reuse", 6), ("on-demand", 0),
                                          ("all-resident", None)])
def test_cuda_nf4_equals_the_per_expert_nf4_resident_model(policy, cache):
    from offload.store import nf4_round_trip

    ref, model = embedded(), embedded()
    nf4_round_trip(ref)
    h = offload_experts(model, cache_experts=cache, policy=policy, expert_format="nf4")
    assert h.engine.layout.nbytes == 9516  # validation/cost_model.expert_bytes(3 * 128 * 48, "nf4")
    assert_same(ref, model)


def test_cuda_nf4_store_made_from_the_16_bit_store_is_the_same():
    from offload.store import nf4_round_trip

    ref, model = embedded(), embedded()
    nf4_round_trip(ref)
    h = offload_experts(model, cache_experts=6)
    h.reconfigure(cache_experts=6, expert_format="nf4")
    assert_same(ref, model)


def test_cuda_a_long_prompt_streams_through_the_banks_on_the_copy_stream():
    ref, model = embedded(), embedded()
    h = offload_experts(model, cache_experts=2, staging_experts=2)
    ids = torch.randint(1, 8000, (2, 200), generator=torch.Generator().manual_seed(0)).to(DEV)
    with torch.no_grad():
        assert (model(ids).logits.float() - ref(ids).logits.float()).abs().max().item() <= ATOL
    assert h.stats()["prefill_copies"] > 8 * 4


def test_cuda_batch_of_two():
    ref, model = embedded(), embedded()
    offload_experts(model, cache_experts=6, policy="prefetch:router-reuse")
    ids = torch.tensor([[17, 233, 1009, 45], [8, 9, 10, 11]])
    assert_same(ref, model, ids)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_traces):
    return {"anchored": _checkpoint(tmp_path_factory, tiny_traces, "anchored", past_layers=1, own_layers=2, window=2,
                                    token_vocab=8192, context=3),
            "hybrid": _checkpoint(tmp_path_factory, tiny_traces, "hybrid"),
            "window": _checkpoint(tmp_path_factory, tiny_traces, "hybrid", lookahead=0, lookahead_tokens=4)}


@pytest.mark.parametrize("kind", ["anchored", "hybrid", "window"])
def test_cuda_graph_predictor_predicts_what_the_eager_one_does(kind, checkpoints):
    """A learned predictor replayed as CUDA graphs gives the same top-m (a next-tokens one, evict:<checkpoint>: the
    same eviction ranks), step by step, as run eagerly; generation equals the resident model's."""
    evict = kind == "window"
    policy = f"{'evict' if evict else 'prefetch'}:{checkpoints[kind]}"
    out = {}
    for graphs in (False, True):
        model = embedded()
        h = offload_experts(model, cache_experts=8, policy=policy, record=True, cuda_graphs=graphs)
        decode_steps(model, 16)
        out[graphs] = h.recorded()["score" if evict else "pred"]
        live = h.engine.evictor if evict else h.engine.predictor
        assert live.use_graphs == graphs and bool(live.graphs) == graphs
        if graphs:
            assert h.stats()["predictor_us_per_layer"] > 0
    assert np.array_equal(out[False], out[True])
    ref, model = embedded(), embedded()
    offload_experts(model, cache_experts=8, policy=policy)
    assert_same(ref, model)


FORCED = ["on-demand", "lfu", "oracle", "belady", "prefetch:router-reuse", "static-popular", "all-resident"]


@pytest.mark.parametrize("policy", FORCED)
def test_cuda_forced_routing_counts_equal_the_simulators(policy, tiny_traces):
    """With real copies on the copy stream: the simulator's counts, and the resident model's tokens under the
    same forced routing."""
    T = 40
    model = embedded()
    h = offload_experts(model, cache_experts=None if policy == "all-resident" else 15, policy=policy,
                        routing_from=tiny_traces, routing_tokens=T, record=True)
    e = h.engine
    tokens = decode_steps(model, T)
    ref = embedded()
    ForcedResident(ref, e.forced.stream.ids, e.forced.stream.weights)
    assert tokens == decode_steps(ref, T)
    pol = parse_policy(policy)
    resident = (e.cache.slot_of >= 0) if policy == "static-popular" else None
    sim, _ = run_policy(pol, 15, e.forced.stream, CostModel(e.layout.nbytes, 1e9), 1, 4, 60, resident=resident)
    assert_counts_equal(h, sim)


def test_cuda_a_failing_copy_raises_at_once():
    model = embedded()
    h = offload_experts(model, cache_experts=4)
    for e in range(60):
        h.engine.slots._src[0][e] = [torch.zeros(3).pin_memory()] * len(h.engine.layout.names)
    with pytest.raises(RuntimeError), torch.no_grad():
        model(torch.tensor([[5]], device=DEV))


def test_cuda_measure_costs_gives_positive_costs_and_link_speed():
    from offload.costs import measure_costs

    model = embedded()
    h = offload_experts(model, cache_experts=15, policy="prefetch:router-reuse")
    res = measure_costs(h, PROMPT.to(DEV), tokens=16)
    c, raw = res["cost"], res["raw"]
    assert c.copy_ms > 0 and c.link_bytes_per_s > 1e9 and raw["link_bytes_per_s"] > 1e9
    assert c.pre_ms > 0 and c.expert_ms > 0 and c.token_ms >= 0
    assert raw["layer_steps"] == 15 * 8
    assert raw["engine_copy_bytes_per_s"] is None or raw["engine_copy_bytes_per_s"] > 0


def test_cuda_model_loaded_on_the_host_moves_without_its_experts():
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED, dtype=torch.bfloat16).eval()  # on the host
    ref = embedded()
    h = offload_experts(model, device=DEV, cache_experts=15)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert not any("experts.gate_up_proj" in n for n, _ in model.named_parameters())
    assert_same(ref, model)
    assert h.memory()["weights"] < sum(p.numel() * p.element_size() for p in ref.parameters())


def test_cuda_no_host_sync_but_the_router_read():
    """A warm decode step adds no implicit host synchronization of its own (.cpu(), .item(), pageable copies):
    under torch's sync debug mode it warns exactly as often as the resident model's step does. The engine's one
    wait, for the router's choice, is an event's synchronize, which is explicit."""
    import warnings

    def syncs(model) -> int:
        cache, tok = DynamicCache(), torch.tensor([[1]], device=DEV)
        with torch.no_grad():
            for _ in range(3):
                tok = model(input_ids=tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    model(input_ids=tok, cache=cache, use_cache=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    ref, model = embedded(), embedded()
    h = offload_experts(model, cache_experts=15, policy="prefetch:router-reuse", timing=False)
    assert syncs(model) == syncs(ref)
    assert h.engine.counters.steps > 0


def test_cuda_moe_layers_of_every_tiny_family_on_the_gpu():
    from collection.families import FAMILIES
    from tests.test_families import tiny

    for model_type in sorted(FAMILIES):
        ref, model = tiny(model_type).to(DEV, torch.bfloat16), tiny(model_type).to(DEV, torch.bfloat16)
        offload_experts(model, cache_experts=1, policy="prefetch:router-reuse")
        assert_same(ref, model, torch.tensor([[5, 90, 700, 3]]), new=5)
        assert len(moe_layers(ref)) > 0
