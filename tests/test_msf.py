"""MSF: the objective against numpy, k=1 == BYOL-asym, sharded == unsharded, a short real run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import sharding
from ssl_jax.methods import msf
from ssl_jax.ops import losses, memory_bank

import harness


def _n(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _msf_ref(u, v, bank, k):
  total = []
  for b in range(u.shape[0]):
    sims = bank @ v[b]
    nn = np.argsort(-sims, kind='stable')[:k]
    total.append(np.mean([2 - 2 * u[b] @ bank[j] for j in nn]))
  return np.mean(total)


def _inputs(seed=0, b=8, n=64, d=16):
  r = np.random.default_rng(seed)
  u, v = _n(r.normal(size=(b, d))), _n(r.normal(size=(b, d)))
  bank = _n(r.normal(size=(n, d)))
  bank[5:5 + b] = v  # the bank already holds this batch's targets
  return u.astype(np.float32), v.astype(np.float32), bank.astype(np.float32)


def test_msf_loss_matches_numpy_reference():
  u, v, bank = _inputs()
  for k in (1, 5, 10):
    got = msf.msf_loss(jnp.asarray(u), jnp.asarray(v), jnp.asarray(bank), k)
    np.testing.assert_allclose(got, _msf_ref(u, v, bank, k), rtol=1e-5, atol=1e-6)


def test_k1_equals_byol_asym():
  u, v, bank = _inputs(1)
  got = msf.msf_loss(jnp.asarray(u), jnp.asarray(v), jnp.asarray(bank), 1)
  np.testing.assert_allclose(got, losses.byol_loss(jnp.asarray(u), jnp.asarray(v)), rtol=1e-5)


def test_sharded_bank_gives_same_loss_and_never_written_rows_are_masked():
  u, v, bank = _inputs(2, n=64)
  ref = _msf_ref(u, v, bank[:13], 5)  # rows >= 13 never written
  valid = memory_bank.valid_mask(jnp.asarray(13), 64)
  garbage = bank.copy()
  garbage[13:] = v[0]  # would be the best neighbours of v[0] if not masked
  mesh = sharding.make_mesh(4)
  with jax.set_mesh(mesh):
    b4 = jax.device_put(jnp.asarray(garbage), sharding.data_sharding(mesh))
    got4 = jax.jit(lambda u, v, b, m: msf.msf_loss(u, v, b, 5, valid=m, mesh=mesh))(
        jnp.asarray(u), jnp.asarray(v), b4, valid)
  got1 = msf.msf_loss(jnp.asarray(u), jnp.asarray(v), jnp.asarray(garbage), 5, valid=valid)
  np.testing.assert_allclose(got4, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got1, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_short_real_run_loss_decreases_and_knn_rises_above_untrained(tmp_path):
  c = harness.load_config('msf')
  c.optimizer.base_lr = 0.4
  c.method.bank_size = 1024
  c.evals.knn.update({'train_examples': 2000, 'eval_examples': 500, 'k': 20, 'batch_size': 500})
  c.evals.online_probe.update({'eval_examples': 500, 'batch_size': 500})
  res = harness.short_real_run(c, tmp_path, steps=60, batch=64, examples=4096, knn=True)
  first, last = harness.decreased(res)
  assert last < first, (first, last)
  m = res['last_metrics']
  assert 0.0 <= m['msf/purity'] <= 1.0
  assert 0.0 < m['msf/nn_cos'] <= 1.0
  before = res['untrained']['monitor/knn_top1']
  after = res['final']['monitor/knn_top1']
  assert after > before + 0.02, (before, after)
