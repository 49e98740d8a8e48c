"""The measured offloaded replay (validation/prefetch/replay.py, tools/replay_offload.py).

On a CPU the engine runs synchronously with small dimensions: these tests check that expert blobs read back
right and that executing a simulator schedule computes exactly what all-resident computes. The GPU tests
(skipped without CUDA) run the same checks with copies on a CUDA stream, and the script's --dry-check.

    pytest -q tests/test_offload.py
"""
import json

import numpy as np
import pytest
import torch

from tests.conftest import run_script
from validation.prefetch.cost_model import CostModel, expert_bytes
from validation.prefetch.replay import ExpertStore, ModelDims, ReplayEngine, check_engine, expert_forward, host_schedule
from validation.prefetch.simulator import POLICIES, Stream, add_locality, run_policy, static_experts

DIMS = ModelDims(hidden=64, heads=4, intermediate=32, shared_intermediate=64, num_experts=8, top_k=2, max_len=64)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_stream(T=12, L=3, seed=0) -> Stream:
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((T, L, DIMS.num_experts)), axis=2)[:, :, :DIMS.top_k].astype(np.int64)
    first = np.zeros(T, dtype=bool)
    first[[0, 7]] = True
    ids = add_locality(ids, first, 0.3, seed)
    position = np.arange(T) - np.where(np.arange(T) >= 7, 7, 0)
    return Stream(ids=ids, weights=rng.random((T, L, DIMS.top_k)).astype(np.float32), first=first, position=position)


@pytest.mark.parametrize("fmt", ["fp16", "nf4"])
def test_expert_blob_reads_back_as_the_generated_expert(fmt):
    store = ExpertStore(DIMS, fmt, torch.device("cpu"))
    assert store.nbytes == expert_bytes(DIMS.expert_params, fmt)
    blob = store.host[0].clone()
    gate_up, down = store.weights(blob, torch.empty(DIMS.expert_params, dtype=torch.float16))
    assert gate_up.shape == (2 * DIMS.intermediate, DIMS.hidden) and down.shape == (DIMS.hidden, DIMS.intermediate)
    w = torch.cat([gate_up.reshape(-1), down.reshape(-1)]).float()
    ref = store.reference_weights.float()
    if fmt == "fp16":
        assert torch.equal(w, ref)
    else:
        import bitsandbytes.functional as bnbf

        assert torch.equal(w, bnbf.dequantize_4bit(store.reference_packed, store.reference_state).view(-1).float())
        assert torch.nn.functional.cosine_similarity(w, ref, dim=0) > 0.98  # NF4: near, not equal


def test_expert_forward_is_the_qwen2_moe_expert():
    g = torch.Generator().manual_seed(0)
    x, gate, up, down = (torch.randn(*s, generator=g) for s in ((1, 6), (4, 6), (4, 6), (6, 4)))
    want = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    assert torch.allclose(expert_forward(x, torch.cat([gate, up]), down), want, atol=1e-6)


@pytest.fixture(scope="module")
def cpu_engine():
    return ReplayEngine(DIMS, 3, torch.device("cpu"), ["fp16", "nf4"], seed=0)


def test_replayed_schedules_compute_what_all_resident_computes(cpu_engine):
    check = check_engine(cpu_engine, small_stream(), ["fp16", "nf4"], lookahead=1, tokens=12)
    assert check["fp16/slot_vs_host_max_abs"] == 0
    assert all(v <= 1e-3 for k, v in check.items() if "vs_all_resident" in k)
    assert len([k for k in check if "vs_all_resident" in k]) == 6  # LRU, oracle, staging x 2 formats


def test_a_schedule_that_skips_a_copy_is_caught(cpu_engine):
    """The check's comparison has teeth: drop one demand copy and the outputs change."""
    s = small_stream()
    cost = CostModel(1, 1.0)
    _, full = run_policy(POLICIES["all-resident"], 8, s, cost, 1, 2, 8, record=True)
    cpu_engine.preload("fp16", {l: [(e, e) for e in range(8)] for l in range(3)})
    _, want = cpu_engine.run("fp16", host_schedule(full, s.weights, s.position, 12), 1, False, keep_outputs=True)
    _, sched = run_policy(POLICIES["on-demand"], 3, s, cost, 1, 2, 8, record=True)
    hs = host_schedule(sched, s.weights, s.position, 12)
    t, l = next((t, l) for t in range(4, 12) for l in range(3) if hs.demand[t][l])
    hs.demand[t][l] = hs.demand[t][l][1:]
    cpu_engine.cache["fp16"].fill_(0)
    _, got = cpu_engine.run("fp16", hs, 1, False, keep_outputs=True)
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) > 1e-3


def test_static_cache_preload_matches_the_kernels_slots(cpu_engine):
    """replay_offload.py preloads a static cache in expert order, slot by slot, as the kernel fills it."""
    s = small_stream()
    cost = CostModel(1, 1.0)
    resident = np.zeros((3, 8), dtype=bool)
    resident[:, [1, 4, 6]] = True
    _, full = run_policy(POLICIES["all-resident"], 8, s, cost, 1, 2, 8, record=True)
    cpu_engine.preload("nf4", {l: [(e, e) for e in range(8)] for l in range(3)})
    _, want = cpu_engine.run("nf4", host_schedule(full, s.weights, s.position, 12), 1, False, keep_outputs=True)
    _, sched = run_policy(POLICIES["static-popular"], 3, s, cost, 1, 2, 8, resident=resident, record=True)
    cpu_engine.cache["nf4"].fill_(0)
    cpu_engine.preload("nf4", {l: list(zip(np.flatnonzero(resident[l]).tolist(), range(3))) for l in range(3)})
    _, got = cpu_engine.run("nf4", host_schedule(sched, s.weights, s.position, 12), 1, False, keep_outputs=True)
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) <= 1e-3


