"""MoCo v2: the symmetric loss is solo-learn's (the mean of both directions, a queue per view)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness import load_config
from ssl_jax import config_lib, methods, train


def _np_info_nce(q, k, queue, t):
  logits = np.concatenate([np.sum(q * k, -1, keepdims=True), q @ queue.T], 1) / t
  logits = logits - logits.max(1, keepdims=True)
  return float(np.mean(np.log(np.exp(logits).sum(1)) - logits[:, 0]))


def _n(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.slow
def test_symmetric_loss_is_the_mean_of_both_directions_with_a_queue_per_view():
  c = load_config('moco')
  c.method.symmetric = True
  c.method.queue_size = 64
  c.batch_size = 8
  train.validate_config(c)
  m = methods.get('moco')(c)
  var = m.init_variables(jax.random.PRNGKey(0))
  state = m.init_state(jax.random.PRNGKey(1))
  assert set(state) == {'queue', 'queue_view1', 'queue_ptr'}
  assert not np.allclose(state['queue'], state['queue_view1'])
  rng = np.random.default_rng(0)
  batch = {f'view{i}': jnp.asarray(rng.integers(0, 256, (8, 32, 32, 3)), jnp.uint8)
           for i in (1, 2)}
  target = jax.tree.map(lambda p: p * 1.01, var['params'])   # target differs from online
  ctx = m.context(var['params'], target_params=target, method_state=state,
                  batch_stats=var['batch_stats'], step=0, rng=None, mesh=None)
  loss, aux = m.loss(ctx, batch)

  def proj(params, x):
    out = m.model.apply({'params': params, 'batch_stats': var['batch_stats']}, x, train=True,
                        with_predictor=False, mutable=['batch_stats'])[0]
    return _n(out['proj'])

  q1, q2 = proj(var['params'], batch['view1']), proj(var['params'], batch['view2'])
  k1, k2 = proj(target, batch['view1']), proj(target, batch['view2'])
  t = c.method.temperature
  want = (_np_info_nce(q1, k2, np.asarray(state['queue']), t)
          + _np_info_nce(q2, k1, np.asarray(state['queue_view1']), t)) / 2
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  # Each queue receives its own view's keys at the same pointer.
  np.testing.assert_allclose(np.asarray(aux.method_state['queue'][:8]), k2, atol=1e-5)
  np.testing.assert_allclose(np.asarray(aux.method_state['queue_view1'][:8]), k1, atol=1e-5)
  assert int(aux.method_state['queue_ptr']) == 8


@pytest.mark.parametrize('name', ['ft', 'clim', 'csml'])
def test_methods_on_moco_refuse_symmetric(name):
  c = load_config(name)
  c.method.symmetric = True
  with pytest.raises(config_lib.ConfigError, match='symmetric=True is invalid'):
    train.validate_config(c)
