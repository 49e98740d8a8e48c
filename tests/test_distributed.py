"""The bookkeeping of several GPUs and processes, with known answers (no process group, no GPU needed):
device runs for capture, GPU shares and placement arguments, shard assignment, row splits of data-parallel
training and the loss weights that make DDP's averaged gradient the global mean, near-tie detection of the
trace comparison.

    pytest -q tests/test_distributed.py
"""
import json

import numpy as np
import pytest
import torch
from torch import nn

from collection.compare import bf16_ulp, near_ties, row_agreement
from collection.distributed import rank_shards
from collection.placement import device_runs, from_pretrained_placement, parse_device_map, parse_max_memory, rank_gpus
from common.errors import UserError
from common.ranks import Ranks
from training.distributed import DataParallel, loss_weights, split_by_tokens, step_sizes
from training.trainer import soft_cross_entropy

C0, C1, CPU = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")


def test_device_runs_group_consecutive_layers_per_device():
    assert device_runs([C0, C0, C1, C1]) == [(C0, 0, 2), (C1, 2, 4)]
    assert device_runs([C0] * 5) == [(C0, 0, 5)]  # one GPU: a single stack, as before device maps
    # a device that comes back (a hand-written map) starts a new run: every run is one contiguous host slice
    assert device_runs([C0, C1, C0, CPU]) == [(C0, 0, 1), (C1, 1, 2), (C0, 2, 3), (CPU, 3, 4)]
    assert device_runs([]) == []


def test_rank_gpus_share_a_node():
    assert rank_gpus(0, 2, 4) == [0, 1] and rank_gpus(1, 2, 4) == [2, 3]
    assert rank_gpus(1, 2, 3) == [1]  # the odd GPU is left out, never shared by two ranks
    with pytest.raises(UserError, match="at least one GPU per rank"):
        rank_gpus(0, 4, 2)


def test_device_map_and_max_memory_parsing(tmp_path):
    assert parse_device_map("balanced") == "balanced"
    assert parse_device_map('{"model.embed_tokens": 0, "lm_head": "cuda:1"}') == {"model.embed_tokens": 0,
                                                                                  "lm_head": "cuda:1"}
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"": "cpu"}))
    assert parse_device_map(str(f)) == {"": "cpu"}
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    for bad, why in [("{oops", "not valid JSON"), (str(listed), "non-empty object"), ('{"lm_head": "gpu7"}', "a device is"),
                     ("fastest", "use auto")]:
        with pytest.raises(UserError, match=why):
            parse_device_map(bad)
    assert parse_max_memory("20GiB") == 20 * 2**30
    assert parse_max_memory('{"0": "1GiB", "cpu": "512MiB"}') == {0: 2**30, "cpu": 2**29}
    for bad in ("lots", '{"gpu0": "1GiB"}', '{"0": "-3GiB"}'):
        with pytest.raises(UserError, match="--max-memory"):
            parse_max_memory(bad)


def test_placement_arguments():
    free = {0: 100, 1: 200}
    # default: 90% of each usable GPU's free memory, and no host memory at all
    assert from_pretrained_placement("auto", None, [0, 1], free) == {"device_map": "auto",
                                                                      "max_memory": {0: 90, 1: 180}}
    assert from_pretrained_placement("balanced", 50, [0, 1], free)["max_memory"] == {0: 50, 1: 50}
    assert from_pretrained_placement({"": 1}, None, [0, 1], free) == {"device_map": {"": 1}}
    with pytest.raises(UserError, match="GPU"):
        from_pretrained_placement({"lm_head": 3}, None, [0, 1], free)
    with pytest.raises(UserError, match="needs CUDA GPUs"):
        from_pretrained_placement("auto", None, [], {})
    with pytest.raises(UserError, match=r"names GPU\(s\) \[2\]"):
        from_pretrained_placement("auto", {2: 10}, [0, 1], free)


def test_rank_shards_are_disjoint_and_cover_the_unfinished_plan():
    done = {0, 4}
    parts = [rank_shards(10, done, Ranks(rank=r, world=3)) for r in range(3)]
    assert parts == [[3, 6, 9], [1, 7], [2, 5, 8]]  # shard i -> rank i % 3, finished shards skipped
    assert sorted(sum(parts, [])) == sorted(set(range(10)) - done)
    assert rank_shards(4, set(), Ranks()) == [0, 1, 2, 3]  # one process: everything, in order


