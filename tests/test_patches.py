"""Tests for ssl_jax.ops.patches against slow numpy references of the APS sampling rules."""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.ops import patches as P


# ----------------------------------------------------------------------------- references


def ref_cell_rect(box, grid, flip, index):
  """Source rectangle (y_lo, y_hi, x_lo, x_hi) of cell ``index`` of a view (explicit, no tricks)."""
  gh, gw = grid
  y0, x0, h, w = (float(v) for v in box)
  r, c = divmod(int(index), gw)
  if flip:  # view column c shows crop column gw-1-c
    c = gw - 1 - c
  ch, cw = h / gh, w / gw
  return y0 + r * ch, y0 + (r + 1) * ch, x0 + c * cw, x0 + (c + 1) * cw


def ref_intersection(a, b):
  y_lo, y_hi = max(a[0], b[0]), min(a[1], b[1])
  x_lo, x_hi = max(a[2], b[2]), min(a[3], b[3])
  if y_hi <= y_lo or x_hi <= x_lo:
    return 0.0
  return (y_hi - y_lo) * (x_hi - x_lo)


def ref_ratios(kept, grid, box1, box2, flip1, flip2, eps=1e-6):
  """Loops over view-2 cells and kept view-1 cells: ratio = max(0, 1 - covered fraction)."""
  gh, gw = grid
  out = np.zeros(gh * gw)
  for j in range(gh * gw):
    cell2 = ref_cell_rect(box2, grid, flip2, j)
    area2 = (cell2[1] - cell2[0]) * (cell2[3] - cell2[2])
    covered = sum(ref_intersection(ref_cell_rect(box1, grid, flip1, i), cell2) for i in set(kept))
    r = max(0.0, 1.0 - covered / area2)
    out[j] = r if r >= eps else 0.0
  return out


def random_box(rng):
  h, w = rng.uniform(0.2, 1.0, size=2)
  y0, x0 = rng.uniform(0, 1 - h), rng.uniform(0, 1 - w)
  return np.array([y0, x0, h, w], np.float32)


def plackett_luce_inclusion(weights, keep):
  """Exact P(cell in sample) for sequential sampling w/o replacement ∝ weights (enumeration)."""
  n = len(weights)
  incl = np.zeros(n)
  for seq in itertools.permutations(range(n), keep):
    p, left = 1.0, float(np.sum(weights))
    for i in seq:
      p *= weights[i] / left
      left -= weights[i]
    incl[list(seq)] += p
  return incl


# ----------------------------------------------------------------------------- sparse view


def test_sparse_sample_distinct_and_in_range():
  f = jax.jit(P.sparse_sample, static_argnums=(1, 2))
  for seed in range(5):
    idx = np.asarray(f(jax.random.key(seed), 256, 64))
    assert idx.shape == (64,) and idx.dtype == np.int32
    assert len(set(idx.tolist())) == 64
    assert idx.min() >= 0 and idx.max() < 256
  with pytest.raises(ValueError):
    P.sparse_sample(jax.random.key(0), 10, 11)


def test_sparse_chunks_disjoint_and_covering():
  f = jax.jit(jax.vmap(lambda k: P.sparse_chunks(k, 256, 0.25)))
  chunks = np.asarray(f(jax.random.split(jax.random.key(0), 8)))
  assert chunks.shape == (8, 4, 64) and chunks.dtype == np.int32
  for b in range(8):
    assert sorted(chunks[b].reshape(-1).tolist()) == list(range(256))
  assert P.sparse_chunks(jax.random.key(1), 16, 0.5).shape == (2, 8)
  assert P.chunk_shape(256, 0.25) == (4, 64)
  for bad in (0.3, 0.0, 1.5):
    with pytest.raises(ValueError):
      P.sparse_chunks(jax.random.key(0), 256, bad)


# ----------------------------------------------------------------------------- coverage rule


