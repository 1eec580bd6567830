"""CutMix (ssl_jax.ops.mixing) against a slow numpy reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.ops import mixing


def _ref_paste(a, b, boxes):
  """Pixel loops: copy b's box into a; kept share of a = pixels not copied / all."""
  out = a.copy()
  ratios = []
  for n, (y0, x0, y1, x1) in enumerate(zip(*boxes)):
    copied = 0
    for y in range(a.shape[1]):
      for x in range(a.shape[2]):
        if y0 <= y < y1 and x0 <= x < x1:
          out[n, y, x] = b[n, y, x]
          copied += 1
    ratios.append(1.0 - copied / (a.shape[1] * a.shape[2]))
  return out, np.array(ratios, np.float32)


def _ref_box(cy, cx, h, w, lam):
  r = np.sqrt(np.float32(1.0) - np.float32(lam))           # float32, as on device
  ch, cw = int(np.floor(np.float32(h) * r)), int(np.floor(np.float32(w) * r))
  y0, x0 = cy - ch // 2, cx - cw // 2
  return (np.clip(y0, 0, h), np.clip(x0, 0, w), np.clip(y0 + ch, 0, h), np.clip(x0 + cw, 0, w))


def test_paste_fixed_boxes_matches_reference():
  rs = np.random.RandomState(0)
  a = rs.randint(0, 256, (5, 7, 9, 3)).astype(np.uint8)
  b = rs.randint(0, 256, (5, 7, 9, 3)).astype(np.uint8)
  # inside, touching borders, empty, whole image, a single pixel
  boxes = (np.array([1, 0, 3, 0, 6]), np.array([2, 0, 4, 0, 8]),
           np.array([4, 7, 3, 7, 7]), np.array([6, 3, 4, 9, 9]))
  mixed, ratio = mixing.paste_boxes(jnp.asarray(a), jnp.asarray(b), boxes)
  ref, ref_ratio = _ref_paste(a, b, boxes)
  assert mixed.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(mixed), ref)
  np.testing.assert_allclose(np.asarray(ratio), ref_ratio, rtol=0, atol=1e-7)
  np.testing.assert_allclose(np.asarray(ratio), [1 - 12 / 63, 1 - 21 / 63, 1.0, 0.0, 1 - 1 / 63],
                             atol=1e-7)


def test_cutmix_boxes_follow_formula_and_weights_match_mixed_area():
  b_, h, w = 64, 12, 10
  rng = jax.random.key(3)
  lam = jax.random.uniform(jax.random.key(4), (b_,))
  # The centres the op draws (same split of the same key), for the numpy reference box.
  ky, kx = jax.random.split(rng)
  cy = np.asarray(jax.random.randint(ky, (b_,), 0, h, jnp.int32))
  cx = np.asarray(jax.random.randint(kx, (b_,), 0, w, jnp.int32))
  boxes = [np.asarray(v) for v in mixing.cutmix_box(rng, h, w, lam)]
  for n in range(b_):
    assert tuple(int(v[n]) for v in boxes) == _ref_box(cy[n], cx[n], h, w, float(lam[n]))
  # a = 0, b = 1: the mean of the mixed image is the pasted share, = 1 - returned weight.
  a = jnp.zeros((b_, h, w, 1), jnp.float32)
  ones = jnp.ones((b_, h, w, 1), jnp.float32)
  mixed, ratio = jax.jit(mixing.cutmix)(a, ones, lam, rng)
  np.testing.assert_allclose(np.asarray(ratio), 1.0 - np.asarray(mixed).mean(axis=(1, 2, 3)),
                             atol=1e-6)
  # Unclipped boxes have the nominal area floor(h r) * floor(w r); clipping only shrinks them.
  r = np.sqrt(1 - np.asarray(lam))
  nominal = np.floor(h * r) * np.floor(w * r) / (h * w)
  assert np.all(1 - np.asarray(ratio) <= nominal + 1e-6)
  assert np.all(1 - np.asarray(ratio) >= 0)


def test_sample_beta_moments_and_no_collectives_when_sharded():
  from jax.sharding import NamedSharding, PartitionSpec as P
  from ssl_jax import sharding
  for a, b in ((1.0, 1.0), (2.0, 2.0), (0.5, 2.0)):
    x = np.asarray(jax.jit(lambda r, a=a, b=b: mixing.sample_beta(r, a, b, (100_000,)))(
        jax.random.key(0)))
    assert np.all((x >= 0) & (x <= 1))
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    np.testing.assert_allclose(x.mean(), mean, atol=4e-3)
    np.testing.assert_allclose(x.var(), var, rtol=3e-2)
  # A [B] draw sharded along 'data' compiles to straight-line code: no cross-device collective
  # (jax.random.beta's rejection loop all-reduces its predicate, which deadlocked CPU runs).
  mesh = sharding.make_mesh(4)
  with jax.set_mesh(mesh):
    imgs = jax.device_put(np.ones((16, 4), np.float32), NamedSharding(mesh, P('data')))
    fn = jax.jit(lambda x, r: x * mixing.sample_beta(r, 2.0, 2.0, (x.shape[0],))[:, None])
    hlo = fn.lower(imgs, jax.random.key(0)).compile().as_text()
  assert 'all-reduce(' not in hlo and 'all-gather(' not in hlo
