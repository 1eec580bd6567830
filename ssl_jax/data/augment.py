"""Image augmentations as TensorFlow ops (host side, inside tf.data).

Every random op here is *stateless*: it takes an explicit ``seed`` (an int32/int64 tensor of shape
``[2]``, as ``tf.random.stateless_*`` expects) so that the pipeline is a pure function of
(seed, process index, position in the stream); resuming at any step reproduces the same pixels.

Images are float32 in ``[0, 1]`` with channels last. Most ops are *batched*: they take
``[B, H, W, 3]`` images and draw one independent set of parameters per example from a single
seed, which is much faster in tf.data than a per-example ``map`` with dozens of tiny ops.

Semantics follow torchvision (the reference implementations of BYOL, MoCo v2, MSF and APS are
PyTorch): the same parameter distributions (RandomResizedCrop's 10-try sampler and fallback,
ColorJitter's factor ranges and random order, luma weights, blur sigma range, solarize rule).
Where we differ, it is numerical detail:

* :func:`crop_resize_batch` (fixed-size images such as CIFAR) resamples with bilinear
  ``crop_and_resize`` and no antialiasing; identical to torchvision when the crop is enlarged
  (always at 32 px), but border pixels of the crop may blend in the pixel just outside it
  (torchvision crops, then resizes). :func:`crop_resize` (any size) is antialiased like
  torchvision v2.
* Batched crops (:func:`crop_resize_batch`) stay float32 until :func:`to_uint8` at the end;
  per-example crops (any image size) are rounded to uint8 once after resampling, as torchvision
  on PIL images is, then the colour stage runs in float32 and rounds once at the end;
  torchvision rounds after every op.
* The blur kernel side is ~10% of the image (23 at 224 px, as BYOL/SimCLR) and at least
  ``2 ceil(2 sigma) + 1`` for the largest sigma (9 at 32 px), so small images get the blur
  strength of the references' PIL ``GaussianBlur(radius=sigma)`` (0.98-1.04x at 32 px; see
  :func:`gaussian_kernel_size`); torchvision's ``GaussianBlur`` takes a fixed kernel size.
* The hue rotation is the HSV round trip in closed form (:func:`hue_rotate_planes`; the
  reference :func:`adjust_hue` uses TF's HSV conversions): same formulas, float error only.
* The colour stage runs fused per example under XLA (:func:`colour_views`); the batched ops it
  replaces remain as its reference (:func:`colour_views_reference`), same draws, same pixels up
  to float rounding.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import tensorflow as tf

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  """``num`` independent stateless seeds (each shape [2]) derived from ``seed``."""
  seeds = tf.random.experimental.stateless_split(seed, num)
  return [seeds[i] for i in range(num)]


def fold_in(seed: tf.Tensor, data) -> tf.Tensor:
  """A new stateless seed from ``seed`` and an integer ``data`` (e.g. a step or a position)."""
  return tf.random.experimental.stateless_fold_in(seed, tf.cast(data, tf.int64))


# ----------------------------------------------------------------------------------------------
# Geometry: random resized crop and flip
# ----------------------------------------------------------------------------------------------


def sample_crop_boxes(seed: tf.Tensor, heights: tf.Tensor, widths: tf.Tensor,
                      scale: Sequence[float] = (0.08, 1.0),
                      ratio: Sequence[float] = (3 / 4, 4 / 3),
                      attempts: int = 10) -> tf.Tensor:
  """RandomResizedCrop's box, torchvision's algorithm, vectorised over a batch.

  For each example: up to ``attempts`` tries of area ``~ U(scale) * H * W`` and aspect ratio
  ``exp(U(log ratio))``; ``w = round(sqrt(area * r))``, ``h = round(sqrt(area / r))``; the first
  try that fits is placed uniformly (``top ~ randint(0, H - h)``). If none fits, the fallback is
  torchvision's: the largest centred crop whose ratio is clamped to ``ratio``.

  Args:
    seed: stateless seed, shape [2].
    heights, widths: source sizes in pixels, shape [B] (any numeric dtype).
    scale, ratio: as torchvision.
    attempts: tries before the fallback (torchvision: 10).

  Returns:
    float32 ``[B, 4]`` boxes ``(top, left, height, width)`` in pixels (integer valued).
  """
  hh = tf.cast(heights, tf.float32)[:, None]
  ww = tf.cast(widths, tf.float32)[:, None]
  n = tf.shape(hh)[0]
  u = tf.random.stateless_uniform(tf.stack([n, attempts, 4]), seed)
  area = hh * ww
  target_area = area * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + u[..., 1] * (log_hi - log_lo))
  w = tf.round(tf.sqrt(target_area * aspect))  # round half to even, as Python's round()
  h = tf.round(tf.sqrt(target_area / aspect))
  valid = (w > 0) & (w <= ww) & (h > 0) & (h <= hh)
  first = tf.argmax(tf.cast(valid, tf.int32), axis=1, output_type=tf.int32)
  found = tf.reduce_any(valid, axis=1)
  pick = lambda t: tf.gather(t, first, axis=1, batch_dims=1)  # noqa: E731
  h_s, w_s, u_top, u_left = pick(h), pick(w), pick(u[..., 2]), pick(u[..., 3])
  hh, ww = hh[:, 0], ww[:, 0]
  top = tf.floor(u_top * (hh - h_s + 1))
  left = tf.floor(u_left * (ww - w_s + 1))
  # Fallback: central crop with the aspect ratio clamped into `ratio`.
  in_ratio = ww / hh
  fb_w = tf.where(in_ratio < ratio[0], ww,
                  tf.where(in_ratio > ratio[1], tf.round(hh * ratio[1]), ww))
  fb_h = tf.where(in_ratio < ratio[0], tf.round(ww / ratio[0]),
                  tf.where(in_ratio > ratio[1], hh, hh))
  fb_top = tf.floor((hh - fb_h) / 2)
  fb_left = tf.floor((ww - fb_w) / 2)
  return tf.stack([tf.where(found, top, fb_top), tf.where(found, left, fb_left),
                   tf.where(found, h_s, fb_h), tf.where(found, w_s, fb_w)], axis=1)


def crop_resize_batch(images: tf.Tensor, boxes: tf.Tensor, size: int,
                      flips: tf.Tensor | None = None) -> tf.Tensor:
  """Crops pixel ``boxes`` (top, left, h, w) of equal-size ``images``, resizes to ``size``.

  One ``tf.image.crop_and_resize`` call for the whole batch. The box corners are chosen so the
  sampling grid is the half-pixel-centre grid of ``tf.image.resize``/torchvision (output pixel
  ``r`` samples source row ``top + (r + 0.5) * h / size - 0.5``), with edge clamping obtained by
  padding one replicated pixel. ``flips`` (bool [B]) mirrors those crops horizontally for free
  (the box's x corners are swapped). Bilinear *without* antialiasing: identical to torchvision
  when upsampling (every CIFAR crop), more aliasing when a crop is shrunk a lot — use
  :func:`crop_resize` (per example, antialiased) for large images. Pixels just outside the crop
  may contribute to its border pixels (torchvision crops first, then resizes).

  Args:
    images: ``[B, H, W, C]`` any numeric dtype.
    boxes: float32 ``[B, 4]`` pixel boxes from :func:`sample_crop_boxes`.
    size: output side.
    flips: optional bool ``[B]``.

  Returns:
    float32 ``[B, size, size, C]`` in the input's value range.
  """
  shape = tf.shape(images)
  height = tf.cast(shape[1], tf.float32)
  width = tf.cast(shape[2], tf.float32)
  padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode='SYMMETRIC')
  top, left, h, w = tf.unstack(boxes, axis=1)
  # Source coordinate of output pixel 0 (in the padded image) and the span to pixel size-1.
  y1 = top + 0.5 * h / size - 0.5 + 1.0
  x1 = left + 0.5 * w / size - 0.5 + 1.0
  y2 = y1 + h * (size - 1) / size
  x2 = x1 + w * (size - 1) / size
  if flips is not None:
    x1, x2 = tf.where(flips, x2, x1), tf.where(flips, x1, x2)
  # crop_and_resize maps normalised y in [0, 1] to y * (H_padded - 1).
  ny = height + 1.0
  nx = width + 1.0
  norm = tf.stack([y1 / ny, x1 / nx, y2 / ny, x2 / nx], axis=1)
  return tf.image.crop_and_resize(padded, norm, tf.range(shape[0]), [size, size],
                                  method='bilinear')


def crop_resize(image: tf.Tensor, box: tf.Tensor, size: int) -> tf.Tensor:
  """Crops one image to pixel ``box`` (top, left, h, w) and resizes to ``size`` x ``size``.

  Bilinear with antialiasing (``tf.image.resize(..., antialias=True)``), like torchvision v2's
  default ``antialias=True``; used for decoded images of any size (ImageNet, folders).
  Returns float32 in the input's value range.

  A crop enlarged on both axes takes the plain bilinear kernel (``antialias=False``, ~3x
  cheaper): antialiasing widens the kernel by the shrink factor only, so the two are the same
  resampling there (half-pixel centres, edge clamping).
  """
  b = tf.cast(box, tf.int32)
  crop = image[b[0]:b[0] + b[2], b[1]:b[1] + b[3], :]  # uint8 into resize: no float copy
  return tf.cond(
      tf.logical_and(b[2] <= size, b[3] <= size),
      lambda: tf.image.resize(crop, [size, size], method='bilinear', antialias=False),
      lambda: tf.image.resize(crop, [size, size], method='bilinear', antialias=True))


def normalize_box(box: tf.Tensor, height, width) -> tf.Tensor:
  """Pixel box(es) ``(top, left, h, w)`` -> the same divided by the source height/width."""
  hh = tf.cast(height, tf.float32)
  ww = tf.cast(width, tf.float32)
  scale = tf.stack([hh, ww, hh, ww], axis=-1)
  return box / scale


def sample_flips(seed: tf.Tensor, n, p: float = 0.5) -> tf.Tensor:
  """Bool ``[n]``: mirror each example with probability ``p`` (torchvision RandomHorizontalFlip)."""
  return tf.random.stateless_uniform(tf.reshape(n, [1]), seed) < p


# ----------------------------------------------------------------------------------------------
# Colour
# ----------------------------------------------------------------------------------------------


def _mask4(mask: tf.Tensor, dtype=tf.float32) -> tf.Tensor:
  """Bool ``[B]`` -> ``[B, 1, 1, 1]`` 0/1 of ``dtype``."""
  return tf.cast(mask, dtype)[:, None, None, None]


def _blend(a: tf.Tensor, b: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
  """``b`` where ``mask[i]`` else ``a``, per example (arithmetic: a broadcast ``tf.where`` is
  several times slower on CPU)."""
  return a + _mask4(mask, a.dtype) * (b - a)


def to_grayscale(images: tf.Tensor) -> tf.Tensor:
  """Luma ``0.2989 R + 0.587 G + 0.114 B`` as ``[..., 1]`` (torchvision's weights)."""
  return tf.tensordot(images, tf.constant(GRAY_WEIGHTS, images.dtype), axes=[[-1], [0]])[..., None]


def sample_apply(seed: tf.Tensor, n, p: float) -> tf.Tensor:
  """Bool ``[n]``: apply an op to each example with probability ``p`` (``U[0, 1) < p``)."""
  return tf.random.stateless_uniform(tf.reshape(n, [1]), seed) < p


def random_grayscale(images: tf.Tensor, seed: tf.Tensor, p: float) -> tf.Tensor:
  """torchvision ``RandomGrayscale(p)``: gray replicated to 3 channels, per example."""
  if p <= 0:
    return images
  apply = sample_apply(seed, tf.shape(images)[0], p)
  return _blend(images, to_grayscale(images), apply)


def adjust_hue(images: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
  """Rotates hue by ``delta[b]`` (fraction of the circle) through HSV, per example.

  Same definition as torchvision's ``adjust_hue`` on float images (RGB -> HSV, ``h = (h + d)
  mod 1``, HSV -> RGB); TF's HSV conversion handles gray pixels the same way up to float error.
  """
  hsv = tf.image.rgb_to_hsv(images)
  h, s, v = tf.unstack(hsv, axis=-1)
  h = tf.math.floormod(h + delta[:, None, None], 1.0)
  return tf.image.hsv_to_rgb(tf.stack([h, s, v], axis=-1))


def _apply_to_subset(images: tf.Tensor, mask: tf.Tensor, fn, *args: tf.Tensor) -> tf.Tensor:
  """``fn(images[mask], *args[mask])`` scattered back into ``images``; skips empty subsets."""
  idx = tf.where(mask)
  def run():
    sub = fn(tf.gather_nd(images, idx), *[tf.gather_nd(a, idx) for a in args])
    return tf.tensor_scatter_nd_update(images, idx, sub)
  return tf.cond(tf.shape(idx)[0] > 0, run, lambda: images)


def sample_jitter(seed: tf.Tensor, n, brightness: float, contrast: float, saturation: float,
                  hue: float, p: float = 1.0
                  ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
  """The per-example draws of ``RandomApply([ColorJitter(b, c, s, h)], p)`` for ``n`` examples.

  Returns ``(apply, factors, hue_delta, order)``: bool ``[n]`` (``U[0, 1) < p``); float32
  ``[n, 4]`` blend factors (brightness, contrast, saturation ``~ U[max(0, 1 - a), 1 + a]``, and
  1 in the hue column; all 1 where not applied); float32 ``[n]`` ``hue_delta ~ U[-hue, hue]``
  (0 where not applied); int32 ``[n, 4]`` a random order of the ops ``{0: brightness,
  1: contrast, 2: saturation, 3: hue}`` (``argsort`` of 4 uniforms: a uniform permutation, as
  ``torch.randperm(4)``).
  """
  n = tf.reshape(n, [1])
  s_apply, s_fac, s_order = split_seed(seed, 3)
  apply = tf.random.stateless_uniform(n, s_apply) < p
  u = tf.random.stateless_uniform(tf.concat([n, [4]], 0), s_fac)

  def factor(k, amount):
    lo = max(0.0, 1.0 - amount)
    return tf.where(apply, lo + u[:, k] * (1.0 + amount - lo), 1.0)
  fac = tf.stack([factor(0, brightness), factor(1, contrast), factor(2, saturation),
                  tf.ones_like(u[:, 0])], axis=1)  # [B, 4]; hue has no blend factor
  hue_delta = tf.where(apply, (2.0 * u[:, 3] - 1.0) * hue, 0.0)
  order = tf.argsort(tf.random.stateless_uniform(tf.concat([n, [4]], 0), s_order), axis=1)
  return apply, fac, hue_delta, tf.cast(order, tf.int32)


def color_jitter(images: tf.Tensor, seed: tf.Tensor, brightness: float, contrast: float,
                 saturation: float, hue: float, p: float = 1.0) -> tf.Tensor:
  """torchvision ``RandomApply([ColorJitter(b, c, s, h)], p)`` on a batch ``[B, H, W, 3]``.

  Per example: factors ``b ~ U[max(0, 1-brightness), 1+brightness]`` (same for contrast and
  saturation), ``hue_delta ~ U[-hue, hue]``, and a random order of the four operations
  (``torch.randperm(4)``). Each operation is torchvision's:

  * brightness: ``clip(b * x)``;
  * contrast: ``clip(c * x + (1 - c) * mean(gray(x)))`` (mean over the whole image);
  * saturation: ``clip(s * x + (1 - s) * gray(x))``;
  * hue: :func:`adjust_hue`.

  Brightness, contrast and saturation are all blends ``f * x + (1 - f) * target``, so each of
  the four stages is one blend with per-example coefficients (``f = 1`` where the stage's op is
  hue or jitter is not applied: the identity on [0, 1] images); the hue stage runs only on the
  examples whose op at that stage is hue.
  """
  apply, fac, hue_delta, order = sample_jitter(seed, tf.shape(images)[0], brightness, contrast,
                                               saturation, hue, p)
  for stage in range(4):
    op = order[:, stage]  # [B] in {0: brightness, 1: contrast, 2: saturation, 3: hue}
    if brightness > 0 or contrast > 0 or saturation > 0:
      f = tf.gather(fac, op, axis=1, batch_dims=1)[:, None, None, None]
      w_mean = (1.0 - f) * _mask4(op == 1)  # contrast: blend towards the mean gray
      w_gray = (1.0 - f) * _mask4(op == 2)  # saturation: blend towards gray
      gray = to_grayscale(images)
      mean = tf.reduce_mean(gray, axis=[1, 2, 3], keepdims=True)
      images = f * images + (w_mean * mean + w_gray * gray)
      images = tf.minimum(tf.maximum(images, 0.0), 1.0)
    if hue > 0:
      images = _apply_to_subset(images, (op == 3) & apply & (hue_delta != 0), adjust_hue,
                                hue_delta)
  return images


def gaussian_kernel_size(image_size: int, sigma_max: float = 2.0) -> int:
  """Odd kernel side: ~10% of the image (BYOL/SimCLR: 23 at 224 px), and at least
  ``2 ceil(2 sigma_max) + 1`` (+-2 sigma of the largest sigma drawn: 9 for sigma 2); at most
  the image side less one on each side (reflect padding). 23 at 224 px, 17 at 160, 11 at 100,
  9 at 99 px and below (32 px: CIFAR), down to 5 px.

  The references blur with PIL's ``GaussianBlur(radius=sigma)``, whose support grows with sigma
  at any image size. Measured at 32 px on CIFAR-10 (mean ``|blur(x) - x|``, ratio to PIL,
  ``benchmarks/blur_strength.py``): the former 3-tap kernel blurred 0.84x as much as PIL at
  sigma 1 and 0.54x at sigma 2 (0.70x over sigma ~ U(0.1, 2)); 9 taps: 1.04x, 0.98x (1.01x);
  13 taps (+-3 sigma): 1.04x, 1.00x (1.01x) for ~5x the extra cost of the fused colour stage.
  """
  side = max(3, int(0.1 * image_size) // 2 * 2 + 1, 2 * math.ceil(2 * sigma_max) + 1)
  return min(side, 2 * (int(image_size) - 1) + 1)


def gaussian_blur(images: tf.Tensor, sigma: tf.Tensor, kernel_size: int) -> tf.Tensor:
  """Separable Gaussian blur with a per-example ``sigma[b]`` and reflect padding.

  Like torchvision's ``gaussian_blur`` (reflect padding, kernel ``exp(-x^2 / 2 sigma^2)``
  normalised to sum 1). The batch is folded into the channel axis so one depthwise convolution
  blurs all examples with their own kernels.
  """
  radius = kernel_size // 2
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kern = tf.exp(-tf.square(x)[None, :] / (2.0 * tf.square(sigma)[:, None]))
  kern = kern / tf.reduce_sum(kern, axis=1, keepdims=True)  # [B, K]
  shape = tf.shape(images)
  b, h, w, c = shape[0], shape[1], shape[2], shape[3]
  # [B, H, W, C] -> [1, H, W, B*C]; channel b*C + c uses kernel b.
  folded = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), tf.stack([1, h, w, b * c]))
  per_channel = tf.repeat(kern, c, axis=0)  # [B*C, K]
  k_row = tf.transpose(per_channel)[None, :, :, None]  # [1, K, B*C, 1]
  k_col = tf.transpose(per_channel)[:, None, :, None]  # [K, 1, B*C, 1]
  out = tf.pad(folded, [[0, 0], [0, 0], [radius, radius], [0, 0]], mode='REFLECT')
  out = tf.nn.depthwise_conv2d(out, k_row, [1, 1, 1, 1], 'VALID')
  out = tf.pad(out, [[0, 0], [radius, radius], [0, 0], [0, 0]], mode='REFLECT')
  out = tf.nn.depthwise_conv2d(out, k_col, [1, 1, 1, 1], 'VALID')
  return tf.transpose(tf.reshape(out, tf.stack([h, w, b, c])), [2, 0, 1, 3])


def sample_blur(seed: tf.Tensor, n, p: float, sigma_range: Sequence[float] = (0.1, 2.0)
                ) -> tuple[tf.Tensor, tf.Tensor]:
  """Per-example blur draws: bool ``[n]`` apply (``U[0, 1) < p``), float32 ``[n]``
  ``sigma ~ U(sigma_range)``."""
  n = tf.reshape(n, [1])
  s_apply, s_sigma = split_seed(seed, 2)
  apply = tf.random.stateless_uniform(n, s_apply) < p
  sigma = sigma_range[0] + tf.random.stateless_uniform(n, s_sigma) * (
      sigma_range[1] - sigma_range[0])
  return apply, sigma


def random_gaussian_blur(images: tf.Tensor, seed: tf.Tensor, p: float,
                         sigma_range: Sequence[float] = (0.1, 2.0)) -> tf.Tensor:
  """Blur each example with probability ``p``, ``sigma ~ U(sigma_range)`` (BYOL, MoCo v2).

  Kernel side from :func:`gaussian_kernel_size` of the image side and the largest sigma (9 at
  32 px for sigma 2, 23 at 224 px). Only the selected examples are convolved.
  """
  if p <= 0:
    return images
  apply, sigma = sample_blur(seed, tf.shape(images)[0], p, sigma_range)
  ksize = gaussian_kernel_size(int(images.shape[1]), sigma_range[1])
  return _apply_to_subset(images, apply, lambda x, s: gaussian_blur(x, s, ksize), sigma)


def solarize(images: tf.Tensor, threshold: float = 0.5) -> tf.Tensor:
  """``x if x < threshold else 1 - x`` (torchvision ``solarize`` on [0, 1] floats)."""
  if threshold == 0.5:
    return 0.5 - tf.abs(images - 0.5)  # the same for x in [0, 1], in two cheap ops
  return tf.where(images >= threshold, 1.0 - images, images)


def random_solarize(images: tf.Tensor, seed: tf.Tensor, p: float,
                    threshold: float = 0.5) -> tf.Tensor:
  """Solarize each example with probability ``p`` (BYOL's second view: p = 0.2)."""
  if p <= 0:
    return images
  apply = sample_apply(seed, tf.shape(images)[0], p)
  return _apply_to_subset(images, apply, lambda x: solarize(x, threshold))


def to_uint8(images: tf.Tensor) -> tf.Tensor:
  """``[0, 1]`` float -> uint8 with rounding (``round(clip(x) * 255)``); uint8 passes through."""
  if images.dtype == tf.uint8:
    return images
  return tf.cast(tf.round(tf.clip_by_value(images, 0.0, 1.0) * 255.0), tf.uint8)


def to_unit_float(images: tf.Tensor) -> tf.Tensor:
  """uint8 ``[0, 255]`` -> float32 ``[0, 1]`` (``x / 255``); float images pass through."""
  if images.dtype == tf.uint8:
    return tf.cast(images, tf.float32) * (1.0 / 255.0)
  return tf.cast(images, tf.float32)


# ----------------------------------------------------------------------------------------------
# The colour stage fused per example (XLA)
# ----------------------------------------------------------------------------------------------
# The batched ops above each make one pass over the whole batch; at 224 px a view batch of 64 is
# 38 MB of float32, so the colour stage is memory-bound (and the hue stage runs TF's HSV
# kernels). :func:`colour_views` computes the same thing with one XLA program per call that
# walks the batch one example at a time: each example (600 KB at 224 px) stays in cache, XLA
# fuses the per-pixel arithmetic, and per-example branches skip the work of ops that are not
# applied (hue runs only at its stage, blur only on blurred examples). The random draws are the
# same as the batched ops' (``sample_*``), so :func:`colour_views_reference` (the batched ops in
# sequence) is its reference.


def _gray_planes(x: tf.Tensor) -> tf.Tensor:
  """Luma of a ``[3, H, W]`` image as ``[1, H, W]`` (:data:`GRAY_WEIGHTS`)."""
  return (GRAY_WEIGHTS[0] * x[0:1] + GRAY_WEIGHTS[1] * x[1:2]) + GRAY_WEIGHTS[2] * x[2:3]


def hue_rotate_planes(x: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
  """Hue rotation by ``delta`` (fraction of the circle) of a ``[3, H, W]`` image in [0, 1].

  The HSV round trip of :func:`adjust_hue` in closed form: with ``v = max(r, g, b)``,
  ``c = v - min(r, g, b)`` and the hexcone hue ``h6`` (``(g - b) / c`` if ``v = r``,
  ``(b - r) / c + 2`` if ``v = g``, ``(r - g) / c + 4`` otherwise; 0 if ``c = 0``; 6 x HSV's
  hue, mod 6), the rotated hue is ``h' = h6 + 6 delta`` and channel ``n`` (5 for red, 3 for
  green, 1 for blue) is ``v - c * clip(min(k, 4 - k), 0, 1)`` with ``k = (n + h') mod 6`` — the
  standard HSV -> RGB formula with ``s v = c``. Value and saturation are unchanged, as in HSV.
  """
  r, g, b = x[0], x[1], x[2]
  v = tf.maximum(tf.maximum(r, g), b)
  c = v - tf.minimum(tf.minimum(r, g), b)
  inv = 1.0 / tf.maximum(c, 1e-12)  # c = 0 (gray): every difference below is 0 too
  h6 = tf.where(v == r, (g - b) * inv, tf.where(v == g, (b - r) * inv + 2.0,
                                                (r - g) * inv + 4.0))
  h6 = h6 + 6.0 * delta

  def channel(n):
    k = n + h6
    k = k - 6.0 * tf.floor(k * (1.0 / 6.0))  # mod 6 (floor: vectorises, floormod does not)
    return v - c * tf.clip_by_value(tf.minimum(k, 4.0 - k), 0.0, 1.0)
  return tf.stack([channel(5.0), channel(3.0), channel(1.0)])


def _jitter_planes(x: tf.Tensor, factors: tf.Tensor, hue_delta: tf.Tensor,
                   order: tf.Tensor) -> tf.Tensor:
  """The four ColorJitter ops of one ``[3, H, W]`` image in ``order`` (see :func:`color_jitter`);
  a loop over the 4 stages whose body runs only the op of that stage."""
  def stage(k, x):
    ops = [lambda: tf.clip_by_value(factors[0] * x, 0.0, 1.0),
           lambda: tf.clip_by_value(factors[1] * x + (1.0 - factors[1]) *
                                    tf.reduce_mean(_gray_planes(x)), 0.0, 1.0),
           lambda: tf.clip_by_value(factors[2] * x + (1.0 - factors[2]) * _gray_planes(x),
                                    0.0, 1.0),
           lambda: hue_rotate_planes(x, hue_delta)]
    return k + 1, tf.switch_case(order[k], ops)
  return tf.while_loop(lambda k, _: k < 4, stage, (tf.constant(0), x))[1]


def _reflect_pad(x: tf.Tensor, radius: int, axis: int) -> tf.Tensor:
  """``radius`` pixels of reflect padding (edge not repeated, as ``tf.pad(mode='REFLECT')``)."""
  n = x.shape[axis]

  def part(start, stop):
    index = [slice(None)] * x.shape.rank
    index[axis] = slice(start, stop)
    return tf.reverse(x[tuple(index)], [axis])
  return tf.concat([part(1, radius + 1), x, part(n - radius - 1, n - 1)], axis)


def gaussian_blur_planes(x: tf.Tensor, sigma: tf.Tensor, kernel_size: int) -> tf.Tensor:
  """:func:`gaussian_blur` of one ``[C, H, W]`` image: the same normalised kernel and reflect
  padding, as a sum of shifted copies (``k_0 x + sum_i k_i (x_{+i} + x_{-i})``, the kernel is
  symmetric) along W, then along H."""
  radius = kernel_size // 2
  t = tf.range(-radius, radius + 1, dtype=tf.float32)
  kern = tf.exp(-tf.square(t) / (2.0 * tf.square(sigma)))
  kern = kern / tf.reduce_sum(kern)
  for axis in (2, 1):
    padded = _reflect_pad(x, radius, axis)

    def shifted(offset):
      begin = [0, 0, 0]
      begin[axis] = radius + offset
      size = list(x.shape)
      return tf.slice(padded, begin, size)
    out = kern[radius] * x
    for i in range(1, radius + 1):
      out = out + kern[radius + i] * (shifted(i) + shifted(-i))
    x = out
  return x


def _colour_one(args, *, jitter: bool, gray: bool, blur_size: int, solarize_threshold):
  """Colour stage of one ``[H, W, 3]`` image with its draws -> uint8 ``[H, W, 3]``."""
  (x, jit_on, factors, hue_delta, order, gray_on, blur_on, sigma, sol_on) = args
  x = tf.transpose(to_unit_float(x), [2, 0, 1])  # channel planes: contiguous rows
  if jitter:
    x = tf.cond(jit_on, lambda: _jitter_planes(x, factors, hue_delta, order), lambda: x)
  if gray:
    x = tf.cond(gray_on, lambda: tf.tile(_gray_planes(x), [3, 1, 1]), lambda: x)
  if blur_size:
    x = tf.cond(blur_on, lambda: gaussian_blur_planes(x, sigma, blur_size), lambda: x)
  if solarize_threshold is not None:
    x = tf.cond(sol_on, lambda: solarize(x, solarize_threshold), lambda: x)
  x = tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0)
  return tf.cast(tf.transpose(x, [1, 2, 0]), tf.uint8)


@functools.lru_cache(maxsize=None)
def _fused_colour_fn(jitter: bool, gray: bool, blur_size: int, solarize_threshold):
  """The XLA-compiled per-example loop for one combination of enabled ops (compiled once per
  input shape and process)."""
  one = functools.partial(_colour_one, jitter=jitter, gray=gray, blur_size=blur_size,
                          solarize_threshold=solarize_threshold)

  def run(images, *draws):
    spec = tf.TensorSpec(images.shape[1:], tf.uint8)
    return tf.map_fn(one, (images, *draws), fn_output_signature=spec)
  # No reduce_retracing: the per-example code needs the static image shape.
  return tf.function(run, jit_compile=True, autograph=False)


def sample_colour(seeds: Sequence[tf.Tensor], n, *, jitter: Sequence[float], jitter_p: float,
                  gray_p: float, blur_p: float, solarize_p: float,
                  blur_sigma: Sequence[float] = (0.1, 2.0)) -> dict[str, tf.Tensor]:
  """Every per-example draw of the colour stage, from ``seeds`` = (jitter, grayscale, blur,
  solarize) seeds — the draws :func:`color_jitter`, :func:`random_grayscale`,
  :func:`random_gaussian_blur` and :func:`random_solarize` make from the same seeds."""
  s_jit, s_gray, s_blur, s_sol = seeds
  apply, fac, hue_delta, order = sample_jitter(s_jit, n, *jitter, p=jitter_p)
  blur_on, sigma = sample_blur(s_blur, n, blur_p, blur_sigma)
  return {'jitter': apply, 'factors': fac, 'hue_delta': hue_delta, 'order': order,
          'gray': sample_apply(s_gray, n, gray_p), 'blur': blur_on, 'sigma': sigma,
          'solarize': sample_apply(s_sol, n, solarize_p)}


def colour_views(images: tf.Tensor, seeds: Sequence[tf.Tensor], *, jitter: Sequence[float],
                 jitter_p: float, gray_p: float, blur_p: float, solarize_p: float,
                 solarize_threshold: float = 0.5) -> tf.Tensor:
  """Colour jitter, grayscale, blur, solarize of a batch ``[B, H, W, 3]`` (float in [0, 1], or
  uint8) -> uint8, fused per example with XLA.

  The result is :func:`colour_views_reference` (same draws from the same ``seeds``) up to float
  rounding: each op computes the same formula (see :func:`hue_rotate_planes` for the hue,
  :func:`gaussian_blur_planes` for the blur), in a different order of float operations. The
  blur kernel side is :func:`gaussian_kernel_size` of the image height.
  """
  if not images.shape[1:].is_fully_defined():
    raise ValueError(f'colour_views needs a static image shape (XLA); got {images.shape}.')
  use_jitter = jitter_p > 0 and any(jitter)
  d = sample_colour(seeds, tf.shape(images)[0], jitter=jitter, jitter_p=jitter_p if use_jitter
                    else 0.0, gray_p=gray_p, blur_p=blur_p, solarize_p=solarize_p)
  blur_size = gaussian_kernel_size(int(images.shape[1]), 2.0) if blur_p > 0 else 0
  fn = _fused_colour_fn(use_jitter, gray_p > 0, blur_size,
                        float(solarize_threshold) if solarize_p > 0 else None)
  return fn(images, d['jitter'], d['factors'], d['hue_delta'],
            d['order'], d['gray'], d['blur'], d['sigma'], d['solarize'])


def colour_views_reference(images: tf.Tensor, seeds: Sequence[tf.Tensor], *,
                           jitter: Sequence[float], jitter_p: float, gray_p: float,
                           blur_p: float, solarize_p: float,
                           solarize_threshold: float = 0.5) -> tf.Tensor:
  """:func:`colour_views` as the batched ops in sequence: :func:`color_jitter`,
  :func:`random_grayscale`, :func:`random_gaussian_blur`, :func:`random_solarize`,
  :func:`to_uint8` (the obvious implementation, kept as the fused stage's reference)."""
  s_jit, s_gray, s_blur, s_sol = seeds
  x = to_unit_float(images)
  if jitter_p > 0 and any(jitter):
    x = color_jitter(x, s_jit, *jitter, p=jitter_p)
  x = random_grayscale(x, s_gray, gray_p)
  x = random_gaussian_blur(x, s_blur, blur_p)
  x = random_solarize(x, s_sol, solarize_p, solarize_threshold)
  return to_uint8(x)


# ----------------------------------------------------------------------------------------------
# Evaluation preprocessing
# ----------------------------------------------------------------------------------------------


def resize_shorter_center_crop(image: tf.Tensor, resize: int, size: int) -> tf.Tensor:
  """Resize the shorter side to ``resize`` (antialiased bilinear), then centre-crop ``size``.

  torchvision's ``Resize(resize)`` + ``CenterCrop(size)``; a no-op resize is skipped so
  CIFAR eval images pass through unchanged. Returns uint8 ``[size, size, 3]``.
  """
  static = image.shape
  if static[0] is not None and static[0] == static[1] == resize == size:
    return tf.cast(image, tf.uint8)  # already the eval size (CIFAR)
  shape = tf.shape(image)
  h = tf.cast(shape[0], tf.float32)
  w = tf.cast(shape[1], tf.float32)
  short = tf.minimum(h, w)
  new_h = tf.cast(tf.round(h * resize / short), tf.int32)
  new_w = tf.cast(tf.round(w * resize / short), tf.int32)
  same = tf.logical_and(tf.equal(new_h, shape[0]), tf.equal(new_w, shape[1]))
  resized = tf.cond(
      same, lambda: tf.cast(image, tf.float32),
      lambda: tf.image.resize(tf.cast(image, tf.float32), tf.stack([new_h, new_w]),
                              method='bilinear', antialias=True))
  top = (new_h - size) // 2
  left = (new_w - size) // 2
  crop = resized[top:top + size, left:left + size, :]
  crop = tf.ensure_shape(crop, [size, size, None])
  return tf.cast(tf.round(tf.clip_by_value(crop, 0.0, 255.0)), tf.uint8)
