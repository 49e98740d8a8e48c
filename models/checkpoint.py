"""Predictor checkpoints: one `.pth` dict of plain tensors and values plus a readable JSON sidecar.

Saved atomically (temp file + rename) and loaded with `torch.load(..., weights_only=True)`, so a
checkpoint can never run code. It carries everything evaluation needs to rebuild the predictor
and re-find its test split: config, weights, split, the args of the run and its metrics.
"""
from __future__ import annotations

import io
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from collection.traces.format import require_token_ids
from collection.traces.rows import SPLITS
from common.atomic import atomic_write_bytes, atomic_write_json
from common.errors import UserError
from common.paths import CHECKPOINT_FAMILY, ZIP_MAGIC
from models.predictors import PredictorConfig, build_predictor, config_problem, reads_hidden

CHECKPOINT_FORMAT = CHECKPOINT_FAMILY + "1"


def plain(obj: Any) -> Any:
    """Args and metrics reduced to types that weights_only loading accepts."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def save_checkpoint(path: Path, model: nn.Module, cfg: PredictorConfig, split: dict[str, np.ndarray],
                    traces: dict[str, Any], args: dict[str, Any], metrics: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {"format": CHECKPOINT_FORMAT, "config": cfg.to_json(), "state_dict": state,
            "split": {k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in split.items()},
            "traces": plain(traces), "args": plain(args), "metrics": plain(metrics)}
    buf = io.BytesIO()  # serialised in memory: a full disk then fails in our write (one line), not inside torch
    torch.save(ckpt, buf)
    atomic_write_bytes(path, buf.getvalue())
    side = {k: ckpt[k] for k in ("format", "config", "traces", "args", "metrics")}
    side["split_sizes"] = {k: int(len(v)) for k, v in split.items()}
    atomic_write_json(path.with_suffix(".json"), side)


def load_failure(e: Exception) -> str:
    """Why torch.load refused a file, in our words. torch's own message for a pickle holding objects advises
    loading it with weights_only=False, which would run whatever code the file carries: never pass that on."""
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
        return "it holds Python objects besides tensors and plain values; such files are refused, since loading them can run code"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return first[:200]


def load_checkpoint(path: Path, device: torch.device | str = "cpu", where: str | None = None
                    ) -> tuple[nn.Module, PredictorConfig, dict[str, Any]]:
    """(predictor in eval mode, its config, the whole checkpoint dict). Bad files give a UserError that starts with
    `where` (default "--checkpoint PATH": the flag that named it)."""
    path = Path(path)
    where = where or f"--checkpoint {path}"
    if not path.is_file():
        raise UserError(f"{where}: " + ("a directory, not a checkpoint file" if path.is_dir() else
                                        "not a regular file" if path.exists() else "no such file"))
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(ZIP_MAGIC) or head.startswith(b"\x80")):  # torch.save's archive, or a bare pickle
        raise UserError(f"{where}: not a loadable checkpoint (not a file torch.save wrote: it starts with neither "
                        "a zip header nor a pickle)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file; all mean "not a checkpoint"
        raise UserError(f"{where}: not a loadable checkpoint ({load_failure(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{where}: not a predictor checkpoint of this project (format "
                        f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r})")
    def bad(why: str) -> UserError:
        return UserError(f"{where}: {why}")

    state, split = ckpt.get("state_dict"), ckpt.get("split")
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise bad("no state_dict of tensors")
    if not (isinstance(split, dict) and split and all(
            k in SPLITS and isinstance(v, torch.Tensor) and v.dim() == 1 and not v.is_floating_point()
            and not v.is_complex() and v.dtype != torch.bool for k, v in split.items())):
        raise bad(f"no split (sequence ids of {', '.join(SPLITS)}), which evaluation needs to find its sequences")
    if not isinstance(ckpt.get("traces"), dict):
        raise bad("no traces section (the trace set it was trained on)")
    try:
        cfg = PredictorConfig(**ckpt["config"])
    except (KeyError, TypeError) as e:
        raise bad(f"its config is not a predictor's ({str(e).splitlines()[0][:200]})") from None
    if (why := config_problem(cfg)) is not None:
        raise bad(f"config {why}")
    # the stored weights' shapes against the config's, before anything is allocated: the model is laid out on the
    # meta device (no memory), so a config whose sizes the weights do not bear is refused at no cost
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in build_predictor(cfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        name = next(iter(sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))))
        raise bad(f"config and weights do not fit ({name}: the config makes {want.get(name, 'no tensor')}, "
                  f"the file holds {got.get(name, 'none')})")
    try:
        model = build_predictor(cfg)
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise bad(f"config and weights do not fit ({str(e).splitlines()[0][:200]})") from None
    return model.to(device).eval(), cfg, ckpt


def checkpoint_for_traces(path: Path | str, ts: Any, device: torch.device | str, where: str,
                          test_ids: np.ndarray | None = None) -> tuple[nn.Module, PredictorConfig, dict[str, Any]]:
    """A checkpoint's predictor, ready to score the trace set `ts` (a collection.traces.format.TraceSet): loaded
    by `load_checkpoint`, then checked by `check_checkpoint_fits`. Every scoring entry point (coverage,
    comparison, sweep, simulator) reads checkpoints through these two."""
    model, cfg, ckpt = load_checkpoint(Path(path), device)
    check_checkpoint_fits(cfg, ckpt, ts, where, test_ids)
    return model, cfg, ckpt


def check_checkpoint_fits(cfg: PredictorConfig, ckpt: dict[str, Any], ts: Any, where: str,
                          test_ids: np.ndarray | None = None) -> None:
    """One line unless a loaded checkpoint can score the trace set `ts`: its routing shape, hidden layers and token
    ids (`check_fits_traces`), and, given `test_ids`, its stored test split equal to the sequences about to be
    scored (other traces or another --seed would score sequences it was trained on, and flatter it). A set of other
    tokens than it was trained on gets a warning: its stored split may not apply."""
    check_fits_traces(cfg, ts, where)
    if ckpt["traces"].get("tokens_sha256") != ts.manifest.plan.get("tokens_sha256"):
        print(f"warning: {where}: these traces are not the ones the checkpoint was trained on; its stored split "
              "may not apply")  # stdout: a refusal that follows stays the one line on stderr
    if test_ids is not None and not np.array_equal(np.sort(checkpoint_split(ckpt, "test", where)), np.sort(test_ids)):
        raise UserError(f"{where}: the checkpoint's held-out test split differs from the sequences scored here "
                        "(other traces or --seed); scoring its training sequences would flatter it")


def checkpoint_split(ckpt: dict[str, Any], name: str, path: Path | str) -> np.ndarray:
    """The sequence ids of split `name` a checkpoint (from `load_checkpoint`) keeps; one line if it keeps none."""
    if name not in ckpt["split"]:
        raise UserError(f"--checkpoint {path}: holds no {name} split (only {', '.join(ckpt['split'])})")
    return ckpt["split"][name].numpy()


def check_fits_traces(cfg: PredictorConfig, ts: Any, where: str) -> None:
    """One clear line unless the trace set `ts` (a collection.traces.format.TraceSet) holds rows this predictor can
    read: the same routing shape (layers L, experts E, top-k, and hidden H where it reads hidden states: a
    routing-only predictor reads none, and scores a set of imported routing, hidden size 0, as well as a
    collected one), every hidden layer its features reach, and token ids inside its embedding table."""
    m = ts.manifest
    shape = lambda l, e, k, *h: f"{l} layers x {e} experts, top-{k}" + "".join(f", hidden {x}" for x in h)  # noqa: E731
    hidden = reads_hidden(cfg)
    mine = (cfg.num_layers, cfg.num_experts, cfg.top_k) + ((cfg.input_dim,) if hidden else ())
    theirs = (m.num_layers, m.num_experts, m.top_k) + ((m.hidden_size,) if hidden else ())
    if hidden and not m.hidden_layers:  # a set of imported routing: its hidden size 0 is no model's
        raise UserError(f"{where}: the {cfg.kind} predictor reads the MoE input h_l, and {ts.dir} stores no hidden "
                        "states (routing only); a hybrid trained with --routing-only reads none")
    if mine != theirs:
        raise UserError(f"{where}: routing shape {shape(*theirs)} differs from the checkpoint's {shape(*mine)} "
                        "(it was trained on other traces)")
    every_layer = sorted(m.hidden_layers) == list(range(m.num_layers))
    if hidden and (cfg.past_layers or cfg.window or cfg.context) and not every_layer:
        raise UserError(f"{where}: the predictor reads hidden states of other layers than l (past layers / window), "
                        f"and {ts.dir} stores only layers {m.hidden_layers}; collect with --hidden-layers all")
    if cfg.token_vocab:
        check_token_ids(ts, cfg.token_vocab, where)


def check_token_ids(ts: Any, vocab: int, where: str) -> None:
    """One line unless every token id of the trace set `ts` indexes a table of `vocab` tokens (a set without token
    ids, a legacy or routing-only import, is refused first; another tokenizer's ids may run past the table)."""
    require_token_ids(ts.manifest, ts.dir, f"{where} (a token-id embedding)")
    low = min(int(sh.numpy("token_ids").min(initial=0)) for sh in ts.shards())
    top = max(int(sh.numpy("token_ids").max(initial=0)) for sh in ts.shards())
    if low < 0:
        raise UserError(f"{where}: {ts.dir} holds token id {low} (no token ids were recovered?); a token-id "
                        "embedding needs real ids: --no-token-emb")
    if top >= vocab:
        raise UserError(f"{where}: token id {top} in {ts.dir} is outside the predictor's table of "
                        f"{vocab} tokens (another tokenizer?)")


def checkpoint_summary(path: Path) -> dict[str, Any]:
    side = Path(path).with_suffix(".json")
    return json.loads(side.read_text()) if side.is_file() else {}
