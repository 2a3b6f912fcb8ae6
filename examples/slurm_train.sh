#!/bin/bash
# Multi-node training under SLURM: one task per GPU, Lightning reads the SLURM environment
# (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, the node list) and sets up NCCL over all of them.
#
#   sbatch examples/slurm_train.sh                      # 2 nodes x 8 GPUs, configs/deepseek_v3_small.yaml
#   NODES=4 CONFIG=configs/deepseek_v3_base.yaml sbatch --nodes=4 examples/slurm_train.sh
#
# The layout comes from the config's `parallel:` section; TP x PP x EP x DP must equal
# nodes x GPUs per node (data_parallel_size: -1 takes whatever is left). Keep TP within a node.
#SBATCH --job-name=lit-deepseek
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

CONFIG=${CONFIG:-configs/deepseek_v3_small.yaml}
NODES=${SLURM_JOB_NUM_NODES:-${NODES:-2}}
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-8}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-lit-deepseek}-${SLURM_JOB_ID:-local}}

mkdir -p logs "$RUN_DIR"
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}
export NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

# srun starts one process per GPU; Lightning's SLURMEnvironment wires ranks and the master address.
# Re-submitting the same command resumes from the last distributed checkpoint.
srun --kill-on-bad-exit=1 lit-deepseek fit \
  --config "$CONFIG" \
  --trainer.accelerator gpu \
  --trainer.devices "$GPUS_PER_NODE" \
  --trainer.num_nodes "$NODES" \
  --logging.run_dir "$RUN_DIR" \
  --ckpt_path last \
  "$@"
