r"""Entry point: parse flags, then train (or run another mode).

    python -m ssl_jax.main --config=configs/byol.py:cifar10 --workdir=/tmp/byol \
        [--config.batch_size=512 --config.optimizer.base_lr=0.3 ...]

Flags: ``--config`` (an ml_collections config file with ``get_config(arg)``, the argument after
``:``), ``--workdir`` (checkpoints, TensorBoard events, config.json), ``--mode`` (``train``),
``--allow_config_change`` (resume a workdir written by a different config). Multi-host runs
call ``jax.distributed.initialize()`` first (``--distributed``, or automatically when the
launcher sets the cluster environment).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and TensorBoard.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train'], 'What to run.')
_ALLOW_CHANGE = flags.DEFINE_bool('allow_config_change', False,
                                  'Resume a workdir whose config.json differs from --config.')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', ['auto', 'yes', 'no'],
                                 'Call jax.distributed.initialize(): auto = when a cluster '
                                 'environment (TPU pod, SLURM, JAX_COORDINATOR_ADDRESS) is seen.')

_CLUSTER_ENV = ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES',
                'MEGASCALE_COORDINATOR_ADDRESS')


def _maybe_initialize_distributed() -> None:
  import jax
  mode = _DISTRIBUTED.value
  if mode == 'yes' or (mode == 'auto' and any(os.environ.get(k) for k in _CLUSTER_ENV)
                       and int(os.environ.get('SLURM_NTASKS', '2')) > 1):
    jax.distributed.initialize()
    logging.info('jax.distributed: process %d of %d', jax.process_index(), jax.process_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError('--config and --workdir are required, e.g. '
                         '--config=configs/byol.py:cifar10,runlocal --workdir=/tmp/byol')
  _maybe_initialize_distributed()
  from ssl_jax import config_lib, train
  config = _CONFIG.value
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    sys.exit(f'Config error: {e}')
  if _MODE.value == 'train':
    train.train_and_evaluate(config, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value)


if __name__ == '__main__':
  flags.mark_flags_as_required([])
  app.run(main)
