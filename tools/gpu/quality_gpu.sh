#!/usr/bin/env bash
# docs/RESULTS.md's GPU numbers (the router-anchored predictor: cost, what mattered, per layer, leave one domain
# out) in one command on one H100/H200, in at most BUDGET_S seconds of wall time (default 360):
#   1. the embedded default's traces (collected first, ~30 s on a GPU, when routing_data/traces/qwen2moe-mini
#      is missing; a set there without router logits or every layer's hidden state is left alone and a fresh
#      one is collected under OUTDIR instead);
#   2. tools/benchmark_predictor_cost.py at batch 1 and 64 (FLOPs, parameters, us per call eager and as a CUDA
#      graph), on an idle GPU, before any training;
#   3. tools/sweep_predictors.py with --deadline (what has not started by then is skipped, what is still
#      training is stopped and scored from its best epoch): the full recipe at d = 0,1,2,3, the "What mattered"
#      ladder at d = 1 and 3, leave-one-domain-out at d = 1; tables "What mattered", "Best per lookahead"
#      (test recall@4 next to router reuse), "Per layer" and "Leave one domain out"; each lookahead's best
#      checkpoint (by validation recall) copied to OUTDIR/best_d<d>/ (best_checkpoint.pth + .json config);
#   4. scripts/simulate_prefetch.py on OUTDIR/best_d1/best_checkpoint.pth (a short CPU replay: it loads and runs).
# Each step runs under `timeout` and `|| true`: one failure never loses the others' output.
#
# Usage: tools/gpu/quality_gpu.sh OUTDIR      (from anywhere; GPU, ~6 minutes)
# Writes into OUTDIR: summary.md (every table), cost.{json,md}, sweep/sweep.{md,json}, best_d{0,1,2,3}/,
# prefetch.{json,png}, *.log and sweep_logs/ (one training log per job). The sweep's checkpoints (~100 MB per
# job) go to WORK (default ${TMPDIR:-/tmp}/quality-gpu-work), not OUTDIR.
# Knobs (environment): BUDGET_S, EPOCHS (6), JOBS (8), HIDDEN (512), BATCH_ROWS (32768), LR (2e-3), TRACES, WORK,
# PYTHON (python3).
# CPU dry run of the whole script (tiny traces collected under OUTDIR, 1 epoch, width 16; ~3 minutes on 2 cores,
# numbers meaningless):
#   QUALITY_SMOKE=1 tools/gpu/quality_gpu.sh /tmp/quality-smoke
set -uo pipefail
source "$(dirname "$0")/args.bash"
check_args "OUTDIR" 1 1 "$@"
O=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
START=$SECONDS
left() { echo $(( BUDGET_S - (SECONDS - START) )); }
within() { local t=$(( $(left) - $1 )); (( t < $2 )) && t=$2; (( t > $3 )) && t=$3; echo $t; }  # time left - $1, in [$2, $3]
log() { echo "[$(date +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$O/run.log"; }

if [ "${QUALITY_SMOKE:-0}" = 1 ]; then  # CPU dry run: every step, tiny
  BUDGET_S=${BUDGET_S:-900} EPOCHS=${EPOCHS:-1} JOBS=${JOBS:-2} HIDDEN=${HIDDEN:-16} BATCH_ROWS=${BATCH_ROWS:-2048}
  LR=${LR:-2e-3} TRACES=${TRACES:-$O/traces-smoke} DEVICE=cpu
  COLLECT=(--target_traces 72 --shard_size 24 --batch_size 8 --max_length 64 --device cpu)
  COST=(--dims embedded --anchored-depths 2 --iters 2 --repeats 1 --warmup 0 --device cpu)
  SIM_TOKENS=512
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  BUDGET_S=${BUDGET_S:-360} EPOCHS=${EPOCHS:-6} JOBS=${JOBS:-8} HIDDEN=${HIDDEN:-512} BATCH_ROWS=${BATCH_ROWS:-32768}
  LR=${LR:-2e-3} TRACES=${TRACES:-routing_data/traces/qwen2moe-mini} DEVICE=auto
  COLLECT=()
  COST=(--iters 100 --repeats 7 --warmup 20)
  SIM_TOKENS=8192
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # 8 training processes side by side on 16 cores
fi
WORK=${WORK:-${TMPDIR:-/tmp}/quality-gpu-work}
RESERVE=60  # seconds kept after the sweep's deadline: scoring stopped jobs, the tables, the simulator, the summary
: > "$O/run.log"
log "budget ${BUDGET_S}s; traces $TRACES; epochs $EPOCHS, $JOBS jobs, width $HIDDEN, $BATCH_ROWS rows/step, lr $LR"

# --- 0. the machine
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "CPU (no nvidia-smi)"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1
  git rev-parse HEAD 2>/dev/null || true; } > "$O/env.log"

