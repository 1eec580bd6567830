"""ops.summaries.score_summary: exact moments, quantiles from a bounded grid sample."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import sharding
from ssl_jax.ops import summaries


def test_small_inputs_give_exact_quantiles():
  rng = np.random.default_rng(0)
  pos = rng.uniform(-1, 1, 37).astype(np.float32)
  neg = rng.uniform(-1, 1, (37, 50)).astype(np.float32)
  out = jax.jit(summaries.score_summary)(pos, neg)
  for name, x in (('pos', pos), ('neg', neg)):
    np.testing.assert_allclose(out[f'score/{name}_mean'], x.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[f'score/{name}_std'], x.std(), rtol=1e-4)
    for q in (10, 50, 90):
      np.testing.assert_allclose(out[f'score/{name}_q{q}'], np.quantile(x, q / 100), atol=1e-6)


def test_large_negatives_sampled_on_an_even_grid():
  rng = np.random.default_rng(1)
  # Rows with different offsets: a sample that skipped rows would bias the quantiles.
  neg = (rng.standard_normal((64, 65536)) * 0.1 + np.linspace(-0.5, 0.5, 64)[:, None])
  neg = neg.astype(np.float32)
  sample = np.asarray(summaries.quantile_sample(jnp.asarray(neg)))
  assert 8192 < sample.size <= summaries.QUANTILE_SAMPLE
  np.testing.assert_array_equal(sample.reshape(64, -1)[:, 0], neg[:, 0])   # every row kept
  out = jax.jit(summaries.score_summary)(neg[:, 0], neg)
  np.testing.assert_allclose(out['score/neg_mean'], neg.mean(), atol=1e-5)
  np.testing.assert_allclose(out['score/neg_std'], neg.std(), rtol=1e-4)
  for q in (10, 50, 90):
    np.testing.assert_allclose(out[f'score/neg_q{q}'], np.quantile(neg, q / 100), atol=0.01)


def test_many_rows_are_strided_too():
  x = jnp.arange(100_000, dtype=jnp.float32).reshape(50_000, 2)
  s = summaries.quantile_sample(x)
  assert s.size <= summaries.QUANTILE_SAMPLE
  np.testing.assert_allclose(float(jnp.median(s)), 50_000, rtol=0.01)


def test_sharded_negatives_give_the_same_summary():
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(2)
  pos = rng.uniform(-1, 1, 16).astype(np.float32)
  neg = rng.uniform(-1, 1, (16, 8192 * 4)).astype(np.float32)
  ref = jax.jit(summaries.score_summary)(pos, neg)
  with jax.set_mesh(mesh):
    neg_s = jax.device_put(neg, NamedSharding(mesh, P(None, sharding.DATA)))
    out = jax.jit(summaries.score_summary)(pos, neg_s)
  for k in ref:
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
