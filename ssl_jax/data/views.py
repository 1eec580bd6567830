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
  """Random resized crops + flips of one decoded image (any size), every view (antialiased).

  Returns ``{key: uint8 [S, S, 3]}`` (the resampled pixels rounded, as torchvision on PIL or
  uint8 tensors: a quarter of the memory of float crops to batch, and the colour stage reads
  uint8) plus ``'_box_<key>'`` and ``'_flip_<key>'`` entries.
  """
  shape = tf.shape(image)
  out = {}
  for v, spec in enumerate(specs):
    s_box, s_flip = augment.split_seed(augment.fold_in(seed, v), 2)
    box = augment.sample_crop_boxes(s_box, shape[:1], shape[1:2], spec.crop_scale,
                                    spec.crop_ratio)[0]
    flip = augment.sample_flips(s_flip, 1, spec.flip_p)[0]
    crop = tf.saturate_cast(tf.round(augment.crop_resize(image, box, spec.size)), tf.uint8)
    crop = tf.cond(flip, lambda c=crop: tf.reverse(c, axis=[1]), lambda c=crop: c)
    out[spec.key] = tf.ensure_shape(crop, [spec.size, spec.size, 3])
    out['_box_' + spec.key] = augment.normalize_box(box, shape[0], shape[1])
    out['_flip_' + spec.key] = flip
  return out


# ----------------------------------------------------------------------------------------------
# Colour stage (batched)
# ----------------------------------------------------------------------------------------------


def finish_views_batch(batch: dict[str, tf.Tensor], seed: tf.Tensor,
                       specs: Sequence[ViewSpec], fused: bool = True) -> dict[str, tf.Tensor]:
  """Colour jitter, grayscale, blur, solarize each view of a batch; cast to uint8.

  ``batch`` holds the outputs of a ``crop_views_*`` function (batched; views float in [0, 1] or
  uint8). Returns the view images (uint8), the geometry keys the specs ask for, and every other
  entry of ``batch`` that does not start with ``'_'``. ``fused``: :func:`augment.colour_views`
  (XLA, per example); else :func:`augment.colour_views_reference` (the batched ops; same draws,
  same result up to float rounding).
  """
  out = {k: v for k, v in batch.items() if not k.startswith('_') and
         k not in {s.key for s in specs}}
  for v, spec in enumerate(specs):
    seeds = augment.split_seed(augment.fold_in(seed, v), 4)
    colour = dict(jitter=spec.jitter, jitter_p=spec.jitter_p, gray_p=spec.gray_p,
                  blur_p=spec.blur_p, solarize_p=spec.solarize_p)
    x = tf.ensure_shape(batch[spec.key], [None, spec.size, spec.size, 3])  # static for XLA
    if not (spec.jitter_p > 0 and any(spec.jitter)) and max(
        spec.gray_p, spec.blur_p, spec.solarize_p) <= 0:
      out[spec.key] = augment.to_uint8(x)  # no colour op (MSF's weak view)
    elif fused:
      out[spec.key] = augment.colour_views(x, seeds, **colour)
    else:
      out[spec.key] = augment.colour_views_reference(x, seeds, **colour)
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
