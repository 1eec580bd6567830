#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (every host runs the same command; JAX finds its peers).
#
#   launch/tpu_pod.sh TPU_NAME ZONE ACCELERATOR_TYPE CONFIG[:ARG] gs://BUCKET/WORKDIR [flags]
#   e.g. launch/tpu_pod.sh ssl-v4-32 us-central2-b v4-32 configs/byol.py:imagenet \
#            gs://my-bucket/byol_in1k --config.batch_size=4096
#
# Creates the slice if it does not exist (PREEMPTIBLE=1 for a preemptible/spot slice), copies
# this checkout to every worker, installs it, and runs on --worker=all. The workdir must be a
# gs:// path every host can reach: process 0 writes metrics and the config, Orbax writes each
# checkpoint collectively, and every host restores it. After a preemption, run the same
# command again: the run resumes from the newest complete checkpoint (same batches, same RNG).
# Env: TPU_SOFTWARE_VERSION (default tpu-ubuntu2204-base), TFDS_DATA_DIR (gs:// data dir).
set -euo pipefail
TPU_NAME=${1:?TPU_NAME}; ZONE=${2:?ZONE}; TYPE=${3:?ACCELERATOR_TYPE}
CONFIG=${4:?CONFIG}; WORKDIR=${5:?WORKDIR (gs://...)}; shift 5
case "$WORKDIR" in gs://*) ;; *) echo "WORKDIR must be a gs:// path reachable by every host, got '$WORKDIR'" >&2; exit 2;; esac
VERSION=${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}
REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"
G="gcloud compute tpus tpu-vm"

if ! $G describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1; then
  echo "Creating TPU slice $TPU_NAME ($TYPE) in $ZONE"
  $G create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$TYPE" --version "$VERSION" \
     ${PREEMPTIBLE:+--spot}
fi

tar -C "$REPO_DIR" --exclude=.git --exclude=.venv --exclude=.ci_venv -czf /tmp/ssl_jax.tgz .
$G scp /tmp/ssl_jax.tgz "$TPU_NAME":/tmp/ssl_jax.tgz --zone "$ZONE" --worker=all
$G ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e; mkdir -p ~/ssl_jax && tar -C ~/ssl_jax -xzf /tmp/ssl_jax.tgz && cd ~/ssl_jax &&
  python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip &&
  pip install -q -r requirements.txt && pip install -q -U 'jax[tpu]'"
$G ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd ~/ssl_jax && . .venv/bin/activate && export TFDS_DATA_DIR='${TFDS_DATA_DIR:-}' &&
  python -m ssl_jax.main --config='$CONFIG' --workdir='$WORKDIR' --distributed=yes $*"
