#!/usr/bin/env bash
# docs/PREFETCH.md's GPU numbers in one go, on one H100/H200 (~12 minutes): collect the embedded default's traces,
# train the hybrid predictor at lookahead 1, measure the offload engine beside the simulator's prediction of each of
# its rows (tools/bench_offload.py, with the predictor on the traces' routing), then the simulator with costs the
# engine measured on this GPU (--measure), fp16 and NF4.
# Usage: tools/gpu/prefetch_gpu.sh OUTDIR        (writes at most 8 files into OUTDIR, logs included)
#        PREDICTOR=path/to/best_checkpoint.pth tools/gpu/prefetch_gpu.sh OUTDIR   (that predictor instead of training
#        the hybrid; e.g. the best d = 1 checkpoint of tools/gpu/quality_gpu.sh)
set -uo pipefail
source "$(dirname "$0")/args.bash"
check_args "OUTDIR" 1 1 "$@"
O=$1
mkdir -p "$O"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T=routing_data/traces/qwen2moe-mini
CK=${PREDICTOR:-models/prefetch/hybrid-d1/best_checkpoint.pth}
P=on-demand,lfu,static-popular,prefetch:router-reuse,prefetch:$CK,oracle,belady,all-resident
quiet() { grep -v -E "collect:|step/s|evaluate:|stream:.*tok/s|simulate:.*run/s" ; }
{
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader
python3 -c "import torch, numba, bitsandbytes; print('torch', torch.__version__, 'numba', numba.__version__, 'bitsandbytes', bitsandbytes.__version__)"
[ -f "$T/manifest.json" ] || python3 scripts/collect_traces.py --dtype float32 --output "$T" --overwrite
[ -f "$CK" ] || python3 scripts/train_simple_predictor.py --traces "$T" --model-type hybrid --lookahead 1 --lr 1e-3 \
    --epochs 20 --hidden-dim 512 --batch-size 8 --output "$(dirname "$CK")" --overwrite
[ -f "$(dirname "$CK")/results.json" ] && cp "$(dirname "$CK")/results.json" "$O/predictor_training.json"
python3 tools/bench_offload.py --traces "$T" --checkpoint "$CK" --json "$O/bench.json"
for f in fp16 nf4; do
  python3 scripts/simulate_prefetch.py --traces "$T" --policies "$P" --cache-experts 4,8,15,30,45,60 --measure \
      --expert-format $f --json "$O/measured_sim_$f.json" --plot "$O/measured_sim_$f.png"
done
} 2>&1 | quiet | tee "$O/run.log"
