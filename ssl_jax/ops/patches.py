"""Patch sampling for APS — Asymmetric Patch Sampling (arXiv 2306.02854).

Patches are indexed row-major on a ``gh × gw`` grid: cell ``(r, c)`` has index ``r·gw + c``, as
in ``ssl_jax.models.vit``. All functions are jit-compilable with static shapes: ``num_patches``,
``keep``, ``ratio``, ``num_chunks`` and ``grid`` are Python ints (static under ``jax.jit``);
boxes, flips, indices and the rng may be traced and ``jax.vmap``-ed over a batch, e.g.::

  idx1 = jax.vmap(lambda k: sparse_chunks(k, 256, 0.25))(keys1)            # [B, 4, 64]
  idx2 = jax.vmap(functools.partial(selective_chunks, keep=64, grid=16, power=3.0))(
      keys2, idx1, box1=box1, box2=box2, flip1=flip1, flip2=flip2)         # [B, 4, 64]

**Sparse view (view 1).** A uniformly random permutation of the ``N`` patches, split into
``num_chunks = 1/ratio`` disjoint chunks of ``keep = N·ratio`` patches that together cover every
patch exactly once (APS: ratio 0.25, 256 patches → 4 chunks of 64).

**Selective view (view 2).** Geometry. A crop box is ``(y0, x0, h, w)`` in normalised source-image
coordinates (any consistent unit works: the rule only uses ratios of areas, which a per-axis
rescaling of the source image leaves unchanged). View ``v``'s image is the crop resized to the
network input, then mirrored left-right if ``flip_v``; its grid cell ``(r, c)`` covers the source
rectangle::

  y ∈ [y0 + r·h/gh, y0 + (r+1)·h/gh],   x ∈ [x0 + c̃·w/gw, x0 + (c̃+1)·w/gw],
  c̃ = gw − 1 − c if flip_v else c.

Rule. With ``K1`` the kept view-1 cells, for every view-2 cell ``j``::

  cover_j = Σ_{i ∈ K1} |R¹_i ∩ R²_j| / |R²_j|,      ratio_j = max(0, 1 − cover_j),

and ``ratio_j < eps`` (1e-6, as the official code) is set to 0 so that float round-off never makes
a fully covered cell positive. Then ``keep`` view-2 cells are drawn without replacement with
probability ∝ ``ratio_j ** power`` (APS: power 3). View-1 cells tile crop 1 without overlap, so
``cover_j ≤ 1`` exactly and the clamp only removes round-off.

Closed form. Rectangles are products of intervals and ``|A ∩ B| = ov_y(A, B) · ov_x(A, B)`` with
``ov(a, b) = max(0, min(a_1, b_1) − max(a_0, b_0))``. With ``Oy[r2, r1]`` the row-interval overlaps,
``Ox[c2, c1]`` the column-interval overlaps (flips folded into the column coordinates) and
``M[r1, c1] = 1`` for kept view-1 cells::

  cover = Oy · M · Oxᵀ / (h2/gh · w2/gw)                      # [gh, gw], two tiny matmuls

Sampling. Gumbel-top-k: ``argsort_desc(power·log ratio_j + G_j)``, ``G_j ~ Gumbel(0, 1)`` i.i.d.,
is an exact draw without replacement ∝ ``ratio**power`` (the same Plackett–Luce law as
``np.random.choice(N, keep, replace=False, p=ratio**power / Σ)``, which the official code uses).
Zero-ratio cells are ranked strictly after every positive cell (a two-key sort on
``(ratio_j == 0, −key_j)``), uniformly at random among themselves: they are picked only when fewer
than ``keep`` cells have a positive ratio, and then exactly ``keep − #positive`` of them. Ties in
``ratio`` get equal probability; ties in the continuous keys have probability zero.

Differences from the official code (visresearch/aps, ``asym_patch_sampling.py``):
  * flips: the official pipeline records the crop box before the flip and maps indices as if no
    view were flipped, so for flipped views its "overlap" is measured against the mirrored cells.
    Here flips mirror the column coordinates within the crop (above).
  * zero ratios: ``np.random.choice`` raises when fewer than ``keep`` cells have non-zero
    probability (and divides by zero when all are zero); here zero cells fill the remainder.
  * the official code loops over kept boxes and the cells they touch; the closed form above
    computes the same ``cover`` (the official in-loop clamp at 1e-6 equals the final clamp here).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

Grid = int | tuple[int, int] | Sequence[int]


def _grid_hw(grid: Grid) -> tuple[int, int]:
  if isinstance(grid, int):
    return grid, grid
  gh, gw = grid
  return int(gh), int(gw)


def _check_num_patches(num_patches: int, grid: Grid) -> tuple[int, int]:
  gh, gw = _grid_hw(grid)
  if gh * gw != num_patches:
    raise ValueError(f'grid {gh}x{gw} has {gh * gw} cells but num_patches={num_patches}')
  return gh, gw


def sparse_sample(rng: jax.Array, num_patches: int, keep: int) -> jax.Array:
  """``keep`` distinct patch indices drawn uniformly without replacement: ``perm(N)[:keep]``.

  Returns int32 ``[keep]`` (in random order).
  """
  if not 0 < keep <= num_patches:
    raise ValueError(f'keep must be in [1, {num_patches}], got {keep}')
  return jax.random.permutation(rng, num_patches)[:keep].astype(jnp.int32)


def chunk_shape(num_patches: int, ratio: float) -> tuple[int, int]:
  """``(num_chunks, keep) = (1/ratio, N·ratio)``; ``ValueError`` unless they tile ``N`` exactly."""
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f'ratio must be in (0, 1], got {ratio}')
  num_chunks = int(round(1.0 / ratio))
  keep = num_patches // num_chunks
  if num_chunks * keep != num_patches or abs(num_chunks * ratio - 1.0) > 1e-6:
    raise ValueError(f'ratio {ratio} does not split {num_patches} patches into 1/ratio equal '
                     'disjoint chunks; use a ratio 1/m with m dividing num_patches')
  return num_chunks, keep


def sparse_chunks(rng: jax.Array, num_patches: int, ratio: float) -> jax.Array:
  """APS sparse view: a random permutation of ``N`` patches reshaped to ``[1/ratio, N·ratio]``.

  Rows are disjoint and together contain every patch exactly once. int32.
  """
  num_chunks, keep = chunk_shape(num_patches, ratio)
  perm = jax.random.permutation(rng, num_patches).astype(jnp.int32)
  return perm.reshape(num_chunks, keep)


def cell_intervals(box: jax.Array, grid: Grid, flip: jax.Array | bool = False
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Source-image intervals of a view's cells: ``(y_lo [gh], y_hi [gh], x_lo [gw], x_hi [gw])``.

  Row ``r`` spans ``[y0 + r·h/gh, y0 + (r+1)·h/gh]``; column ``c`` of the (possibly flipped) view
  spans ``[x0 + c̃·w/gw, x0 + (c̃+1)·w/gw]`` with ``c̃ = gw−1−c`` if ``flip`` else ``c``.
  """
  gh, gw = _grid_hw(grid)
  box = jnp.asarray(box, jnp.float32)
  y0, x0, h, w = box[0], box[1], box[2], box[3]
  r = jnp.arange(gh, dtype=jnp.float32)
  c = jnp.arange(gw, dtype=jnp.float32)
  c = jnp.where(jnp.asarray(flip, bool), gw - 1 - c, c)
  y_lo = y0 + r * (h / gh)
  x_lo = x0 + c * (w / gw)
  return y_lo, y_lo + h / gh, x_lo, x_lo + w / gw


