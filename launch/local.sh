#!/usr/bin/env bash
# Train on this machine (all local GPUs/TPU cores, or the CPU).
#   launch/local.sh configs/byol.py:cifar10 /tmp/byol_c10 [--config.batch_size=256 ...]
set -euo pipefail
CONFIG=${1:?usage: launch/local.sh CONFIG[:ARG] WORKDIR [extra flags]}
WORKDIR=${2:?usage: launch/local.sh CONFIG[:ARG] WORKDIR [extra flags]}
shift 2
cd "$(dirname "$0")/.."
exec python -m ssl_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
