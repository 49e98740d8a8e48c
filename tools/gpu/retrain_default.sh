#!/usr/bin/env bash
# Retrain the embedded default (models/embedded/qwen2moe-mini) for real-model routing, on one GPU, in one command
# (TRAIN_S, 330 s, of training per variant, plus the reports): several variants of tools/train_proxy_moe.py train side by side on the GPU (the model is
# launch-bound, so they share it well), each into its own folder under WORK with its own --time-limit; the first
# variant, in the order of preference below, whose report meets the target (previous-token recall@4 in 0.30-0.45,
# no expert under 0.2% of a layer's assignments, held-out perplexity at most 70.3: the verdict in its
# training_report.json) is chosen; if none meets it, the closest is, and the script exits 3.
#
# Usage: tools/gpu/retrain_default.sh OUTDIR      (on a GPU machine, from anywhere)
# Writes into OUTDIR, five files whatever the variants (the transfer back takes at most 8 files of 16 MiB):
#   model.tar.000, model.tar.001  the chosen model folder (one model.safetensors, config, tokenizer, report) as
#                                 one tar cut into pieces of at most 15 MiB
#   model.manifest.json           every file's and piece's size and SHA-256
#   variants.tar.gz               every variant's training_report.json and training log
#   retrain.log                   the machine, each variant's command, verdict and timing, the choice
# Then, here:
#   python tools/retrain_bundle.py unpack OUTDIR models/embedded/qwen2moe-mini --overwrite
# Knobs (environment): WORK (${TMPDIR:-/tmp}/retrain-work: the variants' folders), PYTHON (python3),
# TRAIN_S (seconds of training per variant, 330), STEPS (planned steps from scratch, 1800), RETUNE_STEPS (1600),
# OMP_NUM_THREADS (4).
# CPU dry run of the whole script (tiny models, numbers meaningless; under a minute on 2 idle cores):
#   RETRAIN_SMOKE=1 bash tools/gpu/retrain_default.sh /tmp/retrain-smoke
set -uo pipefail
source "$(dirname "$0")/args.bash"; check_args "OUTDIR" 1 1 "$@"
O=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "retrain_default.sh: error: cannot create OUTDIR '$1'" >&2; exit 2; }
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
PY=${PYTHON:-python3}
WORK=${WORK:-${TMPDIR:-/tmp}/retrain-work}
START=$SECONDS
log() { echo "[$(date +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$O/retrain.log"; }

