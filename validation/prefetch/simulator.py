"""The expert-cache and prefetch simulator: policies, the decode stream they replay, the replay kernel.

Story of a replay (docs/PREFETCH.md has every formula). The test split's sequences, concatenated, are one
decode stream: a server answering requests one after another, its cache kept across them (`--batch B`:
B such streams decoded together, a step needing the union of their experts). Step t runs layers
0..L-1; layer l keeps cap[l] expert slots. For each (step, layer):

1. `pre_ms` of attention and router; then the layer's experts are known. Each one is a hit if it is
   cached or on its way (a prefetch), else the policy's miss rule applies: a demand fetch (full or, for
   lowbit-on-miss, low-bit copy) joins the one copy engine's FIFO queue behind every copy already queued
   (that is how speculative bytes can hurt), or (cpu-compute) the host CPU computes it from the token's
   hidden state while the GPU computes the hits (only activations cross the link, not queued behind expert
   copies). A demand-fetched expert takes a slot, evicting by the
   policy's rule (`_keep`; a learned eviction by the previous token's scores of the layer), never an expert
   of the current access; when no slot can be freed (a static cache, or cap < experts needed) it goes to a
   staging buffer and is dropped after use.
2. A prefetch policy runs its predictor (`predictor_ms`), then queues the top-m predicted experts of
   layer l+d (l+d < L) that are not cached; they take slots by the eviction rule, never one another.
3. A learned eviction scorer (`evict_ms`) scores this token for the next one's misses, then the shared
   expert (`shared_ms`) runs; both while copies are in flight; the routed experts on the GPU start
   when it is done and every one they need has arrived; the layer ends when they and the CPU's results
   (back over the link) are done. The wait beyond the GPU's own work is the stall.

Before the step where a request starts (`--prompt-tokens P`), its prompt is prefilled: per layer the
union of the prompt's experts, what is not cached streamed through two layer buffers (layer l+1's copies
under layer l's compute), reported apart from decode.

Byte accounting: moved = demand (full and low-bit) + speculative + low-bit upgrades + placement updates
(+ activations for the CPU); speculative = used (hit before eviction) + wasted (evicted unused, or unused
by the end of the stream); used bytes = moved - wasted.

The kernel is numba-compiled over int arrays (about a million (step, layer) steps per second per policy on one
CPU core; docs/BENCHMARKS.md); predictions and eviction scores come from the project's scorers
(validation/coverage/evaluate.py), run once per predictor over the whole stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numba import njit
from tqdm import tqdm

from collection.traces.format import TraceSet
from collection.traces.rows import SplitBlocks, TokenBlock, row_batches, split_sequences
from common.errors import UserError
from models.checkpoint import checkpoint_for_traces, load_checkpoint
from models.predictors import reads_hidden
from validation.coverage.scorers import BASELINES, SCORERS, Scorer, baseline_scorer, expert_popularity, predictor_scorer
from validation.prefetch.cost_model import DEFAULT_PREDICTOR_MS, CostModel

# eviction rules of the kernel (`_keep`); STATIC and WINDOW never evict on a miss
LRU, LFU, BELADY, STATIC, LFRU, LEAST_STALE, SCORE, WINDOW = range(8)
# prefetch sources
NO_PREFETCH, PREDICTED, ORACLE = 0, 1, 2
# what a miss does
FETCH, CPU, LOWBIT = 0, 1, 2

# per-step statistics columns of the kernel's output
(HITS, DEMAND, STAGED, SPEC, SPEC_USED, SPEC_WASTED, LATE, STALL_MS, END_MS, ACCESSES, CPU_EXPERTS, ACT_TOKENS,
 LOWBIT_FETCH, UPGRADE, LOWBIT_COMPUTE, PLACED, PREFILL_MS, PREFILL_COPIES, PREFILL_NEED, PREFILL_TOKENS,
 TOKENS) = range(21)
N_STATS = 21

# the kernel's float parameters, one array (`Knobs.params`)
(P_COPY, P_PRE, P_PRED, P_SHARED, P_EXPERT, P_TOKEN, P_LOWCOPY, P_CPU1, P_CPUTOK, P_ACT, P_DECAY, P_ALPHA, P_PRIOR,
 P_HOT, P_WINDOW, P_PREFILL_TOKEN, P_EVICT) = range(17)
N_PARAMS = 17


# ----------------------------------------------------------------------------------------------
# the policy registry


@dataclass(frozen=True)
class Knobs:
    """The policies' own parameters (docs/PREFETCH.md gives each rule)."""
    lfru_decay: float = 0.9     # lfru: a use's weight is multiplied by this per step it ages
    stale_alpha: float = 0.25   # least-stale: weight of the newest reuse gap in the mean gap
    static_window: int = 64     # static-frequency: steps between two recomputations of the resident set
    hot_uses: int = 2           # lowbit-on-miss: uses of the low-bit copy after which the full one is fetched
    evict_window: int = 16      # evict:frequency-window: steps of history counted


@dataclass(frozen=True)
class Policy:
    name: str
    eviction: int
    prefetch: int
    needs: tuple[str, ...] = ()   # from the traces: "hidden" (MoE inputs), "router_weights", "train_split"
    source: str | None = None     # prefetch: a baseline name or a checkpoint path
    summary: str = ""
    miss: int = FETCH             # what a miss does: fetch it, compute it on the host CPU, fetch a low-bit copy
    evict_source: str | None = None  # SCORE: oracle-next-use, frequency-window or a checkpoint path
    placement: str = "none"       # experts cached before the first step: none, popular (training split), all
    realizable: bool = True       # a real system could run it (not the oracle, Belady or all-resident)

    @property
    def all_resident(self) -> bool:
        return self.placement == "all"

    @property
    def prefetch_key(self) -> str:
        """The stream's predictions this policy reads (shared by every policy with the same source)."""
        return f"prefetch:{self.source}" if self.source is not None else self.name

    @property
    def evict_key(self) -> str:
        return f"evict:{self.evict_source}"

    @property
    def replayable(self) -> bool:
        """An engine can execute its recorded schedule (`Schedule`): copies on a miss or ahead, slots never
        re-planned."""
        return self.miss == FETCH and self.eviction != WINDOW

    @property
    def uses_cpu(self) -> bool:
        return self.miss == CPU

    @property
    def exact(self) -> bool:
        """Every expert is computed at its full precision (lowbit-on-miss computes some from low-bit copies)."""
        return self.miss != LOWBIT


