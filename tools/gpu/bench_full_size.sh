#!/usr/bin/env bash
# Full-size Qwen1.5-MoE-A2.7B (random weights, exact architecture) on one GPU: build the checkpoint,
# 4-bit memory + collection speed, the real 4-bit collect command, then bf16 collection/training/validation.
# Usage: tools/gpu/bench_full_size.sh WORKDIR OUTDIR      (needs ~45 GB of local disk and a >= 40 GB GPU)
#   WORKDIR  scratch space: the random-weight checkpoint (28.6 GB), trace sets, checkpoints
#   OUTDIR   what is kept: gpu.txt, bench_4bit.json, bench_bf16.json and the logs
#   TRAIN_SEQ=200 EPOCHS=3 (environment) size the bf16 training benchmark
set -uo pipefail
source "$(dirname "$0")/args.bash"
check_args "WORKDIR OUTDIR" 2 2 "$@"
W=$1; O=$2
mkdir -p "$W" "$O"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log() { grep -v -E "Loading weights|Writing model|collect:|step/s|evaluate:" ; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$O/gpu.txt"
python3 tools/make_random_checkpoint.py --preset qwen1.5-moe-a2.7b --device cuda --output "$W/qwen15" --overwrite 2>&1 | log | tee "$O/make_checkpoint.log"
python3 tools/benchmark.py --model "$W/qwen15" --quantization 4bit --stages collect --workdir "$W/b4" \
    --json "$O/bench_4bit.json" 2>&1 | log | tee "$O/bench_4bit.log"
python3 scripts/collect_traces.py --model "$W/qwen15" --quantization 4bit --target_traces 48 --shard_size 24 \
    --batch_size 8 --max_length 256 --hidden-layers 0,12,23 --output "$W/traces4bit" --overwrite 2>&1 | log | tee "$O/collect_4bit.log"
python3 tools/benchmark.py --model "$W/qwen15" --quantization none --workdir "$W/b16" --train-sequences "${TRAIN_SEQ:-200}" \
    --epochs "${EPOCHS:-3}" --json "$O/bench_bf16.json" 2>&1 | log | tee "$O/bench_bf16.log"
echo "wrote $O/ (gpu.txt, bench_4bit.json, bench_bf16.json, *.log); scratch files in $W/"
