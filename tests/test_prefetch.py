"""The expert-cache simulator on hand-built traces with known answers, and simulate_prefetch.py's input checks.

    pytest -q tests/test_prefetch.py
"""
import json
import shutil

import numpy as np
import pytest

from common.errors import UserError
from tests.conftest import run_script
from validation.prefetch.cost_model import CostModel, expert_bytes, expert_params
from validation.prefetch.simulator import (
    BELADY,
    DEMAND,
    END_MS,
    HITS,
    LATE,
    LRU,
    ORACLE,
    POLICIES,
    PREDICTED,
    SPEC,
    SPEC_USED,
    SPEC_WASTED,
    STAGED,
    STALL_MS,
    Policy,
    Stream,
    add_locality,
    next_uses,
    parse_policy,
    run_policy,
    summarize,
)

ON_DEMAND, LFU_P, BELADY_P, ORACLE_P = (POLICIES[n] for n in ("on-demand", "lfu", "belady", "oracle"))


def stream_of(ids, predictions=None) -> Stream:
    ids = np.asarray(ids, dtype=np.int64)
    T = ids.shape[0]
    first = np.zeros(T, dtype=bool)
    first[0] = True
    return Stream(ids=ids, weights=np.ones(ids.shape, np.float32), first=first, position=np.arange(T),
                  predictions={k: np.asarray(v, dtype=np.int64) for k, v in (predictions or {}).items()})


def random_stream(T=300, L=3, K=2, E=8, reuse=0.5, seed=0) -> Stream:
    """Random routing with some temporal locality, so caches and predictors have something to find."""
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((T, L, E)), axis=2)[:, :, :K]
    s = stream_of(ids)
    s.ids = add_locality(s.ids, s.first, reuse, seed)
    return s


def unit_cost(copy=5.0, pre=1.0, shared=0.0, expert=1.0, token=0.0) -> CostModel:
    """Costs in round numbers: copy_ms = expert_bytes / link * 1e3 = `copy`."""
    return CostModel(expert_bytes=1000, link_bytes_per_s=1000 / copy * 1e3, pre_ms=pre, shared_ms=shared,
                     expert_ms=expert, token_ms=token)


def run(policy, C, stream, cost=None, d=1, m=2, E=None, pred_ms=0.0, resident=None, record=False):
    E = E or int(stream.ids.max()) + 1
    return run_policy(policy, C, stream, cost or unit_cost(), d, m, E, pred_ms, resident, record)


# ----------------------------------------------------------------------------------------------
# cost model


def test_expert_bytes_of_qwen15_moe():
    params = expert_params("qwen1.5-moe-a2.7b")
    assert params == 3 * 2048 * 1408 == 8_650_752
    assert expert_bytes(params, "fp16") == expert_bytes(params, "bf16") == 17_301_504
    # 4-bit codes + one uint8 absmax per 64 + one fp32 per 256 blocks + the fp32 offset
    assert expert_bytes(params, "nf4") == 4_325_376 + 135_168 + 528 * 4 + 4
    assert abs(CostModel(17_301_504, 55e9).copy_ms - 0.31457) < 1e-4


# ----------------------------------------------------------------------------------------------
# hit and miss


@pytest.mark.parametrize("policy", [ON_DEMAND, LFU_P, BELADY_P, ORACLE_P])
def test_cache_of_all_experts_hits_everything_after_warm_up(policy):
    s = random_stream(E=8, reuse=0.0)
    stats, _ = run(policy, 8, s, E=8)
    T, L, K = s.ids.shape
    # warm-up ends once every expert has been seen at every layer (each is fetched exactly once)
    seen = [max(np.flatnonzero((s.ids[:, l] == e).any(1))[0] for e in range(8)) for l in range(L)]
    warm = max(seen) + 1
    assert stats[:, DEMAND].sum() + stats[:, SPEC].sum() == L * 8
    assert (stats[warm:, HITS] == L * K).all()
    assert summarize(stats, L, K, 1000, warmup=warm)["hit_rate"] == 1.0


@pytest.mark.parametrize("policy", [ON_DEMAND, LFU_P, BELADY_P, ORACLE_P])
def test_no_cache_misses_every_access(policy):
    s = random_stream()
    stats, _ = run(policy, 0, s)
    T, L, K = s.ids.shape
    assert stats[:, HITS].sum() == 0 and stats[:, SPEC].sum() == 0
    assert stats[:, DEMAND].sum() == stats[:, STAGED].sum() == T * L * K