# --- the variants, most preferred first (the first that meets the target is chosen). All use Qwen1.5-MoE's
# Switch coefficient (--aux-coef 0.001), the shipped recipe otherwise, and seed 0. In order:
#   scratch_bal0.01          the coefficients alone: from scratch, the hard-share balance term cut from 0.1 to
#                            0.01 (on the CPU, less balance lost locality faster: docs/EMBEDDED_MODEL.md)
#   scratch_loc0.375_bal0.1  from scratch, the shipped balance term (0.1: every expert stayed alive) and the
#                            locality loss, its weight held at a training-batch previous-token recall of 0.375
#                            and never below 0.25, so the model grows the context the routers read from the start
#   scratch_loc0.32_bal0.1   the same held at 0.32: less perplexity lost, recall nearer the band's floor
#   retune_loc0.32_bal0.1    the shipped model (perplexity 63.9) retuned with the locality loss held at 0.32 (on
#                            the CPU a retune reached the band but lost 73% perplexity: the fallback)
#                            It starts from models/embedded/qwen2moe-mini as it is; since 2026-12-07 that is this
#                            variant's own result (recall@4 0.314), so to reproduce it, restore the folder of
#                            commit e2b9d5c first: git checkout e2b9d5c -- models/embedded/qwen2moe-mini
# From-scratch runs plan STEPS steps (the cosine schedule's length), the retune RETUNE_STEPS; every run stops at
# TRAIN_S seconds of training whatever its step (retrain.log says where each stopped).
TRAIN_S=${TRAIN_S:-330} STEPS=${STEPS:-1800} RETUNE_STEPS=${RETUNE_STEPS:-1600}
LOC="--locality-gain 0.02 --locality-max 5"
SCRATCH_LOC="--aux-coef 0.001 --balance-coef 0.1 --locality-coef 0.5 --locality-min 0.25 $LOC --steps $STEPS --time-limit $TRAIN_S"
NAMES=(scratch_bal0.01 scratch_loc0.375_bal0.1 scratch_loc0.32_bal0.1 retune_loc0.32_bal0.1)
ARGS=(
  "--aux-coef 0.001 --balance-coef 0.01 --steps $STEPS --time-limit $TRAIN_S"
  "$SCRATCH_LOC --locality-target 0.375"
  "$SCRATCH_LOC --locality-target 0.32"
  "--init-from models/embedded/qwen2moe-mini --aux-coef 0.001 --balance-coef 0.1 --locality-coef 1 $LOC --lr 3e-4 --warmup 50 --steps $RETUNE_STEPS --time-limit $TRAIN_S --locality-target 0.32"
)
if [ "${RETRAIN_SMOKE:-0}" = 1 ]; then  # CPU dry run: the same variants, tiny
  SIZE=(--steps 4 --warmup 1 --batch-size 2 --seq-len 32 --eval-every 2 --max-texts 30 --report-sequences 8 --device cpu)
  export OMP_NUM_THREADS=1
else
  SIZE=()
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}  # 4 processes side by side on 16 cores
fi

: > "$O/retrain.log"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'transformers', transformers.__version__)" 2>&1
  git rev-parse HEAD 2>/dev/null || true; } | while read -r line; do log "machine: $line"; done
mkdir -p "$WORK"
DIRS=()
for i in "${!NAMES[@]}"; do
  d=$WORK/${NAMES[$i]}
  DIRS+=("$d")
  rm -rf "$d" "$d.partial" "$d.log"
  # shellcheck disable=SC2086  # ARGS[i] is a list of flags
  cmd=($PY tools/train_proxy_moe.py --output "$d" --overwrite ${ARGS[$i]} "${SIZE[@]}")
  log "start ${NAMES[$i]}: ${cmd[*]}"
  # a hard stop well after the time limit: a hung run never costs the others' results
  timeout $(( TRAIN_S + 240 )) "${cmd[@]}" > "$d.log" 2>&1 &
done
wait
for i in "${!NAMES[@]}"; do
  d=${DIRS[$i]}
  steps=$(grep -ao "trained [0-9]* steps in [0-9]* s" "$d.log" | tail -1)
  verdict=$(grep -a "TARGET:" "$d.log" | tail -1)
  log "${NAMES[$i]}: ${steps:-NO MODEL (see $(basename "$d").log)}; ${verdict:-no verdict}"
done

# --- the choice, the chosen model in pieces, every variant's report and log
chosen=$($PY tools/retrain_bundle.py choose "${DIRS[@]}" 2>> "$O/retrain.log"); rc=$?
if [ -z "$chosen" ]; then
  log "no variant finished: no model to bring back"; rc=1
else
  log "chosen: $(basename "$chosen")$([ $rc = 3 ] && echo ' (NO variant meets the target: the closest)')"
  $PY tools/retrain_bundle.py pack "$chosen" "$O" 2>&1 | while read -r line; do log "$line"; done
fi
tar -czf "$O/variants.tar.gz" -C "$WORK" $(for d in "${DIRS[@]}"; do n=$(basename "$d")
  [ -f "$d/training_report.json" ] && echo "$n/training_report.json"; [ -f "$d.log" ] && echo "$n.log"; done)
log "done in $((SECONDS - START)) s; OUTDIR holds: $(cd "$O" && ls | tr '\n' ' ')"
exit $rc