POLICIES: dict[str, Policy] = {p.name: p for p in (
    Policy("on-demand", LRU, NO_PREFETCH, summary="LRU eviction, fetch on a miss"),
    Policy("lfu", LFU, NO_PREFETCH, summary="evict the expert least used since the start (ties: LRU)"),
    Policy("lfru", LFRU, NO_PREFETCH, summary="evict the lowest decayed use count: sum of lfru_decay^age over "
           "its uses"),
    Policy("least-stale", LEAST_STALE, NO_PREFETCH, summary="evict the expert whose time since its last use is "
           "largest relative to its mean reuse gap"),
    Policy("static-popular", STATIC, NO_PREFETCH, ("train_split",),
           "pin each layer's C most used experts of the training split; a miss is staged and dropped",
           placement="popular"),
    Policy("static-frequency", WINDOW, NO_PREFETCH, ("train_split",),
           "static-popular, whose resident set is recomputed every --static-window steps from the last "
           "window's counts (the changes are copied)", placement="popular"),
    Policy("cpu-compute", STATIC, NO_PREFETCH, ("train_split",),
           "static-popular on the GPU; a miss is computed on the host CPU (only activations cross the link)",
           miss=CPU, placement="popular"),
    Policy("lowbit-on-miss", LRU, NO_PREFETCH, summary="LRU; a miss fetches the low-bit copy, the full one "
           "follows once the expert is used --hot-uses times", miss=LOWBIT),
    Policy("evict:frequency-window", SCORE, NO_PREFETCH, summary="evict the expert used least in the last "
           "--evict-window steps", evict_source="frequency-window"),
    Policy("evict:oracle-next-use", SCORE, NO_PREFETCH, summary="evict the expert whose next use is furthest "
           "(the oracle's score: Belady)", evict_source="oracle-next-use", realizable=False),
    Policy("evict:oracle-window", SCORE, NO_PREFETCH, summary="evict the expert used in the fewest of the next "
           "--evict-window steps (a next-tokens predictor's target, known: the bound of evict:<checkpoint> at "
           "that window)", evict_source="oracle-window", realizable=False),
    Policy("oracle", LRU, ORACLE, summary="prefetch the true experts of layer l+d (LRU eviction)", realizable=False),
    Policy("belady", BELADY, NO_PREFETCH, summary="evict the expert used furthest in the future; fetch on a miss",
           realizable=False),
    Policy("all-resident", STATIC, NO_PREFETCH, summary="every expert on the GPU: the ceiling, no transfers",
           placement="all", realizable=False),
)}
BASELINE_POLICY = "on-demand"  # every speedup is over it, at the same cache size
CEILING_POLICY = "all-resident"  # no transfers: what calibrates a measured cost model
# what simulate_prefetch.py runs by default
DEFAULT_POLICIES = ("on-demand,lfu,lfru,least-stale,static-popular,static-frequency,lowbit-on-miss,"
                    "evict:frequency-window,prefetch:router-reuse,oracle,belady,all-resident")
DEFAULT_PREFETCH = "router-reuse"  # the predictor of `+prefetch` without a source: no training needed
EVICT_SCORES = ("frequency-window", "oracle-next-use", "oracle-window")  # eviction scores that need no checkpoint

# the parts a policy name is made of, joined by "+": one eviction part, one miss part, one prefetch part
_EVICTION_PARTS = {"on-demand": LRU, "lfu": LFU, "lfru": LFRU, "least-stale": LEAST_STALE, "belady": BELADY,
                   "static-popular": STATIC, "static-frequency": WINDOW}
_MISS_PARTS = {"cpu-compute": CPU, "lowbit-on-miss": LOWBIT}


def short_name(name: str) -> str:
    """A policy name short enough for a map cell (each registered part abbreviated)."""
    for old, new in (("static-frequency", "sfreq"), ("static-popular", "spop"), ("cpu-compute", "cpu"),
                     ("prefetch:router-reuse", "pf"), ("prefetch", "pf"), ("lowbit-on-miss", "lowbit"),
                     ("evict:frequency-window", "ev:freq"), ("least-stale", "lstale"), ("on-demand", "lru")):
        name = name.replace(old, new)
    return name


def _baseline_needs(name: str) -> tuple[str, ...]:
    """What a baseline reads from the traces, from the one scorer registry (validation/coverage/scorers.py)."""
    info = SCORERS[name]
    return ((("hidden",) if info.needs_hidden else ()) + (("router_weights",) if info.needs_router else ())
            + (("train_split",) if info.needs_training_split else ()))


# the baselines that can prefetch: all but the same-layer control, which answers layer l only when it runs
PREFETCH_BASELINES: dict[str, tuple[str, ...]] = {b: _baseline_needs(b) for b in BASELINES
                                                  if not SCORERS[b].same_layer_only}
POLICY_HELP = (", ".join(POLICIES) + ", prefetch:<checkpoint.pth | " + " | ".join(PREFETCH_BASELINES)
               + ">, evict:<checkpoint.pth>, and combinations joined by '+' of one eviction part ("
               + ", ".join(_EVICTION_PARTS) + ", evict:<source>), one miss part (" + ", ".join(_MISS_PARTS)
               + ") and one prefetch part (prefetch[:<source>], oracle), e.g. cpu-compute+prefetch, "
               "static-frequency+cpu-compute, evict:<checkpoint.pth>+prefetch:router-reuse")


def _prefetch_source(name: str, src: str) -> tuple[str, tuple[str, ...]]:
    if src in PREFETCH_BASELINES:
        return src, PREFETCH_BASELINES[src]
    if src in BASELINES:  # "router": layer l's own router answers layer l only, too late to prefetch
        raise UserError(f"policy {name}: {src} is the same-layer control (d = 0), not a prefetcher; "
                        f"use prefetch:router-reuse")
    if src.endswith((".pth", ".pt")) or Path(src).is_file():
        return src, ("hidden",)
    raise UserError(f"policy {name}: {src!r} is neither a checkpoint file nor a baseline "
                    f"({', '.join(PREFETCH_BASELINES)})")


def _evict_source(name: str, src: str) -> tuple[str, tuple[str, ...]]:
    if src in EVICT_SCORES:
        return src, ()
    if src.endswith((".pth", ".pt")) or Path(src).is_file():
        return src, ("hidden",)
    raise UserError(f"policy {name}: evict:{src} is neither a checkpoint file (a predictor of the next tokens' "
                    f"experts) nor one of {', '.join(EVICT_SCORES)}")


def parse_policy(name: str) -> Policy:
    """A registered policy, or a '+' combination of parts (POLICY_HELP); one line for anything else."""
    if name in POLICIES:
        return POLICIES[name]
    parts = name.split("+")
    if len(parts) == 1 and not name.startswith(("prefetch:", "evict:")):
        raise UserError(f"unknown policy {name!r}; choose from {POLICY_HELP}")
    eviction = miss = prefetch = None
    needs: list[str] = []
    source = evict_source = None
    realizable = True
    for part in parts:
        if part in _EVICTION_PARTS or part.startswith("evict:"):
            if eviction is not None:
                raise UserError(f"policy {name}: two eviction parts; give one")
            if part.startswith("evict:"):
                eviction, (evict_source, more) = SCORE, _evict_source(name, part[len("evict:"):])
                needs += more
                # a checkpoint runs; a score without one is realizable as the registry says (the oracles: no)
                realizable = realizable and getattr(POLICIES.get(part), "realizable", True)
            else:
                eviction = _EVICTION_PARTS[part]
                realizable = realizable and part != "belady"
                if eviction in (STATIC, WINDOW):
                    needs.append("train_split")
        elif part in _MISS_PARTS:
            if miss is not None:
                raise UserError(f"policy {name}: two miss parts ({', '.join(_MISS_PARTS)}); give one")
            miss = _MISS_PARTS[part]
        elif part == "prefetch" or part.startswith("prefetch:") or part == "oracle":
            if prefetch is not None:
                raise UserError(f"policy {name}: two prefetch parts; give one")
            if part == "oracle":
                prefetch, realizable = ORACLE, False
            else:
                prefetch = PREDICTED
                source, more = _prefetch_source(name, part[len("prefetch:"):] if ":" in part else DEFAULT_PREFETCH)
                needs += more
        else:
            raise UserError(f"policy {name}: unknown part {part!r}; choose from {POLICY_HELP}")
    prefetch = NO_PREFETCH if prefetch is None else prefetch
    miss = FETCH if miss is None else miss
    if eviction is None:  # cpu-compute alone keeps static-popular's placement (llama.cpp's recipe); else LRU
        eviction = STATIC if miss == CPU and prefetch == NO_PREFETCH else LRU
        if eviction == STATIC:
            needs.append("train_split")
    if eviction in (STATIC, WINDOW) and prefetch != NO_PREFETCH:
        raise UserError(f"policy {name}: a static cache takes no prefetch (its slots are placed, not evicted)")
    if miss == CPU and prefetch == NO_PREFETCH and eviction not in (STATIC, WINDOW):
        raise UserError(f"policy {name}: with cpu-compute a miss is never copied, so only a placement "
                        "(static-popular, static-frequency) or a prefetch part fills the cache")
    return Policy(name, eviction, prefetch, tuple(dict.fromkeys(needs)), source, "a combination", miss,
                  evict_source, "popular" if eviction in (STATIC, WINDOW) else "none", realizable)


