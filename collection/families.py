"""Every MoE family the project supports, one entry each: where its MoE blocks, routers and experts are,
how its router's outputs read, and which decoder layers are MoE. Adding a family = one `Family` below.

Facts read from transformers 5.24's modeling files (`transformers/models/<model_type>/modeling_*.py`).
In every supported family the router module returns the same triple, which the capture hook reads as is
(nothing is recomputed):

    router(x) -> (router_logits (N, E), top_k_weights (N, k), top_k_index (N, k)),  N = B*T tokens

`router_logits` are the linear router's outputs (GPT-OSS: including its bias; DeepSeek: in float32);
`top_k_weights` are the weights the experts are multiplied by, `top_k_index` the experts chosen, both in
the router's order. The families differ in how the router goes from logits to choice and weights
(`Family.routing`, also written into each trace set's manifest) and `selection_scores` restates that
rule for code that only has the logits (router baselines): its top-k is the router's choice.

Not supported (docs/FAMILIES.md): families outside this list, and transformers 4.x, whose MoE blocks
returned (hidden, logits) and whose experts were per-expert nn.Linear modules.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from common.errors import UserError


def _every_layer(cfg: Any, i: int) -> bool:
    return True


def _qwen_moe_layer(cfg: Any, i: int) -> bool:
    # Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer: dense MLP in mlp_only_layers and off the sparse step
    return i not in (cfg.mlp_only_layers or []) and cfg.num_experts > 0 and (i + 1) % cfg.decoder_sparse_step == 0


def _deepseek_moe_layer(cfg: Any, i: int) -> bool:
    return i >= cfg.first_k_dense_replace  # the first k decoder layers keep a dense MLP


def _deepseek_shared_width(cfg: Any) -> int:
    return int(cfg.n_shared_experts or 0) * int(cfg.moe_intermediate_size)  # n_shared experts of the routed width


def _jamba_moe_layer(cfg: Any, i: int) -> bool:
    return cfg.layers_num_experts[i] > 1  # num_experts on every expert_layer_period-th layer from the offset


@dataclass(frozen=True)
class Family:
    """Where one family keeps its MoE parts and how its router reads (transformers 5.24)."""
    model_type: str               # config.model_type
    block: str                    # decoder-layer attribute holding the MoE block
    router: str                   # MoE-block attribute holding the router (returns the triple above)
    num_experts: str              # config field with E
    routing: str                  # how the router goes from logits to (weights, ids), in words
    is_moe_layer: Callable[[Any, int], bool] = _every_layer  # (config, decoder layer) -> MoE or dense
    normalized: Callable[[Any], bool] = lambda cfg: False  # do the top-k weights sum to 1 (x scaling)?
    scoring: str = "softmax"      # selection_scores: softmax | sigmoid (+ correction bias) | logits
    grouped: bool = False         # group-limited top-k (DeepSeek n_group / topk_group)
    experts: str = "experts"      # MoE-block attribute holding the routed experts
    fused: tuple[str, ...] = ("gate_up_proj", "down_proj")  # 3-D (E, ., .) parameters of the experts
    shared: str | None = None     # MoE-block attribute of the shared expert(s), if any
    shared_gate: str | None = None  # MoE-block attribute of the shared expert's gate, if any
    router_bias: str | None = None  # router attribute: bias added to the logits (GPT-OSS)
    correction_bias: str | None = None  # router buffer added to the scores for selection only (DeepSeek-V3)
    dense_modules: tuple[str, ...] = ()  # nn.Linear names the 4-bit path keeps 16-bit: the model reads .weight
    expert_width: str = "intermediate_size"  # config field of a routed expert's width I (gate, up: I x H; down: H x I)
    expert_bias: bool = False     # the routed experts carry biases (2I + H per expert)
    shared_width: Callable[[Any], int] = lambda cfg: 0  # total width of the shared expert(s), 0 if none
    tiny: dict[str, Any] = field(default_factory=dict)  # config fields of a seconds-fast test model


# The tiny models share these fields (each entry adds or overrides its own).
TINY_BASE = {"vocab_size": 8192, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
             "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}

FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("qwen2_moe", block="mlp", router="gate", num_experts="num_experts",
           routing="softmax over all E logits (float32), top-k of the probabilities; renormalised to sum 1 "
                   "when norm_topk_prob",
           is_moe_layer=_qwen_moe_layer, normalized=lambda c: bool(c.norm_topk_prob),
           shared="shared_expert", shared_gate="shared_expert_gate", expert_width="moe_intermediate_size",
           shared_width=lambda c: int(c.shared_expert_intermediate_size),
           tiny={"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                 "shared_expert_intermediate_size": 32, "norm_topk_prob": False, "mlp_only_layers": [0]}),
    Family("qwen3_moe", block="mlp", router="gate", num_experts="num_experts",
           routing="softmax over all E logits (float32), top-k of the probabilities; renormalised to sum 1 "
                   "when norm_topk_prob",
           is_moe_layer=_qwen_moe_layer, normalized=lambda c: bool(c.norm_topk_prob),
           expert_width="moe_intermediate_size",
           tiny={"num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 16, "head_dim": 8,
                 "norm_topk_prob": True, "decoder_sparse_step": 2}),
    Family("mixtral", block="mlp", router="gate", num_experts="num_local_experts",
           routing="softmax over all E logits (float32), top-k of the probabilities, always renormalised",
           normalized=lambda c: True,
           tiny={"num_local_experts": 8, "num_experts_per_tok": 2}),
    Family("olmoe", block="mlp", router="gate", num_experts="num_experts",
           routing="softmax over all E logits (float32), top-k of the probabilities; renormalised to sum 1 "
                   "when norm_topk_prob",
           normalized=lambda c: bool(c.norm_topk_prob),
           tiny={"num_experts": 16, "num_experts_per_tok": 4, "norm_topk_prob": False}),
    Family("deepseek_v2", block="mlp", router="gate", num_experts="n_routed_experts",
           routing="softmax over all E float32 logits; topk_method greedy: top-k of the probabilities; "
                   "group_limited_greedy: only the topk_group groups (of n_group) with the highest max "
                   "probability compete; weights = probabilities x routed_scaling_factor, never renormalised "
                   "(transformers 5.24 ignores norm_topk_prob here)",
           is_moe_layer=_deepseek_moe_layer, grouped=True, shared="shared_experts",
           expert_width="moe_intermediate_size", shared_width=_deepseek_shared_width,
           tiny={"n_routed_experts": 8, "num_experts_per_tok": 3, "moe_intermediate_size": 16,
                 "n_shared_experts": 1, "first_k_dense_replace": 1, "num_key_value_heads": 4,
                 "kv_lora_rank": 16, "q_lora_rank": None, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
                 "v_head_dim": 8, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                 "routed_scaling_factor": 1.0}),
    Family("deepseek_v3", block="mlp", router="gate", num_experts="n_routed_experts",
           routing="sigmoid of the float32 logits; choice: top-k of sigmoid + e_score_correction_bias among "
                   "the topk_group groups (of n_group) whose two best biased scores sum highest; weights: "
                   "the unbiased sigmoid scores of the chosen experts, renormalised when norm_topk_prob, "
                   "x routed_scaling_factor",
           is_moe_layer=_deepseek_moe_layer, normalized=lambda c: bool(c.norm_topk_prob), scoring="sigmoid",
           grouped=True, shared="shared_experts", correction_bias="e_score_correction_bias",
           expert_width="moe_intermediate_size", shared_width=_deepseek_shared_width,
           tiny={"n_routed_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 16,
                 "n_shared_experts": 1, "first_k_dense_replace": 2, "num_hidden_layers": 5,
                 "num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_nope_head_dim": 8,
                 "qk_rope_head_dim": 4, "v_head_dim": 8, "n_group": 4, "topk_group": 2,
                 "routed_scaling_factor": 2.5, "norm_topk_prob": True}),
    Family("gpt_oss", block="mlp", router="router", num_experts="num_local_experts",
           routing="logits = W h + b (the router has a bias); top-k of the logits; weights = softmax over "
                   "the k chosen logits (sum 1)",
           normalized=lambda c: True, scoring="logits", router_bias="bias", expert_bias=True,
           tiny={"num_local_experts": 8, "num_experts_per_tok": 2, "head_dim": 8, "sliding_window": 8}),
    Family("phimoe", block="mlp", router="router", num_experts="num_local_experts",
           routing="sparsemixer (eval mode): expert 1 = argmax of the logits, expert 2 = argmax of the rest; "
                   "each weight = softmax over the logits within router_jitter_noise of that expert's, so "
                   "the two do not sum to 1; top-2 only",
           scoring="logits",
           tiny={"num_local_experts": 8, "num_experts_per_tok": 2}),
    Family("granitemoe", block="block_sparse_moe", router="router", num_experts="num_local_experts",
           routing="top-k of the logits (float32); weights = softmax over the k chosen logits (sum 1)",
           normalized=lambda c: True, scoring="logits",
           tiny={"num_local_experts": 8, "num_experts_per_tok": 2}),
    Family("jamba", block="feed_forward", router="router", num_experts="num_experts",
           routing="softmax over all E logits (float32), top-k of the probabilities, never renormalised",
           is_moe_layer=_jamba_moe_layer, dense_modules=("dt_proj",),
           tiny={"num_experts": 8, "num_experts_per_tok": 2, "attn_layer_period": 2, "attn_layer_offset": 1,
                 "expert_layer_period": 2, "expert_layer_offset": 1, "mamba_d_state": 4, "mamba_expand": 2,
                 "mamba_dt_rank": 4}),
]}


def family_of(model_or_config: Any) -> Family:
    cfg = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(f"model type {model_type!r} ({type(model_or_config).__name__}) is not a supported MoE "
                        f"family; supported: {', '.join(FAMILIES)} (docs/FAMILIES.md)")
    return FAMILIES[model_type]


@dataclass
class MoeLayer:
    """One MoE decoder layer's parts, as the model holds them."""
    decoder_index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise UserError(f"{type(model).__name__}: no decoder layers found; not a supported causal LM")
    return layers


