"""The view augmentations in TensorFlow (tf.data): geometry and colour stages of every view.

The recipes themselves (``ViewSpec``, ``RECIPES``, ``resolve_views``) are in
:mod:`ssl_jax.data.recipes` (TF-free) and re-exported here.
"""
from __future__ import annotations

import functools
from typing import Sequence

import tensorflow as tf

from ssl_jax.data import augment
from ssl_jax.data.recipes import (MULTI_RES_TEMPLATE, RECIPES, ViewSpec, get_recipe,  # noqa: F401
                                  output_keys, resolve_views)


# ----------------------------------------------------------------------------------------------
# Geometry stage
# ----------------------------------------------------------------------------------------------


def crop_views_batch(images: tf.Tensor, seed: tf.Tensor, specs: Sequence[ViewSpec]
                     ) -> dict[str, tf.Tensor]:
  """Random resized crops + flips of a batch of equal-size uint8 images, every view.

  Returns ``{key: float32 [B, S, S, 3] in [0, 1]}`` plus ``'_box_<key>'`` (normalised boxes) and
  ``'_flip_<key>'`` (bool) entries. The flip is folded into the crop (free).
  """
  shape = tf.shape(images)
  n = shape[:1]
  heights = tf.fill(n, shape[1])
  widths = tf.fill(n, shape[2])
  out = {}
  for v, spec in enumerate(specs):
    s_box, s_flip = augment.split_seed(augment.fold_in(seed, v), 2)
    boxes = augment.sample_crop_boxes(s_box, heights, widths, spec.crop_scale, spec.crop_ratio)
    flips = augment.sample_flips(s_flip, shape[0], spec.flip_p)
    out[spec.key] = augment.crop_resize_batch(images, boxes, spec.size, flips) * (1 / 255)
    out['_box_' + spec.key] = augment.normalize_box(boxes, shape[1], shape[2])
    out['_flip_' + spec.key] = flips
  return out


def crop_views_example(image: tf.Tensor, seed: tf.Tensor, specs: Sequence[ViewSpec]
                       ) -> dict[str, tf.Tensor]:
  """Random resized crops + flips of one decoded image (any size), every view (antialiased)."""
  shape = tf.shape(image)
  out = {}
  for v, spec in enumerate(specs):
    s_box, s_flip = augment.split_seed(augment.fold_in(seed, v), 2)
    box = augment.sample_crop_boxes(s_box, shape[:1], shape[1:2], spec.crop_scale,
                                    spec.crop_ratio)[0]
    flip = augment.sample_flips(s_flip, 1, spec.flip_p)[0]
    crop = augment.crop_resize(image, box, spec.size) * (1 / 255)
    crop = tf.cond(flip, lambda c=crop: tf.reverse(c, axis=[1]), lambda c=crop: c)
    out[spec.key] = tf.ensure_shape(crop, [spec.size, spec.size, 3])
    out['_box_' + spec.key] = augment.normalize_box(box, shape[0], shape[1])
    out['_flip_' + spec.key] = flip
  return out


# ----------------------------------------------------------------------------------------------
# Colour stage (batched)
# ----------------------------------------------------------------------------------------------


def finish_views_batch(batch: dict[str, tf.Tensor], seed: tf.Tensor,
                       specs: Sequence[ViewSpec]) -> dict[str, tf.Tensor]:
  """Colour jitter, grayscale, blur, solarize each view of a batch; cast to uint8.

  ``batch`` holds the outputs of a ``crop_views_*`` function (batched). Returns the view images
  (uint8), the geometry keys the specs ask for, and every other entry of ``batch`` that does not
  start with ``'_'``.
  """
  out = {k: v for k, v in batch.items() if not k.startswith('_') and
         k not in {s.key for s in specs}}
  for v, spec in enumerate(specs):
    s_jit, s_gray, s_blur, s_sol = augment.split_seed(augment.fold_in(seed, v), 4)
    x = batch[spec.key]
    if spec.jitter_p > 0 and any(spec.jitter):
      x = augment.color_jitter(x, s_jit, *spec.jitter, p=spec.jitter_p)
    x = augment.random_grayscale(x, s_gray, spec.gray_p)
    x = augment.random_gaussian_blur(x, s_blur, spec.blur_p)
    x = augment.random_solarize(x, s_sol, spec.solarize_p)
    out[spec.key] = augment.to_uint8(x)
    if spec.box_key:
      out[spec.box_key] = tf.cast(batch['_box_' + spec.key], tf.float32)
    if spec.flip_key:
      out[spec.flip_key] = batch['_flip_' + spec.key]
  return out


# ----------------------------------------------------------------------------------------------
# Traced once per process
# ----------------------------------------------------------------------------------------------
# tf.data traces every map function each time a pipeline is built; the augmentation graphs have
# hundreds of ops, so tracing them costs seconds. Wrapping them in cached ``tf.function``s makes
# every later pipeline with the same views reuse the traced graph (a function call op).


@functools.lru_cache(maxsize=None)
def traced_crop_views_batch(specs: tuple[ViewSpec, ...]):
  """``crop_views_batch`` for ``specs`` as a cached ``tf.function(images, seed)``."""
  return tf.function(lambda images, seed: crop_views_batch(images, seed, specs),
                     autograph=False, reduce_retracing=True)


@functools.lru_cache(maxsize=None)
def traced_crop_views_example(specs: tuple[ViewSpec, ...]):
  """``crop_views_example`` for ``specs`` as a cached ``tf.function(image, seed)``."""
  return tf.function(lambda image, seed: crop_views_example(image, seed, specs),
                     autograph=False, reduce_retracing=True)


@functools.lru_cache(maxsize=None)
def traced_finish_views_batch(specs: tuple[ViewSpec, ...]):
  """``finish_views_batch`` for ``specs`` as a cached ``tf.function(batch, seed)``."""
  return tf.function(lambda batch, seed: finish_views_batch(batch, seed, specs),
                     autograph=False, reduce_retracing=True)