def check_needs(policy: Policy, ts: TraceSet, lookahead: int) -> None:
    """One line naming what the traces lack for this policy (before anything is computed or written)."""
    L = ts.manifest.num_layers
    if "hidden" in policy.needs:
        first = lookahead if policy.prefetch == PREDICTED else 0
        missing = sorted(set(range(L - first)) - set(ts.manifest.hidden_layers))
        if missing and reads_stored_hidden(policy):
            raise UserError(f"policy {policy.name} needs the stored MoE input (hidden state) of layers "
                            f"0..{L - first - 1}; {ts.dir} lacks layers {missing} (collect with --hidden-layers all)")
    if "router_weights" in policy.needs:
        ts.router_weights()  # raises a one-line TraceFormatError naming the missing file


def reads_stored_hidden(policy: Policy) -> bool:
    """Whether a policy whose parts may read the stored MoE input does: a baseline as the scorer registry says, a
    checkpoint as its config says (the routing-only hybrid reads routing alone; the file is read here only when the
    traces lack hidden states, and again when its predictor is built)."""
    sources = ([policy.source] if policy.prefetch == PREDICTED else []) + (
        [policy.evict_source] if policy.eviction == SCORE else [])
    for src in sources:
        if src in PREFETCH_BASELINES or src in EVICT_SCORES:
            if "hidden" in PREFETCH_BASELINES.get(src, ()):
                return True
        elif reads_hidden(load_checkpoint(Path(src), "cpu")[1]):
            return True
    return False


def check_costs(policy: Policy, cost: CostModel) -> None:
    """One line naming the cost a policy needs and the flag that gives it."""
    if policy.miss == CPU and not cost.cpu_expert_ms > 0:
        raise UserError(f"policy {policy.name} computes misses on the host CPU: give --cpu-expert-ms (> 0) or "
                        "--measure-cpu")
    if policy.miss == LOWBIT and not 0 < cost.lowbit_bytes < cost.expert_bytes:
        raise UserError(f"policy {policy.name}: the low-bit copy ({cost.lowbit_bytes:,} bytes) must be smaller "
                        f"than the expert ({cost.expert_bytes:,} bytes); choose --lowbit-format below "
                        "--expert-format")


def check_caches(caches: list[int], num_experts: int) -> None:
    if not caches:
        raise UserError("no cache size given")
    for c in caches:
        if not 0 <= c <= num_experts:
            raise UserError(f"cache {c}: each layer has {num_experts} experts, so the cache holds 0..{num_experts} of them")


@dataclass
class Predictor:
    """A policy's scorer (prefetch: top-m of layer l+d; evict: every expert's use in the next tokens), how
    long it runs per layer, and what it needs."""
    scorer: Scorer
    predictor_ms: float
    kind: str                 # "learned", or the baseline's name
    needs_hidden: bool
    label: str                # short name for tables
    config: dict[str, Any] = field(default_factory=dict)  # a checkpoint's predictor config
    role: str = "prefetch"    # prefetch | evict
    target_offset: int = 0    # rows of input layer l score layer l + target_offset


def build_predictor(policy: Policy, ts: TraceSet, lookahead: int, train_ids: np.ndarray, test_ids: np.ndarray,
                    seed: int = 0) -> Predictor:
    """The scorer of a policy's prefetch part: a baseline of validation/coverage/evaluate.py or a checkpoint's
    predictor, checked against the traces (E, L, hidden size, lookahead, held-out split)."""
    m = ts.manifest
    if policy.source in PREFETCH_BASELINES:
        scorer = baseline_scorer(policy.source, ts, lookahead, train_ids, torch.device("cpu"), seed)
        return Predictor(scorer, DEFAULT_PREDICTOR_MS.get(policy.source, 0.0), policy.source,
                         "hidden" in PREFETCH_BASELINES[policy.source], policy.source)
    where = f"policy {policy.name}"
    model, cfg, _ = checkpoint_for_traces(policy.source, ts, "cpu", where, test_ids)
    if getattr(cfg, "lookahead_tokens", 0):
        raise UserError(f"{where}: the checkpoint predicts the next tokens' experts (lookahead_tokens "
                        f"{cfg.lookahead_tokens}); use it as evict:{policy.source}")
    if cfg.lookahead != lookahead:
        raise UserError(f"{where}: the checkpoint predicts {cfg.lookahead} layer(s) ahead, --lookahead is {lookahead}")
    scorer = predictor_scorer(model, lookahead, m.num_experts)
    label = f"prefetch:{cfg.kind}-d{cfg.lookahead} ({Path(policy.source).parent.name})"
    return Predictor(scorer, DEFAULT_PREDICTOR_MS["learned"], "learned", reads_hidden(cfg), label, cfg.to_json())


def build_evict_scorer(policy: Policy, ts: TraceSet, test_ids: np.ndarray) -> Predictor:
    """The scorer of `evict:<checkpoint>`: a predictor trained with lookahead_tokens W > 0, whose row (token t,
    layer l) scores every expert's use at layer l + lookahead in tokens t+1..t+W."""
    where = f"policy {policy.name}"
    model, cfg, _ = checkpoint_for_traces(policy.evict_source, ts, "cpu", where, test_ids)
    window = int(getattr(cfg, "lookahead_tokens", 0) or 0)
    if window <= 0:
        raise UserError(f"{where}: the checkpoint predicts layer l+{cfg.lookahead}'s experts of the same token, not "
                        "the next tokens' (its config has no lookahead_tokens > 0); train one for eviction")
    scorer = predictor_scorer(model, cfg.lookahead, ts.manifest.num_experts)
    label = f"evict:{cfg.kind}-next{window} ({Path(policy.evict_source).parent.name})"
    return Predictor(scorer, DEFAULT_PREDICTOR_MS["learned"], "learned", reads_hidden(cfg), label, cfg.to_json(),
                     "evict", cfg.lookahead)


def policy_label(policy: Policy, predictors: dict[str, Predictor]) -> str:
    """The policy's name with each checkpoint path replaced by its predictor's short label."""
    parts = []
    for part in policy.name.split("+"):
        key = part if ":" in part else (f"prefetch:{DEFAULT_PREFETCH}" if part == "prefetch" else part)
        parts.append(predictors[key].label if key in predictors and predictors[key].kind == "learned" else part)
    return "+".join(parts)


@dataclass
class Setup:
    ts: TraceSet
    policies: list[Policy]
    split: dict[str, np.ndarray]
    predictors: dict[str, Predictor]  # scorers by prefetch_key / evict_key, each built once
    labels: dict[str, str] = field(default_factory=dict)  # policy name -> table label


def parse_policies(policy_names: str) -> list[Policy]:
    names = list(dict.fromkeys(n.strip() for n in policy_names.split(",") if n.strip()))
    if not names:
        raise UserError("--policies is empty")
    return [parse_policy(n) for n in names]


