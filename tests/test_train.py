"""The whole training loop on tiny models: mock data, real CIFAR-10, devices, resume."""
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import TFDS_DATA_DIR
from harness import knn_reference, load_config, split_images
from ssl_jax import methods, sharding, train
from ssl_jax.data import synthetic


def _config(method: str, *, steps: int = 6, extra: str = ''):
  c = load_config(method, 'cifar10,runlocal' + extra)
  c.total_steps = steps
  c.batch_size = 16
  c.log_every_steps = 1
  c.checkpoint.every_steps = 3
  c.checkpoint.async_save = False
  for ev in c.evals.values():   # every listed evaluator (kNN, online probe)
    ev.update({'at_start': False, 'at_end': False})
  c.data.shuffle_buffer = 64
  return c


def _params(state):
  return jax.tree.leaves(jax.device_get(state.params))


@pytest.mark.slow
@pytest.mark.parametrize('method', ['byol', 'moco'])
def test_loop_under_mock_data_writes_events_and_checkpoints(method, tmp_path):
  c = _config(method, steps=4)
  # Whole (mock) splits, 64 images each: no subset draw, so the reference reads the same images.
  c.evals.knn.update({'at_end': True, 'train_examples': -1, 'eval_examples': -1,
                      'batch_size': 16, 'k': 5})
  c.evals.online_probe.update({'at_end': True, 'eval_examples': -1, 'batch_size': 16})
  with tfds.testing.mock_data(num_examples=64):
    res = train.train_and_evaluate(c, str(tmp_path))
    # The monitor's numbers against a reference on the final network: the same images read
    # with plain tfds.load, features by the model in eval mode, a numpy weighted kNN (k=5,
    # T=0.1) and the online probe's argmax.
    bank_x, bank_y = split_images('train', 64)
    test_x, test_y = split_images('test', 64)
  assert res['final_step'] == 4
  assert [s for s, _ in res['loss_history']] == [1, 2, 3, 4]
  assert all(np.isfinite(l) for _, l in res['loss_history'])
  ref_knn, ref_probe = _monitor_reference(c, res['state'], bank_x, bank_y, test_x, test_y)
  # One query of slack: a near-tie in the top-k may break differently on 4 devices.
  assert abs(res['final']['monitor/knn_top1'] - ref_knn) <= 1 / 64 + 1e-9, (res['final'], ref_knn)
  assert abs(res['final']['online_probe/test_top1'] - ref_probe) <= 1 / 64 + 1e-9, (
      res['final'], ref_probe)
  events = [f for f in os.listdir(tmp_path) if f.startswith('events.out.tfevents')]
  assert events, os.listdir(tmp_path)
  # every_steps=3, 4 steps, keep=3: exactly steps 3 and 4 are on disk.
  steps = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert steps == [3, 4], os.listdir(tmp_path / 'checkpoints')
  assert (tmp_path / 'config.json').exists()


def _monitor_reference(c, state, bank_x, bank_y, test_x, test_y):
  """(kNN top-1, online-probe top-1) of ``state`` computed without the kNN evaluator."""
  method = methods.get(c.method.name)(c, 1)
  variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})

  def feats(x):
    out = method.model.apply(variables, x, train=False, with_predictor=False)
    return np.asarray(out['features'], np.float64)

  bank, test = feats(bank_x), feats(test_x)
  scores = knn_reference(bank, bank_y, test, c.data.num_classes, k=c.evals.knn.k,
                         temperature=c.evals.knn.temperature)
  probe = jax.device_get(state.probe_params)['params']
  logits = test @ np.asarray(probe['kernel'], np.float64) + np.asarray(probe['bias'], np.float64)
  return (float(np.mean(scores.argmax(1) == test_y)),
          float(np.mean(logits.argmax(1) == test_y)))


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_real_cifar10_knn_rises_above_untrained(tmp_path):
  assert TFDS_DATA_DIR, 'set TFDS_DATA_DIR to a data dir with cifar10 (../shared/data/tfds)'
  c = _config('moco', steps=120)
  c.batch_size = 128
  c.log_every_steps = 40
  c.checkpoint.every_steps = 1000
  c.data.data_dir = TFDS_DATA_DIR
  c.evals.online_probe.update({'at_start': True, 'at_end': True, 'eval_examples': 1000,
                               'batch_size': 500})
  c.evals.knn.update({'at_start': True, 'at_end': True, 'train_examples': 5000,
                      'eval_examples': 1000, 'k': 20, 'batch_size': 500})
  res = train.train_and_evaluate(c, str(tmp_path))
  before = res['untrained']['monitor/knn_top1']
  after = res['final']['monitor/knn_top1']
  assert after > before + 0.02, (before, after)


# MoCo (a queue sharded along 'data', an EMA target) in the fast subset; every method in CI.
@pytest.mark.parametrize('method', [m if m == 'moco' else pytest.param(m, marks=pytest.mark.slow)
                                    for m in methods.names()])
def test_train_step_makes_no_host_transfer(method):
  """DESIGN: no host round-trips inside the step. With the state and the batches placed on the
  4-device mesh beforehand (the trainer's shardings), the step is compiled and run twice (the
  state donated) under ``jax.transfer_guard('disallow')``, which raises on any implicit
  host<->device transfer; the same guard does raise when a host batch is passed."""
  c = _config(method, steps=8)
  mesh = sharding.make_mesh()
  assert mesh.shape[sharding.DATA] == 4, mesh
  # Random batches with the method's recipe keys (views, labels; APS: boxes and flips).
  local = [synthetic.train_batch(c.data, c.batch_size, seed) for seed in (0, 1)]
  m = methods.get(method)(c, 100)
  parts = train.build(c, mesh, m, steps_per_epoch=100, total_steps=8)
  with jax.set_mesh(mesh):
    state = parts.init(jax.random.key(0))
    batches = [sharding.global_batch(mesh, b) for b in local]
    jax.block_until_ready((state, batches))
    with jax.transfer_guard('disallow'):
      step = parts.train_step.lower(state, batches[0]).compile()
      for b in batches:
        state, metrics, scores = step(state, b)
      jax.block_until_ready((state, metrics, scores))
    with jax.transfer_guard('disallow'), pytest.raises(Exception, match='[Dd]isallowed'):
      step(state, local[0])   # a numpy batch: an implicit host-to-device transfer
  assert int(jax.device_get(state.step)) == 2
  assert np.isfinite(float(jax.device_get(metrics['loss'])))
  for leaf in jax.tree.leaves(batches):
    assert leaf.sharding.spec == sharding.data_sharding(mesh).spec
