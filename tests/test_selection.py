"""ssl_jax.ops.selection.sample_selected against its definition: always a kept candidate,
uniform over the kept ones, the fallback when none is kept."""
from __future__ import annotations

import jax
import numpy as np

from ssl_jax.ops import selection


def test_sample_selected_is_uniform_over_kept_and_falls_back():
  rs = np.random.RandomState(0)
  b, m = 6, 5
  indices = rs.randint(0, 100, (b, m)).astype(np.int32)
  indices[:, :] = np.arange(m)[None] + 10 * np.arange(b)[:, None]   # distinct per row
  keep = rs.rand(b, m) > 0.5
  keep[0] = False                                  # row 0: nothing kept -> fallback
  keep[1] = [True, False, True, False, True]       # row 1: three candidates
  fallback = np.arange(b, dtype=np.int32) + 1000
  fn = jax.jit(selection.sample_selected)
  picks = np.stack([np.asarray(fn(jax.random.key(s), indices, keep, fallback)[0])
                    for s in range(900)])
  has = np.asarray(fn(jax.random.key(0), indices, keep, fallback)[1])
  np.testing.assert_array_equal(has, keep.any(axis=1))
  assert np.all(picks[:, 0] == 1000)
  for i in range(1, b):
    kept = indices[i][keep[i]]
    if not len(kept):
      assert np.all(picks[:, i] == fallback[i])
      continue
    assert set(picks[:, i].tolist()) <= set(kept.tolist())
    counts = np.array([np.sum(picks[:, i] == v) for v in kept])
    expect = 900 / len(kept)                     # 5 sigma of Binomial(900, 1/len(kept))
    sigma = np.sqrt(900 * (1 / len(kept)) * (1 - 1 / len(kept)))
    assert np.all(np.abs(counts - expect) < 5 * sigma + 1e-9), (i, counts)