# --- 1. the traces: the embedded default's, with router logits (KL loss) and every layer's MoE input
usable() { timeout 60 $PY - "$1" <<'EOF'
import sys
from pathlib import Path
from collection.traces.format import TraceSet
m = TraceSet(Path(sys.argv[1]), verify=False).manifest
ok = m.capture.get("store_logits", False) and sorted(m.hidden_layers) == list(range(m.num_layers))
print(f"{sys.argv[1]}: {'usable' if ok else 'lacks router logits or hidden layers'}")
sys.exit(0 if ok else 1)
EOF
}
if ! usable "$TRACES" >> "$O/collect.log" 2>&1; then
  [ -e "$TRACES/manifest.json" ] && TRACES=$O/traces  # never overwrite someone's trace set
  log "collecting traces into $TRACES"
  timeout "$(within 200 60 300)" $PY scripts/collect_traces.py --dtype float32 "${COLLECT[@]}" --output "$TRACES" --overwrite \
      >> "$O/collect.log" 2>&1 || log "collection FAILED (see collect.log)"
fi
log "traces ready: $TRACES"

# --- 2. cost per prediction at batch 1 and 64, on an idle GPU
timeout "$(within 180 30 150)" $PY tools/benchmark_predictor_cost.py "${COST[@]}" --batches 1,64 --hidden-dim "$HIDDEN" \
    --json "$O/cost.json" --markdown "$O/cost.md" > "$O/cost.log" 2>&1 || log "cost benchmark FAILED (see cost.log)"
log "cost benchmark done"

# --- 3. the sweep, stopped at its deadline
DEADLINE=$(( $(left) - RESERVE ))
[ "$DEADLINE" -lt 30 ] && DEADLINE=30
LADDER=layer-aware,anchor,+kl,+past,+own,+window,+token,+separate,+fallback
log "sweep: deadline ${DEADLINE}s"
timeout $(( DEADLINE + RESERVE - 15 )) $PY tools/sweep_predictors.py --traces "$TRACES" --configs "$LADDER" \
    --lookaheads 0,1,2,3 --ladder-lookaheads 1,3 --lodo --lodo-lookaheads 1 --epochs "$EPOCHS" \
    --hidden-dim "$HIDDEN" --batch-rows "$BATCH_ROWS" --lr "$LR" --jobs "$JOBS" --device "$DEVICE" \
    --deadline "$DEADLINE" --retrain --output "$O/sweep" --work-dir "$WORK" --best-dir "$O" \
    > "$O/sweep.log" 2>&1 || log "sweep FAILED or cut (see sweep.log; sweep.md holds what finished)"
mkdir -p "$O/sweep_logs" && cp "$WORK"/logs/*.log "$O/sweep_logs/" 2>/dev/null
log "sweep done"

# --- 4. the prefetch simulator runs the best d = 1 checkpoint (a short replay on the CPU, default cost model)
if [ -f "$O/best_d1/best_checkpoint.pth" ] && [ "$(left)" -gt 20 ]; then
  timeout $(( $(left) - 10 )) $PY scripts/simulate_prefetch.py --traces "$TRACES" --lookahead 1 \
      --policies "on-demand,prefetch:router-reuse,prefetch:$O/best_d1/best_checkpoint.pth,oracle" \
      --cache-experts 8,15,30 --max-tokens "$SIM_TOKENS" --json "$O/prefetch.json" --plot "$O/prefetch.png" \
      > "$O/prefetch.log" 2>&1 || log "simulator FAILED (see prefetch.log)"
else
  log "simulator skipped (no best_d1 checkpoint, or no time left)"
fi

# --- the summary: every table in one file
{ echo "# Predictor quality on $(head -1 "$O/env.log")"; echo
  echo "traces $TRACES; epochs $EPOCHS, width $HIDDEN, $BATCH_ROWS rows/step, lr $LR, $JOBS jobs; sweep deadline ${DEADLINE}s"
  for d in 0 1 2 3; do [ -f "$O/best_d$d/best.json" ] && echo "- best d=$d: $O/best_d$d/best_checkpoint.pth" \
      "($(grep -o '"config": "[^"]*"' "$O/best_d$d/best.json"))"; done
  echo; echo "# Cost"; echo; cat "$O/cost.md" 2>/dev/null || echo "(no cost table: see cost.log)"
  echo; cat "$O/sweep/sweep.md" 2>/dev/null || echo "(no sweep tables: see sweep.log)"
  echo; echo "## Prefetch simulator with best_d1 (first $SIM_TOKENS test tokens)"; echo '```'
  grep -E "^ +[0-9]+ |policy" "$O/prefetch.log" 2>/dev/null || echo "(not run: see prefetch.log)"; echo '```'
} > "$O/summary.md"
log "wrote $O/summary.md in $((SECONDS - START))s"
cat "$O/summary.md"