def test_hand_checked_geometry_and_flips():
  # View 1 = left half of the image, view 2 = whole image, 2x2 grids. View-1 cell 0 covers
  # y∈[0,.5], x∈[0,.25] (x∈[.25,.5] if view 1 is flipped): half of view-2's top-left cell, or of
  # its top-right cell when view 2 is flipped (its column 1 then shows the image's left half).
  # Kept indices are padded with duplicates, which count once.
  half, whole = [0., 0., 1., .5], [0., 0., 1., 1.]
  cases = [  # kept, box1, box2, flip1, flip2, expected ratios
      ([0, 0, 0, 0], half, whole, False, False, [.5, 1, 1, 1]),
      ([0, 0, 0, 0], half, whole, True, False, [.5, 1, 1, 1]),
      ([0, 0, 0, 0], half, whole, False, True, [1, .5, 1, 1]),
      ([1, 1, 1, 1], half, whole, False, True, [1, .5, 1, 1]),   # x∈[.25,.5] -> view-2 col 1
      ([1, 1, 1, 1], half, whole, True, True, [1, .5, 1, 1]),    # x∈[0,.25]  -> view-2 col 1
      ([0, 3, 3, 3], whole, whole, False, True, [1, 0, 0, 1]),   # mirrored identity
      ([0, 1, 2, 3], [0., 0., .4, .4], [.5, .5, .5, .5], False, False, [1, 1, 1, 1]),  # disjoint
      ([0, 1, 2, 3], whole, [.25, .25, .5, .5], True, False, [0, 0, 0, 0]),  # view 2 inside 1
  ]
  kept, box1, box2, flip1, flip2, want = (np.array(c) for c in zip(*cases))
  fn = jax.jit(jax.vmap(functools.partial(P.selective_ratios, grid=2)))
  got = fn(jnp.asarray(kept, jnp.int32), box1=box1.astype(np.float32),
           box2=box2.astype(np.float32), flip1=flip1, flip2=flip2)
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize('grid,keep', [((8, 8), 16), ((4, 6), 6), ((16, 16), 64)])
def test_ratios_match_numpy_reference(grid, keep):
  rng = np.random.default_rng(0)
  n = grid[0] * grid[1]
  cases = 6 if n > 100 else 12
  kept = np.stack([rng.permutation(n)[:keep] for _ in range(cases)]).astype(np.int32)
  box1 = np.stack([random_box(rng) for _ in range(cases)])
  box2 = np.stack([random_box(rng) for _ in range(cases)])
  box2[0] = box1[0]  # identical boxes are the most delicate case (exact tiling)
  flip1 = rng.integers(0, 2, cases).astype(bool)
  flip2 = rng.integers(0, 2, cases).astype(bool)
  fn = jax.jit(jax.vmap(functools.partial(P.selective_ratios, grid=grid)))
  got = np.asarray(fn(jnp.asarray(kept), box1=box1, box2=box2, flip1=flip1, flip2=flip2))
  for i in range(cases):
    want = ref_ratios(kept[i], grid, box1[i], box2[i], flip1[i], flip2[i])
    np.testing.assert_allclose(got[i], want, atol=2e-5, err_msg=f'case {i}')


@functools.partial(jax.jit, static_argnames=('keep', 'grid'))
def _cover_ratios_picks(key, kept, box1, box2, flip1, flip2, *, keep, grid):
  """coverage, ratios and 32 independent selective samples, compiled once per (keep, grid)."""
  kw = dict(grid=grid, box1=box1, box2=box2, flip1=flip1, flip2=flip2)
  n = grid[0] * grid[1]
  picks = jax.vmap(lambda k: P.selective_sample(k, n, keep, kept, **kw))(
      jax.random.split(key, 32))
  return P.coverage(kept, **kw), P.selective_ratios(kept, **kw), picks


@pytest.mark.parametrize('flip1,flip2', [(False, False), (True, True), (True, False)])
def test_identical_boxes_kept_cells_fully_covered(flip1, flip2):
  grid, n, keep = (16, 16), 256, 64
  box = jnp.array([.1, .2, .6, .7])
  kept = jax.random.permutation(jax.random.key(3), n)[:keep].astype(jnp.int32)
  cover, ratios, picks = _cover_ratios_picks(jax.random.key(4), kept, box, box, flip1, flip2,
                                             keep=keep, grid=grid)
  mask = np.zeros((16, 16))
  mask.reshape(-1)[np.asarray(kept)] = 1
  if flip1 != flip2:
    mask = mask[:, ::-1]  # the same source patch sits at the mirrored column of view 2
  mask = mask.reshape(-1)
  np.testing.assert_allclose(cover, mask, atol=1e-5)
  assert np.all(np.asarray(ratios)[mask == 1] == 0)
  np.testing.assert_allclose(np.asarray(ratios)[mask == 0], 1.0, atol=1e-5)
  # 192 positive cells >= 64: the selective view never re-uses a covered patch.
  picks = np.asarray(picks)
  assert picks.shape == (32, 64)
  assert not np.any(mask[picks] == 1)
  assert all(len(set(p.tolist())) == keep for p in picks)


