r"""Entry point: parse flags, then train (or run another mode).

    python -m ssl_jax.main --config=configs/byol.py:cifar10 --workdir=/tmp/byol \
        [--config.batch_size=512 --config.optimizer.base_lr=0.3 ...]

Evaluations of a training run (WORKDIR = its ``--workdir``; EVAL_DIR gets results.json,
TensorBoard events and, for the trained ones, checkpoints):

    python -m ssl_jax.main --mode=linear --config=configs/eval_linear.py:cifar10 \
        --config.pretrained=WORKDIR --workdir=EVAL_DIR
    python -m ssl_jax.main --mode=finetune --config=configs/eval_finetune.py:cifar10,1% \
        --config.pretrained=WORKDIR --workdir=EVAL_DIR
    python -m ssl_jax.main --mode=knn --config=configs/eval_knn.py:cifar10 \
        --config.pretrained=WORKDIR --workdir=EVAL_DIR
    python -m ssl_jax.main --mode=embed --config=configs/eval_knn.py:cifar10 \
        --config.pretrained=WORKDIR --workdir=EVAL_DIR
    python -m ssl_jax.main --mode=export --config=configs/eval_linear.py \
        --config.pretrained=WORKDIR --workdir=OUT      # OUT/backbone.pth, OUT/backbone.npz

Flags: ``--config`` (an ml_collections config file with ``get_config(arg)``, the argument after
``:``), ``--workdir`` (checkpoints, TensorBoard events, config.json), ``--mode`` (``train``,
``linear``, ``finetune``, ``knn``, ``embed``, ``export``; every mode but ``train`` runs
``ssl_jax.evals.<module>.run(config, workdir)``), ``--allow_config_change`` (resume a workdir
written by a different config). Multi-host runs
call ``jax.distributed.initialize()`` first (``--distributed``, or automatically when the
launcher sets the cluster environment).
"""
from __future__ import annotations

import os
import sys


def _verbose(argv) -> bool:
  """``--verbosity=N`` (N >= 0) on the command line: library logs on. Default: a clean screen."""
  for i, a in enumerate(argv):
    for name in ('--verbosity', '-v'):
      if a == name and i + 1 < len(argv):
        a = f'{name}={argv[i + 1]}'
      if a.startswith(name + '='):
        try:
          return int(a.split('=', 1)[1]) >= 0
        except ValueError:
          return True
  return False


_VERBOSE = _verbose(sys.argv)
if not _VERBOSE:
  # TensorFlow's and XLA's C++ INFO/WARNING banners (CPU features), before they load.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# TF's oneDNN banner ignores TF_CPP_MIN_LOG_LEVEL. oneDNN only serves TF's own ops here (the
# input pipeline's image ops; the model is JAX), so it is off for every run, whatever the
# verbosity, so that the input's numerics never depend on a logging flag. Set the variable to
# choose otherwise.
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and TensorBoard.')
# --mode -> the module whose ``run(config, workdir)`` it calls (train: ssl_jax.train).
EVAL_MODES = {
    'linear': 'ssl_jax.evals.linear',
    'finetune': 'ssl_jax.evals.finetune',
    'knn': 'ssl_jax.evals.knn_eval',
    'embed': 'ssl_jax.evals.embedding',
    'export': 'ssl_jax.evals.pretrained',
}
_MODE = flags.DEFINE_enum('mode', 'train', ['train', *EVAL_MODES], 'What to run.')
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
  if not _VERBOSE:  # library INFO logs (Orbax, TFDS, absl) off; --verbosity=0|1 turns them on
    logging.set_verbosity(logging.WARNING)
  _maybe_initialize_distributed()
  from ssl_jax import config_lib
  config = _CONFIG.value
  if _MODE.value == 'train':
    from ssl_jax import train
    try:
      config_lib.validate(config)
    except config_lib.ConfigError as e:
      sys.exit(f'Config error: {e}')
    train.train_and_evaluate(config, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value)
    return
  run_eval(_MODE.value, config, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value)


def run_eval(mode: str, config, workdir: str, *, allow_config_change: bool = False):
  """``--mode=<mode>`` for the evaluation modes; clear exits for config and input errors."""
  import importlib
  from ssl_jax import checkpoint, config_lib
  from ssl_jax.evals import pretrained
  if mode not in EVAL_MODES:
    raise app.UsageError(f'--mode={mode!r} is invalid; accepted: train, {", ".join(EVAL_MODES)}')
  if 'pretrained' not in config:
    sys.exit(f'Config error: --mode={mode} needs an evaluation config with a `pretrained` field '
             '(configs/eval_linear.py, eval_finetune.py or eval_knn.py), not a training config.')
  module = importlib.import_module(EVAL_MODES[mode])
  kwargs = {'allow_config_change': allow_config_change} if mode in ('linear', 'finetune') else {}
  try:
    return module.run(config, workdir, **kwargs)
  except (config_lib.ConfigError, pretrained.PretrainedNotFound,
          checkpoint.ConfigMismatchError) as e:
    sys.exit(f'{type(e).__name__}: {e}')


def cli():
  """The ``ssl-jax`` console script (``pip install -e .``): the same as ``python -m ssl_jax.main``."""
  app.run(main)


if __name__ == '__main__':
  cli()