def moe_layers(model: nn.Module) -> list[MoeLayer]:
    """Every MoE decoder layer, in order. The config says which layers are MoE; the modules must agree
    (a dense layer has no router), so a family entry that misreads either fails here, not in the data."""
    fam, cfg = family_of(model), model.config
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, fam.block, None)
        router = getattr(block, fam.router, None)
        experts = getattr(block, fam.experts, None)
        has_parts = router is not None and experts is not None
        if fam.is_moe_layer(cfg, i) != has_parts:
            raise UserError(f"{fam.model_type}: decoder layer {i} is {'MoE' if fam.is_moe_layer(cfg, i) else 'dense'} "
                            f"by the config, but its {fam.block}.{fam.router}/{fam.experts} "
                            f"{'are missing' if not has_parts else 'exist'}; this transformers version differs "
                            f"from the one collection/families.py describes (5.24)")
        if has_parts:
            out.append(MoeLayer(i, block, router, experts))
    if not out:
        raise UserError(f"{type(model).__name__}: no MoE layers")
    return out


def num_experts(cfg: Any) -> int:
    return int(getattr(cfg, family_of(cfg).num_experts))


def router_outputs(fam: Family, output: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (N, E), weights (N, k), ids (N, k)): the router's own return value, checked, not recomputed."""
    if not (isinstance(output, tuple) and len(output) == 3 and all(isinstance(t, torch.Tensor) for t in output)):
        raise RuntimeError(f"{fam.model_type}: the router returned {type(output).__name__}, not the "
                           f"(logits, weights, ids) triple of transformers 5.24 (collection/families.py)")
    return output


