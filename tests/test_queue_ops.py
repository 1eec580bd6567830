"""ssl_jax.ops.losses.queue_logits and mixed_info_nce against slow numpy references, on one
device and with the queue sharded over 4 devices."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import sharding
from ssl_jax.ops import losses


def _unit(rs, *shape):
  x = rs.randn(*shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ref_mixed(q, ka, kb, w, queue, tau):
  def nce(q, k):
    logits = np.concatenate([[q @ k], queue @ q]).astype(np.float64) / tau
    return np.log(np.sum(np.exp(logits))) - logits[0]
  return np.mean([w[i] * nce(q[i], ka[i]) + (1 - w[i]) * nce(q[i], kb[i])
                  for i in range(len(q))])


def test_queue_logits_and_mixed_info_nce_match_numpy_sharded_or_not():
  rs = np.random.RandomState(1)
  b, d, kq, tau = 8, 8, 32, 0.2
  q, ka, kb, queue = _unit(rs, b, d), _unit(rs, b, d), _unit(rs, b, d), _unit(rs, kq, d)
  w = rs.rand(b).astype(np.float32)
  ref_logits = q.astype(np.float64) @ queue.astype(np.float64).T / tau
  ref = _ref_mixed(q, ka, kb, w, queue, tau)
  logits = jax.jit(losses.queue_logits, static_argnums=2)(q, queue, tau)
  np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=1e-5, atol=1e-5)
  got = jax.jit(losses.mixed_info_nce, static_argnums=5)(q, ka, kb, w, queue, tau)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  # w = 1 is MoCo's InfoNCE with k_a.
  np.testing.assert_allclose(float(losses.mixed_info_nce(q, ka, kb, np.ones(b), queue, tau)),
                             float(losses.info_nce(q, ka, queue, tau)), rtol=1e-5)
  mesh = sharding.make_mesh(4)
  with jax.set_mesh(mesh):
    qs = jax.device_put(queue, NamedSharding(mesh, P('data')))
    lg = jax.jit(lambda q, queue: losses.queue_logits(q, queue, tau, mesh=mesh))(q, qs)
    assert lg.sharding.spec == P(None, 'data')          # kept sharded along K
    np.testing.assert_allclose(np.asarray(lg), ref_logits, rtol=1e-5, atol=1e-5)
    got = jax.jit(lambda *a: losses.mixed_info_nce(*a, tau, mesh=mesh))(q, ka, kb, w, qs)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