def prepare(traces: str | Path, policy_names: str, lookahead: int, budget: int, seed: int = 0, locality: float = 0.0,
            max_tokens: int | None = None, verify: bool = True) -> Setup:
    """Every check of a replay's input, before anything is computed or written: policies known, traces holding
    what each needs, 1 <= d < L, 1 <= m <= E, checkpoints of these traces. Bad input: one UserError line."""
    policies = parse_policies(policy_names)
    ts = TraceSet(Path(traces), verify=verify)
    L, E = ts.manifest.num_layers, ts.manifest.num_experts
    if not 1 <= lookahead < L:
        raise UserError(f"--lookahead {lookahead}: the traces have {L} MoE layers, so 1 <= d <= {L - 1} "
                        "(d = 0 would fetch a layer's experts when they are already needed)")
    if not 1 <= budget <= E:
        raise UserError(f"--fetch-budget {budget}: must be within 1..{E} (experts per layer)")
    if not 0.0 <= locality <= 1.0:
        raise UserError(f"--locality {locality}: a probability, within 0..1")
    if max_tokens is not None and max_tokens <= 0:
        raise UserError("--max-tokens must be positive")
    for pol in policies:
        check_needs(pol, ts, lookahead)
    split = split_sequences(ts.sequence_table(), seed)
    if len(split["test"]) == 0 or len(split["train"]) == 0:
        raise UserError(f"{traces}: too few sequences for a training and a test split")
    predictors: dict[str, Predictor] = {}
    for pol in policies:
        if pol.prefetch == PREDICTED and pol.prefetch_key not in predictors:
            predictors[pol.prefetch_key] = build_predictor(pol, ts, lookahead, split["train"], split["test"], seed)
        if pol.eviction == SCORE and pol.evict_source not in EVICT_SCORES and pol.evict_key not in predictors:
            predictors[pol.evict_key] = build_evict_scorer(pol, ts, split["test"])
    return Setup(ts, policies, split, predictors, {p.name: policy_label(p, predictors) for p in policies})


# ----------------------------------------------------------------------------------------------
# the decode stream


@dataclass
class Stream:
    """The replayed steps in decode order: each step's experts (one token, or one per lane at --batch B), each
    predictor's top-m per (step, target layer), each eviction scorer's scores, and the prompts to prefill."""
    ids: np.ndarray        # (T, L, S) int64 experts needed (S = B x K; -1: none), after --locality
    weights: np.ndarray    # (T, L, S) float32 their routing weights
    first: np.ndarray      # (T,) bool: the step starts a sequence (a new request) in some lane
    position: np.ndarray   # (T,) position of the (lane 0) token in its sequence
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # key -> (T, L, B x m) int64, -1: none
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # key -> (T, L, E) float32, higher = used sooner
    lanes: int = 1
    prompt_need: np.ndarray | None = None  # (R, L, E) bool: experts each prompt uses per layer
    prompt_len: np.ndarray | None = None   # (R,) prompt tokens
    prompt_at: np.ndarray | None = None    # (T, B) request whose prompt is prefilled before step t in lane b (-1)

    @property
    def tokens(self) -> int:
        return self.ids.shape[0]

    def head(self, n: int) -> Stream:
        """The first n steps (prompts kept whole)."""
        return replace(self, ids=self.ids[:n], weights=self.weights[:n], first=self.first[:n],
                       position=self.position[:n], predictions={k: v[:n] for k, v in self.predictions.items()},
                       scores={k: v[:n] for k, v in self.scores.items()},
                       prompt_at=None if self.prompt_at is None else self.prompt_at[:n])


@njit(cache=True)
def _add_locality(ids: np.ndarray, first: np.ndarray, u: np.ndarray, p: float) -> np.ndarray:
    """Each of the previous token's experts at a layer is kept with probability p (coin u < p), then the
    token's own experts fill the other slots in their order: K distinct experts, reused ones first."""
    T, L, K = ids.shape
    out = ids.copy()
    for t in range(T):
        if first[t]:
            continue
        for l in range(L):
            n = 0
            for k in range(K):
                if u[t, l, k] < p:
                    out[t, l, n] = out[t - 1, l, k]
                    n += 1
            for k in range(K):
                if n == K:
                    break
                e = ids[t, l, k]
                dup = False
                for j in range(n):
                    dup = dup or out[t, l, j] == e
                if not dup:
                    out[t, l, n] = e
                    n += 1
    return out


def add_locality(ids: np.ndarray, first: np.ndarray, p: float, seed: int) -> np.ndarray:
    """(T, L, K) routing with more temporal locality (docs/PREFETCH.md): within a sequence, each expert of
    the previous token is reused with probability p. p = 0 returns the routing unchanged."""
    if p == 0:
        return ids
    u = np.random.default_rng(seed).random(ids.shape)
    return _add_locality(np.ascontiguousarray(ids, dtype=np.int64), first, u, float(p))


@torch.no_grad()
def top_predictions(scorer: Scorer, block: TokenBlock, lookahead: int, budget: int, batch_rows: int = 1 << 16) -> torch.Tensor:
    """(N, L, budget) the scorer's top-`budget` experts of target layer l+d, predicted at layer l; -1 where
    no layer l exists (target layers below d). Batched over all (token, layer) rows."""
    L, N = block.topk_ids.shape[0], block.tokens
    out = torch.full((N, L, budget), -1, dtype=torch.int64)
    for tok, layer in row_batches(block, list(range(L - lookahead)), batch_rows):
        out[tok, layer + lookahead] = scorer(block, tok, layer).topk(budget, dim=1).indices.cpu()
    return out


@torch.no_grad()
def all_scores(scorer: Scorer, block: TokenBlock, offset: int, num_experts: int, batch_rows: int = 1 << 16
               ) -> torch.Tensor:
    """(N, L, E) float32 an eviction scorer's score of every expert at layer l + offset, from row (token, l);
    the lowest value where no row exists."""
    L, N = block.topk_ids.shape[0], block.tokens
    out = torch.full((N, L, num_experts), -1e30, dtype=torch.float32)
    for tok, layer in row_batches(block, list(range(L - offset)), batch_rows):
        out[tok, layer + offset] = scorer(block, tok, layer).float().cpu()
    return out


def build_stream(ts: TraceSet, seq_ids: np.ndarray, predictors: dict[str, Predictor], lookahead: int, budget: int,
                 locality: float = 0.0, seed: int = 0, max_tokens: int | None = None, progress: bool = True) -> Stream:
    """The sequences `seq_ids` in decode order (shard by shard, as stored), with --locality applied to their
    routing before any predictor sees it, every prefetch predictor's top-`budget` and every eviction scorer's
    scores in one pass over the blocks."""
    with_hidden = any(p.needs_hidden for p in predictors.values())
    blocks = SplitBlocks(ts, seq_ids, torch.device("cpu"), shards_per_group=4, with_hidden=with_hidden, keep=False)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("ids", "weights", "first", *predictors)}
    total = 0
    E = ts.manifest.num_experts
    bar = tqdm(desc="stream", unit="tok", disable=not progress, dynamic_ncols=True)
    for i, block in enumerate(blocks):
        first = (block.prev < 0).numpy()
        ids = add_locality(block.topk_ids.permute(1, 0, 2).numpy(), first, locality, seed + i)
        block.topk_ids = torch.from_numpy(np.ascontiguousarray(ids.transpose(1, 0, 2)))  # predictors see it too
        parts["ids"].append(ids)
        parts["weights"].append(block.topk_weights.permute(1, 0, 2).numpy())
        parts["first"].append(first)
        for name, pred in predictors.items():
            if pred.role == "evict":
                parts[name].append(all_scores(pred.scorer, block, pred.target_offset, E).numpy())
            else:
                parts[name].append(top_predictions(pred.scorer, block, lookahead, budget).numpy())
        total += block.tokens
        bar.update(block.tokens)
        if max_tokens is not None and total >= max_tokens:
            break
    bar.close()
    if total == 0:
        raise UserError(f"{ts.dir}: the replayed split holds no token")
    cut = slice(0, min(total, max_tokens or total))
    cat = {k: np.concatenate(v)[cut] for k, v in parts.items()}
    first = cat["first"]
    starts = np.flatnonzero(first)
    position = np.arange(len(first)) - starts[np.cumsum(first) - 1]
    return Stream(ids=np.ascontiguousarray(cat["ids"], dtype=np.int64),
                  weights=np.ascontiguousarray(cat["weights"], dtype=np.float32), first=first, position=position,
                  predictions={k: np.ascontiguousarray(cat[k], dtype=np.int64) for k, p in predictors.items()
                               if p.role == "prefetch"},
                  scores={k: np.ascontiguousarray(cat[k], dtype=np.float32) for k, p in predictors.items()
                          if p.role == "evict"})


