"""tools/bench_offload.py on a CPU: its bookkeeping (median, spread, unstable rows, target lines) by hand, and one
tiny run end to end (the code path; a CPU's numbers mean nothing).

    pytest -q tests/test_bench_offload.py
"""
import gc
import json
import re

import pytest

from tools.bench_offload import Row, main, targets


def test_median_spread_and_unstable_rows_by_hand():
    row = Row("x", "engine", runs=[{"decode_tokens_per_s": v, "hit_rate": h} for v, h in
                                   ((10.0, 0.5), (12.0, 0.7), (11.0, 0.6))])
    row.predicted = 10.0
    s = row.summary()
    assert s["median_tokens_per_s"] == 11.0 and s["spread"] == pytest.approx(2 / 11) and s["unstable"]
    assert s["hit_rate"] == 0.6 and s["measured_over_predicted"] == pytest.approx(1.1)
    calm = Row("y", "engine", runs=[{"decode_tokens_per_s": v} for v in (10.0, 10.5, 10.2)]).summary()
    assert calm["spread"] == pytest.approx(0.5 / 10.2) and not calm["unstable"]


def test_target_lines_by_hand():
    rows = [{"label": "resident (grouped_mm)", "median_tokens_per_s": 40.0},
            {"label": "fp16 all-resident", "median_tokens_per_s": 38.0},
            {"label": "accelerate offload (device_map, cap = engine at C=15)", "median_tokens_per_s": 0.5,
             "peak_gib": 12.0},
            {"label": "fp16 C=15 on-demand (own routing)", "median_tokens_per_s": 15.0, "peak_gib": 10.0,
             "host_ms_per_layer": 0.08},
            {"label": "fp16 C=15 on-demand (traces)", "median_tokens_per_s": 10.0},
            {"label": "fp16 C=15 prefetch:router-reuse (traces)", "median_tokens_per_s": 13.0,
             "measured_over_predicted": 1.1, "unstable": True},
            {"label": "fp16 C=15 oracle (traces)", "median_tokens_per_s": 14.0, "measured_over_predicted": 0.95},
            {"label": "fp16 C=30 prefetch:router-reuse (traces)", "median_tokens_per_s": 13.0,
             "predictor_us_per_layer": 140.0, "calibration": {"raw": {"predictor_graph_us": 18.0}}},
            {"label": "fp16 C=15 prefetch:router-reuse (own routing)", "median_tokens_per_s": 13.0,
             "predictor_us_per_layer": 90.0, "calibration": {"raw": {"predictor_graph_us": 12.5}}}]
    lines = "\n".join(targets(rows, "fp16", 10.0))
    assert "all-resident / resident = 0.950" in lines
    assert "on-demand C=15 / accelerate = 30.0x" in lines
    assert "peaks 10.00 (engine) vs 12.00 GiB (accelerate), cap 10.00 GiB: engine peak <= the cap" in lines
    assert "engine peak ABOVE the cap" in "\n".join(targets(rows, "fp16", 9.99))
    assert "best prefetch / on-demand = 1.30x" in lines and "/ oracle = 0.93" in lines
    assert "largest |measured / predicted - 1| = 10.0%" in lines
    assert "0.0800 ms per layer" in lines
    assert ("predictor: 18.0 us per layer at most on the GPU's clock, its graph replayed back to back (target <= 20); "
            "140.0 us between the events around it in the decode") in lines
    assert "unstable rows (spread > 10%): fp16 C=15 prefetch:router-reuse (traces)" in lines


