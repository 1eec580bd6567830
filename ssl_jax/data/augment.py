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
* Everything stays float32 until :func:`to_uint8` at the end; torchvision v2 on uint8 tensors
  rounds after every op.
* The blur kernel side is ~10% of the image (23 at 224 px, as BYOL/SimCLR); torchvision's
  ``GaussianBlur`` takes a fixed kernel size.
* HSV conversions are TF's (same formulas; float error on gray pixels).
"""
from __future__ import annotations

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
  """
  b = tf.cast(box, tf.int32)
  crop = image[b[0]:b[0] + b[2], b[1]:b[1] + b[3], :]
  return tf.image.resize(tf.cast(crop, tf.float32), [size, size], method='bilinear',
                         antialias=True)


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, size: int,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[tf.Tensor, tf.Tensor]:
  """torchvision ``RandomResizedCrop`` for one image, returning the crop and its box.

  Returns:
    (float32 ``[size, size, C]``, float32 ``[4]`` box ``(y0, x0, h, w)`` normalised by the
    source height/width.)
  """
  shape = tf.shape(image)
  box = sample_crop_boxes(seed, shape[:1], shape[1:2], scale, ratio)[0]
  return crop_resize(image, box, size), normalize_box(box, shape[0], shape[1])


def normalize_box(box: tf.Tensor, height, width) -> tf.Tensor:
  """Pixel box(es) ``(top, left, h, w)`` -> the same divided by the source height/width."""
  hh = tf.cast(height, tf.float32)
  ww = tf.cast(width, tf.float32)
  scale = tf.stack([hh, ww, hh, ww], axis=-1)
  return box / scale


def sample_flips(seed: tf.Tensor, n, p: float = 0.5) -> tf.Tensor:
  """Bool ``[n]``: mirror each example with probability ``p`` (torchvision RandomHorizontalFlip)."""
  return tf.random.stateless_uniform(tf.reshape(n, [1]), seed) < p


def random_flip(images: tf.Tensor, seed: tf.Tensor, p: float = 0.5
                ) -> tuple[tf.Tensor, tf.Tensor]:
  """Horizontal flip of each example of ``[B, H, W, C]`` with probability ``p``.

  Returns the images and the bool ``[B]`` flags (True = mirrored), which geometry-aware
  methods (APS) need to map patches between views. (The pipeline folds the flip into the crop
  instead: :func:`crop_resize_batch` with ``flips``.)
  """
  flip = sample_flips(seed, tf.shape(images)[0], p)
  return _blend(images, tf.reverse(images, axis=[2]), flip), flip


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


def random_grayscale(images: tf.Tensor, seed: tf.Tensor, p: float) -> tf.Tensor:
  """torchvision ``RandomGrayscale(p)``: gray replicated to 3 channels, per example."""
  if p <= 0:
    return images
  apply = tf.random.stateless_uniform(tf.shape(images)[:1], seed) < p
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
  n = tf.shape(images)[:1]
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


def gaussian_kernel_size(image_size: int) -> int:
  """Odd kernel side ~ 10% of the image (BYOL/SimCLR: 23 at 224; 3 at 32)."""
  return max(3, int(0.1 * image_size) // 2 * 2 + 1)


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


def random_gaussian_blur(images: tf.Tensor, seed: tf.Tensor, p: float,
                         sigma_range: Sequence[float] = (0.1, 2.0)) -> tf.Tensor:
  """Blur each example with probability ``p``, ``sigma ~ U(sigma_range)`` (BYOL, MoCo v2).

  Kernel side from :func:`gaussian_kernel_size` of the image side. Only the selected examples
  are convolved.
  """
  if p <= 0:
    return images
  n = tf.shape(images)[:1]
  s_apply, s_sigma = split_seed(seed, 2)
  apply = tf.random.stateless_uniform(n, s_apply) < p
  sigma = sigma_range[0] + tf.random.stateless_uniform(n, s_sigma) * (
      sigma_range[1] - sigma_range[0])
  ksize = gaussian_kernel_size(int(images.shape[1]))
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
  apply = tf.random.stateless_uniform(tf.shape(images)[:1], seed) < p
  return _apply_to_subset(images, apply, lambda x: solarize(x, threshold))


def to_uint8(images: tf.Tensor) -> tf.Tensor:
  """``[0, 1]`` float -> uint8 with rounding (``round(clip(x) * 255)``)."""
  return tf.cast(tf.round(tf.clip_by_value(images, 0.0, 1.0) * 255.0), tf.uint8)


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
