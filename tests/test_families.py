"""Every supported MoE family, tiny and random, built from transformers' own config class (no hub):
what RoutingCapture stores on a padded batch is exactly what the model used, layer by layer.

    pytest -q tests/test_families.py

The witnesses are independent of collection/families.py: the router modules are the class transformers
itself records `output_router_logits` from (`_can_record_outputs`), the experts are found by class name,
and a pre-hook on them records the (ids, weights) the experts were actually called with.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM

from collection.capture import RoutingCapture, pad_batch
from collection.families import FAMILIES, family_of, moe_layers, router_spec, selection_scores
from collection.model import router_weights, routing_shape
from common.errors import UserError
from models.moe_configs import FULL_SIZE, PUBLISHED_PARAMETERS, make_config

# decoder layers that are MoE in each tiny preset, worked out by hand from its config:
# qwen2 mlp_only_layers [0]; qwen3 decoder_sparse_step 2; deepseek first_k_dense_replace 1 / 2 (of 5);
# jamba expert_layer_period 2, offset 1
MOE_LAYERS = {"qwen2_moe": [1, 2, 3], "qwen3_moe": [1, 3], "mixtral": [0, 1, 2, 3], "olmoe": [0, 1, 2, 3],
              "deepseek_v2": [1, 2, 3], "deepseek_v3": [2, 3, 4], "gpt_oss": [0, 1, 2, 3], "phimoe": [0, 1, 2, 3],
              "granitemoe": [0, 1, 2, 3], "jamba": [1, 3]}


def tiny(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(f"tiny-{model_type}"), dtype=torch.float32).eval()
    for name, p in model.named_parameters():  # random routers (init zeros some) and biases: real choices
        if "router" in name or ".gate." in name or "bias" in name:
            torch.nn.init.normal_(p, std=0.5)
    for m in model.modules():  # DeepSeek-V3's correction bias is a buffer
        if hasattr(m, "e_score_correction_bias"):
            torch.nn.init.normal_(m.e_score_correction_bias, std=0.3)
    return model


def layer_of(name: str) -> int:
    return int(name.split("layers.")[1].split(".")[0])


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_capture_equals_the_models_own_routing_on_a_padded_batch(model_type):
    model = tiny(model_type)
    cfg = model.config
    shape = routing_shape(model)
    L, E, K, H = shape.num_layers, shape.num_experts, shape.top_k, shape.hidden_size
    assert shape.family == model_type and shape.moe_layer_indices == MOE_LAYERS[model_type]
    assert K == cfg.num_experts_per_tok and L == len(MOE_LAYERS[model_type])

    # independent witnesses: transformers' own router class, experts found by class name
    router_cls = model.model._can_record_outputs["router_logits"].target_class
    routers, experts = {}, {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, router_cls):
            hooks.append(mod.register_forward_hook(lambda m, a, o, n=name: routers.__setitem__(layer_of(n), o)))
        elif type(mod).__name__.endswith("Experts"):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, n=name: experts.__setitem__(layer_of(n), (a[1].clone(), a[2].clone()))))
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 8000, (n,), generator=g).tolist() for n in (9, 4, 13)]
    ids, mask = pad_batch(seqs, 0)
    cap = RoutingCapture(model, list(range(L)), torch.float32, True, 64, K, shape.norm_topk_prob, E, H)
    hb = cap.forward(model, ids, mask, output_router_logits=True)
    cap.close()
    for h in hooks:
        h.remove()

    real = mask.reshape(-1).bool()
    n = hb.rows
    assert n == int(real.sum()) == 26  # padding is never stored
    assert sorted(routers) == sorted(experts) == MOE_LAYERS[model_type]  # the MoE layers, by the model itself
    spec = router_spec(model)
    scale = spec["routed_scaling_factor"]
    for j, layer in enumerate(MOE_LAYERS[model_type]):
        used_ids, used_w = experts[layer]
        got_ids, got_w, got_logits = hb.topk_ids[j, :n].long(), hb.topk_weights[j, :n].float(), hb.router_logits[j, :n].float()
        assert torch.equal(got_ids, used_ids[real].long()), f"layer {layer}: ids differ from the experts' input"
        torch.testing.assert_close(got_w, used_w[real].float(), atol=2e-3, rtol=2e-3)  # stored in float16
        torch.testing.assert_close(got_logits, cap.last_output.router_logits[j][real].float(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(got_logits, routers[layer][0][real].float(), atol=2e-3, rtol=2e-3)
        # the documented routing rule (Family.routing) reproduces the choice from the logits alone
        bias = getattr(moe_layers(model)[j].router, "e_score_correction_bias", None)
        chosen = selection_scores(spec, routers[layer][0][real], bias).topk(K, -1).indices
        assert torch.equal(chosen.sort(-1).values, used_ids[real].sort(-1).values), f"layer {layer}: selection rule"
        w, logits = used_w[real].float(), routers[layer][0][real].float()
        if spec["weights_normalized"]:
            torch.testing.assert_close(w.sum(-1), torch.full((n,), scale), atol=1e-4, rtol=1e-4)
        elif spec["scoring"] == "softmax":  # unnormalised: the softmax probabilities of the chosen experts
            torch.testing.assert_close(w, logits.softmax(-1).gather(1, used_ids[real]) * scale, atol=1e-5, rtol=1e-4)
        else:  # PhiMoE's sparsemixer: each weight a softmax within the jitter band, the pair not summing to 1
            assert ((w > 0) & (w <= 1)).all() and not torch.allclose(w.sum(-1), torch.ones(n))


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_router_weights_and_manifest_routing_fields(model_type):
    model = tiny(model_type)
    shape = routing_shape(model).to_json()
    L = len(MOE_LAYERS[model_type])
    W = router_weights(model)
    assert W.shape == (L, shape["num_experts"], shape["hidden_size"])
    assert torch.equal(W[0], moe_layers(model)[0].router.weight.float())
    for key in ("family", "num_experts", "top_k", "moe_layer_indices", "norm_topk_prob", "router"):
        assert key in shape
    assert shape["router"]["router_bias"] == (model_type == "gpt_oss")
    assert shape["router"]["score_correction_bias"] == (model_type == "deepseek_v3")


def test_mixtral_and_qwen2_normalisation_are_read_per_family():
    # Mixtral always renormalises (no config field); Qwen2 follows norm_topk_prob
    assert routing_shape(tiny("mixtral")).norm_topk_prob is True
    assert routing_shape(tiny("qwen2_moe")).norm_topk_prob is False
    torch.manual_seed(0)
    q = AutoModelForCausalLM.from_config(make_config("tiny-qwen2_moe", norm_topk_prob=True))
    assert routing_shape(q).norm_topk_prob is True


def test_an_unsupported_model_type_is_one_clear_error():
    from transformers import AutoConfig

    with pytest.raises(UserError, match="not a supported MoE family"):
        family_of(AutoConfig.for_model("llama"))


def test_a_config_that_disagrees_with_the_modules_is_refused():
    model = tiny("deepseek_v3")
    model.config.first_k_dense_replace = 1  # the config now claims layer 1 is MoE; its module is dense
    with pytest.raises(UserError, match="decoder layer 1 is MoE by the config"):
        moe_layers(model)


@pytest.mark.parametrize("preset", sorted(FULL_SIZE))
def test_full_size_presets_match_the_published_parameter_counts(preset):
    with torch.device("meta"):  # no memory: shapes only
        model = AutoModelForCausalLM.from_config(make_config(preset))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / PUBLISHED_PARAMETERS[preset] - 1) < 0.01, f"{preset}: {n:,} parameters"
    assert family_of(model).model_type == FULL_SIZE[preset]["model_type"]


def test_collected_manifest_records_the_family_and_loads_old_manifests(tmp_path):
    """collect_traces on a DeepSeek-V3 (dense first layers, correction bias): the manifest holds family,
    E, top_k, MoE decoder layers and normalisation; router_weights.safetensors holds the bias; a manifest
    written before families existed still loads, with the defaults it implies."""
    import json

    from collection.traces.format import MANIFEST, TraceSet
    from scripts.collect_traces import main as collect
    from tools.make_random_checkpoint import main as make_checkpoint

    make_checkpoint(["--preset", "tiny-deepseek_v3", "--dtype", "float32", "--output", str(tmp_path / "m")])
    collect(["--model", str(tmp_path / "m"), "--datasets", "news", "--target_traces", "6", "--shard_size", "6",
             "--max_length", "32", "--device", "cpu", "--dtype", "float32", "--output", str(tmp_path / "t")])
    ts = TraceSet(tmp_path / "t")
    m = ts.manifest
    assert (m.family, m.num_experts, m.top_k, m.moe_layer_indices, m.norm_topk_prob) == ("deepseek_v3", 16, 4, [2, 3, 4], True)
    assert m.routing["router"]["groups"] == {"n_group": 4, "topk_group": 2, "group_score": "sum of top-2"}
    extras = ts.router_extras()
    assert set(extras) == {"score_correction_bias"} and extras["score_correction_bias"].shape == (3, 16)
    assert ts.router_weights().shape == (3, 16, 32)
    # the router control applies DeepSeek-V3's own rule (sigmoid + correction bias + groups): exactly 1.0
    from validation.coverage.evaluate import evaluate
    from validation.coverage.scorers import baseline_scorer

    ids = ts.sequence_table()["seq_id"]
    control = baseline_scorer("router", ts, 0, ids, torch.device("cpu"))
    assert evaluate(control, ts, ids, 0, torch.device("cpu"), progress=False).summary()["recall@4"] == 1.0

    d = json.loads((tmp_path / "t" / MANIFEST).read_text())  # as written before this change
    for key in ("family", "router", "moe_layer_indices"):
        d["routing"].pop(key)
    (tmp_path / "t" / MANIFEST).write_text(json.dumps(d))
    old = TraceSet(tmp_path / "t").manifest
    assert (old.family, old.moe_layer_indices, old.top_k) == ("qwen2_moe", [0, 1, 2], 4)
    d["routing"]["moe_layer_indices"] = [2, 2, 4]  # not increasing: refused with the file named
    (tmp_path / "t" / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(UserError, match="moe_layer_indices"):
        TraceSet(tmp_path / "t")
