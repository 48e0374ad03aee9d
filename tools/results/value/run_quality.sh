#!/usr/bin/env bash
# Sequential dtlab quality runs on HalfCheetah (one training at a time, 1 thread), on the same
# budgets as the d3rlpy baselines in tools/results/d3rlpy/run_quality.sh: 10k updates for TD3+BC
# and IQL, 3k for CQL; 3 seeds; 10 evaluation episodes at the end.
#   nohup bash tools/results/value/run_quality.sh "td3bc iql" > tools/results/value/quality.log 2>&1 &
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
export MINARI_DATASETS_PATH="${MINARI_DATASETS_PATH:-$PWD/../shared/datasets/minari}"
export DTLAB_CACHE_DIR="${DTLAB_CACHE_DIR:-/tmp/dtlab-cache}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
ALGOS="${1:-td3bc iql cql}"
for algo in $ALGOS; do
    epochs=10; [[ $algo == cql || $algo == calql ]] && epochs=3
    for ds in medium-v0 full-replay-v0; do
        echo "=== $(date -u +%FT%TZ) start $algo halfcheetah/$ds epochs=$epochs"
        .venv/bin/python tools/quality.py -c conf/$algo.yaml --dataset halfcheetah/$ds --seeds 0 1 2 \
            --epochs $epochs --out /tmp/dtlab-quality --json tools/results/value/quality.jsonl \
            || echo "!!! FAILED $algo halfcheetah/$ds"
    done
done
echo "=== $(date -u +%FT%TZ) all done"
