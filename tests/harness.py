"""Small shared helpers for tests: load a config file, run a short real-data loop, a numpy kNN."""
import os

import numpy as np

from conftest import TFDS_DATA_DIR

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')


def cli_env(**extra: str) -> dict[str, str]:
  """The environment for the trainer run as a subprocess: this one, plus the tests' shared
  compilation cache (a run and its resume compile once)."""
  env = dict(os.environ)
  env['JAX_COMPILATION_CACHE_DIR'] = os.environ.get('SSL_JAX_TEST_CACHE',
                                                    '/tmp/ssl_jax_test_jax_cache')
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.5'
  env.update(extra)
  return env


def load_config(name: str, arg: str = 'cifar10,runlocal'):
  from ssl_jax import config_lib
  return config_lib.load_config_file(os.path.join(REPO, 'configs', f'{name}.py'), arg)


def real_config(name: str, overrides: dict, arg: str = 'cifar10,runlocal'):
  """``load_config(name, arg)`` with dotted ``overrides`` ({'checkpoint.every_steps': 2, ...})
  and real CIFAR-10 from TFDS_DATA_DIR."""
  assert TFDS_DATA_DIR, 'set TFDS_DATA_DIR to a data dir with cifar10 (../shared/data/tfds)'
  c = load_config(name, arg)
  for k, v in overrides.items():
    section, _, field = k.rpartition('.')
    (c[section] if section else c)[field] = v
  c.data.data_dir = TFDS_DATA_DIR
  return c


def short_real_run(config, workdir, *, steps=30, batch=32, examples=512, knn=False):
  """Train ``config`` for ``steps`` on the first ``examples`` real CIFAR-10 images."""
  from ssl_jax import train
  assert TFDS_DATA_DIR, 'set TFDS_DATA_DIR to a data dir with cifar10 (../shared/data/tfds)'
  config.total_steps = steps
  config.batch_size = batch
  config.log_every_steps = 1
  config.checkpoint.every_steps = 10_000
  for ev in config.evals.values():   # every listed evaluator (kNN, online probe)
    ev.update({'at_start': knn, 'at_end': knn})
  config.data.data_dir = TFDS_DATA_DIR
  config.data.train_split = f'train[:{examples}]'
  config.data.shuffle_buffer = examples
  return train.train_and_evaluate(config, str(workdir))


def decreased(res, n=6, skip=0):
  """Mean loss of steps ``skip..skip+n`` and of the last ``n`` steps."""
  losses = np.array([l for _, l in res['loss_history']])
  return losses[skip:skip + n].mean(), losses[-n:].mean()


def knn_reference(bank, labels, queries, num_classes, k, temperature=1.0, weighted=True,
                  metric='cosine'):
  """Slow obvious kNN class scores [Q, C]: ``score[q, c] = sum_{j in NN_k(q)} w_qj [y_j = c]``,
  ``w = exp(sim / T)`` (``weighted``) or 1; ``sim`` = cosine or minus the L2 distance."""
  bank = np.asarray(bank, np.float64)
  queries = np.asarray(queries, np.float64)
  if metric == 'cosine':
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = queries @ bank.T
  else:
    sims = -np.linalg.norm(queries[:, None, :] - bank[None, :, :], axis=-1)
  k = min(k, len(bank))
  out = np.zeros((len(queries), num_classes))
  for i in range(len(queries)):
    for j in np.argsort(-sims[i], kind='stable')[:k]:
      out[i, labels[j]] += np.exp(sims[i, j] / temperature) if weighted else 1.0
  return out


def split_images(split: str, n: int):
  """The first ``n`` (uint8 image, label) pairs of CIFAR-10 ``split`` in reading order, read
  with plain ``tfds.load`` (real data, or ``tfds.testing.mock_data`` inside that context)."""
  import tensorflow_datasets as tfds
  ds = tfds.load('cifar10', split=split, data_dir=TFDS_DATA_DIR, shuffle_files=False)
  ex = list(tfds.as_numpy(ds.take(n)))
  assert len(ex) == n, (split, n, len(ex))
  return (np.stack([e['image'] for e in ex]), np.array([e['label'] for e in ex], np.int32))