def test_a_tiny_run_writes_every_row(tmp_path, monkeypatch):
    from transformers.generation.utils import GenerationMixin

    collector_on = []  # whether Python's cyclic collector could run inside each generate(): never in a timed run,
    # nor in a calibration run (its costs predict the timed runs); with no warm-up, those are all the generate() calls
    generate = GenerationMixin.generate

    def probe(self, *a, **k):
        collector_on.append(gc.isenabled())
        return generate(self, *a, **k)

    monkeypatch.setattr(GenerationMixin, "generate", probe)
    out = tmp_path / "bench.json"
    main(["--device", "cpu", "--preset", "qwen2moe-tiny", "--quick", "--repeats", "1", "--tokens", "3",
          "--prompt-tokens", "3", "--warmup-s", "0", "--traces", "none", "--json", str(out)])
    res = json.loads(out.read_text())
    labels = [r["label"] for r in res["rows"]]
    assert labels == ["resident (grouped_mm)", "fp32 C=0 streaming", "fp32 all-resident",
                      "fp32 C=15 on-demand (own routing)", "fp32 C=15 prefetch:router-reuse (own routing)"]
    for r in res["rows"]:
        assert len(r["runs"]) == 1 and r["median_tokens_per_s"] > 0
        if r["kind"] == "engine":
            assert r["predicted_tokens_per_s"] > 0 and r["calibration"]["cost"]["expert_bytes"] > 0
    assert any("no engine tax" in t for t in res["targets"])
    by = {r["label"]: r for r in res["rows"]}  # the predictor timed on its own clock, where a row has one
    assert by["fp32 C=15 prefetch:router-reuse (own routing)"]["calibration"]["raw"]["predictor_graph_us"] > 0
    assert by["fp32 C=15 on-demand (own routing)"]["calibration"]["raw"]["predictor_graph_us"] is None
    assert len(collector_on) >= 3 * len(labels) - 2 and not any(collector_on) and gc.isenabled()


def test_accelerate_offload_keeps_the_offloaded_weights_in_host_memory():
    """The accelerate baseline: a model held on the host, dispatched with some decoder layers mapped to the host.
    Those layers' weights stay host tensors in accelerate's weights map (copied in at every forward), their
    parameters are placeholders, and the bytes counted on the device are exactly the other modules'. A model
    dispatched from where it is not on the host (here: meta) is refused, not measured."""
    import torch

    from models.random_model import random_model as build
    from tools.bench_offload import dispatch_offloaded, offloaded_weights

    dev = torch.device("meta")  # stands for the GPU: dispatch_model with a CPU main device offloads nothing
    model = build("qwen2moe-tiny", torch.device("cpu"), torch.float32, 0)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    on_host = {n: p for n, p in model.named_parameters() if n.startswith(("model.layers.1.", "model.layers.2."))}
    assert len(model.model.layers) == 3 and on_host
    total = nbytes(list(model.parameters()) + list(model.buffers()))
    device_map = {"model.embed_tokens": dev, "model.rotary_emb": dev, "model.layers.0": dev, "model.layers.1": "cpu",
                  "model.layers.2": "cpu", "model.norm": dev, "lm_head": dev}
    model, on_device = dispatch_offloaded(model, device_map, dev)
    weights = offloaded_weights(model)
    assert all(t.device.type == "cpu" for t in weights)
    assert sorted(t.shape for t in weights) == sorted(p.shape for p in on_host.values())
    assert nbytes(weights) == nbytes(on_host.values()) and on_device == total - nbytes(weights)
    params = dict(model.named_parameters())
    assert all(params[n].device.type == "meta" for n in on_host)
    with pytest.raises(RuntimeError, match="not in host memory"):
        dispatch_offloaded(build("qwen2moe-tiny", torch.device("cpu"), torch.float32, 0).to(dev), device_map, dev)


@pytest.mark.parametrize("argv,message", [
    (["--tokens", "0"], "--tokens 0: within 2..4096"),
    (["--tokens", "99999999999999"], "--tokens 99999999999999: within 2..4096"),
    (["--accelerate-tokens", "-1"], "--accelerate-tokens -1: within 2..4096"),
    (["--warmup-s", "inf"], "--warmup-s inf: must be a number in [0, 3600]"),
    (["--warmup-s", "nan"], "--warmup-s nan"),
    (["--traces", "no/such/traces"], "--traces no/such/traces: no trace set there"),
])
def test_bench_flags_out_of_range_are_refused_before_any_model_is_built(argv, message, capsys):
    """A value out of range is refused (never replaced by a default, never run until a hang or an unwritable
    JSON), and a --traces path that holds no set is named, not silently collected elsewhere."""
    from common.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        main(["--device", "cpu", "--preset", "qwen2moe-tiny", *argv])
    assert "built" not in capsys.readouterr().out
