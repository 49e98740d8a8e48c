#!/usr/bin/env bash
# Full-size Qwen1.5-MoE-A2.7B (random weights, exact architecture) on one GPU: build the checkpoint,
# 4-bit memory + collection speed, the real 4-bit collect command, then bf16 collection/training/validation.
# Usage: scripts/bench_full_size.sh WORKDIR OUTDIR      (needs ~45 GB of local disk and a >= 40 GB GPU)
set -uo pipefail
W=${1:?workdir}; O=${2:?outdir}
mkdir -p "$W" "$O"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log() { grep -v -E "Loading weights|Writing model|collect:|step/s|evaluate:" ; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$O/gpu.txt"
python3 scripts/make_random_checkpoint.py --preset qwen1.5-moe-a2.7b --device cuda --output "$W/qwen15" --overwrite 2>&1 | log | tee "$O/make_checkpoint.log"
python3 scripts/benchmark.py --model "$W/qwen15" --quantization 4bit --stages collect --workdir "$W/b4" \
    --json "$O/bench_4bit.json" 2>&1 | log | tee "$O/bench_4bit.log"
python3 scripts/collect_traces.py --model "$W/qwen15" --quantization 4bit --target_traces 48 --shard_size 24 \
    --batch_size 8 --max_length 256 --hidden-layers 0,12,23 --output "$W/traces4bit" --overwrite 2>&1 | log | tee "$O/collect_4bit.log"
python3 scripts/benchmark.py --model "$W/qwen15" --quantization none --workdir "$W/b16" --train-sequences "${TRAIN_SEQ:-200}" \
    --epochs "${EPOCHS:-3}" --json "$O/bench_bf16.json" 2>&1 | log | tee "$O/bench_bf16.log"