def static_experts(ts: TraceSet, train_ids: np.ndarray, cache: int | np.ndarray) -> np.ndarray:
    """(L, E) bool: each layer's `cache` (one number, or one per layer) most used experts on the training split
    (the placement of static-popular, static-frequency and cpu-compute)."""
    return top_popular(expert_popularity(ts, train_ids).numpy(), cache)


def top_popular(share: np.ndarray, cache: int | np.ndarray) -> np.ndarray:
    """(L, E) bool: layer l's cap[l] largest shares (ties: the lower expert id)."""
    L = share.shape[0]
    caps = np.broadcast_to(np.asarray(cache, dtype=np.int64), (L,))
    rank = np.argsort(np.argsort(-share, axis=1, kind="stable"), axis=1)  # (L, E) each expert's rank
    return rank < caps[:, None]


# ----------------------------------------------------------------------------------------------
# eviction scores that need no checkpoint (computed on the replayed steps, after --locality and --batch)


@njit(cache=True)
def oracle_next_use_scores(ids: np.ndarray, E: int) -> np.ndarray:
    """(T, L, E) float32 minus the steps until each expert's next use at its layer after step t (-(T - t) if
    none): evicting the lowest is Belady's rule."""
    T, L, S = ids.shape
    out = np.empty((T, L, E), dtype=np.float32)
    nxt = np.full((L, E), T, dtype=np.int64)
    for t in range(T - 1, -1, -1):
        for l in range(L):
            for e in range(E):
                out[t, l, e] = -(nxt[l, e] - t)
            for s in range(S):
                if ids[t, l, s] >= 0:
                    nxt[l, ids[t, l, s]] = t
    return out


@njit(cache=True)
def window_count_scores(ids: np.ndarray, E: int, window: int) -> np.ndarray:
    """(T, L, E) float32 the steps among t-window+1..t in which each expert was used at its layer."""
    T, L, S = ids.shape
    out = np.zeros((T, L, E), dtype=np.float32)
    count = np.zeros((L, E), dtype=np.float32)
    seen = np.full((L, E), -1, dtype=np.int64)
    for t in range(T):
        for l in range(L):
            for s in range(S):  # each expert once per step
                e = ids[t, l, s]
                if e >= 0 and seen[l, e] != t:
                    seen[l, e] = t
                    count[l, e] += 1
            if t >= window:
                for s in range(S):
                    e = ids[t - window, l, s]
                    if e >= 0 and seen[l, e] != -2 - t:  # once per expert of the step leaving the window
                        seen[l, e] = -2 - t
                        count[l, e] -= 1
                for s in range(S):  # restore the marks of this step's experts
                    e = ids[t, l, s]
                    if e >= 0:
                        seen[l, e] = t
            for e in range(E):
                out[t, l, e] = count[l, e]
    return out


def oracle_window_scores(ids: np.ndarray, E: int, window: int) -> np.ndarray:
    """(T, L, E) float32 the steps among t+1..t+window in which each expert is used at its layer: what a
    next-tokens predictor (lookahead_tokens W) is trained to foresee, known exactly."""
    T, L, _ = ids.shape
    used = np.zeros((T + 1, L, E + 1), dtype=np.float32)  # column E takes the -1 padding
    t_idx, l_idx = np.indices(ids.shape[:2])
    used[t_idx[..., None], l_idx[..., None], np.where(ids >= 0, ids, E)] = 1.0  # once per step, however many lanes
    run = np.cumsum(used[::-1], axis=0)[::-1]  # run[t] = steps t..T-1 that use it
    later = np.minimum(np.arange(T) + 1 + window, T)
    return np.ascontiguousarray(run[np.arange(T) + 1] - run[later], dtype=np.float32)[..., :E]


def eviction_scores(policy: Policy, stream: Stream, num_experts: int, knobs: Knobs) -> np.ndarray:
    """The (T, L, E) scores a SCORE policy evicts by."""
    if policy.evict_source == "oracle-next-use":
        return oracle_next_use_scores(stream.ids, num_experts)
    if policy.evict_source == "oracle-window":
        return oracle_window_scores(stream.ids, num_experts, knobs.evict_window)
    if policy.evict_source == "frequency-window":
        return window_count_scores(stream.ids, num_experts, knobs.evict_window)
    return stream.scores[policy.evict_key]


# ----------------------------------------------------------------------------------------------
# the kernel


@njit(cache=True)
def next_uses(ids: np.ndarray, E: int) -> np.ndarray:
    """(T, L, S) the next step that uses expert ids[t, l, s] at layer l (T if none): Belady's knowledge."""
    T, L, S = ids.shape
    out = np.full_like(ids, T)
    seen = np.full((L, E), T, dtype=np.int64)
    for t in range(T - 1, -1, -1):
        for l in range(L):
            for s in range(S):
                if ids[t, l, s] >= 0:
                    out[t, l, s] = seen[l, ids[t, l, s]]
            for s in range(S):
                if ids[t, l, s] >= 0:
                    seen[l, ids[t, l, s]] = t
    return out


@njit(cache=True)
def _keep(rule, l, e, t, ts, freq, nxt, lfru, last_step, gap, scores, decay):
    """How much a cached expert is worth keeping at step t: the smallest is evicted (ties: least recently
    touched). LRU: equal for all (recency alone); LFU: uses since the start; BELADY: minus its next use;
    LFRU: its uses decayed by `decay` per step of age; LEAST_STALE: minus its time since the last use over its
    mean reuse gap; SCORE: the scorer's value at (ts, l), the step whose scores the caller reads (the previous
    one: before the first, 0, all equal)."""
    if rule == LFU:
        return float(freq[l, e])
    if rule == BELADY:
        return -float(nxt[l, e])
    if rule == LFRU:
        return lfru[l, e] * decay ** (t - last_step[l, e])
    if rule == LEAST_STALE:
        return -(t - last_step[l, e]) / gap[l, e]
    if rule == SCORE:
        return float(scores[ts, l, e]) if ts >= 0 else 0.0
    return 0.0


@njit(cache=True)
def _victim(l, cap, slot_expert, slot_pin, stamp, rule, t, ts, touched, freq, nxt, lfru, last_step, gap, scores,
            decay):
    """The slot to free in layer l's full cache, never one pinned with `stamp`; -1 if all are. `ts`: the step
    whose scores a SCORE rule reads (`_keep`)."""
    best, best_keep, best_age = -1, np.inf, np.iinfo(np.int64).max
    for s in range(cap):
        if slot_pin[l, s] == stamp:
            continue
        e = slot_expert[l, s]
        k = _keep(rule, l, e, t, ts, freq, nxt, lfru, last_step, gap, scores, decay)
        age = touched[l, e]  # smaller: touched longer ago
        if k < best_keep or (k == best_keep and age < best_age):
            best, best_keep, best_age = s, k, age
    return best


