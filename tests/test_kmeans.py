"""ssl_jax.ops.kmeans against a numpy Lloyd reference; empty clusters; sharded vs unsharded."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import sharding
from ssl_jax.ops import kmeans as km


def _unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(rng, n, d, true_k, noise):
  means = _unit(rng.standard_normal((true_k, d)))
  return _unit(means[rng.integers(0, true_k, n)] + noise * rng.standard_normal((n, d)))


def _ref_lloyd(x, cent, iters):
  """Plain loops, float64: assign by max cosine, normalised means, the documented re-seeding."""
  x = x.astype(np.float64)
  cent = _unit(cent).astype(np.float64)
  reseeds = 0
  for _ in range(iters):
    sims = x @ cent.T
    assign = np.array([int(np.argmax(row)) for row in sims])
    best = sims[np.arange(len(x)), assign]
    farthest = np.argsort(best, kind='stable')          # lowest cosine first
    new, empties = cent.copy(), []
    for j in range(len(cent)):
      members = x[assign == j]
      if len(members):
        total = members.sum(0)
        new[j] = total / np.linalg.norm(total)
      else:
        empties.append(j)
    for r, j in enumerate(empties):
      new[j] = x[farthest[r]]
    reseeds += len(empties)
    cent = new
  sims = x @ cent.T
  assign = sims.argmax(1)
  return cent, assign, sims.max(1).mean(), reseeds


def test_matches_numpy_lloyd_with_empty_clusters():
  rng = np.random.default_rng(0)
  x = _clustered(rng, 600, 12, 8, 0.4)
  init = _unit(rng.standard_normal((10, 12)))
  init[4] = init[3]                      # duplicates: clusters 4 and 7 get no point at the
  init[7] = init[6]                      # first step (ties go to the lowest index)
  c_ref, a_ref, o_ref, reseeds = _ref_lloyd(x, init, 6)
  assert reseeds >= 2                    # the rule was exercised
  c, a, o = jax.jit(lambda x, c: km.kmeans(x, 10, 6, None, c))(x, init)
  np.testing.assert_array_equal(np.asarray(a), a_ref)
  np.testing.assert_allclose(np.asarray(c), c_ref, atol=1e-5)
  np.testing.assert_allclose(float(o), o_ref, rtol=1e-5)
  assert a.dtype == np.int32 and a.shape == (600,) and c.shape == (10, 12)


def test_early_stop_equals_all_iterations():
  rng = np.random.default_rng(1)
  x = _clustered(rng, 400, 8, 5, 0.05)     # converges in a few steps
  init = x[:5]
  c_ref, a_ref, o_ref, _ = _ref_lloyd(x, init, 25)
  c, a, o = km.kmeans(x, 5, 25, None, init)
  np.testing.assert_array_equal(np.asarray(a), a_ref)
  np.testing.assert_allclose(np.asarray(c), c_ref, atol=1e-5)
  np.testing.assert_allclose(float(o), o_ref, rtol=1e-5)


@pytest.mark.parametrize('init', ['random', 'kmeans++'])
def test_objective_never_worse_than_initialisation(init):
  rng = np.random.default_rng(2)
  x = _unit(rng.standard_normal((1000, 16)))
  c0, _, o0 = km.kmeans(x, 20, 0, jax.random.key(3), init=init)     # initialisation only
  _, s0 = km.assign(x, c0)
  np.testing.assert_allclose(float(o0), np.asarray(s0).mean(), rtol=1e-6)
  # Initial centroids are distinct data points.
  matches = (np.abs(np.asarray(c0)[:, None, :] - x[None]) < 1e-6).all(-1)
  assert (matches.sum(1) == 1).all() and len(set(matches.argmax(1))) == 20
  prev = float(o0)
  for iters in (1, 3, 8):
    _, _, o = km.kmeans(x, 20, iters, jax.random.key(3), init=init)
    assert float(o) >= prev - 1e-6
    prev = float(o)
  assert prev > float(o0) + 1e-3


def test_kmeanspp_beats_random_on_clustered_data():
  rng = np.random.default_rng(4)
  x = _clustered(rng, 2000, 16, 20, 0.1)
  objs = {init: np.mean([float(km.kmeans(x, 20, 0, jax.random.key(s), init=init)[2])
                         for s in range(3)]) for init in ('random', 'kmeans++')}
  assert objs['kmeans++'] > objs['random'] + 0.02, objs


def test_sharded_matches_unsharded():
  mesh = sharding.make_mesh(4)
  rng = np.random.default_rng(5)
  x = _clustered(rng, 4 * 250, 12, 10, 0.3)
  init = _unit(rng.standard_normal((12, 12)))
  init[1] = init[0]                       # empty-cluster path with candidates from all shards
  x_s = jax.device_put(x, NamedSharding(mesh, P(sharding.DATA)))
  c1, a1, o1 = km.kmeans(x, 12, 5, None, init)
  c_ref, a_ref, _, reseeds = _ref_lloyd(x, init, 5)
  assert reseeds >= 1
  with jax.set_mesh(mesh):
    c2, a2, o2 = km.kmeans(x_s, 12, 5, None, init, mesh=mesh)
    c3, a3, o3 = km.kmeans(x_s, 12, 4, jax.random.key(0), mesh=mesh)    # k-means++ on shards
  np.testing.assert_array_equal(np.asarray(a2), np.asarray(a1))
  np.testing.assert_array_equal(np.asarray(a2), a_ref)
  np.testing.assert_allclose(np.asarray(c2), np.asarray(c1), atol=1e-5)
  np.testing.assert_allclose(float(o2), float(o1), rtol=1e-5)
  assert a2.sharding.spec == P(sharding.DATA)
  c4, a4, o4 = km.kmeans(x, 12, 4, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(a3), np.asarray(a4))
  np.testing.assert_allclose(np.asarray(c3), np.asarray(c4), atol=1e-5)
  np.testing.assert_allclose(float(o3), float(o4), rtol=1e-5)


def test_invalid_arguments():
  x = _unit(np.random.default_rng(6).standard_normal((5, 3)))
  with pytest.raises(ValueError, match='num_clusters'):
    km.kmeans(x, 6, 1, jax.random.key(0))
  with pytest.raises(ValueError, match='init'):
    km.kmeans(x, 2, 1, jax.random.key(0), init='bogus')