def test_static_experts_are_the_training_splits_most_used(tiny_traces):
    from collection.traces.format import TraceSet
    from collection.traces.rows import split_sequences
    from validation.coverage.scorers import expert_popularity

    ts = TraceSet(tiny_traces)
    train = split_sequences(ts.sequence_table(), 0)["train"]
    share = expert_popularity(ts, train).numpy()
    pinned = static_experts(ts, train, 5)
    assert (pinned.sum(1) == 5).all()
    for l in range(share.shape[0]):
        assert share[l, pinned[l]].min() >= share[l, ~pinned[l]].max()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_replay_offload_on_cpu_is_one_line(tiny_traces, tmp_path):
    proc = run_script("replay_offload", "--traces", tiny_traces, "--json", tmp_path / "r.json", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("replay_offload: error: needs a CUDA GPU")
    assert not (tmp_path / "r.json").exists()
    proc = run_script("replay_offload", "--traces", tiny_traces, "--repeats", "0", "--device", "cpu",
                      "--json", tmp_path / "r.json", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "replay_offload: error: --repeats 0: at least 1"
    assert not (tmp_path / "r.json").exists()


# ----------------------------------------------------------------------------------------------
# on a CUDA GPU


@pytest.mark.gpu
@gpu
def test_cuda_replay_with_copies_on_their_own_stream():
    engine = ReplayEngine(DIMS, 3, torch.device("cuda", 0), ["fp16", "nf4"], seed=0)
    check = check_engine(engine, small_stream(), ["fp16", "nf4"], lookahead=1, tokens=12)
    assert check["fp16/slot_vs_host_max_abs"] == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, gpu])])
def test_cost_measurement_is_positive(device):
    """--measure's path, calibration on an all-resident schedule included (on the CPU the copy is not timed)."""
    from validation.prefetch.replay import measure_costs

    engine = ReplayEngine(DIMS, 3, torch.device(device, 0) if device == "cuda" else torch.device("cpu"), ["fp16"],
                          seed=0)
    s = small_stream()
    _, full = run_policy(POLICIES["all-resident"], 8, s, CostModel(1, 1.0), 1, 2, 8, record=True)
    # a learned predictor as a checkpoint's config describes it: the anchored kind with every input it can read
    anchored = {"kind": "anchored", "hidden_dim": 16, "past_layers": 1, "own_layers": 1, "window": 2, "context": 2,
                "token_vocab": 50, "separate_layers": True}
    m = measure_costs(engine, ["fp16"], {"p": ("router-reuse", {}), "a": ("learned", anchored)}, 1, calls=20,
                      calibration=host_schedule(full, s.weights, s.position, 12))
    c = m["costs"]["fp16"]
    assert c.pre_ms > 0 and c.shared_ms > 0 and c.expert_ms > 0 and m["predictor_ms"]["p"] > 0
    assert m["predictor_ms"]["a"] > 0
    assert m["raw"]["fp16/all_resident_ms_per_token"] > 0
    assert c.copy_ms > 0 if device == "cuda" else c.copy_ms != c.copy_ms  # not measured on a CPU: NaN


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, gpu])])
def test_replay_offload_dry_check_and_a_short_replay(tiny_traces, tmp_path, device):
    """The whole script: on the CPU its path runs synchronously (numbers meaningless), on a GPU for real."""
    run_script("replay_offload", "--traces", tiny_traces, "--model-config", "qwen2moe-tiny", "--dry-check", "--device", device)
    js = tmp_path / "r.json"
    few = ["--max-tokens", "8", "--cache-experts", "4", "--calls", "3", "--repeats", "2"] if device == "cpu" else \
        ["--max-tokens", "24", "--cache-experts", "4,8", "--calls", "20"]
    run_script("replay_offload", "--traces", tiny_traces, "--model-config", "qwen2moe-tiny", *few,
               "--policies", "on-demand,prefetch:router-reuse,oracle,all-resident", "--json", js, "--device", device)
    res = json.loads(js.read_text())
    assert {r["policy"] for r in res["rows"]} >= {"on-demand", "oracle", "all-resident"}
    assert all(r["measured_tokens_per_s"] > 0 and r["predicted_tokens_per_s"] > 0 for r in res["rows"])
    if device == "cpu":  # every run timed once per round; its speed is the median of its rounds
        assert all(len(r["measured_seconds"]) == 2 for r in res["rows"])
        assert all(r["measured_tokens_per_s"] == pytest.approx(8 / float(np.median(r["measured_seconds"])))
                   for r in res["rows"])


@pytest.mark.gpu
@gpu
def test_cuda_graphed_predictor_outlives_its_builder():
    """The replay's learned predictor runs as CUDA graphs that read its weights and inputs in place: after the
    builder returns and other tensors take the freed memory, every layer's graph still gives the eager answer
    (without keeping `run` alive the graphs read garbage: a device-side assert on an H200)."""
    import gc

    from validation.prefetch.replay import predictor_work

    engine = ReplayEngine(DIMS, 3, torch.device("cuda", 0), ["fp16"], seed=0)
    anchored = {"kind": "anchored", "hidden_dim": 16, "past_layers": 1, "own_layers": 1, "window": 2,
                "token_vocab": 50, "separate_layers": True}
    work = predictor_work("learned", engine, 1, anchored)
    gc.collect()
    filler = [torch.full((1 << 20,), 10**6, dtype=torch.int64, device="cuda") for _ in range(8)]  # noqa: F841
    x = torch.randn(1, DIMS.hidden, device="cuda", dtype=torch.float16)
    for l in range(engine.L - 1):
        got = work(x, l).clone()
        torch.cuda.synchronize()
        assert torch.equal(got, work.keep_alive(x, l)), l
