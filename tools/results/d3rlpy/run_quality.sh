#!/usr/bin/env bash
# Sequential queue of d3rlpy quality baselines on HalfCheetah (one training process at a time,
# 1 thread each). Appends one JSON line per run to tools/results/d3rlpy/quality.jsonl; runs whose
# (algo, dataset, seed, updates) are already there are skipped, so it can be restarted.
#
# Run from anywhere, in the background:
#   nohup bash tools/results/d3rlpy/run_quality.sh > tools/results/d3rlpy/quality.log 2>&1 &
# Environment: VENV (default <repo>/.venv-d3rlpy), DATASETS (default <repo>/../shared/datasets/minari/halfcheetah).
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
PY="${VENV:-$REPO_ROOT/.venv-d3rlpy}/bin/python"
DATASETS="${DATASETS:-$REPO_ROOT/../shared/datasets/minari/halfcheetah}"
OUT="$REPO_ROOT/tools/results/d3rlpy/quality.jsonl"

already_done() {  # algo dataset_id seed updates
    [[ -f "$OUT" ]] && "$PY" - "$OUT" "$@" <<'EOF'
import json, sys
out, algo, ds, seed, updates = sys.argv[1:]
for line in open(out):
    r = json.loads(line)
    if (r["algo"], r["dataset_id"], r["seed"], r["updates"], r["mode"]) == (algo, ds, int(seed), int(updates), "quality"):
        sys.exit(0)
sys.exit(1)
EOF
}

# phase: "<updates> <algo...>", in order.
for phase in "10000 td3bc iql bc" "3000 dt" "3000 cql"; do
    read -r updates algos <<<"$phase"
    for ds in medium-v0 full-replay-v0; do
        for seed in 0 1 2; do
            for algo in $algos; do
                if already_done "$algo" "halfcheetah/$ds" "$seed" "$updates"; then
                    echo "skip $algo halfcheetah/$ds seed=$seed updates=$updates (in $OUT)"
                    continue
                fi
                echo "=== $(date -u +%FT%TZ) start $algo halfcheetah/$ds seed=$seed updates=$updates"
                "$PY" "$REPO_ROOT/tools/d3rlpy_baseline.py" --dataset-dir "$DATASETS/$ds" \
                    --algo "$algo" --mode quality --updates "$updates" --seed "$seed" \
                    --eval-episodes 10 --threads 1 --json "$OUT" \
                    || echo "!!! FAILED $algo halfcheetah/$ds seed=$seed (exit $?)"
            done
        done
    done
done
echo "=== $(date -u +%FT%TZ) all done"
