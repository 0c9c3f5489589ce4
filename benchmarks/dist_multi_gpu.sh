#!/usr/bin/env bash
# Multi-GPU check and benchmark of the distributed losses (one node, NCCL), for a machine with
# several GPUs.  Not run yet: the GPU machines lent so far have one GPU.
#   bash benchmarks/dist_multi_gpu.sh OUTDIR [NGPUS]
# 1. the toy DDP training example with both implementations (must run and the loss must fall);
# 2. ring vs gather vs naive at B_local = 8192 and 32768, D = 256, bf16 (time and peak memory per rank).
set -uo pipefail
OUT=${1:?usage: bash benchmarks/dist_multi_gpu.sh OUTDIR [NGPUS]}
NGPU=${2:-$(nvidia-smi -L | wc -l)}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
for impl in ring gather; do
  torchrun --standalone --nproc-per-node "$NGPU" examples/distributed_clip.py --device cuda \
    --dist-impl "$impl" --batch 4096 --dim 256 --steps 20 2>&1 | tee "$OUT/example_$impl.log"
done
for b in 8192 32768; do
  python3 benchmarks/dist_ring_vs_gather.py --world-size "$NGPU" --device cuda --dtype bf16 \
    --b-local "$b" --d 256 --reps 5 --json "$OUT/dist_gpu${NGPU}_b${b}.json" 2>&1 | tee -a "$OUT/dist_bench.log"
done
