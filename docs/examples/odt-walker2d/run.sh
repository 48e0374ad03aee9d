#!/usr/bin/env bash
# The Online Decision Transformer on Walker2d medium at its authors' budget (issue 28): per seed, a stochastic DT
# pre-trained offline (conf/dt.yaml + conf/walker2d/dt.yaml: 5000 updates), then fine-tuned online with
# conf/finetune/dt.yaml (rounds of 1 sampled episode then 300 updates, a replay of the 1000 most recent
# trajectories, exploration return 2 x the evaluation target) to ENV_STEPS env steps, 10 evaluation episodes every
# 10 rounds. The seeds run side by side, one process each.
#
# Spread over calls: every fit stops by itself after SECONDS of this call (Lightning's --trainer.max_time, which
# saves last.ckpt), and running the script again continues each seed from there: finished phases are kept.
# Usage (from the repository root):
#   MINARI_DATASETS_PATH=../shared/datasets/minari bash docs/examples/odt-walker2d/run.sh OUT [SEEDS] [ENV_STEPS] [SECONDS]
#   dtlab plot OUT/on_*/dt/version_0 --labels '[ODT]' --table --out OUT/learning_curves.png
# Defaults: seeds "0 1 2", 200000 env steps, no time limit. DTLAB overrides the command (on a machine without the
# console script: DTLAB="python3 -m dtlab.cli"); extra dtlab arguments for both phases go in DTLAB_ARGS.
set -euo pipefail
out=${1:?usage: run.sh OUT [SEEDS] [ENV_STEPS] [SECONDS]}
seeds=${2:-"0 1 2"}
env_steps=${3:-200000}
seconds=${4:-}
read -r -a dtlab <<< "${DTLAB:-dtlab}"
read -r -a args <<< "${DTLAB_ARGS:-}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
deadline=$(( $(date +%s) + ${seconds:-0} ))

# `--trainer.max_time` for a fit continuing `run` (Lightning's Timer counts the time of the fits it resumes): the
# time spent so far plus what is left of this call; nothing without SECONDS.
limit() {
  [ -z "$seconds" ] && return
  local spent=0
  if [ -f "$1/version_0/checkpoints/last.ckpt" ]; then
    spent=$(python3 -c 'import sys; from dtlab.checkpoints import read_checkpoint
timer = read_checkpoint(sys.argv[1])["callbacks"].get("Timer", {"time_elapsed": {"train": 0}})
print(int(timer["time_elapsed"]["train"]))' "$1/version_0/checkpoints/last.ckpt")
  fi
  local s=$(( spent + deadline - $(date +%s) ))
  (( s < 0 )) && s=0
  printf -- "--trainer.max_time %02d:%02d:%02d:%02d" $((s / 86400)) $((s % 86400 / 3600)) $((s % 3600 / 60)) $((s % 60))
}
# finished: a summary that no time limit cut short
finished() {
  [ -f "$1/version_0/run_summary.json" ] && grep -q '"time_limit_reached": false' "$1/version_0/run_summary.json"
}
resume() {
  if [ -f "$1/version_0/checkpoints/last.ckpt" ]; then echo "--ckpt_path last"; else rm -rf "$1"; fi
}
common() {
  echo --seed_everything "$1" --data.seed "$1" --evaluation.episodes 10 --trainer.enable_progress_bar false
}

one_seed() {
  local k=$1 off=$out/off_$1/dt on=$out/on_$1/dt
  if ! finished "$off"; then
    # shellcheck disable=SC2046
    "${dtlab[@]}" fit -c conf/dt.yaml -c conf/walker2d/dt.yaml --model.init_args.stochastic true $(common "$k") \
      --runs_dir "$out/off_$k" $(limit "$off") $(resume "$off") "${args[@]}" >> "$out/log_off_$k.txt" 2>&1
    finished "$off" || { echo "$(date +%T) seed $k: offline phase continues next call"; return; }
  fi
  if ! finished "$on"; then
    # shellcheck disable=SC2046
    "${dtlab[@]}" fit -c conf/dt.yaml -c conf/walker2d/dt.yaml -c conf/finetune/dt.yaml $(common "$k") \
      --pretrained "$off/version_0/checkpoints/last.ckpt" --trainer.callbacks.init_args.seed "$k" \
      --trainer.callbacks.init_args.env_steps "$env_steps" --runs_dir "$out/on_$k" $(limit "$on") $(resume "$on") \
      "${args[@]}" >> "$out/log_on_$k.txt" 2>&1
    finished "$on" || { echo "$(date +%T) seed $k: online phase continues next call"; return; }
  fi
  echo "$(date +%T) seed $k done"
}

mkdir -p "$out"
for k in $seeds; do one_seed "$k" & done
wait
