"""The router control reads exactly 1.0 when the model's bf16 router logits tie across the top-k boundary.

Hand-built case: the router weight is the identity, so the bf16 logits are the hidden state itself, and the
real Hugging Face Qwen2-MoE router module picks the experts (softmax in float32, then torch.topk).

    pytest -q tests/test_router_ties.py
"""
import pytest
import torch
from transformers import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

from collection.traces.rows import TokenBlock
from validation.coverage.metrics import true_expert_ranks
from validation.coverage.scorers import RouterScorer, break_ties_like_topk

E, K = 6, 2
# fp32 rows; in bf16 (8 bits) 1.001 rounds to 1.0, so row 4 ties experts 1 and 2 only in bf16
HIDDEN = torch.tensor([
    [3.0, 2.0, 2.0, 1.0, 0.0, 0.0],    # second place tied: a chosen expert ties an unchosen one
    [3.0, 2.0, 1.0, 1.0, 0.0, 0.0],    # the tie is between two unchosen experts: not a boundary tie
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],    # every expert tied
    [2.0, 2.0, 0.0, 0.0, 0.0, 0.0],    # the two chosen experts tie each other only
    [2.0, 1.001, 1.0, 0.0, 0.0, 0.0],  # distinct in fp32, tied in bf16
])
TIED_ROWS = 3  # rows 0, 2 and 4


def model_router() -> Qwen2MoeTopKRouter:
    cfg = Qwen2MoeConfig(hidden_size=E, num_experts=E, num_experts_per_tok=K, norm_topk_prob=False)
    router = Qwen2MoeTopKRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    return router.to(torch.bfloat16)


def test_tie_break_matches_the_models_topk_and_moves_nothing_else():
    router = model_router()
    h = HIDDEN.to(torch.bfloat16)
    with torch.no_grad():
        logits, _, chosen = router(h)
    assert logits.dtype == torch.bfloat16 and torch.equal(logits.float(), h.float())
    plain = true_expert_ranks(logits.float(), chosen)
    assert (plain >= K).any(1).sum() == TIED_ROWS  # ties counted against the control: why it read 0.993
    scores = break_ties_like_topk(logits, K)
    assert (true_expert_ranks(scores, chosen) < K).all()        # recall@K and coverage@K exactly 1.0
    assert torch.equal(scores.to(torch.bfloat16), logits)       # below bf16's resolution
    # the order of distinct logits is kept: a strictly larger logit still scores strictly higher
    a, b = logits.float().unsqueeze(2), logits.float().unsqueeze(1)
    assert ((scores.unsqueeze(2) > scores.unsqueeze(1)) | ~(a > b)).all()


def test_float32_logits_are_left_alone():
    logits = HIDDEN.clone()
    assert torch.equal(break_ties_like_topk(logits, K), logits)


def test_router_scorer_control_is_exact_and_counts_the_ties():
    router = model_router()
    h = HIDDEN.to(torch.bfloat16)
    with torch.no_grad():
        _, weights, chosen = router(h)
    N = h.shape[0]
    block = TokenBlock(hidden=h.unsqueeze(0), topk_ids=chosen.unsqueeze(0), topk_weights=weights.float().unsqueeze(0),
                       prev=torch.arange(N) - 1, source=torch.zeros(N, dtype=torch.long),
                       hidden_slot=torch.tensor([0]))
    scorer = RouterScorer(router.weight.detach().unsqueeze(0), lookahead=0, top_k=K)
    tok, layer = torch.arange(N), torch.zeros(N, dtype=torch.long)
    scores = scorer(block, tok, layer)
    assert (true_expert_ranks(scores, chosen) < K).all()
    assert (scorer.rows, scorer.tied_rows, scorer.tied_missed_rows) == (N, TIED_ROWS, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_gpu_traces_router_control(tmp_path):
    """The case the control failed on (0.993): bf16 traces collected on a GPU. Scored on the GPU, the tie-break
    reproduces the model's top-k; scored on the CPU, any miss is explained by the why-it-differs line."""
    import json

    from tests.conftest import run_script

    traces = tmp_path / "bf16"
    run_script("collect_traces", "--target_traces", "240", "--shard_size", "120", "--max_length", "128",
               "--device", "cuda", "--dtype", "bfloat16", "--no-logits", "--output", traces)
    for device in ("cuda", "cpu"):
        js = tmp_path / f"{device}.json"
        proc = run_script("validate_coverage_analysis", "--traces", traces, "--model-type", "router", "--lookahead",
                          "0", "--split", "train", "--device", device, "--quiet", "--json", js,
                          "--plot", tmp_path / f"{device}.png")
        res = json.loads(js.read_text())
        print(device, res["recall@4"], res["control_ties"], proc.stdout.splitlines()[-3:])
        assert res["control_ties"]["tied_rows"] > 0  # bf16 ties do occur across the top-4 boundary
        if device == "cuda":
            assert res["recall@4"] == 1.0 and res["exact_match"] == 1.0
        elif res["recall@4"] < 1.0:
            assert "why it differs:" in proc.stdout


def test_why_the_control_differs_line():
    from scripts.validate_coverage_analysis import why_control_differs

    scorer = RouterScorer(torch.zeros(1, 60, 8, dtype=torch.bfloat16), lookahead=0, top_k=4)
    scorer.rows, scorer.tied_rows, scorer.tied_missed_rows = 1000, 20, 5
    line = why_control_differs({"top_k": 4, "coverage@4": 0.993}, scorer)  # 7 rows missed: 5 tied, 2 not
    assert line.startswith("why it differs: 7 of 1,000 rows miss the stored top-4. 20 rows had a chosen expert "
                           "tied in bfloat16 with an unchosen one; torch.topk on this device broke 5 of those ties")
    assert line.endswith("; 2 rows have no tie: their recomputed router logits differ from the model's")