def router_spec(model: nn.Module) -> dict[str, Any]:
    """What a reader of the traces needs to redo the router's choice from stored logits (manifest)."""
    fam, cfg = family_of(model), model.config
    spec: dict[str, Any] = {"routing": fam.routing, "scoring": fam.scoring,
                            "weights_normalized": fam.normalized(cfg),
                            "routed_scaling_factor": float(getattr(cfg, "routed_scaling_factor", 1.0) or 1.0),
                            "router_bias": fam.router_bias is not None,
                            "score_correction_bias": fam.correction_bias is not None,
                            "shared_expert": fam.shared is not None, "shared_expert_gate": fam.shared_gate is not None}
    if fam.grouped:
        grouped = fam.scoring == "sigmoid" or getattr(cfg, "topk_method", None) == "group_limited_greedy"
        spec["groups"] = {"n_group": int(cfg.n_group), "topk_group": int(cfg.topk_group),
                          "group_score": "sum of top-2" if fam.scoring == "sigmoid" else "max"} if grouped else None
    return spec


def router_extras(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per-MoE-layer router tensors besides the weight matrix: `router_bias.{l}` (E,) and
    `score_correction_bias.{l}` (E,), stored beside `router.{l}` in router_weights.safetensors."""
    fam = family_of(model)
    out = {}
    for l, m in enumerate(moe_layers(model)):
        if fam.router_bias:
            out[f"router_bias.{l}"] = getattr(m.router, fam.router_bias).detach().float().cpu()
        if fam.correction_bias:
            out[f"score_correction_bias.{l}"] = getattr(m.router, fam.correction_bias).detach().float().cpu()
    return out


def selection_scores(spec: dict[str, Any], logits: torch.Tensor,
                     correction_bias: torch.Tensor | None = None) -> torch.Tensor:
    """(N, E) scores whose top-k is the router's choice, from its logits (which include any router bias).

    For code that has logits but not the router (router baselines on stored hidden states). Softmax
    families rank by the logits themselves (softmax is monotone); DeepSeek-V3 ranks sigmoid + correction
    bias; grouped routing sets experts outside the chosen groups to -inf. tests/test_families.py checks
    that top-k of these scores equals the ids the model used, family by family.
    """
    scores = logits.float()
    if spec["scoring"] == "sigmoid":
        scores = scores.sigmoid()
        if correction_bias is not None:
            scores = scores + correction_bias.float()
    groups = spec.get("groups")
    if groups:
        G, keep = groups["n_group"], groups["topk_group"]
        per_group = scores.view(scores.shape[0], G, -1)
        if groups["group_score"] == "max":
            # DeepSeek-V2 ranks groups by their best softmax probability: softmax is monotone within a
            # row, so the best logit ranks them the same
            group_scores = per_group.amax(-1)
        else:  # DeepSeek-V3: sum of each group's two best (biased) scores
            group_scores = per_group.topk(2, dim=-1).values.sum(-1)
        chosen = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_scores.topk(keep, -1).indices, True)
        scores = scores.masked_fill(~chosen.repeat_interleave(per_group.shape[-1], dim=1), float("-inf"))
    return scores
