"""ssl_jax.ops.knn against slow numpy references; sharded vs single-device search."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import sharding
from ssl_jax.ops import knn


def _unit(rng, n, d):
  x = rng.standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ref_topk(q, bank, k, valid=None):
  """One query at a time: sort all scores (descending, stable -> lowest index first)."""
  scores = np.zeros((len(q), k), np.float64)
  idx = np.zeros((len(q), k), np.int64)
  for b in range(len(q)):
    s = bank.astype(np.float64) @ q[b].astype(np.float64)
    if valid is not None:
      s = np.where(valid, s, -np.inf)
    order = np.argsort(-s, kind='stable')[:k]
    scores[b], idx[b] = s[order], order
    idx[b][scores[b] == -np.inf] = -1
  return scores, idx


@pytest.mark.parametrize('n,b,k,block_rows', [
    (301, 5, 5, None),       # one block, plain top_k (301 has no power-of-two chunking)
    (4096, 6, 5, None),      # one block, chunk-maximum path (chunks of 128)
    (5000, 4, 5, 1024),      # several blocks, ragged last block (5000 % 1024 != 0)
    (3000, 3, 40, 1024),     # larger k (small chunks) over several blocks
])
def test_topk_matches_reference(n, b, k, block_rows):
  rng = np.random.default_rng(n + k)
  bank, q = _unit(rng, n, 16), _unit(rng, b, 16)
  fn = jax.jit(lambda q, bk: knn.topk_cosine(q, bk, k, block_rows=block_rows))
  s, i = fn(q, bank)
  rs, ri = _ref_topk(q, bank, k)
  assert s.shape == (b, k) and s.dtype == jnp.float32 and i.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(i), ri)
  np.testing.assert_allclose(np.asarray(s), rs, atol=1e-5)


def test_ties_go_to_lowest_index():
  rng = np.random.default_rng(0)
  base = rng.integers(-3, 4, (8, 8)).astype(np.float32)   # integer dots: exact in any order
  base[:3] = np.eye(8, dtype=np.float32)[:3] * 9           # row r is the best match of query r
  bank = np.tile(base, (512, 1))              # every row appears 512 times (4096 rows)
  q = np.eye(8, dtype=np.float32)[:3]
  _, i = knn.topk_cosine(jnp.asarray(q), jnp.asarray(bank), 4, block_rows=1024)
  _, ref = jax.lax.top_k(jnp.asarray(q @ bank.T), 4)
  np.testing.assert_array_equal(np.asarray(i), np.asarray(ref))
  np.testing.assert_array_equal(np.asarray(i)[:, 0], [0, 1, 2])


def test_valid_mask_excludes_rows():
  rng = np.random.default_rng(1)
  n, k = 2500, 6
  bank, q = _unit(rng, n, 16), _unit(rng, 7, 16)
  q[0] = bank[3]                               # its best match is an invalid row
  valid = rng.random(n) < 0.5
  valid[3] = False
  s, i = jax.jit(lambda q, bk, v: knn.topk_cosine(q, bk, k, valid=v, block_rows=1024))(
      q, bank, valid)
  rs, ri = _ref_topk(q, bank, k, valid)
  np.testing.assert_array_equal(np.asarray(i), ri)
  np.testing.assert_allclose(np.asarray(s), rs, atol=1e-5)
  assert valid[np.asarray(i)].all()
  assert 3 not in np.asarray(i)


def test_fewer_valid_rows_than_k():
  rng = np.random.default_rng(2)
  bank, q = _unit(rng, 64, 8), _unit(rng, 3, 8)
  valid = np.zeros(64, bool)
  valid[[5, 40]] = True
  s, i = knn.topk_cosine(jnp.asarray(q), jnp.asarray(bank), 4, valid=jnp.asarray(valid))
  s, i = np.asarray(s), np.asarray(i)
  assert set(i[:, :2].ravel()) <= {5, 40}
  assert (i[:, 2:] == -1).all() and np.isneginf(s[:, 2:]).all() and np.isfinite(s[:, :2]).all()


def _all_gathers(hlo: str) -> list[str]:
  return [line for line in hlo.splitlines() if 'all-gather' in line]


def test_sharded_matches_single_device_and_never_gathers_bank():
  mesh = sharding.make_mesh(4)
  rng = np.random.default_rng(3)
  n, k = 4 * 1500, 5                         # 1500 rows per shard: ragged blocks of 1024
  bank, q = _unit(rng, n, 16), _unit(rng, 9, 16)
  valid = rng.random(n) < 0.8
  single = np.asarray(knn.topk_cosine(jnp.asarray(q), jnp.asarray(bank), k, valid=valid,
                                      block_rows=1024)[1])
  bank_s = jax.device_put(bank, NamedSharding(mesh, P(sharding.DATA)))
  valid_s = jax.device_put(valid, NamedSharding(mesh, P(sharding.DATA)))
  fn = jax.jit(lambda q, bk, v: knn.topk_cosine(q, bk, k, valid=v, mesh=mesh, block_rows=1024))
  with jax.set_mesh(mesh):
    s, i = fn(q, bank_s, valid_s)
    hlo = fn.lower(q, bank_s, valid_s).compile().as_text()
  np.testing.assert_array_equal(np.asarray(i), single)
  _, ri = _ref_topk(q, bank, k, valid)
  np.testing.assert_array_equal(np.asarray(i), ri)
  assert not [g for g in _all_gathers(hlo) if f'f32[{n},16]' in g], 'bank was all-gathered'
  # No context mesh: same answer (the mesh is an argument, the ambient mesh is never read).
  i2 = knn.topk_cosine(jnp.asarray(q), bank_s, k, valid=valid_s, mesh=mesh, block_rows=1024)[1]
  np.testing.assert_array_equal(np.asarray(i2), single)


def _ref_knn_scores(qf, bf, bl, c, k, t, metric, weighting):
  out = np.zeros((len(qf), c))
  for b in range(len(qf)):
    if metric == 'cosine':
      sim = bf.astype(np.float64) @ qf[b]
    else:
      sim = -np.sqrt(((bf.astype(np.float64) - qf[b]) ** 2).sum(1))
    order = np.argsort(-sim, kind='stable')[:k]
    for j in order:
      out[b, bl[j]] += np.exp(sim[j] / t) if weighting == 'exp' else 1.0
  return out


@pytest.mark.parametrize('metric,weighting,k', [('cosine', 'exp', 20), ('cosine', 'none', 7),
                                                ('euclidean', 'exp', 10)])
def test_weighted_knn_predict_matches_reference(metric, weighting, k):
  rng = np.random.default_rng(4)
  c, n, nq = 5, 600, 37                      # 37 queries in chunks of 16 (ragged last chunk)
  centers = _unit(rng, c, 8) * 3
  bl = rng.integers(0, c, n)
  bf = (centers[bl] + rng.standard_normal((n, 8))).astype(np.float32)
  ql = rng.integers(0, c, nq)
  qf = (centers[ql] + rng.standard_normal((nq, 8))).astype(np.float32)
  if metric == 'cosine':
    bf = bf / np.linalg.norm(bf, axis=1, keepdims=True)
    qf = qf / np.linalg.norm(qf, axis=1, keepdims=True)
  t = 0.1 if metric == 'cosine' else 1.0
  got = knn.weighted_knn_predict(qf, bf, bl, c, k=k, temperature=t, metric=metric,
                                 chunk_size=16, weighting=weighting)
  ref = _ref_knn_scores(qf, bf, bl, c, k, t, metric, weighting)
  assert got.shape == (nq, c)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(got).argmax(1), ref.argmax(1))
  assert (ref.argmax(1) == ql).mean() > 0.5   # the data are separable enough to be a real test


def test_weighted_knn_sharded_bank_and_valid():
  mesh = sharding.make_mesh(4)
  rng = np.random.default_rng(5)
  c, n = 4, 400
  bf, qf = _unit(rng, n, 8), _unit(rng, 10, 8)
  bl = rng.integers(0, c, n)
  valid = np.arange(n) < 300                  # rows 300.. never written
  ref = _ref_knn_scores(qf, bf[:300], bl[:300], c, 15, 0.1, 'cosine', 'exp')
  single = knn.weighted_knn_predict(qf, bf, bl, c, k=15, valid=valid)
  spec = NamedSharding(mesh, P(sharding.DATA))
  with jax.set_mesh(mesh):
    sharded = knn.weighted_knn_predict(qf, jax.device_put(bf, spec),
                                       jax.device_put(bl.astype(np.int32), spec), c, k=15,
                                       valid=jax.device_put(valid, spec), mesh=mesh)
  np.testing.assert_allclose(np.asarray(single), ref, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(sharded), ref, rtol=1e-4)


def test_knn_vote_weights():
  sims = jnp.array([[0.5, 0.2, -jnp.inf]])
  labels = jnp.array([[1, 1, 0]])
  v = knn.knn_vote(sims, labels, 3, temperature=0.5)
  np.testing.assert_allclose(np.asarray(v), [[0.0, np.exp(1.0) + np.exp(0.4), 0.0]], rtol=1e-6)
  u = knn.knn_vote(sims, labels, 3, weighting='none')
  np.testing.assert_allclose(np.asarray(u), [[0.0, 2.0, 0.0]])


# ---------------------------------------------------------------------------------------------
# In-batch searches and the approximate top-k option.
def _ref_in_batch(f, k, pool):
  """Per row: every other row of its pool sorted by (-cos, index); -1 past the pool."""
  b = len(f)
  idx = np.full((b, k), -1, np.int64)
  for i in range(b):
    lo = i // pool * pool
    cand = [j for j in range(lo, lo + pool) if j != i]
    s = f[cand].astype(np.float64) @ f[i].astype(np.float64)
    order = [cand[m] for m in np.argsort(-s, kind='stable')][:k]
    idx[i, :len(order)] = order
  return idx


def test_topk_excluding_matches_reference():
  rng = np.random.default_rng(3)
  q, cand = _unit(rng, 7, 8), _unit(rng, 30, 8)
  exclude = rng.integers(0, 30, 7)
  _, i = jax.jit(lambda q, c, e: knn.topk_excluding(q, c, 4, exclude=e))(q, cand, exclude)
  for b in range(7):
    s = cand.astype(np.float64) @ q[b].astype(np.float64)
    s[exclude[b]] = -np.inf
    np.testing.assert_array_equal(np.asarray(i)[b], np.argsort(-s, kind='stable')[:4])


@pytest.mark.parametrize('pool,k', [(32, 5), (8, 5), (4, 5)])   # one pool; 4 pools; k > pool-1
def test_topk_within_pools_matches_reference(pool, k):
  rng = np.random.default_rng(pool)
  f = _unit(rng, 32, 8)
  s, i = jax.jit(lambda f: knn.topk_within_pools(f, k, pool))(f)
  ref = _ref_in_batch(f, k, pool)
  np.testing.assert_array_equal(np.asarray(i), ref)
  got = np.where(ref >= 0, np.sum(f[np.arange(32)[:, None]] * f[np.maximum(ref, 0)], -1),
                 -np.inf)
  np.testing.assert_allclose(np.asarray(s), got, atol=1e-5)


def test_topk_within_pools_on_four_devices_moves_nothing():
  """Pools of the per-device rows: the same result, and no collective in the program."""
  from hlo_utils import collectives_of
  rng = np.random.default_rng(5)
  f = _unit(rng, 32, 8)
  want = knn.topk_within_pools(jnp.asarray(f), 3, 8)
  mesh = sharding.make_mesh(4)
  with jax.set_mesh(mesh):
    fs = jax.device_put(f, NamedSharding(mesh, P('data')))
    fn = jax.jit(lambda x: knn.topk_within_pools(x, 3, 8, mesh=mesh))
    got = fn(fs)
    assert collectives_of(fn, fs) == 0
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


@pytest.mark.parametrize('recall', [0.95, 0.8])
def test_recall_target_on_cpu_equals_exact(recall):
  """``approx_max_k`` is exact on CPU: every search that takes ``recall_target`` returns the exact
  neighbours (bank search, sharded bank, in-batch pools, kNN classifier)."""
  rng = np.random.default_rng(11)
  bank, q = _unit(rng, 4096, 16), _unit(rng, 6, 16)
  exact = knn.topk_cosine(jnp.asarray(q), jnp.asarray(bank), 5, block_rows=1024)
  approx = knn.topk_cosine(jnp.asarray(q), jnp.asarray(bank), 5, block_rows=1024,
                           recall_target=recall)
  np.testing.assert_array_equal(np.asarray(approx[1]), np.asarray(exact[1]))
  np.testing.assert_allclose(np.asarray(approx[0]), np.asarray(exact[0]), atol=1e-6)
  mesh = sharding.make_mesh(4)
  with jax.set_mesh(mesh):
    bs = jax.device_put(bank, NamedSharding(mesh, P('data')))
    sharded = jax.jit(lambda q, b: knn.topk_cosine(q, b, 5, mesh=mesh, recall_target=recall))(
        q, bs)
  np.testing.assert_array_equal(np.asarray(sharded[1]), np.asarray(exact[1]))
  f = _unit(rng, 32, 8)
  np.testing.assert_array_equal(
      np.asarray(knn.topk_within_pools(jnp.asarray(f), 3, 8, recall_target=recall)[1]),
      np.asarray(knn.topk_within_pools(jnp.asarray(f), 3, 8)[1]))
  labels = rng.integers(0, 4, 4096)
  np.testing.assert_array_equal(
      np.asarray(knn.weighted_knn_predict(q, bank, labels, 4, k=20, recall_target=recall)),
      np.asarray(knn.weighted_knn_predict(q, bank, labels, 4, k=20)))
  with pytest.raises(ValueError, match='recall_target=1.5 is invalid'):
    knn.topk_cosine(jnp.asarray(q), jnp.asarray(bank), 5, recall_target=1.5)


def test_knn_classify_with_recall_target_equals_exact_on_cpu():
  """The kNN evaluator's search takes config.knn.recall_target; on CPU approx_max_k is exact."""
  from ssl_jax.evals import knn_eval
  rs = np.random.RandomState(0)
  bank, queries = rs.randn(300, 16).astype(np.float32), rs.randn(40, 16).astype(np.float32)
  labels = rs.randint(0, 5, 300).astype(np.int32)
  kw = dict(num_classes=5, ks=(10,), temperatures=(0.1,))
  exact = knn_eval.knn_classify(bank, labels, queries, **kw)
  approx = knn_eval.knn_classify(bank, labels, queries, recall_target=0.9, **kw)
  for name in exact:
    np.testing.assert_allclose(approx[name], exact[name], rtol=1e-6, atol=1e-6)
  import ml_collections
  from ssl_jax.evals import evaluators
  run_config = ml_collections.ConfigDict({'knn': {'recall_target': 0.9}})
  ctx = evaluators.Context(run_config=run_config, data=ml_collections.ConfigDict(
      {'train_split': 'train', 'eval_split': 'test'}), mesh=None, num_classes=5,
      cache=knn_eval.features.ExtractionCache(None, None, None))
  ev = knn_eval.KnnEvaluator(evaluators.default_config().knn, None, ctx)
  assert ev.recall_target == 0.9