EVICTION_CASES = [
    # one layer, one expert per token, two slots: the hit pattern of each rule, worked by hand
    # 0 0 1 2 0 1: LRU evicts 0 for 2 (0 used at t1, 1 at t2), then 1 for 0; LFU keeps 0 (used twice);
    # Belady evicts 1 for 2 (next used at t5, after 0's t4)
    ([0, 0, 1, 2, 0, 1], {"on-demand": [0, 1, 0, 0, 0, 0], "lfu": [0, 1, 0, 0, 1, 0], "belady": [0, 1, 0, 0, 1, 0]}),
    # 0 0 0 1 2 1 0: 2 evicts 0 under LRU (older) and Belady (next use t6 vs t5), 1 under LFU (used once)
    ([0, 0, 0, 1, 2, 1, 0], {"on-demand": [0, 1, 1, 0, 0, 1, 0], "lfu": [0, 1, 1, 0, 0, 0, 1],
                             "belady": [0, 1, 1, 0, 0, 1, 0]}),
    # 0 1 2 0 1 2 0: LRU always evicts the one needed next; Belady keeps 0 and cycles 1/2 through a slot
    ([0, 1, 2, 0, 1, 2, 0], {"on-demand": [0, 0, 0, 0, 0, 0, 0], "belady": [0, 0, 0, 1, 0, 1, 0]}),
]


@pytest.mark.parametrize("seq,expected", EVICTION_CASES)
def test_eviction_rules_give_the_hand_worked_hits(seq, expected):
    s = stream_of(np.array(seq).reshape(-1, 1, 1))
    for name, hits in expected.items():
        stats, _ = run(POLICIES[name], 2, s)
        assert stats[:, HITS].tolist() == hits, name


def test_an_access_never_evicts_its_own_experts():
    # t0 caches 0 and 1 (0 the older); t1 needs 2 and 0: 2 must evict 1, not 0, though 0 is older
    s = stream_of([[[0, 1]], [[2, 0]]])
    stats, sched = run(ON_DEMAND, 2, s, record=True)
    assert stats[:, HITS].tolist() == [0, 1]
    assert sched.demand[1, 0, 0].tolist() == [2, 1]  # expert 2 into expert 1's slot
    assert sorted(sched.need[1, 0].tolist()) == [0, 1]


def test_static_popular_keeps_its_experts_and_stages_the_rest():
    s = stream_of(np.array([0, 1, 2, 0, 2, 2]).reshape(-1, 1, 1))
    resident = np.array([[True, False, True]])
    stats, sched = run(POLICIES["static-popular"], 2, s, E=3, resident=resident, record=True)
    assert stats[:, HITS].tolist() == [1, 0, 1, 1, 1, 1]
    assert stats[:, STAGED].sum() == stats[:, DEMAND].sum() == 1
    assert sched.need[1, 0, 0] == -1  # computed from staging buffer 0


def test_belady_and_oracle_bound_the_other_policies():
    pred_policy = Policy("prefetch:test", LRU, PREDICTED)
    for seed in range(3):
        s = random_stream(seed=seed)
        rng = np.random.default_rng(seed)
        T, L, K = s.ids.shape
        # a predictor right about half the time
        guess = np.where(rng.random(s.ids.shape) < 0.5, s.ids, rng.integers(0, 8, s.ids.shape))
        guess[:, 0] = -1
        s.predictions["prefetch:test"] = guess
        for C in (2, 3, 5):
            res = {p.name: summarize(run(p, C, s, m=K)[0], L, K, 1000)
                   for p in (ON_DEMAND, LFU_P, BELADY_P, ORACLE_P, pred_policy)}
            assert res["belady"]["hit_rate"] >= res["on-demand"]["hit_rate"]
            assert res["belady"]["hit_rate"] >= res["lfu"]["hit_rate"]
            for name in ("on-demand", "lfu", "prefetch:test"):
                assert res["oracle"]["hit_rate"] >= res[name]["hit_rate"], (seed, C, name)
                assert res["oracle"]["tokens_per_s"] >= res[name]["tokens_per_s"], (seed, C, name)


# ----------------------------------------------------------------------------------------------
# time


