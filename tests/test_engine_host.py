"""The offload engine's host side on a CPU: where its tensors live, and what a decode step does on the host
(no reads back, no events, no cache bookkeeping where none is needed). The GPU-only behaviour is in
tests/test_engine_gpu.py; the outputs and counts are in tests/test_engine.py.

    pytest -q tests/test_engine_host.py
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from tests.test_engine import anchored_checkpoint, hybrid_checkpoint  # noqa: F401  (fixtures)


class OnlyOn(TorchFunctionMode):
    """Fails on any torch call that reads or makes a tensor on another device than `device`: a host tensor
    reaching a device op (an index built on the CPU, a factory call without device=)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and t.device != self.device:
                raise AssertionError(f"{getattr(func, '__name__', func)}: a tensor on {t.device}, not {self.device}")
        return out


@pytest.mark.parametrize("kind", ["anchored", "hybrid"])
@pytest.mark.parametrize("rows", [1, 2])
def test_the_live_learned_predictor_builds_every_tensor_on_its_device(kind, rows, anchored_checkpoint,  # noqa: F811
                                                                      hybrid_checkpoint, monkeypatch):  # noqa: F811
    """The learned predictor's live path (LiveFeatures at a prompt and at decode steps, the network, the top-m)
    run on the 'meta' device: every tensor any call reads or makes is on that device, so none is built on the
    host (on a GPU such a tensor fails a device op or costs a copy)."""
    from offload.prefetch import LivePredictor, learned

    # the anchored head opens a disabled autocast region for the router product, which has no meta device type
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())
    ckpt = anchored_checkpoint if kind == "anchored" else hybrid_checkpoint
    dev = torch.device("meta")
    L, E, K, H, m = 8, 60, 4, 128, 4
    pred = learned(ckpt, L, E, K, H, 1, 8192, torch.randn(L, E, H), dev, torch.float32)
    live = LivePredictor("learned", m, pred, reads_x=False, features=pred.features)
    feats = pred.features(rows)
    x = lambda n: torch.empty(n, H, device=dev)  # noqa: E731
    ids = lambda n: torch.zeros(n, K, dtype=torch.int64, device=dev)  # noqa: E731
    w = lambda n: torch.empty(n, K, device=dev)  # noqa: E731
    with OnlyOn(dev):
        feats.begin(torch.zeros(rows, 3, dtype=torch.int64, device=dev), True)  # a prompt of 3 tokens per row
        for l in range(L):
            feats.record(l, x(3 * rows), ids(3 * rows), w(3 * rows))
        feats.end(3)
        for _ in range(2):  # decode steps
            feats.begin(torch.zeros(rows, 1, dtype=torch.int64, device=dev), False)
            for l in range(L):
                feats.record(l, x(rows), ids(rows), w(rows))
                if l + 1 < L:
                    out = live(l, x(rows))
                    assert out.device == dev and out.shape == (m,)
            feats.end(1)


@pytest.mark.parametrize("kind", ["anchored", "hybrid"])
def test_a_learned_predictor_runs_live_in_a_bfloat16_model(kind, anchored_checkpoint, hybrid_checkpoint):  # noqa: F811
    """The predictor runs in the model's dtype: its routing features (kept in float32) reach its first layer in
    bfloat16 too, so a bfloat16 model decodes with it (a float32 feature beside bfloat16 weights fails the first
    matrix product)."""
    from transformers import AutoModelForCausalLM

    from offload import offload_experts
    from tests.test_engine import EMBEDDED, PROMPT

    ckpt = anchored_checkpoint if kind == "anchored" else hybrid_checkpoint
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED, dtype=torch.bfloat16).eval()
    h = offload_experts(model, cache_experts=8, policy=f"prefetch:{ckpt}", record=True)
    with torch.no_grad():
        out = model.generate(PROMPT, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, PROMPT.shape[1] + 4) and len(h.recorded()["pred"]) > 0


def test_the_device_check_catches_a_host_tensor():
    """OnlyOn itself: a host index reaching a meta tensor's op fails."""
    dev = torch.device("meta")
    table = torch.empty(10, 4, device=dev)
    with OnlyOn(dev), pytest.raises(AssertionError, match="on cpu"):
        table[torch.tensor([1, 2])]


def test_reconfigure_replans_the_same_model_and_keeps_its_output():
    """handle.reconfigure: another cache size and policy for the same model (the plan passed in by
    offload_experts); the greedy tokens stay the resident model's."""
    from offload import offload_experts
    from tests.test_engine import PROMPT, embedded, generate

    ref, model = embedded(), embedded()
    h = offload_experts(model, cache_experts=8, policy="on-demand")
    h.reconfigure(cache_experts=3, policy="lfu")
    assert h.engine.C == 3 and h.options["policy"] == "lfu"
    assert torch.equal(generate(model, PROMPT)[0], generate(ref, PROMPT)[0])
