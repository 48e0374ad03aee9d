set -x
common="--data.dataset_id walker2d/medium-v0 --evaluation.episodes 0 --checkpoint.monitor null --checkpoint.save_top_k -1 --checkpoint.filename {step} --trainer.enable_progress_bar false --runs_dir /tmp/fqe/val/runs"
time dtlab fit -c conf/bc.yaml --data.steps_per_epoch 1000 --trainer.max_steps 10000 $common
time dtlab fit -c conf/td3bc.yaml --data.steps_per_epoch 5000 --trainer.max_steps 20000 $common
