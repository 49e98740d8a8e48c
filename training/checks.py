"""What a training run needs from a trace set, checked before anything is trained; what its result is worth; what an
interrupted run leaves behind.

`missing_inputs` lists, for a run's resolved flags, every input the trace set lacks, each with the collection flag
that would store it and (where one exists) the training flags that do without it. The trainer refuses such a run in
one line before the first step; scripts/compare_predictors.py asks the same of every predictor it is about to train,
before it trains any.

`quality_warning` is the trainer's last word on a finished run: a best validation recall within 0.05 of random
(K / E) or below router reuse (layer l+d's own router on h_l, training-free) at the same lookahead is a predictor
that learned too little to be worth prefetching with; the line names what usually helps.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collection.traces.format import ROUTER_WEIGHTS, TraceSet
from collection.traces.rows import input_layers
from common.errors import UserError

NEAR_RANDOM = 0.05  # a best recall@K closer than this to K / E has learned next to nothing


@dataclass(frozen=True)
class Need:
    """An input a run needs and the trace set lacks."""
    what: str            # what the run reads and the traces lack, in one clause
    collect: str         # how to collect traces that hold it
    without: str | None  # training flags that do without it (None: the predictor cannot)


def missing_inputs(args: argparse.Namespace, ts: TraceSet) -> list[Need]:
    """Every input the run of `args` (recipe flags resolved: training.trainer.resolve_defaults) needs and `ts` lacks."""
    m = ts.manifest
    hidden = not getattr(args, "routing_only", False)  # the routing-only hybrid reads no MoE input
    # a lookahead the model has, and h_l stored at some layer l where it is read (one line if not)
    input_layers(ts, args.lookahead, hidden and bool(m.hidden_layers))
    needs = []
    if hidden and not m.hidden_layers:  # a routing-only set (imported routing): the hybrid's history part trains
        needs.append(Need(f"the {args.model_type} predictor reads the MoE input h_l, and {ts.dir} stores no hidden "
                          "states (routing only)", "collect with --hidden-layers all",
                          "--routing-only" if args.model_type == "hybrid" else "--model-type hybrid --routing-only"))
    if args.loss_kl > 0 and not m.capture.get("store_logits", False):
        recipe = "the anchored predictor's default recipe" if args.model_type == "anchored" else "this run"
        needs.append(Need(f"{recipe} distils the target router's logits (--loss-kl {args.loss_kl:g}), and {ts.dir} "
                          "holds none (collected with --no-logits)", "collect without --no-logits", "--loss-kl 0"))
    if args.model_type == "anchored" and not (ts.dir / ROUTER_WEIGHTS).is_file():
        needs.append(Need(f"the anchored predictor starts from the model's router matrices, and "
                          f"{ts.dir / ROUTER_WEIGHTS} is missing (legacy imports have none)",
                          "collect with scripts/collect_traces.py", None))
    if (args.model_type == "anchored" and (args.past_layers or args.window or args.context)
            and sorted(m.hidden_layers) != list(range(m.num_layers))):
        needs.append(Need(f"the anchored predictor reads the MoE inputs of earlier layers and tokens (--past-layers "
                          f"{args.past_layers}, --window {args.window}, --context {args.context}), and {ts.dir} stores "
                          f"layers {m.hidden_layers} only", "collect with --hidden-layers all",
                          "--past-layers 0 --window 0 --context 0"))
    return needs


def check_traces_serve(args: argparse.Namespace, ts: TraceSet) -> None:
    """One line naming what to add, before anything is trained, when `ts` cannot serve the run of `args`."""
    for need in missing_inputs(args, ts):
        raise UserError(f"{need.what}: {need.collect}" + (f", or add {need.without}" if need.without else ""))


def quality_warning(recall: float, top_k: int, num_experts: int, lookahead: int, reuse: float | None) -> str | None:
    """One line when the best validation recall@K is within NEAR_RANDOM of random (K / E) or below router reuse's
    (None where that is not known: no router matrices, or d = 0, where it would be the router itself); else None."""
    chance = top_k / num_experts
    if recall < chance + NEAR_RANDOM:
        return (f"warning: best validation recall@{top_k} {recall:.4f} is within {NEAR_RANDOM} of random "
                f"({chance:.4f}): the predictor learned next to nothing; try another --lr (1e-3 suits most "
                "predictors) or more --epochs")
    if reuse is not None and recall < reuse:
        return (f"warning: best validation recall@{top_k} {recall:.4f} is below router reuse's {reuse:.4f} at "
                f"lookahead {lookahead} (layer l+{lookahead}'s router on h_l, no training): prefetch with router "
                "reuse instead, or train longer / with another --lr")
    return None


def window_quality_warning(ap: float, random_ap: float) -> str | None:
    """The closing check of a --lookahead-tokens predictor: one line when its best validation average precision is
    within NEAR_RANDOM of a random ranking's (router reuse predicts no window, so there is nothing else to beat)."""
    if ap < random_ap + NEAR_RANDOM:
        return (f"warning: best validation window_ap {ap:.4f} is within {NEAR_RANDOM} of a random ranking's "
                f"({random_ap:.4f}): the predictor learned next to nothing about which experts come soon; try another "
                "--lr or more --epochs")
    return None


def interrupted_note(out: Path, latest: int | None, best: dict[str, Any] | None) -> str:
    """What an interrupted training run leaves in `out`, for the line that follows "interrupted": the epoch of its
    latest_checkpoint.pth and of its best_checkpoint.pth (training has no --resume)."""
    if latest is None:
        return "no epoch had finished: nothing was kept"
    note = f"kept {out / 'latest_checkpoint.pth'} (epoch {latest})"
    if best is not None:
        note += f" and best_checkpoint.pth (epoch {best['epoch']}, val {best['metric']} {best['value']:.4f})"
    return note + "; training has no --resume: rerun the same command with --overwrite to start again"