def _overlap_1d(a_lo, a_hi, b_lo, b_hi) -> jax.Array:
  """``ov[i, j] = max(0, min(a_hi_i, b_hi_j) − max(a_lo_i, b_lo_j))``."""
  return jnp.maximum(0.0, jnp.minimum(a_hi[:, None], b_hi[None, :])
                     - jnp.maximum(a_lo[:, None], b_lo[None, :]))


def coverage(first_view_indices: jax.Array, *, grid: Grid, box1: jax.Array, box2: jax.Array,
             flip1: jax.Array | bool = False, flip2: jax.Array | bool = False) -> jax.Array:
  """``cover_j`` = fraction of view-2 cell ``j`` covered by the kept view-1 cells, ``[gh·gw]`` f32.

  ``cover = Oy · M · Oxᵀ / (h2/gh · w2/gw)`` (see the module docstring); boxes must have
  positive size. Duplicate indices in ``first_view_indices`` count once.
  """
  gh, gw = _grid_hw(grid)
  idx = jnp.asarray(first_view_indices, jnp.int32)
  kept = jnp.zeros((gh * gw,), jnp.float32).at[idx].set(1.0).reshape(gh, gw)
  y1_lo, y1_hi, x1_lo, x1_hi = cell_intervals(box1, grid, flip1)
  y2_lo, y2_hi, x2_lo, x2_hi = cell_intervals(box2, grid, flip2)
  oy = _overlap_1d(y2_lo, y2_hi, y1_lo, y1_hi)  # [gh (view 2), gh (view 1)]
  ox = _overlap_1d(x2_lo, x2_hi, x1_lo, x1_hi)  # [gw (view 2), gw (view 1)]
  hp = jax.lax.Precision.HIGHEST
  area = jnp.matmul(jnp.matmul(oy, kept, precision=hp), ox.T, precision=hp)
  box2 = jnp.asarray(box2, jnp.float32)
  cell_area2 = (box2[2] / gh) * (box2[3] / gw)
  return (area / cell_area2).reshape(gh * gw)


