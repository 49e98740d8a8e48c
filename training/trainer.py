"""Training an expert predictor on a trace set: the loop shared by the train_*_predictor scripts.

Story of a run: read the trace set and split its sequences (train / val / test, stratified by
source, seeded); build the predictor from the manifest's routing shape (the anchored kind also copies
the model's router matrices in); each epoch, walk the training shards `--shards-per-group` at a time,
shuffle that group's (token, layer) rows and take AdamW steps on the loss (the seed's soft
cross-entropy, plus optional distillation to the target router and an MSE on the predicted hidden
state); validate; keep `latest_checkpoint.pth` and `best_checkpoint.pth`.

With `--lookahead-tokens W` the target of row (t, l) is instead the set of experts layer l uses in tokens
t+1..t+W of the same sequence (what an eviction policy asks: which cached expert is needed soon), learned
with a binary cross-entropy per expert and validated with the window metrics (average precision, AUC,
recall@k against the set); rows with no later token are left out.

Flags left unset take their kind's defaults (`KIND_DEFAULTS`): the seed's kinds keep the seed's loss and
per-epoch cosine, so the seed-recipe row never changes; the anchored kind gets its best measured recipe.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from collection.traces.format import DEFAULT_TRACES, TraceSet, require_token_ids
from collection.traces.rows import (
    SplitBlocks,
    TokenBlock,
    has_later_token,
    hidden_at,
    input_layers,
    load_block,
    mean_tokens_per_sequence,
    split_sequences,
    targets,
    window_targets,
)
from common.atomic import PARTIAL_SUFFIX, atomic_write_json
from common.errors import UserError, number_flag
from common.paths import TRAINING_RUN_FILES, check_writable, refuse_symlink
from models.checkpoint import check_token_ids, save_checkpoint
from models.features import feature_spec, make_features
from models.predictors import (
    CONFIG_LIMITS,
    PREDICTORS,
    PredictorConfig,
    build_predictor,
    count_parameters,
    flops_per_row,
)
from training.checks import check_traces_serve, interrupted_note, quality_warning, window_quality_warning
from training.distributed import data_parallel, describe

# the smallest --lr taken: below it AdamW's steps vanish under float32 rounding of the weights
MIN_LR = 1e-12

# every file a run writes in --output: what --overwrite may replace, and all it may replace
OUTPUT_FILES = TRAINING_RUN_FILES  # a run writes these into --output, and nothing else

# validate(model, trace set, sequence ids, lookahead, device, blocks, loss_fn, dtype) -> flat metric dict with
# "loss": the train scripts pass `validation.coverage.evaluate.epoch_validation`, the project's one evaluation loop
Validate = Callable[[nn.Module, TraceSet, np.ndarray, int, torch.device, SplitBlocks,
                     Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.dtype], dict[str, float]]
# reference(trace set, sequence ids, lookahead, device, blocks) -> router reuse's recall@K on those rows, or None where
# it is not defined: `validation.coverage.evaluate.router_reuse_recall`, passed by the train scripts
Reference = Callable[[TraceSet, np.ndarray, int, torch.device, SplitBlocks], float | None]


def add_training_args(p: argparse.ArgumentParser, *, kind: str, shards_per_group: int, batch_size: int, lr: float,
                      epochs: int, lookahead: int, output: str) -> None:
    """The seed's flags with its values as defaults, plus what a prefetching study needs."""
    g = p.add_argument_group("data")
    g.add_argument("--traces", default=DEFAULT_TRACES, help=f"trace directory (default {DEFAULT_TRACES})")
    g.add_argument("--shards-per-group", "--shards_per_group", type=int, default=shards_per_group,
                   help=f"shards loaded together; rows are shuffled within a group (default {shards_per_group})")
    g.add_argument("--lookahead", type=int, default=lookahead,
                   help=f"predict layer l+d's experts from layer l (default {lookahead}; 0 = the seed's same-layer task)")
    g.add_argument("--lookahead-tokens", type=int, default=0,
                   help="W >= 1: predict, for token t at layer l, which experts layer l uses in the next W tokens "
                        "t+1..t+W (an eviction policy's question; a binary cross-entropy per expert; needs "
                        "--lookahead 0; simple, layer-aware and hybrid). Default 0: layers ahead (--lookahead)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="sequences held out for validation (0.1)")
    g.add_argument("--test-fraction", type=float, default=0.1, help="sequences held out for the test split (0.1)")
    g.add_argument("--no-verify", action="store_true", help="skip shard checksum verification (faster start)")
    g.add_argument("--allow-incomplete", action="store_true",
                   help="train on the finished shards of a collection that has not completed")
    g = p.add_argument_group("optimisation (seed defaults)")
    g.add_argument("--batch-size", "--batch_size", type=int, default=batch_size,
                   help=f"sequences per step, as the seed counted them (default {batch_size}): a step takes "
                        "batch-size x mean tokens per sequence x layers (token, layer) rows, shuffled across the group "
                        "(under torchrun: the rows of one step summed over the processes)")
    g.add_argument("--batch-rows", type=int, default=None, help="token rows per step (overrides --batch-size)")
    g.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate (default {lr})")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (0.01)")
    g.add_argument("--epochs", type=int, default=epochs, help=f"epochs; cosine schedule over them (default {epochs})")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (1.0)")
    g.add_argument("--hidden-dim", type=int, default=256, help="predictor width (256, the seed's)")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout (0.1)")
    g.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and shuffling (0)")
    g.add_argument("--select-metric", default=None, help="validation metric that picks best_checkpoint "
                   "(default recall@K, K = the model's top-k; the seed used any_hit@1)")
    g.add_argument("--exclude-sources", default="", help="comma list of source names left out of train and val "
                   "(leave-one-domain-out; the test split keeps them)")
    g = p.add_argument_group("recipe (unset: the kind's default, KIND_DEFAULTS; the seed's kinds keep the seed's)")
    g.add_argument("--loss-ce", type=float, default=None, help="weight of the soft cross-entropy on the true top-k "
                   "(with --lookahead-tokens: of the binary cross-entropy on the window's set) (1)")
    g.add_argument("--loss-kl", type=float, default=None, help="weight of the KL to the target router's softmax "
                   "(needs stored router logits; 0)")
    g.add_argument("--loss-mse", type=float, default=None, help="weight of the MSE of the predicted h_{l+d} "
                   "against the stored one, relative to its mean square (anchored only; 0)")
    g.add_argument("--schedule", choices=["epoch", "step"], default=None,
                   help="epoch: cosine stepped per epoch (the seed's); step: linear warm-up then cosine per step")
    g.add_argument("--warmup", type=float, default=None, help="warm-up share of all steps with --schedule step (0.05)")
    g = p.add_argument_group("anchored predictor (--model-type anchored; unset: KIND_DEFAULTS)")
    g.add_argument("--past-layers", type=int, default=None, help="this token's MoE inputs at layers l-1..l-P")
    g.add_argument("--own-layers", type=int, default=None, help="this token's routing at its last Q finished layers "
                   "(also the --routing-only hybrid's, 1 unless given)")
    g.add_argument("--window", type=int, default=None, help="previous W tokens' MoE input and routing at layer l+d "
                   "(the --routing-only hybrid: their routing, 1 token unless given)")
    g.add_argument("--context", type=int, default=None, help="mean MoE input at layer l+d over the previous C tokens")
    g.add_argument("--token-emb", action=argparse.BooleanOptionalAction, default=None,
                   help="learned embedding of the token id (a table of the model's vocabulary)")
    g.add_argument("--depth", type=int, default=None, help="residual blocks in the trunk")
    g.add_argument("--separate-layers", action=argparse.BooleanOptionalAction, default=None,
                   help="one trunk per target layer instead of a shared trunk with per-layer heads")
    g.add_argument("--anchor", action=argparse.BooleanOptionalAction, default=None,
                   help="score the predicted h_{l+d} with the target router (--no-anchor: a plain per-layer head)")
    g.add_argument("--residual-logits", action=argparse.BooleanOptionalAction, default=None,
                   help="add a zero-initialised per-layer logit head to the router's scores")
    g.add_argument("--layer-fallback", action=argparse.BooleanOptionalAction, default=None,
                   help="after training, reset to router reuse every target layer where router reuse scores a "
                        "higher validation recall than the trained heads")
    g.add_argument("--router-lr", type=float, default=None,
                   help="learning rate of the router matrices as a multiple of --lr (0 = frozen)")
    g = p.add_argument_group("run")
    g.add_argument("--model-type", default=kind, choices=list(PREDICTORS), help=f"predictor ({kind})")
    g.add_argument("--routing-only", action="store_true",
                   help="the hybrid without hidden states: this token's experts at its last --own-layers finished "
                        "layers and the previous --window tokens' experts at layer l+d (1 and 1 unless given: the "
                        "hybrid's history part), so that routing alone, e.g. a set of imported routing "
                        "(scripts/import_routing.py), trains it; stored in the checkpoint, which every reader follows")
    g.add_argument("--output", default=output, help=f"checkpoint directory (default {output})")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--gpu", type=int, default=None, help="CUDA GPU index")
    g.add_argument("--amp", choices=["auto", "off"], default="auto", help="bf16 autocast on GPU (auto) or never")
    g.add_argument("--overwrite", action="store_true",
                   help=f"replace the files of an earlier run in --output ({', '.join(OUTPUT_FILES)}); nothing else")


