"""CLIM: the center-wise selection rule vs brute force (global and per pool), the pool of the
mixing partner (a pod's per-device pools reproduced on one device; no image crosses devices),
and a tiny run of the trainer's step on 4 devices (k-means refreshes inside the jitted step,
one compiled shape, cluster ids consistent with the bank, the loss decreases)."""
from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import method_steps
from harness import load_config
from hlo_utils import compiled_text
from ssl_jax import config_lib, sharding, train
from ssl_jax.methods import base, clim


def _unit(rs, *shape):
  x = rs.randn(*shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ref_select(z, cand, a_z, a_c, cents, k, exclude=None, valid=None, pool=None):
  """Brute force: sort every candidate by (-cos, index), drop excluded/invalid/other pools,
  keep the rule."""
  b, n = len(z), len(cand)
  idx = np.full((b, k), -1, np.int64)
  keep = np.zeros((b, k), bool)
  for i in range(b):
    s = cand.astype(np.float64) @ z[i].astype(np.float64)
    order = [j for j in sorted(range(n), key=lambda j: (-s[j], j))
             if (exclude is None or j != exclude[i]) and (valid is None or valid[j])
             and (pool is None or j // pool == i // pool)][:k]
    c = cents[a_z[i]].astype(np.float64)
    for m, j in enumerate(order):
      idx[i, m] = j
      keep[i, m] = a_c[j] == a_z[i] and cand[j] @ c > z[i] @ c and a_z[i] >= 0
  return idx, keep


def test_center_wise_select_matches_brute_force():
  rs = np.random.RandomState(0)
  b, n, d, c, k = 12, 40, 8, 3, 6
  z, cand, cents = _unit(rs, b, d), _unit(rs, n, d), _unit(rs, c, d)
  # Arbitrary cluster ids (the rule must not depend on them being argmax assignments).
  a_z, a_c = rs.randint(0, c, b), rs.randint(0, c, n)
  a_z[0] = -1                                        # an anchor without a cluster keeps nothing
  valid = rs.rand(n) > 0.3
  fn = jax.jit(clim.center_wise_select, static_argnames='k')
  idx, keep, _ = fn(z, cand, a_z, a_c, cents, k=k, valid=valid)
  ref_idx, ref_keep = _ref_select(z, cand, a_z, a_c, cents, k, valid=valid)
  np.testing.assert_array_equal(np.asarray(idx), ref_idx)
  np.testing.assert_array_equal(np.asarray(keep), ref_keep)
  assert ref_keep.any() and not ref_keep.all()

  # In-batch use: the anchors are the candidates, clusters are argmax assignments, self excluded.
  zb = _unit(rs, 24, d)
  ab = np.argmax(zb @ cents.T, axis=1)
  self_idx = np.arange(24)
  idx, keep, _ = fn(zb, zb, ab, ab, cents, k=k, exclude=self_idx)
  ref_idx, ref_keep = _ref_select(zb, zb, ab, ab, cents, k, exclude=self_idx)
  np.testing.assert_array_equal(np.asarray(idx), ref_idx)
  np.testing.assert_array_equal(np.asarray(keep), ref_keep)
  assert not np.any(np.asarray(idx) == self_idx[:, None])


@pytest.mark.parametrize('pool', [24, 8, 4])
def test_center_wise_select_in_pools_matches_brute_force(pool):
  rs = np.random.RandomState(pool)
  d, c, k = 8, 2, 5
  z, cents = _unit(rs, 24, d), _unit(rs, c, d)
  a = np.argmax(z @ cents.T, axis=1).astype(np.int32)
  fn = jax.jit(clim.center_wise_select_in_pools, static_argnames=('k', 'pool'))
  idx, keep, _ = fn(z, a, cents, k=k, pool=pool)
  ref_idx, ref_keep = _ref_select(z, z, a, a, cents, k, exclude=np.arange(24), pool=pool)
  np.testing.assert_array_equal(np.asarray(idx), ref_idx)
  np.testing.assert_array_equal(np.asarray(keep), ref_keep)
  assert ref_keep.any()
  if pool == 24:   # one pool: the global search
    g = jax.jit(clim.center_wise_select, static_argnames='k')(z, z, a, a, cents, k=k,
                                                             exclude=np.arange(24))
    np.testing.assert_array_equal(np.asarray(g[0]), np.asarray(idx))


def test_selection_on_four_sharded_devices_equals_unsharded():
  rs = np.random.RandomState(2)
  b, d, c, k = 16, 8, 4, 5
  z, cents = _unit(rs, b, d), _unit(rs, c, d)
  a = np.argmax(z @ cents.T, axis=1).astype(np.int32)
  fn = jax.jit(clim.center_wise_select, static_argnames=('k', 'mesh'))
  pooled = jax.jit(clim.center_wise_select_in_pools, static_argnames=('k', 'pool', 'mesh'))
  want = fn(z, z, a, a, cents, k=k, exclude=np.arange(b))
  want_pooled = pooled(z, a, cents, k=k, pool=4)
  mesh = sharding.make_mesh(4)
  with jax.set_mesh(mesh):
    zs = jax.device_put(z, NamedSharding(mesh, P('data')))
    as_ = jax.device_put(a, NamedSharding(mesh, P('data')))
    got = fn(zs, zs, as_, as_, cents, k=k, exclude=jnp.arange(b), mesh=mesh)
    got_pooled = pooled(zs, as_, cents, k=k, pool=4, mesh=mesh)
  for g, w in ((got, want), (got_pooled, want_pooled)):
    np.testing.assert_array_equal(np.asarray(g[0]), np.asarray(w[0]))     # indices
    np.testing.assert_array_equal(np.asarray(g[1]), np.asarray(w[1]))     # keep
    np.testing.assert_allclose(np.asarray(g[2]), np.asarray(w[2]), atol=1e-6)


# ---------------------------------------------------------------------------------------------
def _tiny_config(**method):
  c = load_config('clim')
  c.batch_size = 16
  c.data.image_size = 16
  c.data.extra_resolutions = (8,)
  c.model.projector.update({'hidden_dim': 32, 'out_dim': 16})
  c.method.update({'queue_size': 256, 'bank_size': 32, 'num_clusters': 4,
                   'kmeans_every_steps': 3, 'k': 4})
  c.method.update(method)
  c.optimizer.update({'name': 'sgd', 'base_lr': 0.8, 'warmup_steps': 0, 'warmup_epochs': 0.0})
  return c


@pytest.mark.slow
def test_tiny_run_on_four_devices_compiles_once_and_loss_decreases():
  c = _tiny_config()
  parts, mesh = method_steps.build(c, 4)
  assert parts.method.query_views == ('view1', 'view_lr0')
  batch = method_steps.random_batch(c, np.random.RandomState(0))
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: compiles.append(event) if event.endswith('backend_compile_duration')
      else None)
  with jax.set_mesh(mesh):
    state = parts.init(jax.random.key(0))
    gb = sharding.global_batch(mesh, batch)
    refreshes = set()
    compiles.clear()
    for _ in range(8):     # the bank (32 rows) is full after 2 steps; k-means at steps 2, 5
      state, met, _ = parts.train_step(state, gb)
      refreshes.add(int(state.method_state['kmeans_step']))
      assert np.isfinite(float(met['loss']))
    assert len(compiles) == 1, compiles     # one program, with and without k-means
    assert refreshes == {-1, 2, 5}, refreshes
    assert float(met['clim/has_clusters']) == 1.0
    assert 0.0 < float(met['clim/selected_frac']) <= 1.0
    # Cluster ids of the bank rows = argmax under the current centroids (rows written before
    # and after the last clustering alike).
    ms = jax.device_get(state.method_state)
    np.testing.assert_array_equal(ms['bank_clusters'], np.argmax(ms['bank'] @ ms['centroids'].T,
                                                                 axis=1))
    # The centroids are declared replicated, the bank sharded.
    assert state.method_state['centroids'].sharding.spec == P()
    assert state.method_state['bank'].sharding.spec == P('data')
    # With the method state and the step frozen (a fixed objective), the optimizer lowers the
    # loss (step 6: no clustering is due; the last one was at step 5).
    # (The step donates its state: each step gets fresh copies of the frozen entries.)
    frozen, step6 = jax.device_get(state.method_state), int(state.step)
    shardings = parts.shardings
    losses_ = []
    for _ in range(6):
      fixed = jax.device_put(frozen, shardings.method_state)
      state, met, _ = parts.train_step(
          state.replace(method_state=fixed, step=jax.device_put(jnp.int32(step6),
                                                                shardings.step)), gb)
      losses_.append(float(met['loss']))
  assert losses_[-1] < losses_[0] - 0.1, losses_


@pytest.mark.slow   # compiles the step on 1 and 4 devices
@pytest.mark.slow
def test_per_device_pools_on_four_devices_equal_one_device_and_move_no_image():
  """partner_pool=0 on 4 devices (4 images per device) is partner_pool=4 on one device; the
  compiled 4-device step has no collective carrying images; partner_pool=-1 (the whole batch)
  on 4 devices says that it gathers images."""
  rs = np.random.RandomState(1)
  batches = [method_steps.random_batch(_tiny_config(), rs) for _ in range(3)]
  one, m1, _ = method_steps.run(_tiny_config(partner_pool=4), 1, batches)
  four, m4, _ = method_steps.run(_tiny_config(), 4, batches)
  np.testing.assert_allclose(four, one, rtol=2e-5)
  for a, b in zip(m1, m4):
    np.testing.assert_allclose(b['clim/selected_frac'], a['clim/selected_frac'])
    np.testing.assert_allclose(b['clim/area_ratio'], a['clim/area_ratio'], rtol=1e-6)

  def image_collectives(c):
    parts, mesh = method_steps.build(c, 4)
    b = sharding.global_batch(mesh, batches[0])
    with jax.set_mesh(mesh), warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      text = compiled_text(parts.train_step, parts.abstract, b)
    ops = [l for l in text.splitlines()
           if re.search(r'(all-gather|all-reduce|all-to-all|collective-permute)(-start)?\(', l)
           and re.search(r'\[[0-9]+,16,16,3\]', l.split('(')[0] + l.split(')')[0])]
    traffic = [w for w in caught if issubclass(w.category, base.CrossDeviceTrafficWarning)]
    return ops, traffic

  ops, traffic = image_collectives(_tiny_config())
  assert not ops and not traffic, (ops, traffic)
  ops, traffic = image_collectives(_tiny_config(partner_pool=-1))
  assert ops and traffic, 'the whole-batch pool on 4 devices must gather images and say so'


def test_partner_pool_is_validated():
  c = _tiny_config(partner_pool=5)
  with pytest.raises(config_lib.ConfigError,
                     match=r'config\.method\.partner_pool=5 is invalid; accepted: 0 .*'):
    train.validate_config(c)
  c = _tiny_config(k=16)
  with pytest.raises(config_lib.ConfigError, match=r'config\.method\.k=16 is invalid'):
    train.validate_config(c)
