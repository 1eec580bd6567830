#!/usr/bin/env bash
# Multi-node GPU training under Slurm: one process per node, all of the node's GPUs each.
#
#   sbatch --nodes=4 launch/gpu_slurm.sh configs/byol.py:imagenet /shared/runs/byol_in1k \
#          --config.batch_size=4096
#
# Submit from the root of this checkout (the job runs in $SLURM_SUBMIT_DIR). sbatch options on
# the command line override the #SBATCH lines below (--gpus-per-node=4, --cpus-per-task=16,
# --time=4:00:00, --partition=..., --output=...). The workdir must be on a file system every
# node sees.
#
# Processes: srun starts one task per node; jax.distributed.initialize() (--distributed=yes)
# takes the process count and rank from the step's SLURM_NTASKS / SLURM_PROCID and the
# coordinator from the first host of SLURM_STEP_NODELIST, port 61440 + SLURM_JOB_ID % 4096
# (JAX_COORDINATOR_PORT overrides it). JAX would give each task only GPU $SLURM_LOCALID, so this
# script sets JAX_LOCAL_DEVICE_IDS=0,...,N-1 (N = the node's GPUs) when one task runs per node.
#
# Preemption and time limits: --signal=TERM@120 sends the trainer SIGTERM two minutes before the
# time limit (as does `scancel --signal=TERM JOBID`, and Slurm preemption); it saves a checkpoint
# and exits 0. This script then reads the workdir: a finished run ends the job; a run stopped
# early that saved a newer checkpoint in this attempt is requeued (`scontrol requeue`; Slurm
# starts it again after its credential lifetime, 120 s by default) and resumes from that
# checkpoint, with the same batches and random numbers as an uninterrupted run. --requeue also
# lets Slurm requeue the job itself after a node failure or a preemption. A trainer that fails
# fails the job (never retried), and a stop without a newer checkpoint is an error (no requeue
# loop). Every attempt appends to the same log (--open-mode=append); SLURM_RESTART_COUNT counts
# the requeues.
#
# Environment (sbatch passes the submitting shell's environment to the job):
#   SSL_JAX_VENV    the virtualenv to activate (default: the active one, $VIRTUAL_ENV, else
#                   .venv). Set up once per cluster: python3 -m venv .venv && . .venv/bin/activate
#                   && pip install -r requirements.txt && pip install -U 'jax[cuda12]'
#   TFDS_DATA_DIR   where the TFDS datasets are (or --config.data.data_dir=...).
#   XLA_PYTHON_CLIENT_MEM_FRACTION  GPU memory JAX preallocates (default here 0.9).
#   JAX_LOCAL_DEVICE_IDS, JAX_COORDINATOR_PORT  JAX's own; set them to override the above.
#SBATCH --job-name=ssl_jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -euo pipefail
USAGE='usage: sbatch [--nodes=N] launch/gpu_slurm.sh CONFIG[:ARG] WORKDIR [flags]'
CONFIG=${1:?$USAGE}
WORKDIR=${2:?WORKDIR on a shared file system; $USAGE}; shift 2
JOB=${SLURM_JOB_ID:?not inside a Slurm job; $USAGE}
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
if [[ ! -f ssl_jax/main.py ]]; then
  echo "gpu_slurm.sh: $PWD is not an ssl_jax checkout; submit from its root directory." >&2
  exit 2
fi
VENV=${SSL_JAX_VENV:-${VIRTUAL_ENV:-.venv}}
if [[ ! -f $VENV/bin/activate ]]; then
  echo "gpu_slurm.sh: no virtualenv at $VENV (set SSL_JAX_VENV, or create .venv as the" \
       "header of launch/gpu_slurm.sh says)." >&2
  exit 2
fi
. "$VENV/bin/activate"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
# All of the node's GPUs for its one task (SLURM_GPUS_PER_NODE may read "type:N").
GPUS=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
GPUS=${GPUS##*:}
if [[ -z ${JAX_LOCAL_DEVICE_IDS:-} && ${SLURM_NTASKS_PER_NODE:-1} == 1 && $GPUS =~ ^[0-9]+$ ]] \
    && (( GPUS > 0 )); then
  JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS - 1)))
  export JAX_LOCAL_DEVICE_IDS
fi
# srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05): pass it on.
SRUN_ARGS=(--kill-on-bad-exit=1)
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
  SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi

# "<latest checkpoint step> <total steps>" of WORKDIR (-1 -1 before the first checkpoint).
progress() {
  python - "$WORKDIR" <<'EOF'
import math, sys
import orbax.checkpoint as ocp
from ssl_jax import paths  # a local or gs:// workdir
workdir = sys.argv[1]
d = paths.join(paths.absolute(workdir), 'checkpoints')
step = None
if paths.isdir(d):
  mngr = ocp.CheckpointManager(d, item_names=('state', 'meta'),
                               options=ocp.CheckpointManagerOptions(create=False))
  step = mngr.latest_step()
if step is None:
  print(-1, -1)
  sys.exit()
meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
config = paths.read_json(paths.join(workdir, 'config.json'))
if config['total_steps'] > 0:
  total = int(config['total_steps'])
else:  # the trainer's total_steps_of(); meta's epoch is step / steps_per_epoch
  total = int(math.ceil(config['total_epochs'] * round(step / meta['epoch'])))
print(step, total)
EOF
}

P=$(progress) || { echo "gpu_slurm.sh: cannot read the checkpoints of $WORKDIR." >&2; exit 1; }
read -r BEFORE _ <<< "$P"
echo "gpu_slurm.sh: job $JOB attempt $((${SLURM_RESTART_COUNT:-0} + 1)) on" \
     "${SLURM_JOB_NUM_NODES:-1} node(s) ($GPUS GPU(s) each); $WORKDIR at checkpoint step $BEFORE"
RC=0
srun "${SRUN_ARGS[@]}" python -m ssl_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --distributed=yes "$@" || RC=$?
if (( RC != 0 )); then
  echo "gpu_slurm.sh: the trainer failed (exit $RC); not requeueing." >&2
  exit "$RC"
fi
P=$(progress) || { echo "gpu_slurm.sh: cannot read the checkpoints of $WORKDIR." >&2; exit 1; }
read -r STEP TOTAL <<< "$P"
if (( TOTAL > 0 && STEP >= TOTAL )); then
  echo "gpu_slurm.sh: run complete (step $STEP of $TOTAL)."
elif (( STEP > BEFORE )); then
  echo "gpu_slurm.sh: stopped at step $STEP of $TOTAL (preemption or time-limit notice);" \
       "requeueing job $JOB to resume there."
  scontrol requeue "$JOB" || { echo "gpu_slurm.sh: scontrol requeue $JOB failed." >&2; exit 1; }
  sleep 120   # the requeue ends this attempt (the job starts again from the top) within seconds
  echo "gpu_slurm.sh: scontrol requeue $JOB did not end this attempt." >&2
  exit 1
else
  echo "gpu_slurm.sh: the trainer exited 0 at checkpoint step $STEP of $TOTAL without saving" \
       "a newer one; not requeueing (submit the same command again to continue)." >&2
  exit 1
fi