def selective_ratios(first_view_indices: jax.Array, *, grid: Grid, box1: jax.Array,
                     box2: jax.Array, flip1: jax.Array | bool = False,
                     flip2: jax.Array | bool = False, eps: float = 1e-6) -> jax.Array:
  """``ratio_j = max(0, 1 − cover_j)``, set to 0 below ``eps``; ``[gh·gw]`` float32."""
  r = 1.0 - coverage(first_view_indices, grid=grid, box1=box1, box2=box2, flip1=flip1,
                     flip2=flip2)
  return jnp.where(r >= eps, r, 0.0)


def sample_by_ratio(rng: jax.Array, ratios: jax.Array, keep: int, power: float = 3.0
                    ) -> jax.Array:
  """``keep`` distinct indices drawn without replacement with probability ∝ ``ratios**power``.

  Gumbel-top-k over ``power·log ratio + G``; cells with ``ratio <= 0`` rank after all positive
  ones (uniformly among themselves), so they are drawn only when fewer than ``keep`` cells are
  positive. Returns int32 ``[keep]`` in draw order (largest key first).
  """
  n = ratios.shape[-1]
  if not 0 < keep <= n:
    raise ValueError(f'keep must be in [1, {n}], got {keep}')
  ratios = jnp.asarray(ratios, jnp.float32)
  positive = ratios > 0
  gumbel = jax.random.gumbel(rng, ratios.shape, jnp.float32)
  log_w = power * jnp.log(jnp.where(positive, ratios, 1.0))
  key = jnp.where(positive, log_w + gumbel, gumbel)
  tier = jnp.where(positive, 0, 1).astype(jnp.int32)
  _, _, order = jax.lax.sort((tier, -key, jnp.arange(n, dtype=jnp.int32)), num_keys=2)
  return order[:keep]


def selective_sample(rng: jax.Array, num_patches: int, keep: int, first_view_indices: jax.Array,
                     *, grid: Grid, box1: jax.Array, box2: jax.Array,
                     flip1: jax.Array | bool = False, flip2: jax.Array | bool = False,
                     power: float = 3.0, eps: float = 1e-6) -> jax.Array:
  """APS selective view: ``keep`` view-2 cells, ∝ ``ratio**power``, avoiding view 1's patches.

  ``ratio`` is :func:`selective_ratios` (rule in the module docstring); sampling is
  :func:`sample_by_ratio`. ``box = (y0, x0, h, w)`` in normalised source coordinates; ``flip``
  means the view image was mirrored left-right after cropping. Returns int32 ``[keep]``.
  """
  _check_num_patches(num_patches, grid)
  ratios = selective_ratios(first_view_indices, grid=grid, box1=box1, box2=box2, flip1=flip1,
                            flip2=flip2, eps=eps)
  return sample_by_ratio(rng, ratios, keep, power)


def selective_chunks(rng: jax.Array, chunks: jax.Array, *, keep: int, grid: Grid,
                     box1: jax.Array, box2: jax.Array, flip1: jax.Array | bool = False,
                     flip2: jax.Array | bool = False, power: float = 3.0,
                     eps: float = 1e-6) -> jax.Array:
  """:func:`selective_sample` for every sparse chunk ``chunks [C, K1]`` → ``[C, keep]``.

  Each chunk gets an independent key (``jax.random.split(rng, C)``); chunk ``i`` of view 2 avoids
  chunk ``i`` of view 1 only (the official pairing).
  """
  gh, gw = _grid_hw(grid)
  keys = jax.random.split(rng, chunks.shape[0])
  fn = lambda k, c: selective_sample(k, gh * gw, keep, c, grid=(gh, gw), box1=box1, box2=box2,
                                     flip1=flip1, flip2=flip2, power=power, eps=eps)
  return jax.vmap(fn)(keys, chunks)


__all__ = ['sparse_sample', 'sparse_chunks', 'chunk_shape', 'cell_intervals', 'coverage',
           'selective_ratios', 'sample_by_ratio', 'selective_sample', 'selective_chunks']
