#!/usr/bin/env bash
# Durable collection, compact hidden formats and reading, on one GPU in about 7 minutes (H100): the GPU tests;
# the quality of predictors trained on each hidden format (embedded default, whole bundled trace split, d = 0..3); then, on the full-size
# Qwen1.5-MoE-A2.7B architecture (random weights, bf16): durable collection in every format beside the disk
# ceiling, and training / validation read from lossless and compact shards in the page cache.
# Usage: tools/gpu/bench_io.sh OUTDIR [WORKDIR]     (WORKDIR default /tmp/bench_io: ~45 GB of local disk)
# Writes into OUTDIR: gpu.txt, gpu_tests.txt, formats.json, formats.md, bench_io.json, *.log
set -uo pipefail
source "$(dirname "$0")/args.bash"
check_args "OUTDIR [WORKDIR]" 1 2 "$@"
O=$1; W=${2:-/tmp/bench_io}
mkdir -p "$O" "$W"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log() { grep -v -E "Loading weights|Writing model|collect:|transcode:|step/s|evaluate:|epoch [0-9]+/[0-9]+:" ; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$O/gpu.txt"
df -h "$W" | tail -1 | tee -a "$O/gpu.txt"
t0=$SECONDS
python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -15 | tee "$O/gpu_tests.txt"
[ -f "$W/qwen15/config.json" ] && [ -f "$W/qwen15/tokenizer.json" ] ||  # kept from an earlier run
    python3 tools/make_random_checkpoint.py --preset qwen1.5-moe-a2.7b --device cuda --output "$W/qwen15" --overwrite \
    2>&1 | log | tail -3 | tee "$O/make_checkpoint.log"
echo "checkpoint ready at $((SECONDS - t0)) s"
# quality: layer-aware predictor (comparison recipe, 10 epochs) on bf16 and every compact format, same split and rows
python3 tools/compare_hidden_formats.py --output "$W/formats" --predictors layer-aware --epochs 10 --jobs 4 \
    --formats hadamard-3.5bit,pca-3.5bit,pca-router-3.5bit \
    2>&1 | log | tee "$O/formats.log" | tail -12
cp "$W/formats/formats.json" "$W/formats/formats.md" "$O/" 2>/dev/null
echo "formats done at $((SECONDS - t0)) s"
python3 tools/benchmark.py --model "$W/qwen15" --quantization none --workdir "$W/bench" --formats all \
    --read-formats lossless,hadamard-3.5bit,pca-router-3.5bit --paired-rounds 0 --train-sequences 200 --epochs 3 \
    $([ -f "$O/formats.json" ] && echo --quality "$O/formats.json") --json "$O/bench_io.json" 2>&1 | log \
    | tee "$O/bench_io.log"
echo "all done at $((SECONDS - t0)) s"
rm -rf "$W/bench"