def test_split_by_tokens():
    assert split_by_tokens(np.array([10, 10, 10, 10]), 2).tolist() == [0, 0, 1, 1]
    assert split_by_tokens(np.array([30, 10, 10, 10]), 2).tolist() == [0, 1, 1, 1]  # balanced by tokens, not count
    # one sequence holds nearly every token: the middle rule would leave part 0 empty; equal counts instead
    assert split_by_tokens(np.array([1000, 1, 1]), 3).tolist() == [0, 1, 2]


def test_step_sizes_cut_like_tensor_split():
    sizes = step_sizes(np.array([10, 7]), 3)
    assert sizes.tolist() == [[4, 3, 3], [3, 2, 2]]
    assert [len(c) for c in torch.arange(10).tensor_split(3)] == sizes[0].tolist()


def test_rank_sequences_cut_every_shard(tmp_path):
    # 2 shards: shard 0 holds train sequences 0..3 (10 tokens each), shard 1 holds 4..6 (30, 10, 10 tokens)
    table = {"seq_id": np.arange(8), "shard": np.array([0, 0, 0, 0, 1, 1, 1, 1]),
             "length": np.array([10, 10, 10, 10, 30, 10, 10, 99])}
    train = np.arange(7)  # sequence 7 is validation: not shared out
    parts = [DataParallel(Ranks(rank=r, world=2), CPU).rank_sequences(table, train) for r in range(2)]
    assert parts[0].tolist() == [0, 1, 4] and parts[1].tolist() == [2, 3, 5, 6]
    assert DataParallel(Ranks(), CPU).rank_sequences(table, train) is train  # one process: all of them
    with pytest.raises(UserError, match="fewer than the 3 processes"):
        DataParallel(Ranks(rank=0, world=3), CPU).rank_sequences(table, np.array([0, 1, 2, 3, 4, 5]))


