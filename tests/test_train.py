"""The whole training loop on tiny models: mock data, real CIFAR-10, devices, resume."""
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ssl_jax import train
from conftest import TFDS_DATA_DIR


def _config(method: str, *, steps: int = 6, extra: str = ''):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      f'cfg_{method}', os.path.join(os.path.dirname(__file__), '..', 'configs', f'{method}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config('cifar10,runlocal' + extra)
  c.total_steps = steps
  c.batch_size = 16
  c.log_every_steps = 1
  c.checkpoint.every_steps = 3
  c.checkpoint.async_save = False
  c.knn.update({'at_start': False, 'at_end': False})
  c.data.shuffle_buffer = 64
  return c


def _params(state):
  return jax.tree.leaves(jax.device_get(state.params))


@pytest.mark.parametrize('method', ['byol', 'moco'])
def test_loop_under_mock_data_writes_events_and_checkpoints(method, tmp_path):
  c = _config(method, steps=4)
  c.knn.update({'at_end': True, 'train_examples': 64, 'eval_examples': 32, 'batch_size': 16,
                'k': 5})
  with tfds.testing.mock_data(num_examples=64):
    res = train.train_and_evaluate(c, str(tmp_path))
  assert res['final_step'] == 4
  assert [s for s, _ in res['loss_history']] == [1, 2, 3, 4]
  assert all(np.isfinite(l) for _, l in res['loss_history'])
  assert 0.0 <= res['final']['monitor/knn_top1'] <= 1.0
  assert 'online_probe/test_top1' in res['final']
  events = [f for f in os.listdir(tmp_path) if f.startswith('events.out.tfevents')]
  assert events, os.listdir(tmp_path)
  assert {'3', '4'} <= set(os.listdir(tmp_path / 'checkpoints'))
  assert (tmp_path / 'config.json').exists()


def test_one_vs_four_devices_same_loss(tmp_path):
  c1 = _config('moco', steps=3)
  c1.num_devices = 1
  c4 = _config('moco', steps=3)
  c4.num_devices = 4
  with tfds.testing.mock_data(num_examples=64):
    r1 = train.train_and_evaluate(c1, str(tmp_path / 'one'))
    r4 = train.train_and_evaluate(c4, str(tmp_path / 'four'))
  l1 = np.array([l for _, l in r1['loss_history']])
  l4 = np.array([l for _, l in r4['loss_history']])
  np.testing.assert_allclose(l1, l4, rtol=2e-4)
  for a, b in zip(_params(r1['state']), _params(r4['state'])):
    np.testing.assert_allclose(a, b, atol=2e-4)


@pytest.mark.parametrize('method', ['byol', 'moco'])
def test_resume_equals_uninterrupted(method, tmp_path):
  with tfds.testing.mock_data(num_examples=64):
    straight = train.train_and_evaluate(_config(method, steps=6), str(tmp_path / 'straight'))
    first = train.train_and_evaluate(_config(method, steps=6), str(tmp_path / 'resumed'),
                                     stop_at_step=3)
    assert first['preempted_at'] == 3
    second = train.train_and_evaluate(_config(method, steps=6), str(tmp_path / 'resumed'))
  assert second['start_step'] == 3
  assert [s for s, _ in straight['loss_history'][3:]] == [s for s, _ in second['loss_history']]
  np.testing.assert_allclose([l for _, l in straight['loss_history'][3:]],
                             [l for _, l in second['loss_history']], rtol=1e-6)
  for a, b in zip(_params(straight['state']), _params(second['state'])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  ms_a = jax.device_get(straight['state'].method_state)
  ms_b = jax.device_get(second['state'].method_state)
  for a, b in zip(jax.tree.leaves(ms_a), jax.tree.leaves(ms_b)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _scalar_steps(workdir, tag):
  from tensorboard.backend.event_processing import event_accumulator
  out = []
  for f in sorted(os.listdir(workdir)):
    if f.startswith('events.out'):
      acc = event_accumulator.EventAccumulator(os.path.join(workdir, f),
                                               size_guidance={'tensors': 0, 'scalars': 0})
      acc.Reload()
      tags = acc.Tags()
      if tag in tags.get('tensors', []):
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        out += [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
      elif tag in tags.get('scalars', []):
        out += [(e.step, e.value) for e in acc.Scalars(tag)]
  return out


def test_resumed_run_logs_no_second_value_for_a_step(tmp_path):
  """Resumed from step 3 with a 4-step window: the window 4..4 is partial and not written, so
  TensorBoard holds one loss per step, equal to the uninterrupted run's at the shared steps."""
  def cfg():
    c = _config('moco', steps=8)
    c.log_every_steps = 4
    return c
  with tfds.testing.mock_data(num_examples=64):
    straight = train.train_and_evaluate(cfg(), str(tmp_path / 'straight'))
    train.train_and_evaluate(cfg(), str(tmp_path / 'resumed'), stop_at_step=3)
    train.train_and_evaluate(cfg(), str(tmp_path / 'resumed'))
  del straight
  a = dict(_scalar_steps(str(tmp_path / 'straight'), 'loss'))
  b_list = _scalar_steps(str(tmp_path / 'resumed'), 'loss')
  b = dict(b_list)
  assert len(b) == len(b_list), b_list                  # no step logged twice
  assert sorted(a) == [4, 8] and sorted(b) == [8], (a, b)
  np.testing.assert_allclose(b[8], a[8], rtol=1e-5)


def test_real_cifar10_knn_rises_above_untrained(tmp_path):
  assert TFDS_DATA_DIR, 'set TFDS_DATA_DIR to a data dir with cifar10 (../shared/data/tfds)'
  c = _config('moco', steps=120)
  c.batch_size = 128
  c.log_every_steps = 40
  c.checkpoint.every_steps = 1000
  c.data.data_dir = TFDS_DATA_DIR
  c.knn.update({'at_start': True, 'at_end': True, 'train_examples': 5000,
                'eval_examples': 1000, 'k': 20, 'batch_size': 500})
  res = train.train_and_evaluate(c, str(tmp_path))
  before = res['untrained']['monitor/knn_top1']
  after = res['final']['monitor/knn_top1']
  assert after > before + 0.02, (before, after)
