"""Losses against slow, obvious numpy references."""
import numpy as np
import jax.numpy as jnp

from ssl_jax.ops import losses


def _n(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _rng():
  return np.random.default_rng(0)


def test_byol_loss_matches_numpy():
  r = _rng()
  p, z = r.normal(size=(8, 16)), r.normal(size=(8, 16))
  ref = np.mean([2 - 2 * np.dot(_n(p[i]), _n(z[i])) for i in range(8)])
  np.testing.assert_allclose(losses.byol_loss(jnp.asarray(p), jnp.asarray(z)), ref, rtol=1e-5)


def _info_nce_ref(q, k, queue, tau):
  out = []
  for b in range(q.shape[0]):
    logits = np.concatenate([[q[b] @ k[b]], queue @ q[b]]) / tau
    m = logits.max()
    out.append(-(logits[0] - m - np.log(np.sum(np.exp(logits - m)))))
  return np.mean(out)


def test_info_nce_matches_numpy():
  r = _rng()
  q, k, queue = _n(r.normal(size=(6, 8))), _n(r.normal(size=(6, 8))), _n(r.normal(size=(32, 8)))
  got = losses.info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue), 0.2)
  np.testing.assert_allclose(got, _info_nce_ref(q, k, queue, 0.2), rtol=1e-5)


def _multi_pos_ref(q, cands, pos_mask, tau):
  out = []
  for b in range(q.shape[0]):
    s = cands[b] @ q[b] / tau
    lse = np.log(np.sum(np.exp(s - s.max()))) + s.max()
    ps = np.nonzero(pos_mask[b])[0]
    out.append(-np.mean([s[p] - lse for p in ps]))
  return np.mean(out)


def test_multi_positive_matches_numpy_and_reduces_to_info_nce():
  r = _rng()
  q = _n(r.normal(size=(5, 8)))
  cands = _n(r.normal(size=(5, 12, 8)))
  mask = r.random((5, 12)) < 0.3
  mask[:, 0] = True
  got = losses.multi_positive_info_nce(jnp.asarray(q), jnp.asarray(cands), jnp.asarray(mask), 0.2)
  np.testing.assert_allclose(got, _multi_pos_ref(q, cands, mask, 0.2), rtol=1e-5)
  # Only the key (index 0) positive, the rest a shared queue: exactly MoCo's InfoNCE.
  k = _n(r.normal(size=(5, 8)))
  queue = _n(r.normal(size=(11, 8)))
  cands = np.concatenate([k[:, None], np.broadcast_to(queue, (5, 11, 8))], axis=1)
  only_key = np.zeros((5, 12), bool)
  only_key[:, 0] = True
  got = losses.multi_positive_info_nce(jnp.asarray(q), jnp.asarray(cands),
                                       jnp.asarray(only_key), 0.2)
  np.testing.assert_allclose(got, _info_nce_ref(q, k, queue, 0.2), rtol=1e-5)


def test_multi_positive_bf16_inputs_stay_accurate():
  r = _rng()
  q = _n(r.normal(size=(16, 64)))
  cands = _n(r.normal(size=(16, 40, 64)))
  mask = np.zeros((16, 40), bool)
  mask[:, :3] = True
  ref = _multi_pos_ref(q, cands, mask, 0.1)
  got = losses.multi_positive_info_nce(jnp.asarray(q, jnp.bfloat16),
                                       jnp.asarray(cands, jnp.bfloat16), jnp.asarray(mask), 0.1)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, rtol=2e-2)


def test_cross_entropy_mask():
  logits = jnp.asarray([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
  labels = jnp.asarray([0, 0, -1])
  got = losses.cross_entropy(logits, labels, labels >= 0)
  ref = np.mean([np.log(1 + np.exp(-2.0)), np.log(1 + np.exp(2.0))])
  np.testing.assert_allclose(got, ref, rtol=1e-6)