@njit(cache=True)
def _prefill(t, r, prompt_need, prompt_len, slot_of, arrive, link_free, now, prm, stats):
    """Request r's prompt before step t: per layer the union of its experts; the uncached ones stream through
    two layer buffers, so layer l's copies start once layer l-2's compute has freed its buffer; layer l
    computes once layer l-1 is done and its copies are in. The cache is left as it was. Returns (now,
    link_free)."""
    L, E = slot_of.shape
    end = np.empty(L)
    start = now
    for l in range(L):
        free_at = end[l - 2] if l >= 2 else start
        need = 0
        copies_done = free_at
        for e in range(E):
            if prompt_need[r, l, e]:
                need += 1
                if slot_of[l, e] < 0:
                    link_free = max(free_at, link_free) + prm[P_COPY]
                    copies_done = link_free
                    stats[t, PREFILL_COPIES] += 1
                else:
                    copies_done = max(copies_done, arrive[l, e])
        stats[t, PREFILL_NEED] += need
        compute = prm[P_PRE] + prm[P_SHARED] + need * prm[P_EXPERT] + (prompt_len[r] - 1) * prm[P_PREFILL_TOKEN]
        end[l] = max(end[l - 1] if l > 0 else start, copies_done) + compute
    now = end[L - 1] + prm[P_TOKEN]
    stats[t, PREFILL_MS] += now - start
    stats[t, PREFILL_TOKENS] += prompt_len[r]
    return now, link_free


@njit(cache=True)
def _place(t, cap, win_count, slot_of, slot_expert, n_used, arrive, low, now, link_free, copy_ms, stats):
    """static-frequency: each layer's resident set becomes its cap[l] most used experts of the last window
    (ties: the resident one, then the lower id); the experts that enter are copied in FIFO order from `now`."""
    L, E = slot_of.shape
    chosen = np.zeros(E, dtype=np.bool_)
    for l in range(L):
        chosen[:] = False
        for j in range(cap[l]):
            best, best_key = -1, -1
            for e in range(E):
                key = 2 * win_count[l, e] + (1 if slot_of[l, e] >= 0 else 0)
                if not chosen[e] and key > best_key:
                    best, best_key = e, key
            chosen[best] = True
        free = np.empty(cap[l], dtype=np.int64)
        n_free = 0
        for s in range(n_used[l]):
            e = slot_expert[l, s]
            if not chosen[e]:
                slot_of[l, e] = -1
                slot_expert[l, s] = -1
                free[n_free] = s
                n_free += 1
        for s in range(n_used[l], cap[l]):
            free[n_free] = s
            n_free += 1
        n_used[l] = cap[l]
        k = 0
        for e in range(E):
            if chosen[e] and slot_of[l, e] < 0:
                s = free[k]
                k += 1
                link_free = max(now, link_free) + copy_ms
                slot_of[l, e] = s
                slot_expert[l, s] = e
                arrive[l, e] = link_free
                low[l, e] = False
                stats[t, PLACED] += 1
            win_count[l, e] = 0
    return link_free


