#!/usr/bin/env bash
# Offline-to-online fine-tuning on Walker2d medium (issue 28's CPU part): IQL, TD3+BC→TD3, CQL and Cal-QL,
# seeds 0, 1, 2. Each seed trains its own offline policy (10k updates), then fine-tunes it online for 10k env
# steps after a 1k warm-up (conf/finetune/*: balanced replay 0.5, one update per env step), with 10 evaluation
# episodes every 2000 updates. One thread per run. Run it again to continue after a stop: finished runs are kept,
# a stopped one resumes from its last checkpoint. Usage (from the repository root):
#   MINARI_DATASETS_PATH=../shared/datasets/minari bash docs/examples/finetune-walker2d/run.sh OUT [SEEDS] [ALGOS]
set -euo pipefail
out=${1:?usage: run.sh OUT [SEEDS] [ALGOS]}
seeds=${2:-"0 1 2"}
algos=${3:-"iql td3bc cql calql"}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
data=walker2d/medium-v0
# a run stopped part-way continues from its last checkpoint (exact resume); one stopped before its first is redone
resume() {
  if [ -f "$1/version_0/checkpoints/last.ckpt" ]; then echo "--ckpt_path last"; else rm -rf "$1"; fi
}
for k in $seeds; do
  for algo in $algos; do
    off=$out/off_$k; on=$out/on_$k
    extra=()
    [ "$algo" = td3bc ] && extra=(--model.init_args.bc_anneal_updates 5000)  # BC weight 1 → 0 over the first half
    if [ ! -f "$off/$algo/version_0/run_summary.json" ]; then
      dtlab fit -c conf/$algo.yaml --data.dataset_id $data --seed_everything $k --data.seed $k \
        --trainer.max_steps 10000 --data.steps_per_epoch 5000 --evaluation.episodes 10 --runs_dir "$off" \
        --trainer.enable_progress_bar false $(resume "$off/$algo") >> "$out/log_off_${algo}_$k.txt" 2>&1
    fi
    if [ ! -f "$on/$algo/version_0/run_summary.json" ]; then
      dtlab fit -c conf/finetune/$algo.yaml --data.dataset_id $data --seed_everything $k --data.seed $k \
        --trainer.callbacks.init_args.seed $k --pretrained "$off/$algo/version_0/checkpoints/last.ckpt" \
        --trainer.max_steps 10000 --trainer.callbacks.init_args.env_steps 10000 --data.steps_per_epoch 2000 \
        --evaluation.episodes 10 --runs_dir "$on" --trainer.enable_progress_bar false "${extra[@]}" $(resume "$on/$algo") \
        >> "$out/log_on_${algo}_$k.txt" 2>&1
    fi
    echo "$(date +%T) seed $k $algo done"
  done
done
