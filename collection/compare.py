"""Do two trace sets of the same plan hold the same routing? The check behind every multi-GPU claim.

Two collections of one model, one set of texts and one batching (a `--device-map` run and a one-GPU run, a
torchrun run and one process) must hold exactly the same sequences and tokens. The router's choices must agree
exactly, except where the choice is a near tie that a rounding difference can flip; weights and hidden
states must agree within a tolerance:

- ids: a (layer, token) row *differs* when its ordered top-k ids differ. A differing row is a *tie* when, in
  either set, two neighbours among the top k+1 selection scores (the family's rule applied to the stored logits,
  `collection.families.selection_scores`) are within `tie_ulps` bfloat16 units in the last place of each other:
  at the precision the model computes in, which of them ranks first, or makes the cut, is not determined.
  Every other differing row is a *mismatch*. Without stored logits no row can be called a tie.
  (Group-limited routing: a near tie between two groups is not recognised and counts as a mismatch.)
- once a token's choice differs at layer l, its later layers, and through attention the later tokens of its
  sequence, compute on other inputs. Weights and hidden states are compared on *clean* rows only: rows of
  sequences none of whose rows differ at an earlier layer. Their count is reported.
- weights: max |a - b| over clean rows with equal ids (stored in float16); hidden states: per stored layer,
  max |a - b| over clean rows divided by max |a| of that layer; router logits: max |a - b| over clean rows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from collection.families import selection_scores
from collection.traces.format import TraceSet
from common.errors import UserError

BF16_MANTISSA_BITS = 7  # explicit fraction bits of bfloat16: neighbours differ by 2**(exponent - 7)


@dataclass
class Tolerance:
    tie_ulps: float = 2.0        # neighbouring selection scores this close (in bf16 ulps) make a tie
    weights_atol: float = 1e-2   # max |weight a - weight b| on clean rows with equal ids
    hidden_rtol: float = 2e-2    # max |h a - h b| / max |h a| per layer, on clean rows


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (float32 result; the smallest normal's spacing near 0)."""
    mag = x.abs().float().clamp(min=torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - BF16_MANTISSA_BITS)


def near_ties(scores: torch.Tensor, k: int, tie_ulps: float) -> torch.Tensor:
    """(N,) bool: some two neighbours among the top k+1 scores of a row are within `tie_ulps` bf16 ulps."""
    top = scores.float().topk(min(k + 1, scores.shape[-1]), dim=-1).values  # (N, k+1), descending
    gap = top[:, :-1] - top[:, 1:]
    tied = gap <= tie_ulps * bf16_ulp(top[:, :-1])
    return (tied & torch.isfinite(gap)).any(-1)


