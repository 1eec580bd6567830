"""CutMix (Yun et al., ICCV 2019) on batches of images, with static shapes.

For a nominal mixing coefficient ``lam`` (the share of image ``a`` that should survive), a box
of side ratio ``r = sqrt(1 - lam)`` is cut from ``b`` and pasted into ``a``::

  cut_h = floor(H r),  cut_w = floor(W r)
  cy ~ U{0..H-1},      cx ~ U{0..W-1}                      (the box centre, per example)
  y0 = clip(cy - cut_h // 2, 0, H),  y1 = clip(cy - cut_h // 2 + cut_h, 0, H)   (x alike)
  M[y, x] = 1  if y0 <= y < y1 and x0 <= x < x1  else 0
  mixed = (1 - M) * a + M * b
  area_ratio = 1 - (y1 - y0)(x1 - x0) / (H W)             # the exact kept share of ``a``

Clipping at the border (and the floor) makes the pasted area differ from ``(1 - lam) H W``,
so callers weight their losses with the returned ``area_ratio``, not with ``lam`` (as the
reference CutMix code does after clipping). The mask is built from ``iota`` comparisons, so
every shape is static under ``jax.jit`` whatever the boxes. Images keep their dtype (uint8
images stay uint8: a pixel comes from either ``a`` or ``b``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _log_gamma_draw(rng: jax.Array, alpha: float, shape, rounds: int) -> jax.Array:
  """``log G`` for ``G ~ Gamma(alpha, 1)``: Marsaglia & Tsang (2000) with ``rounds`` proposals.

  For ``a = max(alpha, alpha + 1 if alpha < 1)``: ``d = a - 1/3``, ``c = 1 / sqrt(9 d)``;
  proposal ``x ~ N(0, 1)``, ``v = (1 + c x)^3``, accepted if ``v > 0`` and
  ``log U < x^2 / 2 + d - d v + d log v``; then ``G = d v``. The first accepted of ``rounds``
  proposals is kept (acceptance >= 0.95 per proposal for a >= 1, so with 8 rounds a draw falls
  back to ``G = d`` with probability < 1e-10). ``alpha < 1``: ``G = G_{alpha+1} U^{1/alpha}``.
  """
  boost = alpha < 1.0
  a = alpha + 1.0 if boost else alpha
  d = a - 1.0 / 3.0
  c = 1.0 / (9.0 * d) ** 0.5
  k_x, k_u, k_b = jax.random.split(rng, 3)
  x = jax.random.normal(k_x, (rounds,) + tuple(shape), jnp.float32)
  log_u = jnp.log(jax.random.uniform(k_u, (rounds,) + tuple(shape), jnp.float32,
                                     minval=jnp.finfo(jnp.float32).tiny))
  v = (1.0 + c * x) ** 3
  safe_v = jnp.where(v > 0, v, 1.0)
  ok = (v > 0) & (log_u < 0.5 * x * x + d - d * safe_v + d * jnp.log(safe_v))
  first = jnp.argmax(ok, axis=0)                                   # first accepted proposal
  v_acc = jnp.take_along_axis(safe_v, first[None], axis=0)[0]
  log_g = jnp.log(d) + jnp.where(jnp.any(ok, axis=0), jnp.log(v_acc), 0.0)
  if boost:
    log_g = log_g + jnp.log(jax.random.uniform(k_b, tuple(shape), jnp.float32,
                                               minval=jnp.finfo(jnp.float32).tiny)) / alpha
  return log_g


def sample_beta(rng: jax.Array, a: float, b: float, shape=(), *, rounds: int = 8) -> jax.Array:
  """``Beta(a, b)`` draws ``x = G_a / (G_a + G_b) = sigmoid(log G_a - log G_b)`` [shape] f32.

  ``G_a, G_b`` are Gamma draws from a fixed number of Marsaglia-Tsang proposals
  (``_log_gamma_draw``): straight-line elementwise code with no loop. Why not
  ``jax.random.beta``: its Gamma sampler is a rejection *while loop*; a [B] draw sharded along
  'data' becomes a loop whose predicate is all-reduced across devices, and on 4-device CPU runs
  that collective interleaved with the network's BatchNorm all-reduces and deadlocked the step
  (``betainc``-based inversion has the same kind of loop). ``a``, ``b`` are Python floats > 0.
  """
  if not (a > 0 and b > 0):
    raise ValueError(f'Beta parameters a={a!r}, b={b!r} are invalid; accepted: numbers > 0')
  k_a, k_b = jax.random.split(rng)
  return jax.nn.sigmoid(_log_gamma_draw(k_a, float(a), shape, rounds)
                        - _log_gamma_draw(k_b, float(b), shape, rounds))


def cutmix_box(rng: jax.Array, h: int, w: int, lam) -> tuple[jax.Array, jax.Array,
                                                             jax.Array, jax.Array]:
  """A CutMix box per entry of ``lam`` (scalar or [B]): ``(y0, x0, y1, x1)`` int32, same shape.

  The box covers rows ``y0 .. y1 - 1`` and columns ``x0 .. x1 - 1``; see the module docstring
  for the formula. Pure: the same ``rng`` and ``lam`` give the same boxes.
  """
  lam = jnp.asarray(lam, jnp.float32)
  r = jnp.sqrt(jnp.clip(1.0 - lam, 0.0, 1.0))
  cut_h = jnp.floor(h * r).astype(jnp.int32)
  cut_w = jnp.floor(w * r).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy = jax.random.randint(ky, lam.shape, 0, h, jnp.int32)
  cx = jax.random.randint(kx, lam.shape, 0, w, jnp.int32)
  y0 = cy - cut_h // 2
  x0 = cx - cut_w // 2
  return (jnp.clip(y0, 0, h), jnp.clip(x0, 0, w), jnp.clip(y0 + cut_h, 0, h),
          jnp.clip(x0 + cut_w, 0, w))


def box_mask(boxes, h: int, w: int) -> jax.Array:
  """``M[b, y, x] = y0_b <= y < y1_b and x0_b <= x < x1_b`` (bool [B, h, w]) from iota tests."""
  y0, x0, y1, x1 = (jnp.asarray(v, jnp.int32)[:, None, None] for v in boxes)
  ys = jax.lax.broadcasted_iota(jnp.int32, (1, h, w), 1)
  xs = jax.lax.broadcasted_iota(jnp.int32, (1, h, w), 2)
  return (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)


def paste_boxes(images_a: jax.Array, images_b: jax.Array, boxes) -> tuple[jax.Array, jax.Array]:
  """``mixed = where(M, b, a)`` for per-example ``boxes = (y0, x0, y1, x1)`` ([B] each).

  ``images_a``, ``images_b``: [B, H, W, C] (any dtype). Returns ``mixed`` (dtype of ``a``) and
  ``area_ratio`` [B] float32 ``= 1 - (y1 - y0)(x1 - x0) / (H W)``, the share of pixels from a.
  """
  if images_a.shape != images_b.shape:
    raise ValueError(f'images_a {images_a.shape} and images_b {images_b.shape} must have the '
                     'same shape [B, H, W, C]')
  _, h, w, _ = images_a.shape
  mask = box_mask(boxes, h, w)
  mixed = jnp.where(mask[..., None], images_b.astype(images_a.dtype), images_a)
  y0, x0, y1, x1 = (jnp.asarray(v, jnp.int32) for v in boxes)
  area = ((y1 - y0) * (x1 - x0)).astype(jnp.float32)
  return mixed, 1.0 - area / float(h * w)


def cutmix(images_a: jax.Array, images_b: jax.Array, lam, rng: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
  """CutMix of ``b`` into ``a``: a box of area ~ ``(1 - lam) H W`` per example.

  ``lam``: scalar (one nominal ratio for the batch, fresh box position per example) or [B].
  Returns ``(mixed [B, H, W, C], area_ratio [B] float32)``, ``area_ratio`` being the exact
  share of ``a`` kept (use it as the loss weight of ``a``'s target, ``1 - area_ratio`` for b's).
  """
  if images_a.ndim != 4:
    raise ValueError(f'images must be [B, H, W, C]; got shape {images_a.shape}')
  b, h, w, _ = images_a.shape
  lam = jnp.broadcast_to(jnp.asarray(lam, jnp.float32), (b,))
  return paste_boxes(images_a, images_b, cutmix_box(rng, h, w, lam))


__all__ = ['cutmix', 'cutmix_box', 'box_mask', 'paste_boxes', 'sample_beta']
