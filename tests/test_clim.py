"""CLIM: the center-wise selection rule vs brute force, the mixing loss vs numpy, sharded =
unsharded, and a tiny run on 4 devices (k-means refreshes inside the jitted step, one compiled
shape, cluster ids consistent with the bank, the loss decreases)."""
from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import config_lib, sharding
from ssl_jax.methods import clim

_CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs')


def _unit(rs, *shape):
  x = rs.randn(*shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ref_select(z, cand, a_z, a_c, cents, k, exclude=None, valid=None):
  """Brute force: sort every candidate by (-cos, index), drop excluded/invalid, keep the rule."""
  b, n = len(z), len(cand)
  idx = np.full((b, k), -1, np.int64)
  keep = np.zeros((b, k), bool)
  for i in range(b):
    s = cand.astype(np.float64) @ z[i].astype(np.float64)
    order = [j for j in sorted(range(n), key=lambda j: (-s[j], j))
             if (exclude is None or j != exclude[i]) and (valid is None or valid[j])][:k]
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

  # sample_selected: always a kept index, uniform over the kept set; fallback when none.
  picks = np.stack([np.asarray(clim.sample_selected(jax.random.key(s), idx, keep, self_idx)[0])
                    for s in range(40)])
  for i in range(24):
    kept = set(ref_idx[i][ref_keep[i]].tolist())
    assert set(picks[:, i].tolist()) == (kept or {i}), (i, kept, set(picks[:, i].tolist()))


def test_mixed_info_nce_matches_numpy():
  rs = np.random.RandomState(1)
  b, d, kq, tau = 6, 8, 20, 0.2
  q, ka, kb, queue = _unit(rs, b, d), _unit(rs, b, d), _unit(rs, b, d), _unit(rs, kq, d)
  w = rs.rand(b).astype(np.float32)

  def nce(q, k):
    logits = np.concatenate([[q @ k], queue @ q]) / tau
    return np.log(np.sum(np.exp(logits))) - logits[0]

  ref = np.mean([w[i] * nce(q[i], ka[i]) + (1 - w[i]) * nce(q[i], kb[i]) for i in range(b)])
  got = jax.jit(clim.mixed_info_nce, static_argnums=5)(q, ka, kb, w, queue, tau)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_selection_on_four_sharded_devices_equals_unsharded():
  rs = np.random.RandomState(2)
  b, d, c, k = 16, 8, 4, 5
  z, cents = _unit(rs, b, d), _unit(rs, c, d)
  a = np.argmax(z @ cents.T, axis=1).astype(np.int32)
  fn = jax.jit(clim.center_wise_select, static_argnames='k')
  want = fn(z, z, a, a, cents, k=k, exclude=np.arange(b))
  mesh = sharding.make_mesh(4)
  with jax.set_mesh(mesh):
    zs = jax.device_put(z, NamedSharding(mesh, P('data')))
    as_ = jax.device_put(a, NamedSharding(mesh, P('data')))
    got = fn(zs, zs, as_, as_, cents, k=k, exclude=jnp.arange(b))
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))     # indices
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))     # keep
  np.testing.assert_allclose(np.asarray(got[2]), np.asarray(want[2]), atol=1e-6)


# ---------------------------------------------------------------------------------------------
def _tiny_config():
  spec = importlib.util.spec_from_file_location('clim_cfg', os.path.join(_CONFIGS, 'clim.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config('cifar10,runlocal')
  c.batch_size = 16
  c.data.image_size = 16
  c.data.extra_resolutions = (8,)
  c.model.projector.update({'hidden_dim': 32, 'out_dim': 16})
  c.method.update({'queue_size': 256, 'bank_size': 32, 'num_clusters': 4,
                   'kmeans_every_steps': 3, 'k': 4})
  config_lib.validate(c, num_devices=4)
  return c


def _batch(rs, b=16, size=16, low=8):
  img = lambda s: rs.randint(0, 256, (b, s, s, 3)).astype(np.uint8)   # noqa: E731
  return {'view1': img(size), 'view2': img(size), 'view_lr0': img(low),
          'label': rs.randint(0, 3, (b,)).astype(np.int32)}


def test_tiny_run_on_four_devices_compiles_once_and_loss_decreases():
  from ssl_jax import methods
  method = methods.get('clim')(_tiny_config())
  assert method.query_views == ('view1', 'view_lr0')
  variables = method.init_variables(jax.random.key(0))
  tx = optax.sgd(0.05, momentum=0.9)
  mesh = sharding.make_mesh(4)
  rep = NamedSharding(mesh, P())

  def step_fn(params, opt, target, ms, bs, batch, rng, step):
    (loss, aux), g = jax.value_and_grad(method.loss, has_aux=True)(
        params, target, ms, bs, batch, rng, step)
    upd, opt = tx.update(g, opt, params)
    params = optax.apply_updates(params, upd)
    target = jax.tree.map(lambda t, p: 0.9 * t + 0.1 * p, target, params)
    return params, opt, target, aux.method_state, aux.batch_stats, loss, aux.metrics

  with jax.set_mesh(mesh):
    ms = method.init_state(jax.random.key(1))
    ms_sh = jax.tree.map(lambda x: NamedSharding(mesh, sharding.leading_axis_spec(x, 4)), ms)
    ms = jax.device_put(ms, ms_sh)
    params, bs = jax.device_put((variables['params'], variables['batch_stats']), rep)
    opt, target = jax.device_put(tx.init(params), rep), params
    batch = jax.device_put(_batch(np.random.RandomState(0)), NamedSharding(mesh, P('data')))
    step = jax.jit(step_fn, out_shardings=(rep, rep, rep, ms_sh, rep, None, None))
    refreshes = set()
    for s in range(8):     # the bank (32 rows) is full after 2 steps; k-means at steps 2, 5
      params, opt, target, ms, bs, loss, met = step(params, opt, target, ms, bs, batch,
                                                   jax.random.key(s), jnp.int32(s))
      refreshes.add(int(ms['kmeans_step']))
      assert np.isfinite(float(loss))
    assert refreshes == {-1, 2, 5}, refreshes
    assert float(met['clim/has_clusters']) == 1.0
    assert 0.0 < float(met['clim/selected_frac']) <= 1.0
    # Cluster ids of the bank rows = argmax under the current centroids (rows written before
    # and after the last clustering alike).
    bank, cents = np.asarray(ms['bank']), np.asarray(ms['centroids'])
    np.testing.assert_array_equal(np.asarray(ms['bank_clusters']),
                                  np.argmax(bank @ cents.T, axis=1))
    # With the method state frozen (a fixed objective) the optimizer lowers the loss.
    frozen = ms
    losses_ = []
    for _ in range(6):    # step 6: no clustering due (the last one was at step 5)
      params, opt, target, _, bs, loss, _ = step(params, opt, target, frozen, bs, batch,
                                                 jax.random.key(0), jnp.int32(6))
      losses_.append(float(loss))
  assert losses_[-1] < losses_[0] - 0.1, losses_
  assert step._cache_size() == 1