def test_a_late_prefetch_stalls_exactly_its_remaining_time():
    # two layers, one expert each; copy 5 ms, pre 1, expert 1, d = 1, one slot per layer
    s = stream_of([[[0], [1]]])
    stats, _ = run(ORACLE_P, 1, s, unit_cost(copy=5, pre=1, shared=0, expert=1), d=1, E=2)
    # layer 0: router at 1; demand copy of 0 runs 1..6; the oracle's prefetch of layer 1's expert queues
    #          behind it, 6..11; experts start at 6 (stall 5), end at 7
    # layer 1: router at 8; expert 1 is in flight until 11: late, stalls 11 - 8 = 3; ends at 12
    assert stats[0, STALL_MS] == pytest.approx(5 + 3)
    assert stats[0, END_MS] == pytest.approx(12)
    assert stats[0, LATE] == 1 and stats[0, HITS] == 1 and stats[0, DEMAND] == 1 and stats[0, SPEC] == 1
    on_demand, _ = run(ON_DEMAND, 1, s, unit_cost(copy=5, pre=1, shared=0, expert=1), E=2)
    assert on_demand[0, STALL_MS] == pytest.approx(5 + 5) and on_demand[0, END_MS] == pytest.approx(14)


def test_a_wrong_prefetch_delays_the_demand_fetch_behind_it_and_counts_as_wasted():
    s = stream_of([[[0], [1]]], predictions={"prefetch:wrong": [[[-1], [0]]]})
    wrong = Policy("prefetch:wrong", LRU, PREDICTED)
    stats, _ = run(wrong, 1, s, unit_cost(copy=5, pre=1, shared=2, expert=1), d=1, m=1, E=2, pred_ms=0.5)
    # layer 0: router at 1, demand 1..6; predictor to 1.5, prefetch of the wrong expert 6..11; shared to 3.5,
    #          stall 6 - 3.5 = 2.5, end 7
    # layer 1: router at 8, expert 1 misses: evicts the unused prefetch (wasted), demand queues 11..16;
    #          ready at 8 + 2 = 10, stall 6, end 17
    assert stats[0, STALL_MS] == pytest.approx(2.5 + 6)
    assert stats[0, END_MS] == pytest.approx(17)
    assert (stats[0, DEMAND], stats[0, SPEC], stats[0, SPEC_USED], stats[0, SPEC_WASTED]) == (2, 1, 0, 1)


def test_a_prefetch_leaves_when_the_predictor_is_done():
    s = stream_of([[[0], [1]], [[0], [2]]], predictions={"prefetch:right": [[[-1], [1]], [[-1], [2]]]})
    right = Policy("prefetch:right", LRU, PREDICTED)
    stats, _ = run(right, 1, s, unit_cost(copy=5, pre=1, shared=0, expert=1), d=1, m=1, E=3, pred_ms=0.5)
    # token 0: layer 0 router 1, demand 1..6, prefetch of 1 queued behind it 6..11; predictor to 1.5: stall 4.5,
    #          end 7; layer 1 (no predictor: nothing at l+d) router 8, waits for 11: stall 3, end 12
    # token 1: layer 0 router 13, hit; predictor to 13.5, prefetch of 2 on an idle link 13.5..18.5; end 14.5;
    #          layer 1 router 15.5, waits for 18.5: stall 3, end 19.5
    assert stats[:, STALL_MS].tolist() == pytest.approx([4.5 + 3, 0 + 3])
    assert stats[:, END_MS].tolist() == pytest.approx([12, 19.5])
    assert stats[:, LATE].tolist() == [1, 1] and stats[:, SPEC_USED].tolist() == [1, 1]


def test_shared_expert_hides_part_of_a_demand_fetch_and_token_time_adds_up():
    s = stream_of([[[0]], [[0]]])
    stats, _ = run(ON_DEMAND, 1, s, unit_cost(copy=5, pre=1, shared=2, expert=1, token=0.5), E=1)
    # token 0: router 1, copy 1..6, shared to 3: stall 3, end 7 + 0.5; token 1: hit, 7.5 + 1 + 2 + 1 + 0.5
    assert stats[:, STALL_MS].tolist() == pytest.approx([3, 0])
    assert stats[:, END_MS].tolist() == pytest.approx([7.5, 12.0])
    assert summarize(stats, 1, 1, 1000)["tokens_per_s"] == pytest.approx(2 / 12.0 * 1e3)


def test_all_resident_is_compute_only():
    s = random_stream()
    T, L, K = s.ids.shape
    cost = unit_cost(pre=0.3, shared=0.2, expert=0.1, token=0.4)
    stats, _ = run(POLICIES["all-resident"], 0, s, cost, E=8)
    assert stats[:, HITS].sum() == T * L * K and stats[:, STALL_MS].sum() == 0
    assert stats[-1, END_MS] == pytest.approx(T * (L * cost.layer_ms(K) + 0.4))


# ----------------------------------------------------------------------------------------------
# bytes


