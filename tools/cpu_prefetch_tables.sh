#!/usr/bin/env bash
# docs/PREFETCH.md's section "Simulated on a CPU: the embedded default", every table of it, on a CPU (~15 minutes on
# 2 cores): 600 sequences of the bundled corpus (up to 128 tokens) collected from the embedded default, the hybrid
# predictor at d = 1 trained on them (6 epochs, width 256), then scripts/simulate_prefetch.py once per table row
# group (HF-eager and "engine" costs, PCIe 4/5, fp16/NF4, fetch budget m, lookahead d, --locality p).
# Usage: tools/cpu_prefetch_tables.sh WORKDIR OUTDIR
#   WORKDIR  the trace set (WORKDIR/traces, ~1 GB) and the predictor (WORKDIR/ckpt/hybrid-d1); kept and reused
#   OUTDIR   cpu_*.json (one per simulator run), cpu_main.png and the logs
set -uo pipefail
source "$(dirname "$0")/gpu/args.bash"
check_args "WORKDIR OUTDIR" 2 2 "$@"
W=$1; O=$2
mkdir -p "$W" "$O"
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T=$W/traces; CK=$W/ckpt/hybrid-d1/best_checkpoint.pth
[ -f "$T/manifest.json" ] || $PY scripts/collect_traces.py --target_traces 600 --shard_size 100 --max_length 128 \
    --dtype float32 --device cpu --output "$T" --overwrite > "$O/collect.log" 2>&1 || { echo "collection failed: $O/collect.log"; exit 1; }
[ -f "$CK" ] || $PY scripts/train_simple_predictor.py --traces "$T" --model-type hybrid --lookahead 1 --lr 1e-3 \
    --epochs 6 --hidden-dim 256 --batch-size 8 --device cpu --output "$(dirname "$CK")" --overwrite \
    > "$O/train.log" 2>&1 || { echo "training failed: $O/train.log"; exit 1; }
EAGER=(--pre-ms 0.43 --shared-ms 0.53 --expert-ms 0.06)
ENGINE=(--pre-ms 0.08 --shared-ms 0.06 --expert-ms 0.015)
H=prefetch:$CK
sim() { local name=$1; shift; $PY scripts/simulate_prefetch.py --traces "$T" --seed 0 --lookahead 1 --fetch-budget 4 \
    "$@" --json "$O/cpu_$name.json" > "$O/cpu_$name.log" 2>&1 && echo "cpu_$name.json" || echo "cpu_$name FAILED (see its log)"; }
sim main "${EAGER[@]}" --cache-experts 4,8,15,30,45,60 --plot "$O/cpu_main.png" \
    --policies on-demand,lfu,static-popular,prefetch:router-reuse,prefetch:previous-token,prefetch:popularity,$H,oracle,belady,all-resident
for m in 1 3 6 8; do sim m$m "${EAGER[@]}" --cache-experts 15 --fetch-budget $m --policies on-demand,prefetch:router-reuse,$H,oracle; done
sim m2all "${EAGER[@]}" --cache-experts 4,8,15,30,45 --fetch-budget 2 \
    --policies on-demand,prefetch:router-reuse,$H,oracle,belady,all-resident
for d in 2 3; do sim d$d "${EAGER[@]}" --cache-experts 15 --lookahead $d --policies on-demand,prefetch:router-reuse,oracle; done
ALL=on-demand,lfu,static-popular,prefetch:router-reuse,$H,oracle,belady,all-resident
sim pcie4 "${EAGER[@]}" --cache-experts 8,15,30 --link pcie4 --policies $ALL
sim nf4 "${EAGER[@]}" --cache-experts 8,15,30 --expert-format nf4 --policies $ALL
sim engine "${ENGINE[@]}" --cache-experts 8,15,30 --policies $ALL
sim engine4 "${ENGINE[@]}" --cache-experts 8,15,30 --link pcie4 --policies $ALL
for p in 0.4 0.8; do
  sim loc$p "${EAGER[@]}" --cache-experts 8,15,30 --locality $p \
      --policies on-demand,lfu,prefetch:previous-token,prefetch:router-reuse,$H,oracle,belady,all-resident
  sim engloc$p "${ENGINE[@]}" --cache-experts 15 --locality $p --policies on-demand,prefetch:router-reuse,$H,oracle,belady,all-resident
done
grep -h "locality\|recall" "$O/cpu_main.log" | head -3