@njit(cache=True)
def replay_kernel(ids, pred, n_pred, cap, rule, prefetch, miss, d, resident0, next_use, scores, ntok,
                  prompt_need, prompt_len, prompt_at, prm, record, log_need, log_demand, log_prefetch):
    """One policy over the stream (module docstring). Returns (T, N_STATS) per-step statistics.

    ids (T, L, S) experts needed (-1: none; an expert named by several lanes is one access, run for all
    its tokens); pred (T, L, >= n_pred) predicted experts of each target layer (PREDICTED); cap (L,) slots;
    resident0 (L, E) experts cached before the first step (STATIC, WINDOW); next_use (T, L, S) for BELADY;
    scores (T, L, E) for SCORE; ntok (T,) tokens decoded per step; prompt_* the prefills (`_prefill`);
    prm the float parameters (P_*). With `record`, the schedule is written for a real replay: log_need
    (T, L, S) the slot each needed expert is computed from (-1 - j: staging buffer j); log_demand
    (T, L, S, 2) and log_prefetch (T, L, n_pred, 2) the (expert, slot) copies queued at that step, in
    queue order, -1 padded.
    """
    T, L, S = ids.shape
    E = resident0.shape[1]
    W = max(cap.max(), 1)
    B = prompt_at.shape[1]
    copy_ms, pre_ms, pred_ms, shared_ms, expert_ms = prm[P_COPY], prm[P_PRE], prm[P_PRED], prm[P_SHARED], prm[P_EXPERT]
    decay, alpha, hot, window = prm[P_DECAY], prm[P_ALPHA], prm[P_HOT], int(prm[P_WINDOW])
    evict_ms = prm[P_EVICT]
    stats = np.zeros((T, N_STATS))
    slot_of = np.full((L, E), -1, dtype=np.int64)      # slot of a cached expert, -1 if not cached
    slot_expert = np.full((L, W), -1, dtype=np.int64)  # expert in a slot
    slot_pin = np.zeros((L, W), dtype=np.int64)        # == stamp: protected in this step
    n_used = np.zeros(L, dtype=np.int64)
    touched = np.zeros((L, E), dtype=np.int64)  # clock of the last touch (LRU order, every rule's tie-break)
    freq = np.zeros((L, E), dtype=np.int64)     # steps using it since the start (LFU)
    nxt = np.full((L, E), T, dtype=np.int64)    # next use (BELADY)
    lfru = np.zeros((L, E))                     # decayed use count at its last use (LFRU)
    last_step = np.zeros((L, E), dtype=np.int64)  # step of its last use (LFRU, LEAST_STALE)
    gap = np.full((L, E), prm[P_PRIOR])         # mean reuse gap in steps (LEAST_STALE), prior E / K
    reused = np.zeros((L, E), dtype=np.bool_)   # a gap has been measured
    win_count = np.zeros((L, E), dtype=np.int64)  # steps using it in the current window (WINDOW)
    arrive = np.zeros((L, E))                   # when the cached copy is (was) complete
    pending = np.zeros((L, E), dtype=np.bool_)  # speculative copy not used yet
    low = np.zeros((L, E), dtype=np.bool_)      # the cached copy is the low-bit one (LOWBIT)
    low_uses = np.zeros((L, E), dtype=np.int64)  # uses of that low-bit copy
    upgrade_at = np.full((L, E), np.inf)        # when its full copy lands (inf: none queued)
    seen = np.zeros((L, E), dtype=np.int64)     # == stamp: already counted in this step
    tokens_of = np.zeros(E, dtype=np.int64)     # tokens routed to each expert in this step
    where = np.zeros(E, dtype=np.int64)         # slot (or -1 - staging buffer) each expert is computed from
    acc = np.empty(S, dtype=np.int64)           # this step's distinct experts, in order
    if rule == STATIC or rule == WINDOW:
        for l in range(L):
            for e in range(E):
                if resident0[l, e] and n_used[l] < cap[l]:
                    slot_of[l, e] = n_used[l]
                    slot_expert[l, n_used[l]] = e
                    n_used[l] += 1
    clock = 1        # recency: one tick per touch
    stamp = 0
    link_free = 0.0  # when the copy engine has finished everything queued
    now = 0.0        # when the previous layer's compute ended
    for t in range(T):
        for b in range(B):
            if prompt_at[t, b] >= 0:
                now, link_free = _prefill(t, prompt_at[t, b], prompt_need, prompt_len, slot_of, arrive, link_free,
                                          now, prm, stats)
        if rule == WINDOW and t > 0 and t % window == 0:
            link_free = _place(t, cap, win_count, slot_of, slot_expert, n_used, arrive, low, now, link_free, copy_ms,
                               stats)
        for l in range(L):
            stamp += 1
            r = now + pre_ms  # router done: this layer's experts are known
            runs_predictor = prefetch != NO_PREFETCH and l + d < L
            p = pred_ms if runs_predictor else 0.0
            ready = r + p + evict_ms + shared_ms  # the routed experts could start here
            wait = ready
            n_acc = 0
            for s in range(S):  # each distinct expert once, counting its tokens
                e = ids[t, l, s]
                if e < 0:
                    continue
                if seen[l, e] == stamp:
                    tokens_of[e] += 1
                    continue
                seen[l, e] = stamp
                tokens_of[e] = 1
                acc[n_acc] = e
                n_acc += 1
                freq[l, e] += 1
                win_count[l, e] += 1
                if freq[l, e] > 1:
                    g = t - last_step[l, e]
                    gap[l, e] = (1 - alpha) * gap[l, e] + alpha * g if reused[l, e] else g
                    reused[l, e] = True
                    lfru[l, e] = lfru[l, e] * decay ** g + 1.0
                else:
                    lfru[l, e] = 1.0
                last_step[l, e] = t
                if rule == BELADY:
                    nxt[l, e] = next_use[t, l, s]
                if slot_of[l, e] >= 0:  # pinned before any miss of this step looks for a slot
                    slot_pin[l, slot_of[l, e]] = stamp
            stats[t, ACCESSES] += n_acc
            # 1. hits, and the misses: demand fetches (FIFO behind every queued copy), or the host CPU
            n_staged = 0
            n_dem = 0
            n_gpu = 0
            cpu_ms = 0.0
            for i in range(n_acc):
                e = acc[i]
                s = slot_of[l, e]
                if s >= 0:
                    stats[t, HITS] += 1
                    n_gpu += 1
                    if pending[l, e]:
                        stats[t, SPEC_USED] += 1
                        pending[l, e] = False
                    if arrive[l, e] > ready:
                        stats[t, LATE] += 1
                        wait = max(wait, arrive[l, e])
                    if low[l, e]:
                        if upgrade_at[l, e] <= ready:  # the full copy is in: full precision from now on
                            low[l, e] = False
                        else:
                            stats[t, LOWBIT_COMPUTE] += 1
                            low_uses[l, e] += 1
                            if low_uses[l, e] >= hot and upgrade_at[l, e] == np.inf:  # hot: fetch the full copy
                                link_free = max(r, link_free) + copy_ms
                                upgrade_at[l, e] = link_free
                                stats[t, UPGRADE] += 1
                elif miss == CPU:  # the host computes it from the token's hidden state; nothing is copied
                    stats[t, CPU_EXPERTS] += 1
                    cpu_ms += prm[P_CPU1] + (tokens_of[e] - 1) * prm[P_CPUTOK]
                else:
                    q = max(r, link_free) + (prm[P_LOWCOPY] if miss == LOWBIT else copy_ms)
                    link_free = q
                    wait = max(wait, q)
                    n_gpu += 1
                    stats[t, DEMAND] += 1
                    if miss == LOWBIT:
                        stats[t, LOWBIT_FETCH] += 1
                        stats[t, LOWBIT_COMPUTE] += 1
                    if rule != STATIC and rule != WINDOW and cap[l] > 0:
                        if n_used[l] < cap[l]:
                            s = n_used[l]
                            n_used[l] += 1
                        else:
                            # a SCORE rule reads the previous token's scores of layer l: this token's are computed
                            # after its router, beside the copies, off the critical path (step 3)
                            s = _victim(l, cap[l], slot_expert, slot_pin, stamp, rule, t, t - 1, touched, freq, nxt,
                                        lfru, last_step, gap, scores, decay)
                            if s >= 0:
                                old = slot_expert[l, s]
                                slot_of[l, old] = -1
                                if pending[l, old]:
                                    stats[t, SPEC_WASTED] += 1
                                    pending[l, old] = False
                    if s >= 0:
                        slot_of[l, e] = s
                        slot_expert[l, s] = e
                        slot_pin[l, s] = stamp
                        arrive[l, e] = q
                        low[l, e] = miss == LOWBIT
                        low_uses[l, e] = 0
                        upgrade_at[l, e] = np.inf
                    else:  # no slot can be freed: staging buffer, dropped after this layer
                        stats[t, STAGED] += 1
                        s = -1 - n_staged
                        n_staged += 1
                    if record:
                        log_demand[t, l, n_dem, 0] = e
                        log_demand[t, l, n_dem, 1] = s
                    n_dem += 1
                if s >= 0:  # touched: the most recent
                    touched[l, e] = clock
                    clock += 1
                where[e] = s
            if record:
                for s in range(S):
                    if ids[t, l, s] >= 0:
                        log_need[t, l, s] = where[ids[t, l, s]]
            # 2. the predictor, then speculative fetches for layer l+d, pinned so they never take one another's slot
            if runs_predictor and cap[l + d] > 0:
                tl = l + d
                issue = r + p
                n_pre = 0
                n_pin = 0
                for j in range(n_pred):
                    if n_pin == cap[tl]:
                        break
                    e = pred[t, tl, j] if prefetch == PREDICTED else ids[t, tl, j]
                    if e < 0:
                        continue
                    s = slot_of[tl, e]
                    if s >= 0 and slot_pin[tl, s] == stamp:  # named twice (two lanes' predictions)
                        continue
                    if s < 0:
                        if n_used[tl] < cap[tl]:
                            s = n_used[tl]
                            n_used[tl] += 1
                        else:
                            # a score of layer l+d from row (t, l+d) needs this token's input there, which
                            # does not exist yet when layer l runs: the previous token's is the newest
                            s = _victim(tl, cap[tl], slot_expert, slot_pin, stamp, rule, t, t - 1, touched, freq, nxt,
                                        lfru, last_step, gap, scores, decay)
                            old = slot_expert[tl, s]
                            slot_of[tl, old] = -1
                            if pending[tl, old]:
                                stats[t, SPEC_WASTED] += 1
                                pending[tl, old] = False
                        q = max(issue, link_free) + copy_ms
                        link_free = q
                        slot_of[tl, e] = s
                        slot_expert[tl, s] = e
                        arrive[tl, e] = q
                        pending[tl, e] = True
                        low[tl, e] = False
                        stats[t, SPEC] += 1
                        if record:
                            log_prefetch[t, l, n_pre, 0] = e
                            log_prefetch[t, l, n_pre, 1] = s
                        n_pre += 1
                    slot_pin[tl, s] = stamp
                    n_pin += 1
                    # cached or just queued: the most recent
                    touched[tl, e] = clock
                    clock += 1
            # 3. an eviction scorer on this token's input (its scores serve the next token's misses: `evict_ms`, in
            # `ready` above, beside the copies), then the routed experts on the GPU, once the shared expert is done
            # and every one they need is here;
            # the CPU's misses meanwhile, from the router's end: hidden states down, compute, results up (a few KB
            # each way, on their own stream: not queued behind expert copies); the layer waits for both
            end = wait + n_gpu * expert_ms
            if cpu_ms > 0:
                act = prm[P_ACT] * ntok[t]
                end = max(end, r + act + cpu_ms + act)
                stats[t, ACT_TOKENS] += ntok[t]
            stats[t, STALL_MS] += end - (ready + n_gpu * expert_ms)
            now = end
        now += prm[P_TOKEN]
        stats[t, TOKENS] = ntok[t]
        stats[t, END_MS] = now
    for l in range(L):  # speculative copies never used by the end of the stream
        for e in range(E):
            if pending[l, e]:
                stats[T - 1, SPEC_WASTED] += 1
    return stats


# ----------------------------------------------------------------------------------------------
# running a policy and summarising it


