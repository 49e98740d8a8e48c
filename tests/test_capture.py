"""Capture takes exactly what the model computes: router ids/weights/logits and the MoE-block input."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from collection.capture import RoutingCapture, pad_batch
from collection.model import moe_blocks, routing_shape
from collection.traces.format import TraceSet


@pytest.mark.parametrize("lengths,hidden", [((9, 4, 13), "all"), ((8, 8), "ends")])  # ragged / no padding at all
def test_captured_rows_are_the_models_own_routing(tiny_model, lengths, hidden):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    shape = routing_shape(model)
    L, E, K, H = shape.num_layers, shape.num_experts, shape.top_k, shape.hidden_size
    moe_inputs = {}  # an independent witness of the MoE-block input: a pre-hook on each mlp
    hooks = [mlp.register_forward_pre_hook(lambda m, a, l=l: moe_inputs.__setitem__(l, a[0].detach().clone()))
             for l, (_, mlp) in enumerate(moe_blocks(model))]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 500, (n,), generator=g).tolist() for n in lengths]
    ids, mask = pad_batch(seqs, 0)
    hidden_layers = list(range(L)) if hidden == "all" else [0, L - 1]
    cap = RoutingCapture(model, hidden_layers, torch.float32, True, 64, K, shape.norm_topk_prob, E, H)
    hb = cap.forward(model, ids, mask, output_router_logits=True)
    cap.close()
    for h in hooks:
        h.remove()
    real = mask.reshape(-1).bool()
    assert hb.rows == sum(map(len, seqs)) == int(real.sum())  # padding positions are not stored
    for l in range(L):
        logits = cap.last_output.router_logits[l][real]  # the model's own router logits, real tokens
        probs = torch.softmax(logits.float(), -1)
        top = probs.topk(K, dim=-1)
        assert torch.equal(hb.topk_ids[l, :hb.rows].long(), top.indices)
        assert torch.allclose(hb.topk_weights[l, :hb.rows].float(), top.values, atol=1e-3)
        assert torch.allclose(hb.router_logits[l, :hb.rows].float(), logits.float(), atol=2e-3, rtol=1e-3)
        if l in hidden_layers:
            assert torch.equal(hb.hidden[hidden_layers.index(l), :hb.rows], moe_inputs[l].reshape(-1, H)[real])


def test_stored_shards_match_a_fresh_forward(embedded_model, tiny_traces):
    model = AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32).eval()
    ts = TraceSet(tiny_traces)
    sh = ts.shard(0)
    off = sh.numpy("seq_offsets")
    tokens = sh.numpy("token_ids")
    s = 3  # one sequence, run alone (no padding at all)
    ids = torch.from_numpy(tokens[off[s]:off[s + 1]].astype(np.int64))[None]
    out = model(input_ids=ids, output_router_logits=True)
    stored = sh.tensor("topk_ids", (slice(None), slice(off[s], off[s + 1])))
    agree = 0
    for l in range(ts.manifest.num_layers):
        fresh = out.router_logits[l].float().topk(ts.manifest.top_k, -1).indices
        agree += (fresh.sort(-1).values == stored[l].long().sort(-1).values).all(-1).float().mean().item()
    # the batch shape differs from collection, so only near-ties at the k-th expert may flip
    assert agree / ts.manifest.num_layers > 0.98
    m = ts.manifest
    assert m.num_experts == 60 and m.top_k == 4 and m.capture["hidden_layers"] == list(range(m.num_layers))
    assert int(sh.numpy("seq_sources").max()) < len(m.sources) == 6


def test_write_jobs_one_per_96_mib_of_a_batch_at_most_the_threads():
    from collection.capture import write_jobs

    MiB = 1 << 20
    assert write_jobs(50 * MiB, 120, 4) == 1      # a full-size compact batch: one job
    assert write_jobs(96 * MiB + 1, 120, 4) == 2  # just over one job's share
    assert write_jobs(203 * MiB, 120, 4) == 3     # a full-size lossless batch
    assert write_jobs(2000 * MiB, 120, 4) == 4    # never more than the threads
    assert write_jobs(2000 * MiB, 2, 4) == 2      # nor than the slices
    assert write_jobs(0, 0, 4) == 1
