"""Small shared helpers for method tests: load a config file, run a short real-data loop."""
import os

import numpy as np

from conftest import TFDS_DATA_DIR

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')


def load_config(name: str, arg: str = 'cifar10,runlocal'):
  from ssl_jax import config_lib
  return config_lib.load_config_file(os.path.join(REPO, 'configs', f'{name}.py'), arg)


def short_real_run(config, workdir, *, steps=30, batch=32, examples=512, knn=False):
  """Train ``config`` for ``steps`` on the first ``examples`` real CIFAR-10 images."""
  from ssl_jax import train
  assert TFDS_DATA_DIR, 'set TFDS_DATA_DIR to a data dir with cifar10 (../shared/data/tfds)'
  config.total_steps = steps
  config.batch_size = batch
  config.log_every_steps = 1
  config.checkpoint.every_steps = 10_000
  config.knn.update({'at_start': knn, 'at_end': knn})
  config.data.data_dir = TFDS_DATA_DIR
  config.data.train_split = f'train[:{examples}]'
  config.data.shuffle_buffer = examples
  return train.train_and_evaluate(config, str(workdir))


def decreased(res, n=6, skip=0):
  """Mean loss of steps ``skip..skip+n`` and of the last ``n`` steps."""
  losses = np.array([l for _, l in res['loss_history']])
  return losses[skip:skip + n].mean(), losses[-n:].mean()