def test_weighted_rank_losses_average_to_the_global_mean_gradient():
    """What DDP does with the weights of DataParallel.row_batches: each rank backpropagates
    world * n_r / n * (its mean loss), and DDP averages the gradients over the ranks. With unequal shares
    (10 and 7 rows a step here) that equals the gradient of the mean loss over all the step's rows; without the
    weights it would not."""
    torch.manual_seed(0)
    model = nn.Linear(6, 9)
    x, true = torch.randn(17, 6), torch.randint(0, 9, (17, 3))
    counts, world = np.array([10, 7]), 2
    weights = loss_weights(step_sizes(counts, 1))  # (ranks, steps), as DataParallel.row_batches takes them
    assert weights[:, 0].tolist() == pytest.approx([2 * 10 / 17, 2 * 7 / 17])
    shares = [slice(0, 10), slice(10, 17)]

    def grads(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    reference = grads(soft_cross_entropy(model(x), true))
    ddp = sum(grads(soft_cross_entropy(model(x[s]), true[s]) * float(weights[r, 0])) for r, s in enumerate(shares)) / world
    unweighted = sum(grads(soft_cross_entropy(model(x[s]), true[s])) for s in shares) / world
    assert torch.allclose(ddp, reference, atol=1e-6)
    assert not torch.allclose(unweighted, reference, atol=1e-4)


def test_bf16_ulp_and_near_ties():
    assert bf16_ulp(torch.tensor([1.0, 1.5, 2.0, 0.25])).tolist() == [2**-7, 2**-7, 2**-6, 2**-9]
    k = 2
    scores = torch.tensor([
        [5.0, 3.0, 1.0, 0.0],               # clear gaps everywhere: no tie
        [5.0, 3.0, 3.0 - 2**-6, 0.0],       # 2nd and 3rd within 1 ulp (ulp at 3.0 is 2**-6): the cut is a tie
        [4.0, 4.0 - 2**-5, 1.0, 0.0],       # 1st and 2nd within 1 ulp (ulp at 4.0 is 2**-5): the order is a tie
        [5.0, 3.0, 3.0 - 4 * 2**-6, 0.0],   # 4 ulps apart: not a tie at tie_ulps 2
    ])
    assert near_ties(scores, k, 2.0).tolist() == [False, True, True, False]
    assert near_ties(scores, k, 4.0).tolist() == [False, True, True, True]


def test_row_agreement_counts_ties_mismatches_and_clean_rows():
    # 2 layers, 2 sequences of 2 and 1 tokens, top-2
    ids_a = torch.tensor([[[0, 1], [2, 3], [4, 5]], [[0, 1], [2, 3], [4, 5]]])
    ids_b = ids_a.clone()
    ids_b[0, 0] = torch.tensor([1, 0])  # layer 0, token 0 (sequence 0): order flipped, a near tie
    ids_b[1, 2] = torch.tensor([4, 6])  # layer 1, token 2 (sequence 1): another expert, no tie
    ties = torch.tensor([[True, False, False], [False, False, False]])
    r = row_agreement(ids_a, ids_b, np.array([0, 2, 3]), ties)
    assert r["differ"].tolist() == [[True, False, False], [False, False, True]]
    assert r["tie"].tolist() == [[True, False, False], [False, False, False]]
    assert r["mismatch"].tolist() == [[False, False, False], [False, False, True]]
    # sequence 0 differs at layer 0, so its layer-1 rows are not clean; sequence 1 differs only at the last layer
    assert r["clean"].tolist() == [[True, True, True], [False, False, True]]
    none = row_agreement(ids_a, ids_b, np.array([0, 2, 3]), None)  # no logits stored: no row can be a tie
    assert int(none["mismatch"].sum()) == 2


def test_compare_finds_one_changed_choice_in_a_real_trace_set(tiny_traces, tmp_path):
    """A copy of a trace set with one (layer, token) row's experts replaced: compare_traces counts exactly that
    row as a mismatch (its logits are clear of ties), leaves the sequence's later layers out of the clean rows,
    and exits 1; the untouched copy compares equal, byte for byte."""
    import shutil

    from safetensors.torch import load_file, save_file

    from collection.families import selection_scores
    from collection.traces.format import TraceSet
    from common.atomic import sha256_file
    from scripts.compare_traces import main as compare_main

    copy = tmp_path / "copy"
    shutil.copytree(tiny_traces, copy)
    assert compare_main([str(tiny_traces), str(copy)]) == 0

    ts = TraceSet(copy)
    m, sh = ts.manifest, ts.shard(0)
    layer, off = 2, sh.numpy("seq_offsets")
    logits = sh.tensor("router_logits")[layer].float()
    clear = ~near_ties(selection_scores(m.routing["router"], logits, None), m.top_k, 2.0)
    token = int(clear.nonzero()[0, 0])  # the first row of layer 2 whose choice is no near tie
    path = copy / m.shards[0].file
    tensors = load_file(path)
    chosen = set(tensors["topk_ids"][layer, token].tolist())
    other = [e for e in range(m.num_experts) if e not in chosen][:m.top_k]
    tensors["topk_ids"][layer, token] = torch.tensor(other, dtype=torch.int16)
    save_file(tensors, path, metadata=sh.metadata)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (copy / "manifest.json").write_text(json.dumps(manifest))

    from collection.compare import compare_trace_sets

    res = compare_trace_sets(tiny_traces, copy)
    assert (res["differing_rows"], res["tie_rows"], res["mismatch_rows"]) == (1, 0, 1)
    assert res["mismatch_rows_per_layer"][layer] == 1 and not res["within_tolerance"]
    seq = int(np.searchsorted(off, token, side="right") - 1)
    seq_len = int(off[seq + 1] - off[seq])
    later_layers = m.num_layers - layer - 1
    assert res["rows"] - res["clean_rows"] == seq_len * later_layers  # that sequence's rows above layer 2
    assert res["identical_shards"] == len(ts) - 1
    assert compare_main([str(tiny_traces), str(copy)]) == 1


def test_partial_manifest_files_are_exactly_the_tools_names(tmp_path):
    """A kill during a rank's atomic manifest write leaves `manifest.rankNNNNN.json.partial`: the resume removes it
    with the folded partial manifests, and nothing that merely resembles those names."""
    from collection.distributed import partial_manifest_files

    for name in ("manifest.rank00000.json", "manifest.rank00001.json.partial", "manifest.rankfoo.json",
                 "manifest.rank00002.json.bak", "manifest.rank1.json", "manifest.json"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in partial_manifest_files(tmp_path)] == ["manifest.rank00000.json",
                                                                  "manifest.rank00001.json.partial"]