def row_agreement(ids_a: torch.Tensor, ids_b: torch.Tensor, offsets: np.ndarray,
                  ties: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per (layer, token) row of one shard: does it differ, is it a tie, is it a mismatch, is it clean.

    ids_*: (L, N, k); offsets: (S + 1,) sequence boundaries; ties: (L, N) bool or None (no logits stored).
    """
    differ = (ids_a != ids_b).any(-1)  # (L, N)
    tie = differ & ties if ties is not None else torch.zeros_like(differ)
    offsets = np.asarray(offsets, dtype=np.int64)
    seq_differs = torch.from_numpy(np.logical_or.reduceat(differ.numpy(), offsets[:-1], axis=1))  # (L, S)
    earlier = (torch.cumsum(seq_differs.long(), 0) - seq_differs.long()) > 0  # a differing row at a layer < l
    seq_of_row = torch.repeat_interleave(torch.arange(len(offsets) - 1), torch.from_numpy(np.diff(offsets)))  # (N,)
    return {"differ": differ, "tie": tie, "mismatch": differ & ~tie, "clean": ~earlier[:, seq_of_row]}


def compare_trace_sets(dir_a: Path, dir_b: Path, tol: Tolerance = Tolerance(), verify: bool = True) -> dict[str, Any]:
    """The agreement of trace set `dir_b` with the reference `dir_a` (see the module docstring)."""
    a, b = TraceSet(dir_a, verify=verify), TraceSet(dir_b, verify=verify)
    ma, mb = a.manifest, b.manifest
    same_shards = [s.file for s in ma.shards] == [s.file for s in mb.shards]
    if ma.plan.get("tokens_sha256") != mb.plan.get("tokens_sha256") or not same_shards:
        raise UserError(f"{dir_a} and {dir_b} are not collections of the same plan (texts, tokens or shards differ)")
    for key in ("num_layers", "num_experts", "top_k"):
        if ma.routing[key] != mb.routing[key]:
            raise UserError(f"{dir_a} and {dir_b} differ in routing.{key}")
    K, spec = ma.top_k, ma.routing.get("router") or {"scoring": "softmax"}
    correction = a.router_extras().get("score_correction_bias")
    sums = {"rows": 0, "differing_rows": 0, "tie_rows": 0, "mismatch_rows": 0, "clean_rows": 0}
    worst = {"weights_max_abs_diff": 0.0, "logits_max_abs_diff": 0.0, "hidden_max_rel_diff": 0.0,
             "hidden_max_abs_diff": 0.0}
    per_layer_mismatch = np.zeros(ma.num_layers, dtype=np.int64)
    identical = 0
    for i in range(len(a)):
        sa, sb = a.shard(i), b.shard(i)
        identical += sa.info.sha256 == sb.info.sha256
        for name in ("token_ids", "seq_offsets", "seq_ids", "seq_sources"):
            if not np.array_equal(sa.numpy(name), sb.numpy(name)):
                raise UserError(f"{sa.info.file}: {name} differ between {dir_a} and {dir_b}; not the same plan")
        ids_a, ids_b = sa.tensor("topk_ids"), sb.tensor("topk_ids")
        logits = "router_logits" in sa.entries and "router_logits" in sb.entries
        ties = None
        if logits:
            la, lb = sa.tensor("router_logits").float(), sb.tensor("router_logits").float()
            ties = torch.stack([
                near_ties(selection_scores(spec, la[l], None if correction is None else correction[l]), K, tol.tie_ulps)
                | near_ties(selection_scores(spec, lb[l], None if correction is None else correction[l]), K, tol.tie_ulps)
                for l in range(ma.num_layers)])
        rows = row_agreement(ids_a, ids_b, sa.numpy("seq_offsets"), ties)
        clean, same = rows["clean"], rows["clean"] & ~rows["differ"]
        sums["rows"] += rows["differ"].numel()
        sums["differing_rows"] += int(rows["differ"].sum())
        sums["tie_rows"] += int(rows["tie"].sum())
        sums["mismatch_rows"] += int(rows["mismatch"].sum())
        sums["clean_rows"] += int(clean.sum())
        per_layer_mismatch += rows["mismatch"].sum(1).numpy()
        wa, wb = sa.tensor("topk_weights").float(), sb.tensor("topk_weights").float()
        if same.any():
            worst["weights_max_abs_diff"] = max(worst["weights_max_abs_diff"], (wa - wb)[same].abs().max().item())
        if logits and clean.any():
            worst["logits_max_abs_diff"] = max(worst["logits_max_abs_diff"], (la - lb)[clean].abs().max().item())
        if "hidden" in sa.entries and "hidden" in sb.entries:
            for j, layer in enumerate(ma.hidden_layers):  # one layer at a time: (N, H) in float32
                keep = clean[layer]
                if not keep.any():
                    continue
                ha, hb = sa.tensor("hidden", j)[keep].float(), sb.tensor("hidden", j)[keep].float()
                diff = (ha - hb).abs().max().item()
                worst["hidden_max_abs_diff"] = max(worst["hidden_max_abs_diff"], diff)
                worst["hidden_max_rel_diff"] = max(worst["hidden_max_rel_diff"], diff / max(ha.abs().max().item(), 1e-30))
    within = (sums["mismatch_rows"] == 0 and worst["weights_max_abs_diff"] <= tol.weights_atol
              and worst["hidden_max_rel_diff"] <= tol.hidden_rtol)
    return {"reference": str(dir_a), "compared": str(dir_b), "shards": len(a), "identical_shards": identical,
            "sequences": sum(s.sequences for s in ma.shards), **sums,
            "clean_fraction": sums["clean_rows"] / max(sums["rows"], 1), **worst,
            "mismatch_rows_per_layer": per_layer_mismatch.tolist(),
            "ties_detectable": bool(ma.capture.get("store_logits", True) and mb.capture.get("store_logits", True)),
            "tolerance": asdict(tol), "within_tolerance": bool(within)}