@dataclass
class Schedule:
    """What the kernel decided (`run_policy(..., record=True)`): the schedule an engine would execute."""
    need: np.ndarray       # (T, L, K) slot each needed expert is computed from; -1 - j: staging j
    demand: np.ndarray     # (T, L, K, 2) (expert, slot) demand copies queued after layer l's router
    prefetch: np.ndarray   # (T, L, m, 2) (expert, slot) speculative copies for layer l+d queued at layer l
    slots: int             # cache slots per layer the schedule uses (the largest layer's)


def kernel_params(cost: CostModel, predictor_ms: float, knobs: Knobs, num_experts: int, top_k: int,
                  evict_ms: float = 0.0) -> np.ndarray:
    prm = np.zeros(N_PARAMS)
    prm[P_EVICT] = evict_ms
    prm[[P_COPY, P_PRE, P_PRED, P_SHARED, P_EXPERT, P_TOKEN]] = (cost.copy_ms, cost.pre_ms, predictor_ms,
                                                                  cost.shared_ms, cost.expert_ms, cost.token_ms)
    prm[[P_LOWCOPY, P_CPU1, P_CPUTOK, P_ACT]] = (cost.lowbit_copy_ms, cost.cpu_expert_ms, cost.cpu_token_ms,
                                                 cost.activation_ms)
    prm[[P_DECAY, P_ALPHA, P_PRIOR, P_HOT, P_WINDOW]] = (knobs.lfru_decay, knobs.stale_alpha,
                                                         num_experts / max(top_k, 1), knobs.hot_uses,
                                                         knobs.static_window)
    prm[P_PREFILL_TOKEN] = cost.prefill_token_ms
    return prm


_NONE_I = np.zeros((1, 1, 1), dtype=np.int64)


def run_policy(policy: Policy, cache: int | np.ndarray, stream: Stream, cost: CostModel, lookahead: int, budget: int,
               num_experts: int, predictor_ms: float = 0.0, resident: np.ndarray | None = None,
               record: bool = False, knobs: Knobs = Knobs(), scores: np.ndarray | None = None,
               evict_ms: float = 0.0) -> tuple[np.ndarray, Schedule | None]:
    """Per-step statistics (T, N_STATS) of `policy` with `cache` slots per layer (one number or (L,)), and its
    schedule. `resident`: (L, E) experts placed before the first step (static placements); `scores`: a SCORE
    policy's (T, L, E) scores when already computed (else from the stream); `evict_ms`: its scorer's time per
    layer, run after the router (module docstring, step 3)."""
    ids = stream.ids
    T, L, S = ids.shape
    E = num_experts
    caps = np.ascontiguousarray(np.broadcast_to(np.asarray(cache, dtype=np.int64), (L,)))
    if policy.all_resident:
        caps, resident = np.full(L, E, dtype=np.int64), np.ones((L, E), dtype=bool)
    if resident is None:
        if policy.placement == "popular":
            raise ValueError(f"policy {policy.name} places experts before the first step: pass `resident`")
        resident = np.zeros((L, E), dtype=bool)
    m = budget * stream.lanes
    if policy.prefetch == PREDICTED:
        pred, n_pred = stream.predictions[policy.prefetch_key], min(m, int(caps.max()))
    else:
        pred, n_pred = _NONE_I, min(S, int(caps.max())) if policy.prefetch == ORACLE else 0
    nu = next_uses(ids, E) if policy.eviction == BELADY else _NONE_I
    if policy.eviction == SCORE:
        sc = scores if scores is not None else eviction_scores(policy, stream, E, knobs)
        # step t evicts by row t-1's scores (`_victim`), except where t starts a sequence: its prompt's last token
        # is not scored (the engine's rule), so none there (all equal: LRU decides)
        starts = np.flatnonzero(stream.first[1:])
        if len(starts):
            sc = sc.copy()
            sc[starts] = 0.0
    else:
        sc = np.zeros((1, 1, 1), dtype=np.float32)
    if record:
        logs = (np.full((T, L, S), -1, np.int64), np.full((T, L, S, 2), -1, np.int64),
                np.full((T, L, max(n_pred, 1), 2), -1, np.int64))
    else:
        logs = (_NONE_I, np.zeros((1, 1, 1, 2), np.int64), np.zeros((1, 1, 1, 2), np.int64))
    ntok = (ids >= 0).any(1).reshape(T, stream.lanes, -1).any(2).sum(1).astype(np.int64)
    if stream.prompt_at is not None:
        prompts = (stream.prompt_need, stream.prompt_len.astype(np.int64), stream.prompt_at)
    else:
        prompts = (np.zeros((1, 1, 1), dtype=np.bool_), np.zeros(1, np.int64), np.full((T, 1), -1, np.int64))
    prm = kernel_params(cost, predictor_ms, knobs, E, S // stream.lanes, evict_ms if policy.eviction == SCORE else 0.0)
    stats = replay_kernel(ids, pred, n_pred, caps, policy.eviction, policy.prefetch, policy.miss, lookahead,
                          resident, nu, sc, ntok, *prompts, prm, record, *logs)
    return stats, (Schedule(*logs, slots=int(caps.max())) if record else None)


def summarize(stats: np.ndarray, num_layers: int, top_k: int, expert_bytes: int, warmup: int = 0,
              lowbit_bytes: int = 0, activation_bytes: int = 0) -> dict[str, float]:
    """Hit rate, demand misses, bytes (used / wasted) and stall per decoded token, decode tokens/s, and
    apart from them the prefill's time and bytes, over the steps after `warmup` (wasted speculative bytes
    are counted when their expert is evicted)."""
    s = stats[warmup:]
    start = stats[warmup - 1, END_MS] if warmup else 0.0
    tot = s.sum(0)
    n = max(tot[TOKENS], 1.0)
    decode_ms = stats[-1, END_MS] - start - tot[PREFILL_MS]
    full = tot[DEMAND] - tot[LOWBIT_FETCH] + tot[SPEC] + tot[UPGRADE] + tot[PLACED]
    moved = full * expert_bytes + tot[LOWBIT_FETCH] * lowbit_bytes + 2 * tot[ACT_TOKENS] * activation_bytes
    wasted = tot[SPEC_WASTED] * expert_bytes
    accesses = max(tot[ACCESSES], 1.0)
    out = {
        "tokens": int(tot[TOKENS]), "hit_rate": tot[HITS] / accesses, "demand_misses_per_token": tot[DEMAND] / n,
        "staged_per_token": tot[STAGED] / n, "late_prefetch_hits_per_token": tot[LATE] / n,
        "experts_moved_per_token": (tot[DEMAND] + tot[SPEC]) / n, "speculative_per_token": tot[SPEC] / n,
        "bytes_moved_per_token": moved / n, "bytes_used_per_token": (moved - wasted) / n,
        "bytes_wasted_per_token": wasted / n,
        "stall_ms_per_token": tot[STALL_MS] / n, "ms_per_token": decode_ms / n,
        "tokens_per_s": 1e3 * tot[TOKENS] / decode_ms if decode_ms > 0 else float("inf"),
        "cpu_share": tot[CPU_EXPERTS] / accesses, "lowbit_share": tot[LOWBIT_COMPUTE] / accesses,
        "upgrades_per_token": tot[UPGRADE] / n, "placed_per_token": tot[PLACED] / n,
    }
    if tot[PREFILL_TOKENS] > 0:
        out.update({"prefill_tokens": int(tot[PREFILL_TOKENS]), "prefill_ms": tot[PREFILL_MS],
                    "prefill_tokens_per_s": 1e3 * tot[PREFILL_TOKENS] / tot[PREFILL_MS],
                    "prefill_bytes": tot[PREFILL_COPIES] * expert_bytes,
                    "prefill_hit_rate": 1 - tot[PREFILL_COPIES] / max(tot[PREFILL_NEED], 1)})
    return out