# What an unset recipe flag means. BASE is the seed's recipe, and every kind's unless listed below.
BASE_DEFAULTS: dict[str, Any] = {"loss_ce": 1.0, "loss_kl": 0.0, "loss_mse": 0.0, "schedule": "epoch", "warmup": 0.0,
                                 "past_layers": 0, "own_layers": 0, "window": 0, "context": 0, "token_emb": False,
                                 "depth": 2, "separate_layers": False, "anchor": True, "residual_logits": True,
                                 "router_lr": 0.0, "layer_fallback": False}
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    # the best measured recipe of the anchored kind (docs/RESULTS.md, "What mattered")
    "anchored": {"loss_ce": 1.0, "loss_kl": 1.0, "loss_mse": 0.0, "schedule": "step", "warmup": 0.05,
                 "past_layers": 2, "own_layers": 2, "window": 2, "token_emb": True, "depth": 2, "router_lr": 0.0,
                 "separate_layers": True, "layer_fallback": True},
}
# --routing-only (the hybrid): its history over one finished layer and one previous token, the hybrid's history part
ROUTING_ONLY_DEFAULTS: dict[str, Any] = {"own_layers": 1, "window": 1}


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill every unset recipe flag with its kind's default (in place, so the saved args are complete)."""
    kind = ROUTING_ONLY_DEFAULTS if getattr(args, "routing_only", False) else KIND_DEFAULTS.get(args.model_type, {})
    for key, value in BASE_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, kind.get(key, value))


