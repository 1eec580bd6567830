"""The fast augmentation paths against their obvious references.

* :func:`augment.colour_views` (the colour stage fused per example under XLA) against
  :func:`augment.colour_views_reference` (the batched ops in sequence) with the same seeds:
  the same draws, so the same pixels up to float rounding;
* its closed-form hue rotation against the HSV round trip (:func:`augment.adjust_hue`), its
  shifted-copies blur against the depthwise convolution (:func:`augment.gaussian_blur`);
* :func:`augment.crop_resize`'s plain-bilinear path for enlarged crops against the antialiased
  resize, and its uint8 crops (:func:`views.crop_views_example`) against float crops;
* the per-example crops of the views of one image are independent draws of the recipe's law.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from ssl_jax.data import augment
from ssl_jax.data import views


def _images(n, size, seed=0):
  """Natural-ish test images: smooth colour gradients plus noise, some gray and saturated
  pixels (the hue formula's special cases)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  out = []
  for _ in range(n):
    a = rng.uniform(0.5, 3, size=3)
    phase = xx[..., None] * rng.uniform(1, 4) + yy[..., None] * rng.uniform(1, 4)
    base = 0.5 + 0.5 * np.sin(a[None, None] * phase + rng.uniform(0, 6, 3))
    img = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
    img[: size // 8] = img[: size // 8].mean(-1, keepdims=True)  # gray rows
    img[-size // 8:, :, 0] = 1.0  # saturated red
    out.append(img)
  return tf.constant(np.stack(out).astype(np.float32))


RECIPES = {
    'byol_view1': views.RECIPES['byol'][0],
    'byol_view2': views.RECIPES['byol'][1],
    'moco': views.RECIPES['moco'][0],
    # Every op on most examples: exercises every branch of the fused per-example code.
    'all_ops': dataclasses.replace(views.RECIPES['byol'][1], jitter_p=1.0, gray_p=0.5,
                                   blur_p=0.7, solarize_p=0.5),
}


@pytest.mark.parametrize('name', sorted(RECIPES))
@pytest.mark.parametrize('size', [32, 64])
def test_fused_colour_matches_reference(name, size):
  spec = RECIPES[name]
  x = _images(12, size)
  seeds = augment.split_seed(tf.constant([5, size], tf.int64), 4)
  kw = dict(jitter=spec.jitter, jitter_p=spec.jitter_p, gray_p=spec.gray_p, blur_p=spec.blur_p,
            solarize_p=spec.solarize_p)
  fast = augment.colour_views(x, seeds, **kw).numpy().astype(int)
  ref = augment.colour_views_reference(x, seeds, **kw).numpy().astype(int)
  assert fast.shape == ref.shape == (12, size, size, 3)
  diff = np.abs(fast - ref)
  # Float rounding only: an output differs by at most one level, and rarely.
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
  # ... and the ops did run (against the input merely rounded).
  plain = augment.to_uint8(x).numpy().astype(int)
  changed = np.abs(fast - plain).reshape(12, -1).max(1) > 2
  assert changed.mean() >= 0.5
  # uint8 input is float input x / 255 (up to float rounding).
  x8 = augment.to_uint8(x)
  diff = np.abs(augment.colour_views(x8, seeds, **kw).numpy().astype(int) -
                augment.colour_views(tf.cast(x8, tf.float32) / 255.0, seeds, **kw).numpy())
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_colour_draws_follow_the_recipe_laws():
  """The draws the fused stage consumes (:func:`augment.sample_colour`): torchvision's laws."""
  n = 4000
  seeds = augment.split_seed(tf.constant([1, 9], tf.int64), 4)
  d = augment.sample_colour(seeds, n, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2,
                            blur_p=0.1, solarize_p=0.2)
  assert abs(d['jitter'].numpy().mean() - 0.8) < 0.03
  assert abs(d['gray'].numpy().mean() - 0.2) < 0.03
  assert abs(d['blur'].numpy().mean() - 0.1) < 0.02
  assert abs(d['solarize'].numpy().mean() - 0.2) < 0.03
  on = d['jitter'].numpy()
  fac = d['factors'].numpy()[on]
  for k, amount in enumerate((0.4, 0.4, 0.2)):
    assert fac[:, k].min() >= 1 - amount - 1e-6 and fac[:, k].max() <= 1 + amount + 1e-6
    assert abs(fac[:, k].mean() - 1.0) < 0.02
  np.testing.assert_array_equal(d['factors'].numpy()[~on], 1.0)
  hue = d['hue_delta'].numpy()
  assert np.abs(hue).max() <= 0.1 and np.all(hue[~on] == 0)
  sig = d['sigma'].numpy()
  assert sig.min() >= 0.1 and sig.max() <= 2.0
  order = d['order'].numpy()
  np.testing.assert_array_equal(np.sort(order, 1), np.tile(np.arange(4), (n, 1)))
  # A uniform permutation: each op first a quarter of the time.
  np.testing.assert_allclose(np.bincount(order[:, 0], minlength=4) / n, 0.25, atol=0.03)


def test_hue_rotation_matches_hsv_round_trip():
  x = _images(8, 24, seed=1)
  deltas = np.array([-0.5, -0.3, -0.1, -0.01, 0.0, 0.05, 0.25, 0.5], np.float32)
  ref = augment.adjust_hue(x, tf.constant(deltas)).numpy()
  for i, d in enumerate(deltas):
    planes = augment.hue_rotate_planes(tf.transpose(x[i], [2, 0, 1]), tf.constant(d))
    np.testing.assert_allclose(tf.transpose(planes, [1, 2, 0]).numpy(), ref[i], atol=1e-5)
  # Pure colours rotate onto each other: red by 1/3 turn is green.
  red = tf.constant([[[1.0]], [[0.0]], [[0.0]]])
  np.testing.assert_allclose(augment.hue_rotate_planes(red, tf.constant(1 / 3)).numpy().ravel(),
                             [0, 1, 0], atol=1e-6)


@pytest.mark.parametrize('kernel_size', [3, 9, 23])
def test_blur_shifted_copies_match_depthwise_convolution(kernel_size):
  x = _images(4, 40, seed=2)
  sigma = tf.constant([0.1, 0.5, 1.3, 2.0])
  ref = augment.gaussian_blur(x, sigma, kernel_size).numpy()
  for i in range(4):
    out = augment.gaussian_blur_planes(tf.transpose(x[i], [2, 0, 1]), sigma[i], kernel_size)
    np.testing.assert_allclose(tf.transpose(out, [1, 2, 0]).numpy(), ref[i], atol=2e-6)


@pytest.mark.parametrize('box', [(3, 5, 40, 30), (0, 0, 64, 64), (10, 2, 100, 48),
                                 (0, 0, 120, 90), (7, 9, 17, 120)])
def test_crop_resize_equals_antialiased_resize(box):
  """Enlarged crops take the plain bilinear kernel: the same resampling as antialiased."""
  rng = np.random.default_rng(3)
  image = tf.constant(rng.integers(0, 256, size=(130, 140, 3)).astype(np.uint8))
  top, left, h, w = box
  ref = tf.image.resize(tf.cast(image[top:top + h, left:left + w], tf.float32), [64, 64],
                        method='bilinear', antialias=True).numpy()
  out = augment.crop_resize(image, tf.constant(box, tf.float32), 64).numpy()
  np.testing.assert_allclose(out, ref, atol=2e-3)


def test_uint8_crops_match_float_crops_after_colour():
  """Per-example crops are rounded to uint8 before the colour stage: the final views differ from
  colouring the float crops by little (rounding, amplified at most by the jitter factors)."""
  rng = np.random.default_rng(4)
  yy, xx = np.mgrid[0:90, 0:120] / 90.0
  image = np.stack([128 + 100 * np.sin(3 * xx + 2 * yy), 128 + 90 * np.cos(4 * yy),
                    128 + 60 * np.sin(5 * xx)], -1) + rng.normal(0, 3, (90, 120, 3))
  image = tf.constant(np.clip(image, 0, 255).astype(np.uint8))
  specs = tuple(dataclasses.replace(s, size=48) for s in views.RECIPES['byol'])
  seed = tf.constant([2, 3], tf.int64)
  crops = [views.crop_views_example(image, augment.fold_in(seed, i), specs) for i in range(16)]
  batch = {k: tf.stack([c[k] for c in crops]) for k in crops[0]}
  assert batch['view1'].dtype == tf.uint8
  as_float = dict(batch)
  for s in specs:  # the float crops: the same boxes and flips, not rounded
    float_crops = []
    for i, c in enumerate(crops):
      box = c['_box_' + s.key].numpy() * np.array([90, 120, 90, 120])
      x = augment.crop_resize(image, tf.constant(np.round(box), tf.float32), 48)
      float_crops.append(tf.reverse(x, [1]) if c['_flip_' + s.key].numpy() else x)
    as_float[s.key] = tf.stack(float_crops) / 255.0
    # The uint8 crop is the float crop rounded.
    np.testing.assert_allclose(batch[s.key].numpy(), as_float[s.key].numpy() * 255, atol=0.5 + 1e-3)
  out8 = views.finish_views_batch(batch, seed, specs)
  out32 = views.finish_views_batch(as_float, seed, specs)
  for s in specs:
    diff = np.abs(out8[s.key].numpy().astype(int) - out32[s.key].numpy().astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.5, (s.key, diff.max(), diff.mean())


def test_per_example_views_are_independent_with_the_recipe_law():
  """The views of one image (uint8 crops now) draw independent boxes and flips, each with the
  batched sampler's law."""
  image = tf.zeros([100, 150, 3], tf.uint8)
  specs = tuple(dataclasses.replace(s, size=8) for s in views.RECIPES['byol'])
  fn = tf.function(lambda s: views.crop_views_example(image, s, specs))
  root = tf.constant([4, 4], tf.int64)
  outs = [fn(augment.fold_in(root, i)) for i in range(400)]
  area = np.array([[o['_box_' + s.key][2].numpy() * o['_box_' + s.key][3].numpy()
                    for s in specs] for o in outs])
  flips = np.array([[o['_flip_' + s.key].numpy() for s in specs] for o in outs])
  assert (area[:, 0] == area[:, 1]).mean() < 0.05
  assert abs(np.corrcoef(area[:, 0], area[:, 1])[0, 1]) < 0.15
  # Each view's areas have the law of the batched sampler (tested against torchvision's).
  boxes = augment.sample_crop_boxes(root, tf.fill([4000], 100), tf.fill([4000], 150)).numpy()
  law = np.quantile(boxes[:, 2] * boxes[:, 3] / (100 * 150), [0.1, 0.5, 0.9])
  for v in range(2):
    np.testing.assert_allclose(np.quantile(area[:, v], [0.1, 0.5, 0.9]), law, atol=0.06)
  assert np.all(np.abs(flips.mean(0) - 0.5) < 0.08)
  assert abs(np.corrcoef(flips[:, 0], flips[:, 1])[0, 1]) < 0.15