@pytest.mark.parametrize("C", [0, 1, 3, 8])
def test_byte_accounting_balances(C):
    s = random_stream(seed=1)
    rng = np.random.default_rng(1)
    s.predictions["prefetch:noisy"] = np.where(rng.random((300, 3, 4)) < 0.4, np.pad(s.ids, ((0, 0), (0, 0), (0, 2))),
                                               rng.integers(0, 8, (300, 3, 4)))
    for policy in (ON_DEMAND, LFU_P, BELADY_P, ORACLE_P, Policy("prefetch:noisy", LRU, PREDICTED)):
        stats, _ = run(policy, C, s, m=4)
        tot = stats.sum(0)
        assert tot[SPEC_USED] + tot[SPEC_WASTED] == tot[SPEC], policy.name
        r = summarize(stats, 3, 2, 1000)
        assert r["bytes_used_per_token"] + r["bytes_wasted_per_token"] == pytest.approx(r["bytes_moved_per_token"])
        assert r["experts_moved_per_token"] == pytest.approx(r["demand_misses_per_token"] + r["speculative_per_token"])
        # an access is a hit or a demand fetch, nothing else
        assert tot[HITS] + tot[DEMAND] == 300 * 3 * 2


def test_the_recorded_schedule_replays_to_the_same_cache():
    """Following the logged copies slot by slot reproduces exactly which expert each access computes with."""
    s = random_stream(seed=2)
    rng = np.random.default_rng(2)
    s.predictions["prefetch:noisy"] = np.where(rng.random((300, 3, 2)) < 0.5, s.ids, rng.integers(0, 8, (300, 3, 2)))
    for policy in (ON_DEMAND, BELADY_P, ORACLE_P, Policy("prefetch:noisy", LRU, PREDICTED)):
        for C in (1, 3):
            stats, sched = run(policy, C, s, record=True)
            T, L, K = s.ids.shape
            slots = np.full((L, C), -1)
            for t in range(T):
                for l in range(L):
                    staging = {}
                    for e, slot in sched.demand[t, l]:
                        if e >= 0:
                            if slot >= 0:
                                slots[l, slot] = e
                            else:
                                staging[slot] = e
                    for k in range(K):
                        slot = sched.need[t, l, k]
                        got = slots[l, slot] if slot >= 0 else staging[slot]
                        assert got == s.ids[t, l, k], (policy.name, C, t, l, k)
                    for e, slot in sched.prefetch[t, l]:
                        if e >= 0:
                            slots[l + 1, slot] = e


# ----------------------------------------------------------------------------------------------
# locality and Belady's knowledge


def test_locality_zero_is_identity_and_one_repeats_the_first_token_of_each_sequence():
    s = random_stream(T=50, reuse=0.0)
    assert add_locality(s.ids, s.first, 0.0, 0) is s.ids
    first = np.zeros(50, dtype=bool)
    first[[0, 20]] = True
    full = add_locality(s.ids, first, 1.0, 0)
    assert (full[:20] == s.ids[0]).all() and (full[20:] == s.ids[20]).all()
    half = add_locality(s.ids, first, 0.5, 0)
    assert all(len(set(row)) == 2 for row in half.reshape(-1, 2))  # experts stay distinct
    keep = np.mean([len(set(half[t, l]) & set(half[t - 1, l])) / 2 for t in range(1, 50) if not first[t]
                    for l in range(3)])
    assert 0.35 < keep < 0.75  # each previous expert kept with p = 0.5 (plus chance overlap)


def test_next_uses():
    ids = np.array([0, 1, 0, 0, 1]).reshape(-1, 1, 1)
    assert next_uses(ids, 2).ravel().tolist() == [2, 4, 3, 5, 5]


# ----------------------------------------------------------------------------------------------
# the registry and the script's input checks


def test_policy_registry():
    assert parse_policy("prefetch:router-reuse").needs == ("hidden", "router_weights")
    assert parse_policy("oracle").prefetch == ORACLE and parse_policy("belady").eviction == BELADY
    for bad in ("fifo", "prefetch:router", "prefetch:nothing-here"):
        with pytest.raises(UserError):
            parse_policy(bad)


def test_simulate_prefetch_writes_table_json_and_plot(tiny_traces, tmp_path):
    out = tmp_path / "sim"
    proc = run_script("simulate_prefetch", "--traces", tiny_traces, "--cache-experts", "4,15", "--policies",
                      "on-demand,prefetch:popularity,prefetch:router-reuse,oracle,belady,all-resident",
                      "--output-dir", out)
    assert "hit rate" in proc.stdout and "vs LRU" in proc.stdout
    res = json.loads((out / "prefetch.json").read_text())
    rows = {(r["policy"], r["cache_experts"]): r for r in res["rows"]}
    assert len(rows) == 12
    assert rows[("on-demand", 15)]["speedup_vs_on_demand"] == 1.0
    L = res["num_layers"]
    assert rows[("all-resident", 4)]["tokens_per_s"] == pytest.approx(1e3 / (L * 1.2))
    assert rows[("oracle", 15)]["hit_rate"] >= rows[("on-demand", 15)]["hit_rate"]
    assert (out / "prefetch.png").stat().st_size > 10_000


