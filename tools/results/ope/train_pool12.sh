# Pools of 12 for issue 29's validation (docs/results.md, "FQE over pools of 12"): on each Walker2d dataset,
# BC, TD3+BC, IQL and CQL, one run each, checkpoints kept at fixed steps; then `dtlab ope` on 3 checkpoints per run.
# walker2d/medium-v0 reuses the BC and TD3+BC runs of tools/results/ope/train_pool.sh (/tmp/fqe/val/runs).
# Run as two chains (one per core): `bash train_pool12.sh medium` and `bash train_pool12.sh full-replay`.
set -x
export OMP_NUM_THREADS=1
ds=$1                                    # medium | full-replay
R=/tmp/opepool/runs/$ds
common="--data.dataset_id walker2d/$ds-v0 --evaluation.episodes 0 --checkpoint.monitor null --checkpoint.save_top_k -1 --checkpoint.filename {step} --trainer.enable_progress_bar false --runs_dir $R"
if [ "$ds" = medium ]; then
  B=/tmp/fqe/val/runs/bc/version_0/checkpoints; T=/tmp/fqe/val/runs/td3bc/version_0/checkpoints   # train_pool.sh
else
  time dtlab fit -c conf/td3bc.yaml --data.steps_per_epoch 5000 --trainer.max_steps 20000 $common
  B=$R/bc/version_0/checkpoints; T=$R/td3bc/version_0/checkpoints
fi
time dtlab fit -c conf/iql.yaml --model.init_args.lr_schedule_updates 10000 --data.steps_per_epoch 1000 --trainer.max_steps 10000 $common
time dtlab fit -c conf/cql.yaml --data.steps_per_epoch 250 --trainer.max_steps 1000 $common
if [ "$ds" = medium ]; then
  # full-replay's BC, trained on this chain's core to balance the two chains
  time dtlab fit -c conf/bc.yaml --data.steps_per_epoch 1000 --trainer.max_steps 10000 \
    ${common//medium/full-replay}
  touch /tmp/opepool/bc-full-replay.done
else
  while [ ! -e /tmp/opepool/bc-full-replay.done ]; do sleep 5; done
fi
I=$R/iql/version_0/checkpoints; C=$R/cql/version_0/checkpoints
time dtlab ope $B/step=1000.ckpt $B/step=3000.ckpt $B/step=10000.ckpt $T/step=5000.ckpt $T/step=10000.ckpt \
  $T/step=20000.ckpt $I/step=2000.ckpt $I/step=5000.ckpt $I/step=10000.ckpt $C/step=250.ckpt $C/step=500.ckpt \
  $C/step=1000.ckpt --dataset_id walker2d/$ds-v0 --updates 5000 --batch_size 256 \
  --fqe '{lr: 1e-3, target_update_interval: 10}' --true_episodes 10 --out /tmp/opepool/ope-$ds
