"""LARS (solo-learn's, with and without ``clip_lr``) against a slow numpy transcription."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssl_jax import optim


def numpy_lars(params, grads_seq, lrs, *, wd, eta, momentum, clip, nesterov=False, eps=1e-8):
  """solo-learn ``LARS.step`` (exclude_bias_n_norm=True), one tensor at a time, in float64."""
  params = {k: v.astype(np.float64).copy() for k, v in params.items()}
  bufs = {}
  for grads, lr in zip(grads_seq, lrs):
    for k, p in params.items():
      g = grads[k].astype(np.float64)
      d = g
      if p.ndim != 1:
        p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
        if p_norm != 0 and g_norm != 0:
          r = eta * p_norm / (g_norm + p_norm * wd + eps)
          if clip:
            r = min(r / lr, 1.0)
          d = (g + wd * p) * r
      if k not in bufs:
        bufs[k] = d.copy()
      else:
        bufs[k] = momentum * bufs[k] + d
      step = d + momentum * bufs[k] if nesterov else bufs[k]
      params[k] = p - lr * step
  return params


@pytest.mark.parametrize('clip', [False, True])
@pytest.mark.parametrize('nesterov', [False, True])
def test_lars_matches_solo_learn_reference(clip, nesterov):
  rng = np.random.default_rng(0)
  params = {'conv': rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
            'dense': rng.normal(size=(8, 5)).astype(np.float32) * 0.1,
            'bias': rng.normal(size=(5,)).astype(np.float32),
            'zero': np.zeros((4, 4), np.float32)}          # ||w|| = 0: plain SGD direction
  grads_seq = [{k: (rng.normal(size=v.shape) * s).astype(np.float32)
                for (k, v), s in zip(params.items(), (1.0, 30.0, 1.0, 1.0))} for _ in range(4)]
  schedule = optax.linear_schedule(0.5, 2.0, 3)   # lr changes every step: order of lr/momentum
  lrs = [float(schedule(i)) for i in range(4)]
  kw = dict(wd=1e-2, eta=0.02, momentum=0.9, clip=clip, nesterov=nesterov)
  want = numpy_lars(params, grads_seq, lrs, **kw)
  tx = optim.lars(schedule, weight_decay=kw['wd'], trust_coefficient=kw['eta'],
                  momentum=kw['momentum'], nesterov=nesterov, clip=clip)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for grads in grads_seq:
    upd, state = tx.update(jax.tree.map(jnp.asarray, grads), state, p)
    p = optax.apply_updates(p, upd)
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=2e-5, atol=1e-6, err_msg=k)
  # The clip must bind for the large-gradient 'dense' tensor only when clip=True, else the test
  # could pass with clipping ignored: compare with the unclipped reference.
  other = numpy_lars(params, grads_seq, lrs, **{**kw, 'clip': not clip})
  assert not np.allclose(other['conv'], want['conv'], rtol=1e-4)


def test_lars_clip_caps_the_step_at_the_scheduled_lr():
  """With clip, a tensor with a tiny gradient moves at most lr * |g + wd w| (ratio <= 1)."""
  w = jnp.ones((4, 4))
  g = jnp.full((4, 4), 1e-6)
  tx = optim.lars(optax.constant_schedule(0.1), weight_decay=0.0, trust_coefficient=0.02,
                  momentum=0.0, clip=True)
  upd, _ = tx.update({'w': g}, tx.init({'w': w}), {'w': w})
  np.testing.assert_allclose(np.asarray(upd['w']), -0.1 * np.asarray(g), rtol=1e-6)
  tx = optim.lars(optax.constant_schedule(0.1), weight_decay=0.0, trust_coefficient=0.02,
                  momentum=0.0, clip=False)
  upd, _ = tx.update({'w': g}, tx.init({'w': w}), {'w': w})
  assert float(jnp.max(jnp.abs(upd['w']))) > 100 * 0.1 * 1e-6   # unclipped ratio 0.02/1e-6