def test_layer_ms_scales_the_phases_and_all_resident_follows(tiny_traces, tmp_path):
    from scripts.simulate_prefetch import main

    js = tmp_path / "s.json"
    main(["--traces", str(tiny_traces), "--policies", "on-demand,all-resident", "--cache-experts", "8",
          "--layer-ms", "0.6", "--json", str(js), "--plot", str(tmp_path / "s.png")])
    res = json.loads(js.read_text())
    c = res["cost_model"]
    assert c["pre_ms"] + c["shared_ms"] + 4 * c["expert_ms"] == pytest.approx(0.6)
    assert c["pre_ms"] / c["shared_ms"] == pytest.approx(0.43 / 0.53)
    row = next(r for r in res["rows"] if r["policy"] == "all-resident")
    assert row["tokens_per_s"] == pytest.approx(1e3 / (res["num_layers"] * 0.6))


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory, tiny_traces):
    """A predictor checkpoint of a model with 3 layers: not the traces' 8."""
    import torch

    from models.checkpoint import save_checkpoint
    from models.predictors import PredictorConfig, build_predictor

    cfg = PredictorConfig(kind="layer-aware", input_dim=128, num_experts=60, top_k=4, num_layers=3, lookahead=1)
    path = tmp_path_factory.mktemp("ckpt") / "best_checkpoint.pth"
    torch.manual_seed(0)
    save_checkpoint(path, build_predictor(cfg), cfg, {"test": np.arange(3)}, {}, {}, {})
    return path


@pytest.fixture(scope="module")
def no_hidden_traces(tmp_path_factory, tiny_traces):
    """The tiny traces as if collected with --hidden-layers none and without router weights."""
    out = tmp_path_factory.mktemp("nohidden") / "traces"
    shutil.copytree(tiny_traces, out)
    man = json.loads((out / "manifest.json").read_text())
    man["capture"]["hidden_layers"] = []
    (out / "manifest.json").write_text(json.dumps(man))
    (out / "router_weights.safetensors").unlink()
    return out


BAD = [
    (["--policies", "on-demand,fifo"], "unknown policy 'fifo'"),
    (["--cache-experts", "4,61"], "cache 61: each layer has 60 experts"),
    (["--gpu-gib", "0.5", "--context", "4096"], "--gpu-gib 0.5: 0.75 GiB of KV cache at --context 4096"),
    (["--lookahead", "8"], "--lookahead 8: the traces have 8 MoE layers"),
    (["--lookahead", "0"], "--lookahead 0"),
    (["--fetch-budget", "0"], "--fetch-budget 0"),
    (["--locality", "1.5"], "--locality 1.5"),
    (["--policies", "prefetch:CKPT"], "trained on other traces"),
    (["--policies", "prefetch:CKPT", "--traces", "NOHIDDEN"], "needs the stored MoE input"),
    (["--policies", "prefetch:router-reuse", "--traces", "NOHIDDEN"], "needs the stored MoE input"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_input_is_one_line_and_writes_nothing(argv, message, tiny_traces, other_checkpoint, no_hidden_traces,
                                                  tmp_path):
    from scripts.simulate_prefetch import main

    argv = [a.replace("CKPT", str(other_checkpoint)).replace("NOHIDDEN", str(no_hidden_traces)) for a in argv]
    if "--traces" not in argv:
        argv += ["--traces", str(tiny_traces)]
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        main([*argv, "--output-dir", str(out)])
    assert not out.exists()


def test_router_weights_missing_is_one_line(no_hidden_traces, tmp_path):
    """Through the command line: one line on stderr, exit 2, nothing written."""
    man = json.loads((no_hidden_traces / "manifest.json").read_text())
    full = tmp_path / "traces"
    shutil.copytree(no_hidden_traces, full)
    man["capture"]["hidden_layers"] = list(range(man["routing"]["num_layers"]))
    (full / "manifest.json").write_text(json.dumps(man))
    out = tmp_path / "out"
    proc = run_script("simulate_prefetch", "--traces", full, "--policies", "prefetch:router-reuse",
                      "--output-dir", out, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "router_weights.safetensors" in proc.stderr
    assert proc.stderr.startswith("simulate_prefetch: error:")
    assert not out.exists()
