#!/usr/bin/env bash
# Multi-node GPU training under Slurm: one process per node, all of the node's GPUs each.
#
#   sbatch --nodes=4 launch/gpu_slurm.sh configs/byol.py:imagenet /shared/runs/byol_in1k \
#          --config.batch_size=4096
#
# jax.distributed.initialize() reads the coordinator, process count and rank from the Slurm
# environment (SLURM_JOB_NODELIST / SLURM_NTASKS / SLURM_PROCID). The workdir must be on a file
# system every node sees. --signal=TERM@120 delivers Slurm's preemption/time-limit notice as
# SIGTERM two minutes early: the trainer checkpoints and exits, and --requeue restarts the job,
# which resumes from that checkpoint.
#SBATCH --job-name=ssl_jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail
CONFIG=${1:?usage: sbatch [--nodes=N] launch/gpu_slurm.sh CONFIG[:ARG] WORKDIR [flags]}
WORKDIR=${2:?WORKDIR on a shared file system}; shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# Set up once per cluster: python3 -m venv .venv && . .venv/bin/activate &&
#   pip install -r requirements.txt && pip install -U 'jax[cuda12]'
. .venv/bin/activate
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
srun --kill-on-bad-exit=1 python -m ssl_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --distributed=yes "$@"