# the flags only the anchored predictor reads (and, of them, the two the --routing-only hybrid reads): given to
# another kind they would be dropped without a word, so they are refused instead
ANCHORED_ONLY = ("past_layers", "own_layers", "window", "context", "token_emb", "depth", "separate_layers", "anchor",
                 "residual_logits", "layer_fallback", "router_lr")
ROUTING_ONLY_READS = ("own_layers", "window")


def ignored_flags(args: argparse.Namespace) -> list[str]:
    """The anchored-only flags given explicitly to a kind that would not read them."""
    if args.model_type == "anchored":
        return []
    reads = ROUTING_ONLY_READS if getattr(args, "routing_only", False) else ()
    return [f"--{n.replace('_', '-')}" for n in ANCHORED_ONLY if getattr(args, n, None) is not None and n not in reads]


def validate_args(args: argparse.Namespace) -> None:
    """Every flag checked before anything is read or written: one line for the first bad one."""
    ignored = ignored_flags(args)
    if ignored:
        them = "it" if len(ignored) == 1 else "them"
        raise UserError(f"{', '.join(ignored)}: read by --model-type anchored only (--own-layers and --window also by "
                        f"--routing-only); --model-type {args.model_type} would ignore {them}")
    resolve_defaults(args)
    for name in ("past_layers", "own_layers", "window", "context"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more")
    for name in ("loss_ce", "loss_kl", "loss_mse", "router_lr"):
        if not (getattr(args, name) >= 0 and math.isfinite(getattr(args, name))):
            raise UserError(f"--{name.replace('_', '-')} must be a number >= 0")
    if args.routing_only and args.model_type != "hybrid":
        raise UserError(f"--routing-only is the hybrid predictor's variant; --model-type {args.model_type} reads "
                        "hidden states (add --model-type hybrid)")
    if args.routing_only and (args.own_layers < 1 or args.window < 1):
        raise UserError("--routing-only reads this token's finished layers and the previous tokens: --own-layers and "
                        "--window must be 1 or more")
    if args.loss_ce + args.loss_kl + args.loss_mse <= 0:
        raise UserError("--loss-ce, --loss-kl and --loss-mse are all 0: nothing to train on")
    if args.loss_mse > 0 and not (args.model_type == "anchored" and args.anchor):
        raise UserError("--loss-mse needs a predicted hidden state: --model-type anchored with its anchor")
    if not 0 <= args.warmup < 1:
        raise UserError("--warmup must be in [0, 1)")
    if args.depth < 0:
        raise UserError("--depth must be 0 or more")
    for name in ("shards_per_group", "batch_size", "epochs", "hidden_dim"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.batch_rows is not None and args.batch_rows <= 0:
        raise UserError("--batch-rows must be positive")
    number_flag("lr", args.lr, MIN_LR, math.inf)
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        raise UserError("--weight-decay must be a number >= 0")
    if not (args.grad_clip > 0 and math.isfinite(args.grad_clip)):
        raise UserError("--grad-clip must be a positive number")
    if not 0 <= args.dropout < 1:  # also false for nan
        raise UserError(f"--dropout {args.dropout}: must be in [0, 1)")
    if not 0 <= args.seed < 2**63:  # torch.manual_seed takes 64 bits
        raise UserError(f"--seed {args.seed}: must be in 0..{2**63 - 1}")
    if args.lookahead < 0:
        raise UserError(f"--lookahead {args.lookahead}: must be >= 0")
    check_lookahead_tokens(args)
    if not (0 <= args.val_fraction < 1 and 0 <= args.test_fraction < 1 and args.val_fraction + args.test_fraction < 1):
        raise UserError("--val-fraction and --test-fraction must be in [0, 1) and sum below 1")
    for name in ("hidden_dim", "past_layers", "own_layers", "window", "context", "depth"):
        if getattr(args, name) > CONFIG_LIMITS[name]:  # a size no predictor needs: memory, not a model
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: at most {CONFIG_LIMITS[name]}")
    check_writable("--output", args.output, "dir")  # before training: a run never ends unable to save what it learned
    out = Path(args.output)
    for name in OUTPUT_FILES:  # its temporary files are made by the run, never written through a planted link
        refuse_symlink(out / (name + PARTIAL_SUFFIX), "temporary file of --output")
    present = [name for name in OUTPUT_FILES if os.path.lexists(out / name)]
    if present and not args.overwrite:
        raise UserError(f"{out} already holds {', '.join(present)} of an earlier run; --overwrite replaces them, "
                        "or choose another --output")


# the kinds trained for a lookahead in tokens: the anchored kind's router anchor and distillation target the
# current token's routing, which a window of later tokens does not have
WINDOW_KINDS = ("simple", "layer-aware", "hybrid")


def check_lookahead_tokens(args: argparse.Namespace) -> None:
    """--lookahead-tokens W: W >= 0; with W >= 1, a kind that can learn it, --lookahead 0 and the soft
    cross-entropy's weight as the only loss (the window's set has no router distribution nor hidden state)."""
    W = args.lookahead_tokens
    if W < 0:
        raise UserError(f"--lookahead-tokens {W}: must be >= 0 (0 = layers ahead, --lookahead)")
    if W == 0:
        return
    if args.model_type not in WINDOW_KINDS:
        raise UserError(f"--lookahead-tokens: --model-type {args.model_type} cannot learn it "
                        f"(choose {', '.join(WINDOW_KINDS)})")
    if args.lookahead != 0:
        raise UserError(f"--lookahead-tokens {W} predicts layer l's experts in later tokens: it needs --lookahead 0 "
                        f"(given or defaulted: {args.lookahead}); the two are exclusive")
    if args.loss_kl > 0 or args.loss_mse > 0:
        raise UserError("--lookahead-tokens trains on the window's set of experts only: --loss-kl and --loss-mse "
                        "must be 0")


def window_bce(logits: torch.Tensor, used: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of every expert's logit against the window's 0/1 set `used` (R, E), averaged over
    the experts and over the rows where `rows` (R,) bool is true (rows with no later token have no target; a
    mask, not a selection: no host sync per step), in float32."""
    per_row = F.binary_cross_entropy_with_logits(logits.float(), used, reduction="none").mean(1)
    return (per_row * rows).sum() / rows.sum().clamp(min=1)


def probability_bce(p: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """`window_bce` on probabilities (what a token-lookahead scorer returns), for validation; torch bounds
    log(0) at -100, so a saturated probability costs 100 nats, not infinity."""
    return F.binary_cross_entropy(p.float(), used)


def multi_hot_target(true_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The seed's target: 1/K on each true expert (soft cross-entropy against it)."""
    t = torch.zeros(true_ids.shape[0], num_experts, device=true_ids.device)
    return t.scatter_(1, true_ids, 1.0 / true_ids.shape[1])


def soft_cross_entropy(logits: torch.Tensor, true_ids: torch.Tensor) -> torch.Tensor:
    """The seed's loss: cross-entropy against 1/K on each true expert, in float32."""
    return -(multi_hot_target(true_ids, logits.shape[1]) * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def distill_kl(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(logits)) per row, averaged, in float32: the target router's whole
    distribution, a denser signal than its top-k alone."""
    p_log = F.log_softmax(teacher_logits.float(), dim=1)
    return (p_log.exp() * (p_log - F.log_softmax(logits.float(), dim=1))).sum(1).mean()


def hidden_mse(h_hat: torch.Tensor, h_true: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the predicted MoE input, relative to the true one's mean square (scale-free)."""
    h_true = h_true.float()
    return ((h_hat.float() - h_true) ** 2).mean() / (h_true ** 2).mean().clamp(min=1e-12)


def model_vocab_size(ts: TraceSet) -> int:
    """The MoE model's vocabulary: its local config.json when the model is a directory, else (hub ids that
    cannot be read offline) the largest token id in the traces + 1."""
    import json

    require_token_ids(ts.manifest, ts.dir, "--token-emb (a token-id embedding)")

    cfg = Path(str(ts.manifest.model.get("name_or_path", ""))) / "config.json"
    if cfg.is_file():
        try:
            vocab = json.loads(cfg.read_text()).get("vocab_size")
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError) as e:
            raise UserError(f"{cfg}: unreadable model config ({str(e)[:200]}); --no-token-emb does without it") from None
        if type(vocab) is int and 0 < vocab <= CONFIG_LIMITS["token_vocab"]:
            return vocab
        if vocab is not None:
            raise UserError(f"{cfg}: vocab_size {vocab!r} is not a vocabulary size (1..{CONFIG_LIMITS['token_vocab']}); "
                            "--no-token-emb does without it")
    vocab = int(max(int(sh.numpy("token_ids").max(initial=0)) for sh in ts.shards())) + 1
    if vocab > CONFIG_LIMITS["token_vocab"]:
        raise UserError(f"{ts.dir}: token id {vocab - 1} is beyond any vocabulary; --no-token-emb does without ids")
    return vocab


def lr_lambda(args: argparse.Namespace, total_steps: int) -> Callable[[int], float]:
    """--schedule step: linear warm-up over `--warmup` of the steps, then cosine to zero."""
    warm = max(1, round(args.warmup * total_steps)) if args.warmup > 0 else 0

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return f


def rate(per_s: float) -> str:
    """A speed as people read it: 13200 -> '13.2k', 2.5e6 -> '2.50M', 950 -> '950'."""
    if per_s >= 1e6:
        return f"{per_s / 1e6:.2f}M"
    if per_s >= 1e3:
        return f"{per_s / 1e3:.1f}k"
    return f"{per_s:.0f}"


def undone(step: Callable[[], Any], model: nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Runs `step` (a training step), then puts back the weights, the optimiser's state and the random number
    generators: the run goes on exactly as if the step had not been taken."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = copy.deepcopy(opt.state_dict())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        step()
    model.load_state_dict(weights)
    opt.load_state_dict(state)
    opt.zero_grad(set_to_none=True)


def run_training(args: argparse.Namespace, validate: Validate, reference: Reference | None = None) -> dict[str, Any]:
    """Train as the flags say (module docstring); `reference` gives router reuse's validation recall for the closing
    check (training.checks.quality_warning). Ctrl-C ends the run with a line saying what it kept."""
    progress: dict[str, Any] = {"latest": None, "best": None}  # the epochs whose checkpoints are written
    try:
        return train(args, validate, reference, progress)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_note(Path(args.output), progress["latest"], progress["best"])) from None


def train(args: argparse.Namespace, validate: Validate, reference: Reference | None,
          progress: dict[str, Any]) -> dict[str, Any]:
    validate_args(args)
    out = Path(args.output)
    torch.manual_seed(args.seed)
    dp = data_parallel(args.device, args.gpu)  # under torchrun: DDP, this rank's GPU and its part of the rows
    device = dp.device
    amp = device.type == "cuda" and args.amp == "auto"
    dtype = torch.bfloat16 if amp else torch.float32

    # --- data: the trace set, its split, and what one step holds
    ts = TraceSet(Path(args.traces), verify=not args.no_verify, allow_incomplete=args.allow_incomplete)
    check_traces_serve(args, ts)  # what the recipe reads (router logits, router matrices, hidden layers) is there
    m = ts.manifest
    table = ts.sequence_table()
    split = split_sequences(table, args.seed, args.val_fraction, args.test_fraction)
    excluded = [x for x in args.exclude_sources.split(",") if x]
    if excluded:  # leave-one-domain-out: those sources train and validate nothing; the test split is unchanged
        unknown = sorted(set(excluded) - set(m.source_names))
        if unknown:
            raise UserError(f"--exclude-sources: {', '.join(unknown)} not in the traces "
                            f"(sources: {', '.join(m.source_names)})")
        drop = np.isin(table["source"], [m.source_names.index(x) for x in excluded])
        for name in ("train", "val"):
            split[name] = split[name][~np.isin(split[name], table["seq_id"][drop])]
    if len(split["train"]) == 0 or len(split["val"]) == 0:
        raise UserError(f"{args.traces}: too few sequences ({len(table['seq_id'])}) for a train and a validation split")
    hidden = not args.routing_only  # a routing-only predictor's rows: every layer, whatever hidden states are stored
    layers = input_layers(ts, args.lookahead, hidden)
    tokens_per_seq = mean_tokens_per_sequence(table, split["train"])
    rows_per_step = args.batch_rows or max(1, round(args.batch_size * tokens_per_seq * len(layers)))
    train_tokens = int(table["length"][np.isin(table["seq_id"], split["train"])].sum())
    steps_per_epoch = math.ceil(train_tokens * len(layers) / rows_per_step)
    print(f"traces: {args.traces} ({m.model['name_or_path']}, {m.num_layers} layers x {m.num_experts} experts, "
          f"top-{m.top_k}); split by sequence: {len(split['train'])} train / {len(split['val'])} val / "
          f"{len(split['test'])} test")
    W = args.lookahead_tokens
    target = (f"experts of layer l in tokens t+1..t+{W}" if W else f"experts of layer l+{args.lookahead}")
    print(f"rows: (token t, layer l) -> {target}; layers {layers[0]}..{layers[-1]}; "
          f"{rows_per_step:,} rows per step ({'--batch-rows' if args.batch_rows else f'{args.batch_size} sequences'}"
          f"{describe(dp, rows_per_step)}), ~{steps_per_epoch} steps per epoch")

    # --- model and optimiser (the seed's recipe: AdamW, cosine stepped per epoch, clip 1.0)
    cfg = PredictorConfig(kind=args.model_type, input_dim=m.hidden_size, num_experts=m.num_experts, top_k=m.top_k,
                          num_layers=m.num_layers, lookahead=args.lookahead, hidden_dim=args.hidden_dim,
                          dropout=args.dropout, lookahead_tokens=W)
    if args.routing_only:  # the hybrid's history part alone: no MoE input, so no hidden size
        cfg.input_dim, cfg.routing_only, cfg.own_layers, cfg.window = 0, True, args.own_layers, args.window
    if args.model_type == "anchored":
        cfg.past_layers, cfg.own_layers, cfg.window, cfg.context, cfg.depth = (
            args.past_layers, args.own_layers, args.window, args.context, args.depth)
        cfg.token_vocab = model_vocab_size(ts) if args.token_emb else 0
        if cfg.token_vocab:
            check_token_ids(ts, cfg.token_vocab, f"--traces {args.traces}")
        cfg.separate_layers, cfg.anchor, cfg.residual_logits = args.separate_layers, args.anchor, args.residual_logits
    model = build_predictor(cfg)
    router = getattr(model, "router", None)
    if router is not None:  # the model's own router matrices: router reuse is where training starts
        model.set_router(ts.router_weights().float())
        router.requires_grad_(args.router_lr > 0)
    model = model.to(device)
    step_model = dp.wrap(model)  # the training step's forward (DDP averages gradients); `model` is what is saved
    spec = feature_spec(model)
    groups = [{"params": [p for p in model.parameters() if p is not router], "weight_decay": args.weight_decay}]
    if router is not None and args.router_lr > 0:  # fine-tuned near the model's router: no decay toward zero
        groups.append({"params": [router], "weight_decay": 0.0, "lr": args.lr * args.router_lr})
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    total_steps = steps_per_epoch * args.epochs
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs) if args.schedule == "epoch" else
             torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args, total_steps)))
    with_logits = args.loss_kl > 0
    select = args.select_metric or ("window_ap" if W else f"recall@{m.top_k}")
    val_loss = probability_bce if W else soft_cross_entropy
    print(f"predictor: {cfg.kind}, {count_parameters(model):,} parameters, {flops_per_row(model):,} FLOPs per row; "
          f"best checkpoint by val {select}")
    print(f"loss: {args.loss_ce:g} x {'binary cross-entropy per expert' if W else 'soft cross-entropy'} + "
          f"{args.loss_kl:g} x KL to the target router + "
          f"{args.loss_mse:g} x hidden MSE; schedule {args.schedule}"
          + (f" (warm-up {args.warmup:.0%} of {total_steps} steps)" if args.schedule == "step" else ""))

    traces_info = {"dir": str(args.traces), "model": m.model, "routing": m.routing,
                   "tokens_sha256": m.plan.get("tokens_sha256"), "sources": m.source_names}
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    # a fitted hidden format's codec (at full size, 0.4-0.8 GB of axes, checksummed) is read once per run, here:
    # a one-time cost like loading a model, kept out of the first epoch's reading rate and reported on its own
    t_codec = time.perf_counter()
    codec_loaded = ts.hidden_codec(device) is not None
    codec_s = time.perf_counter() - t_codec
    if codec_loaded:
        print(f"hidden format {m.hidden_format}: codec read, verified and moved to {device} in {codec_s:.2f} s")

    def step(block: TokenBlock, tok: torch.Tensor, layer: torch.Tensor, weight: float) -> torch.Tensor:
        """One AdamW step on rows (tok, layer) of `block`; the loss, weighted (under DDP) by this rank's share."""
        # features go straight into Linear layers, which autocast would cast to `dtype` anyway
        f = make_features(block, tok, layer, args.lookahead, m.num_experts, spec, dtype)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=amp):
            logits, h_hat = step_model(f, return_hidden=True) if args.loss_mse > 0 else (step_model(f), None)
        loss = torch.zeros((), device=device)
        if args.loss_ce > 0 and W:
            used = window_targets(block, tok, layer, W, m.num_experts)
            loss = loss + args.loss_ce * window_bce(logits, used, has_later_token(block, tok))
        elif args.loss_ce > 0:
            loss = loss + args.loss_ce * soft_cross_entropy(logits, targets(block, tok, layer, args.lookahead))
        if args.loss_kl > 0:
            loss = loss + args.loss_kl * distill_kl(logits, block.router_logits[layer + args.lookahead, tok])
        if args.loss_mse > 0:
            loss = loss + args.loss_mse * hidden_mse(h_hat, hidden_at(block, layer + args.lookahead, tok))
        loss = loss * weight
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        return loss

    train_seqs = dp.rank_sequences(table, split["train"])
    # one step on a step's worth of training sequences, then undone: what is paid once per process on first use
    # (the reader's pinned staging buffers, CUDA's lazy kernel loading, GEMM algorithm choice: 0.28-0.43 s at full
    # size on an H200) is kept out of the first epoch's rate, like the codec's load. The step is no larger than a
    # real one: a step's worth of sequences, from one group's worth of shards at most
    t_warm = time.perf_counter()
    is_train = np.isin(table["seq_id"], train_seqs)
    first_shards = np.unique(table["shard"][is_train])[:args.shards_per_group]
    warm_ids = table["seq_id"][is_train & np.isin(table["shard"], first_shards)]
    warm_ids = np.sort(warm_ids)[:max(1, math.ceil(rows_per_step / max(tokens_per_seq * len(layers), 1)))]
    warm = load_block(ts, first_shards.tolist(), warm_ids, device, with_hidden=hidden, with_logits=with_logits)
    undone(lambda: step(warm, *next(iter(dp.row_batches(warm, layers, rows_per_step, torch.Generator())))),
           model, opt, device)
    del warm
    if device.type == "cuda":  # what the step reserved is free again: the blocks' cache budget below counts it
        torch.cuda.empty_cache()
    warm_s = time.perf_counter() - t_warm
    print(f"warm-up: one step on {len(warm_ids)} training sequence(s), undone, in {warm_s:.2f} s")
    train_blocks = SplitBlocks(ts, train_seqs, device, args.shards_per_group, with_hidden=hidden,
                               with_logits=with_logits)
    train_blocks.keep = dp.agree(train_blocks.keep)  # every rank walks the groups in the same order
    val_blocks = SplitBlocks(ts, split["val"], device, args.shards_per_group, with_hidden=hidden)
    print(f"data: {'kept on ' + str(device) + ' after the first epoch' if train_blocks.keep else 'reloaded every epoch'} "
          f"({len(ts)} shards, {args.shards_per_group} per group)")
    history: list[dict[str, Any]] = []
    best = -1.0
    train_rows, train_time = 0, 0.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        steps = 0
        rows_before = train_rows
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{args.epochs}", unit="step", leave=False,
                   dynamic_ncols=True, disable=not dp.is_main)
        for block in train_blocks.epoch(rng):
            for tok, layer, weight in dp.row_batches(block, layers, rows_per_step, gen):  # weight 1 in one process
                loss = step(block, tok, layer, weight)
                if args.schedule == "step":
                    sched.step()
                loss_sum += loss.detach()  # summed on the device: no host sync per step
                steps += 1
                train_rows += tok.shape[0]
                bar.update(1)
        if args.schedule == "epoch":
            sched.step()
        bar.close()
        loss_sum, train_rows = dp.mean(loss_sum), rows_before + dp.total(train_rows - rows_before)  # over the ranks
        # once per epoch (a host sync here costs nothing): a diverged run stops before NaNs reach the metrics
        train_loss = (loss_sum / max(steps, 1)).item()
        weights_finite = torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all().item()
        if not (math.isfinite(train_loss) and weights_finite):
            raise UserError(f"training diverged at epoch {epoch} (loss {train_loss:.4g}"
                            f"{'' if weights_finite else ', weights not finite'}); lower --lr")
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time

        model.eval()
        val = dp.from_main(lambda: validate(model, ts, split["val"], args.lookahead, device, val_blocks,
                                            val_loss, dtype))
        row = {"epoch": epoch, "train_loss": train_loss, "lr": sched.get_last_lr()[0],
               "rows_per_s": train_rows / max(train_time, 1e-9), "epoch_s": epoch_time,
               "epoch_rows_per_s": (train_rows - rows_before) / max(epoch_time, 1e-9),
               **{f"val/{k}": v for k, v in val.items()}}
        history.append(row)
        K = m.top_k
        if W:
            scores = (f"window AP {val['window_ap']:.4f} (random {val['random/window_ap']:.4f}) AUC "
                      f"{val['window_auc']:.4f} recall@{K} {val[f'window_recall@{K}']:.4f}")
        else:
            scores = (f"recall@{K} {val[f'recall@{K}']:.4f} coverage@{2 * K} "
                      f"{val.get(f'coverage@{2 * K}', float('nan')):.4f} any_hit@1 {val['any_hit@1']:.4f} "
                      f"any_hit@5 {val['any_hit@5']:.4f}")
        print(f"epoch {epoch:3d}/{args.epochs}: train loss {row['train_loss']:.4f} | val loss {val['loss']:.4f} "
              f"{scores} | {rate(row['epoch_rows_per_s'])} rows/s | {epoch_time:.1f} s")
        if select not in val:
            examples = "window_ap, window_auc, window_recall@" if W else "any_hit@1, recall@"
            raise UserError(f"--select-metric {select}: not a validation metric (e.g. {examples}{K})")
        metrics = {"epoch": epoch, "val": val, "history": history, "select_metric": select}
        if dp.is_main:  # one set of checkpoints, written by rank 0
            if epoch == 1:  # this run's first checkpoint replaces an earlier run's: its results no longer describe them
                (out / "results.json").unlink(missing_ok=True)
            save_checkpoint(out / "latest_checkpoint.pth", model, cfg, split, traces_info, vars(args), metrics)
        progress["latest"] = epoch  # what Ctrl-C would leave: run_training's last line names it
        if val[select] > best:
            best = val[select]
            best_epoch = {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "val": val,
                          "metrics": {**metrics, "best": {select: best, "epoch": epoch}}}
            if dp.is_main:
                save_checkpoint(out / "best_checkpoint.pth", model, cfg, split, traces_info, vars(args),
                                best_epoch["metrics"])
            progress["best"] = {"epoch": epoch, "metric": select, "value": best}
    fallback: list[int] = []
    if args.layer_fallback and getattr(model, "router", None) is not None and history:
        # per target layer, keep what validates better: the trained heads, or router reuse (the heads at init)
        model.load_state_dict(best_epoch["state"])
        model.eval()
        key = f"per_layer_recall@{m.top_k}"
        reuse_model = copy.deepcopy(model)
        for t in range(m.num_layers):
            reuse_model.reset_layer(t)
        reuse = dp.from_main(lambda: validate(reuse_model, ts, split["val"], args.lookahead, device, val_blocks,
                                              soft_cross_entropy, dtype))
        learned = best_epoch["val"][key]
        fallback = [t for t in range(m.num_layers)
                    if learned[t] is not None and reuse[key][t] is not None and reuse[key][t] > learned[t]]
        if fallback:
            for t in fallback:
                model.reset_layer(t)
            val = dp.from_main(lambda: validate(model, ts, split["val"], args.lookahead, device, val_blocks,
                                                soft_cross_entropy, dtype))
            best = val[select]
            if dp.is_main:
                save_checkpoint(out / "best_checkpoint.pth", model, cfg, split, traces_info, vars(args),
                                {**best_epoch["metrics"], "val": val, "val_before_fallback": best_epoch["val"],
                                 "fallback_layers": fallback, "best": {**best_epoch["metrics"]["best"], select: best}})
        print(f"per-layer fallback to router reuse: target layers {fallback or 'none'} "
              f"(val {select} {best_epoch['val'][select]:.4f} -> {best:.4f})")
    # the closing check: a best recall near random, or below the training-free router reuse, is said so
    K = m.top_k
    best_val = val if fallback else best_epoch["val"]
    window = getattr(args, "lookahead_tokens", 0) > 0  # a window target: its own metrics, no router reuse to beat
    reuse = (dp.from_main(lambda: reference(ts, split["val"], args.lookahead, device, val_blocks))
             if reference and not window and hidden else None)  # router reuse reads h_l, which is not loaded
    if reuse is not None:
        print(f"router reuse at lookahead {args.lookahead}, validation split: recall@{K} {reuse:.4f}")
    warning = (window_quality_warning(best_val["window_ap"], best_val["random/window_ap"]) if window else
               quality_warning(best_val[f"recall@{K}"], K, m.num_experts, args.lookahead, reuse))
    if warning and dp.is_main:
        print(warning, file=sys.stderr)
    summary = {"best": {select: best}, "fallback_layers": fallback, "val_router_reuse": reuse,
               "train/rows_per_s": train_rows / max(train_time, 1e-9),
               "train/seconds": train_time, "codec_load_seconds": codec_s if codec_loaded else 0.0,
               "warmup_seconds": warm_s,
               "parameters": count_parameters(model),
               "flops_per_row": flops_per_row(model), "history": history}
    if dp.is_main:
        atomic_write_json(out / "results.json", {**summary, "processes": dp.world})
    print(f"best val {select} {best:.4f}; wrote best_checkpoint.pth, latest_checkpoint.pth (+ .json) and "
          f"results.json to {out}/")
    dp.ranks.leave()
    return summary