def test_zero_ratio_cells_only_when_needed():
  rng = np.random.default_rng(1)
  grid, n = (8, 8), 64

  @functools.partial(jax.jit, static_argnums=(1,))
  def ratios_and_sample(key, keep, kept, box1, box2, f1, f2):
    kw = dict(grid=grid, box1=box1, box2=box2, flip1=f1, flip2=f2)
    return P.selective_ratios(kept, **kw), P.selective_sample(key, n, keep, kept, **kw)

  for case in range(12):
    keep = 16 if case % 2 else 40
    kept = jnp.asarray(rng.permutation(n)[:keep].astype(np.int32))
    box1, box2 = random_box(rng), random_box(rng)
    if case % 3 == 0:
      box2 = box1  # many zero-ratio cells (and too few positive ones when keep = 40)
    f1, f2 = bool(rng.integers(2)), bool(rng.integers(2))
    ratios, idx = ratios_and_sample(jax.random.key(case), keep, kept, box1, box2, f1, f2)
    ratios, idx = np.asarray(ratios), np.asarray(idx)
    assert len(set(idx.tolist())) == keep
    num_pos = int(np.sum(ratios > 0))
    if num_pos >= keep:
      assert np.all(ratios[idx] > 0)
    else:  # every positive cell, then zero cells for the remainder
      assert set(np.flatnonzero(ratios > 0)) <= set(idx.tolist())
      assert int(np.sum(ratios[idx] == 0)) == keep - num_pos
  # Force the fill-up path: identical boxes, keep 48 of 64 -> 16 positive cells < 48.
  kept = jnp.arange(48, dtype=jnp.int32)
  box = jnp.array([0., 0., 1., 1.])
  _, idx = ratios_and_sample(jax.random.key(0), 48, kept, box, box, False, False)
  idx = np.asarray(idx)
  assert set(range(48, 64)) <= set(idx.tolist()) and len(set(idx.tolist())) == 48
  # All ratios zero (no NaNs): a uniform draw of distinct cells.
  sample_zero = jax.jit(P.sample_by_ratio, static_argnums=2)
  idx = np.asarray(sample_zero(jax.random.key(0), jnp.zeros(10), 4))
  assert len(set(idx.tolist())) == 4


# ----------------------------------------------------------------------------- sampling law


def test_sampling_frequencies_follow_ratio_cubed():
  draws = 20000
  ratios = jnp.array([1.0, 0.8, 0.5, 0.3, 0.0])
  box1, box2 = jnp.array([0., 0., 1., .5]), jnp.array([0., 0., 1., 1.])

  @jax.jit
  def draw(keys):
    one = jax.vmap(lambda k: P.sample_by_ratio(k, ratios, 1))(keys)
    two = jax.vmap(lambda k: P.sample_by_ratio(k, ratios, 2))(keys)
    sel = jax.vmap(lambda k: P.selective_sample(k, 4, 1, jnp.array([0]), grid=2, box1=box1,
                                                box2=box2))(keys)
    return one, two, sel

  one, two, sel = (np.asarray(a) for a in draw(jax.random.split(jax.random.key(0), draws)))
  w = np.asarray(ratios) ** 3
  p = w / w.sum()  # [.601, .308, .075, .016, 0]
  uniform = np.array([.25, .25, .25, .25, 0.])
  tol = 0.02  # ≈ 6 standard deviations of a frequency over 20k draws; the seed is fixed
  assert np.max(np.abs(uniform - p)) > 10 * tol  # the test distinguishes uniform sampling

  freq = np.bincount(one[:, 0], minlength=5) / draws
  np.testing.assert_allclose(freq, p, atol=tol)
  assert freq[4] == 0

  # Without replacement (keep = 2): inclusion frequencies = exact Plackett-Luce probabilities.
  assert all(a != b for a, b in two)
  incl = np.bincount(two.reshape(-1), minlength=5) / draws
  want = plackett_luce_inclusion(w, 2)
  np.testing.assert_allclose(incl, want, atol=tol)
  assert np.max(np.abs(want - 2 * uniform)) > 10 * tol

  # End to end through the geometry: ratios [.5, 1, 1, 1] -> p ∝ [.125, 1, 1, 1].
  freq = np.bincount(sel[:, 0], minlength=4) / draws
  w = np.array([.125, 1, 1, 1])
  np.testing.assert_allclose(freq, w / w.sum(), atol=tol)
  assert abs(w[0] / w.sum() - .25) > 10 * tol


@jax.jit
def _batched_chunks(key):
  """What the APS step does for a batch of 2: sparse chunks, then the selective chunks."""
  keys1, keys2 = jax.random.split(key, (2, 2))
  chunks = jax.vmap(lambda k: P.sparse_chunks(k, 64, 0.25))(keys1)
  box1 = jnp.array([[0., 0., 1., 1.], [.1, .1, .5, .6]])
  box2 = jnp.array([[0., 0., 1., 1.], [.3, .2, .6, .5]])
  fn = jax.vmap(functools.partial(P.selective_chunks, keep=16, grid=8))
  return chunks, fn(keys2, chunks, box1=box1, box2=box2, flip1=jnp.array([False, True]),
                    flip2=jnp.array([False, False]))


def test_selective_chunks_batched():
  chunks, out = (np.asarray(a) for a in _batched_chunks(jax.random.key(0)))
  assert chunks.shape == out.shape == (2, 4, 16) and out.dtype == np.int32
  for b in range(2):
    assert all(len(set(row.tolist())) == 16 for row in out[b])
  # Identical boxes, no flip: chunk i of view 2 avoids chunk i of view 1 (48 free cells >= 16).
  for i in range(4):
    assert not set(out[0, i].tolist()) & set(chunks[0, i].tolist())
