"""Tests of ssl_jax.data: recipes, determinism/resume, host slices, folders, eval, geometry."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from ssl_jax import data
from ssl_jax.data import augment
from ssl_jax.data import sources
from ssl_jax.data import views

REAL_TFDS = os.environ.get('TFDS_DATA_DIR')
HAVE_CIFAR = bool(REAL_TFDS) and os.path.isdir(os.path.join(REAL_TFDS, 'cifar10'))


def take(it, n):
  return list(itertools.islice(it, n))


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def cifar_cfg(views_name='byol', **overrides):
  cfg = data.default_data_config('cifar10')
  cfg.views = views_name
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def train_iter(cfg, gbs=8, seed=0, start_step=0, pi=0, pc=1):
  return data.make_train_iterator(cfg, global_batch_size=gbs, seed=seed, start_step=start_step,
                                  process_index=pi, process_count=pc)


# ------------------------------------------------------------------------------------------------
# Image folders built on the fly
# ------------------------------------------------------------------------------------------------


def _write_image(path, value, size=(20, 24), fmt=None):
  """A distinct image per `value`: constant colour plus a gradient."""
  h, w = size
  yy, xx = np.mgrid[0:h, 0:w]
  img = np.stack([np.full((h, w), value % 256), (xx * 5) % 256, (yy * 7) % 256], -1)
  Image.fromarray(img.astype(np.uint8)).save(path, format=fmt)


@pytest.fixture(scope='module')
def labelled_folder(tmp_path_factory):
  """root/train/<c{k}>/: 12 classes x 1 image (unique labels), and root/val with 7 images."""
  root = tmp_path_factory.mktemp('folder')
  for split, n in (('train', 12), ('val', 7)):
    for k in range(n):
      d = root / split / f'c{k:02d}'
      d.mkdir(parents=True)
      ext = 'jpg' if k % 2 else 'png'
      _write_image(d / f'img{k}.{ext}', 10 * k + 1)
  return str(root)


def folder_cfg(root, views_name='moco'):
  cfg = data.default_data_config('imagenet100')
  cfg.folder_root = root
  cfg.image_size = 16
  cfg.eval_resize = 16
  cfg.views = views_name
  return cfg


# ------------------------------------------------------------------------------------------------
# Recipes: keys, shapes, dtypes
# ------------------------------------------------------------------------------------------------


EXPECTED_KEYS = {
    'byol': ['view1', 'view2'], 'moco': ['view1', 'view2'], 'weak_strong': ['weak', 'strong'],
    'multi_res': ['view1', 'view2', 'view_lr0', 'view_lr1'],
    'aps': ['view1', 'view2', 'box1', 'box2', 'flip1', 'flip2']}


def _check_batch(batch, recipe, b):
  expected = EXPECTED_KEYS[recipe]
  assert sorted(batch) == sorted(expected + ['label'])
  sizes = {'view_lr0': 24, 'view_lr1': 16}
  for k in expected:
    if not k.startswith(('box', 'flip')):
      side = sizes.get(k, 32)
      assert batch[k].dtype == np.uint8 and batch[k].shape == (b, side, side, 3), k
  assert batch['label'].dtype == np.int32 and batch['label'].shape == (b,)
  if recipe == 'aps':
    for i in '12':
      box = batch['box' + i]
      assert box.dtype == np.float32 and box.shape == (b, 4)
      assert batch['flip' + i].dtype == bool and batch['flip' + i].shape == (b,)
      assert np.all(box >= 0) and np.all(box[:, :2] + box[:, 2:] <= 1 + 1e-6)
      assert np.all(box[:, 2] * box[:, 3] >= 0.15 - 0.02)
  first, second = expected[:2]
  assert not np.array_equal(batch[first], batch[second])  # independent augmentations


@pytest.mark.parametrize('recipe', sorted(views.RECIPES))
def test_recipe_keys_shapes_dtypes(recipe):
  """Every recipe's batch stage, run eagerly (cheap) on a random uint8 batch."""
  cfg = cifar_cfg(recipe)
  specs = views.resolve_views(cfg)
  images = tf.constant(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), np.uint8))
  seed = tf.constant([1, 2], tf.int64)
  batch = views.crop_views_batch(images, seed, specs)
  batch['label'] = tf.range(8, dtype=tf.int32)
  out = {k: v.numpy() for k, v in views.finish_views_batch(batch, seed, specs).items()}
  _check_batch(out, recipe, 8)


def test_recipe_table_and_dataset_switches():
  cfg = cifar_cfg('byol')
  v1, v2 = views.resolve_views(cfg)
  assert v1.blur_p == v2.blur_p == 0.0  # CIFAR: no blur
  assert v1.solarize_p == 0.0 and v2.solarize_p == 0.2
  assert v1.jitter == (0.4, 0.4, 0.2, 0.1) and v1.crop_scale == (0.08, 1.0)
  cfg = data.default_data_config('imagenet')
  v1, v2 = views.resolve_views(cfg)
  assert (v1.blur_p, v2.blur_p) == (1.0, 0.1) and v1.size == 224
  cfg.views = 'weak_strong'
  weak, strong = views.resolve_views(cfg)
  assert weak.jitter_p == 0 and weak.gray_p == 0 and weak.blur_p == 0
  assert strong.jitter == (0.4, 0.4, 0.4, 0.1) and strong.blur_p == 0.5
  assert strong.crop_scale == (0.2, 1.0)
  cfg.views = 'multi_res'
  specs = views.resolve_views(cfg)
  assert [s.size for s in specs] == [224, 224, 160, 128, 96]
  cfg.crop_scale = (0.3, 0.9)
  assert all(s.crop_scale == (0.3, 0.9) for s in views.resolve_views(cfg))


# ------------------------------------------------------------------------------------------------
# Determinism and resume
# ------------------------------------------------------------------------------------------------


def _check_resume(cfg, gbs, steps, resume_points, seed=3):
  full = take(train_iter(cfg, gbs=gbs, seed=seed), steps)
  for s in resume_points:
    resumed = take(train_iter(cfg, gbs=gbs, seed=seed, start_step=s), steps - s)
    assert_batches_equal(resumed, full[s:])
  return full


def test_resume_equals_uninterrupted_array_source():
  with tfds.testing.mock_data(num_examples=20):
    cfg = cifar_cfg('aps')
    assert data.steps_per_epoch(cfg, 8) == 2  # 4 examples dropped each epoch
    # Resume mid-epoch 0; the resumed stream then crosses the epoch boundaries at 2 and 4.
    full = _check_resume(cfg, 8, 5, resume_points=[1])
    _check_batch(full[0], 'aps', 8)
    other = next(train_iter(cfg, gbs=8, seed=4))
  # Different seeds give different batches.
  assert not np.array_equal(full[0]['view1'], other['view1'])


def test_resume_equals_uninterrupted_streamed_tfds():
  with tfds.testing.mock_data(num_examples=20):
    cfg = cifar_cfg('aps', cache=False, shuffle_buffer=16)
    _check_resume(cfg, 8, 4, resume_points=[3])  # two epochs; resume skips into epoch 1


def test_folder_epochs_are_permutations_and_resume(labelled_folder):
  cfg = folder_cfg(labelled_folder)
  assert data.num_examples(cfg, 'train') == 12
  assert data.steps_per_epoch(cfg, 4) == 3
  full = _check_resume(cfg, 4, 6, resume_points=[4])
  labels = np.array([b['label'] for b in full]).reshape(2, 12)  # 2 epochs of 12 unique labels
  for epoch in labels:
    assert sorted(epoch) == list(range(12))
  assert not np.array_equal(labels[0], labels[1])  # reshuffled every epoch
  assert full[0]['view1'].shape == (4, 16, 16, 3)


def test_process_slices_disjoint_and_cover(labelled_folder):
  cfg = folder_cfg(labelled_folder)
  per_host = []
  for pi in range(2):
    # global batch 4 -> local 2; one epoch = 3 steps = 6 examples per host.
    batches = take(train_iter(cfg, gbs=4, pi=pi, pc=2), 3)
    assert all(b['view1'].shape[0] == 2 for b in batches)
    per_host.append(set(np.concatenate([b['label'] for b in batches]).tolist()))
  assert not per_host[0] & per_host[1]
  assert per_host[0] | per_host[1] == set(range(12))


def test_batch_size_must_divide_process_count():
  with pytest.raises(ValueError, match=r'global_batch_size=10.*process_count=4'):
    data.local_batch_size(10, 4)


# ------------------------------------------------------------------------------------------------
# Image folders: unlabelled, corrupt files
# ------------------------------------------------------------------------------------------------


def test_folder_without_labels(tmp_path):
  split = tmp_path / 'train'
  split.mkdir()
  for k in range(6):
    _write_image(split / f'{k}.png', k)
  cfg = folder_cfg(str(tmp_path))
  batch = next(train_iter(cfg, gbs=4))
  np.testing.assert_array_equal(batch['label'], -1)
  assert batch['view1'].shape == (4, 16, 16, 3)


def test_folder_skips_corrupt_jpeg_and_names_it(tmp_path, caplog):
  for cls in ('a', 'b'):
    (tmp_path / 'train' / cls).mkdir(parents=True)
    for k in range(3):
      _write_image(tmp_path / 'train' / cls / f'{k}.jpg', k)
  bad = tmp_path / 'train' / 'b' / 'broken.jpg'
  good = (tmp_path / 'train' / 'a' / '0.jpg').read_bytes()
  bad.write_bytes(good[:len(good) // 3])  # truncated JPEG: header fine, data cut
  (tmp_path / 'train' / 'a' / 'noise.jpg').write_bytes(os.urandom(300))
  cfg = folder_cfg(str(tmp_path))
  with caplog.at_level(logging.WARNING, logger='ssl_jax.data'):
    n = data.num_examples(cfg, 'train')
  assert n == 6
  text = caplog.text
  assert str(bad) in text and 'noise.jpg' in text
  assert 'Skipped 2 of 8' in text
  labels = np.concatenate([b['label'] for b in take(train_iter(cfg, gbs=2), 3)])
  assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
  assert data.num_skipped(cfg, 'train') == 2


def test_folder_validate_none_names_the_bad_file(tmp_path):
  """With validation off, the decoder's TF error used to name no file."""
  (tmp_path / 'train' / 'a').mkdir(parents=True)
  for k in range(4):
    _write_image(tmp_path / 'train' / 'a' / f'{k}.png', k)
  (tmp_path / 'train' / 'a' / 'noise.jpg').write_bytes(os.urandom(300))
  cfg = folder_cfg(str(tmp_path))
  cfg.folder_validate = 'none'
  data.clear_cache()
  with pytest.raises(data.DataConfigError, match=r"undecodable image file\(s\).*noise\.jpg.*"
                     r"folder_validate=decode"):
    take(train_iter(cfg, gbs=5), 2)


# ------------------------------------------------------------------------------------------------
# Eval iterator
# ------------------------------------------------------------------------------------------------


def test_eval_iterator_pads_last_batch_with_mask():
  with tfds.testing.mock_data(num_examples=10):
    cfg = cifar_cfg()
    batches = list(data.make_eval_iterator(cfg, split='test', global_batch_size=4,
                                           process_index=0, process_count=1))
  assert len(batches) == 3
  for b in batches:
    assert b['image'].dtype == np.uint8 and b['image'].shape == (4, 32, 32, 3)
    assert b['label'].dtype == np.int32 and b['mask'].dtype == bool
  np.testing.assert_array_equal(batches[-1]['mask'], [True, True, False, False])
  np.testing.assert_array_equal(batches[-1]['label'][2:], -1)
  assert batches[-1]['image'][2:].max() == 0


def test_eval_iterator_hosts_same_batch_count(labelled_folder):
  cfg = folder_cfg(labelled_folder)
  out = [list(data.make_eval_iterator(cfg, split='val', global_batch_size=4, process_index=pi,
                                      process_count=2)) for pi in range(2)]
  assert len(out[0]) == len(out[1]) == 2  # 3 and 4 images, local batch 2
  masks = [np.concatenate([b['mask'] for b in host]) for host in out]
  assert masks[0].sum() == 3 and masks[1].sum() == 4
  labels = np.concatenate([np.concatenate([b['label'] for b in host])[m]
                           for host, m in zip(out, masks)])
  np.testing.assert_array_equal(labels, np.arange(7))  # in order, disjoint, covering
  assert out[0][0]['image'].shape == (2, 16, 16, 3)


# ------------------------------------------------------------------------------------------------
# Geometry: APS boxes and flips map view pixels to the right source pixels
# ------------------------------------------------------------------------------------------------


def _gradient(h, w):
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  return np.stack([3 * xx + 10, 3 * yy + 10, np.zeros_like(xx)], -1)  # linear in x and y


@pytest.mark.parametrize('per_example', [False, True])
def test_aps_boxes_and_flips_match_crop(per_example):
  h = w = 48
  size = 16
  spec = dataclasses.replace(views.RECIPES['aps'][0], size=size, jitter_p=0.0, gray_p=0.0)
  specs = (spec,)
  image = _gradient(h, w)
  seed = tf.constant([7, 11], tf.int64)
  n = 16
  if per_example:
    outs = [views.crop_views_example(tf.constant(image), augment.fold_in(seed, i), specs)
            for i in range(n)]
    batch = {k: tf.stack([o[k] for o in outs]) for k in outs[0]}
  else:
    batch = views.crop_views_batch(tf.constant(np.repeat(image[None].astype(np.uint8), n, 0)),
                                   seed, specs)
  out = views.finish_views_batch(batch, seed, specs)
  pixels = out['view1'].numpy().astype(np.float32)
  boxes, flips = out['box1'].numpy(), out['flip1'].numpy()
  assert flips.any() and not flips.all()
  rr, cc = np.mgrid[0:size, 0:size].astype(np.float32)
  for px, (y0, x0, bh, bw), flip in zip(pixels, boxes, flips):
    c_src = size - 1 - cc if flip else cc
    y = (y0 + (rr + 0.5) / size * bh) * h - 0.5  # source pixel coordinates
    x = (x0 + (c_src + 0.5) / size * bw) * w - 0.5
    # Away from the crop's borders, where resampling clamps (the antialiased kernel of the
    # per-example path is as wide as the shrink factor).
    m = 1 + max(bh * h, bw * w) / size
    top, left = y0 * h, x0 * w
    inside = ((y >= top + m) & (y <= top + bh * h - 1 - m) &
              (x >= left + m) & (x <= left + bw * w - 1 - m))
    assert inside.mean() > 0.1
    np.testing.assert_allclose(px[..., 0][inside], 3 * x[inside] + 10, atol=1.01)
    np.testing.assert_allclose(px[..., 1][inside], 3 * y[inside] + 10, atol=1.01)


def _torchvision_crop_areas(rng, n, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision RandomResizedCrop.get_params, transcribed (area fractions only)."""
  out = []
  for _ in range(n):
    for _ in range(10):
      target = height * width * rng.uniform(*scale)
      aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
      w, h = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
      if 0 < w <= width and 0 < h <= height:
        out.append(h * w / (height * width))
        break
    else:
      out.append(1.0)
  return np.array(out)


def test_crop_boxes_follow_torchvision():
  seed = tf.constant([1, 2], tf.int64)
  n = 4000
  boxes = augment.sample_crop_boxes(seed, tf.fill([n], 32), tf.fill([n], 40), (0.08, 1.0),
                                    (3 / 4, 4 / 3)).numpy()
  top, left, bh, bw = boxes.T
  assert np.all(top >= 0) and np.all(left >= 0)
  assert np.all(top + bh <= 32) and np.all(left + bw <= 40)
  assert np.all(boxes == np.round(boxes))  # integer pixel boxes like torchvision
  ratio = bw / bh
  assert ratio.min() > 0.6 and ratio.max() < 1.6
  area = bh * bw / (32 * 40)
  ref = _torchvision_crop_areas(np.random.default_rng(0), n, 32, 40)
  np.testing.assert_allclose(np.quantile(area, [0.1, 0.5, 0.9]), np.quantile(ref, [0.1, 0.5, 0.9]),
                             atol=0.03)
  # Placement is uniform: centres spread over the image.
  assert abs(np.mean(top + bh / 2) - 16) < 1 and abs(np.mean(left + bw / 2) - 20) < 1


# ------------------------------------------------------------------------------------------------
# Colour ops
# ------------------------------------------------------------------------------------------------


def test_color_ops_semantics():
  rng = np.random.default_rng(0)
  x = tf.constant(rng.uniform(size=(6, 8, 8, 3)).astype(np.float32))
  seed = tf.constant([0, 1], tf.int64)
  # p = 0 is the identity; zero strengths are the identity.
  np.testing.assert_allclose(augment.color_jitter(x, seed, 0.4, 0.4, 0.4, 0.1, p=0.0), x)
  np.testing.assert_allclose(augment.color_jitter(x, seed, 0, 0, 0, 0, p=1.0), x, atol=1e-6)
  y = augment.color_jitter(x, seed, 0.4, 0.4, 0.4, 0.1, p=1.0).numpy()
  assert y.min() >= 0 and y.max() <= 1 and not np.allclose(y, x)
  # Hue rotation by a full turn is the identity; by 0 too.
  np.testing.assert_allclose(augment.adjust_hue(x, tf.ones([6])), x, atol=1e-5)
  gray = augment.random_grayscale(x, seed, p=1.0).numpy()
  np.testing.assert_allclose(gray[..., 0], gray[..., 2], atol=1e-6)
  np.testing.assert_allclose(gray[..., 0], x.numpy() @ np.array(augment.GRAY_WEIGHTS), atol=1e-6)
  sol = augment.solarize(x).numpy()
  np.testing.assert_allclose(sol, np.where(x.numpy() >= 0.5, 1 - x.numpy(), x.numpy()), atol=1e-6)
  # Blur keeps constant images and the mean (reflect padding), and smooths noise.
  const = tf.fill([2, 16, 16, 3], 0.3)
  np.testing.assert_allclose(augment.gaussian_blur(const, tf.constant([0.5, 2.0]), 5), const,
                             atol=1e-6)
  noisy = tf.constant(rng.uniform(size=(2, 16, 16, 3)).astype(np.float32))
  blurred = augment.gaussian_blur(noisy, tf.constant([0.1, 2.0]), 5).numpy()
  np.testing.assert_allclose(blurred[0], noisy[0], atol=1e-3)  # sigma 0.1 ~ identity
  assert blurred[1].std() < 0.6 * noisy[1].numpy().std()
  assert augment.gaussian_kernel_size(224) == 23 and augment.gaussian_kernel_size(32) == 9


def test_normalize():
  images = np.array([[[0, 128, 255]]], np.uint8)
  out = np.asarray(data.normalize(images))
  expected = (images / 255.0 - np.array(data.MEAN_RGB)) / np.array(data.STDDEV_RGB)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, expected, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_clear_errors(tmp_path):
  with pytest.raises(ValueError, match=r"'bogus'.*accepted.*'byol'"):
    views.get_recipe('bogus')
  with pytest.raises(ValueError, match=r"'imagenet7'.*accepted.*'cifar10'"):
    data.default_data_config('imagenet7')
  cfg = cifar_cfg(data_dir=str(tmp_path), name='cifar100')
  with pytest.raises(data.DatasetNotFound, match=rf"cifar100.*{tmp_path}.*TFDS_DATA_DIR"):
    data.num_examples(cfg, 'train')
  cfg = cifar_cfg(name='no_such_dataset_xyz')
  with pytest.raises(ValueError, match='no_such_dataset_xyz'):
    data.num_examples(cfg, 'train')
  cfg = cifar_cfg(source='s3')
  with pytest.raises(ValueError, match=r"'s3'.*accepted.*'tfds'"):
    data.num_examples(cfg, 'train')
  cfg = folder_cfg(str(tmp_path))
  (tmp_path / 'train').mkdir()
  with pytest.raises(ValueError, match=r"'val'.*accepted.*'train'"):
    data.num_examples(cfg, 'val')


# ------------------------------------------------------------------------------------------------
# Real CIFAR-10
# ------------------------------------------------------------------------------------------------


def test_real_cifar10():
  assert HAVE_CIFAR, 'set TFDS_DATA_DIR to a data dir with cifar10 (../shared/data/tfds)'
  cfg = cifar_cfg('aps', data_dir=REAL_TFDS, train_split='test[:1024]')
  assert data.num_examples(cfg, 'train') == 50_000
  assert data.num_examples(cfg, 'test') == 10_000
  assert data.steps_per_epoch(data.default_data_config('cifar10'), 512) == 97
  with pytest.raises(ValueError, match=r"'bogus'.*accepted.*'test', 'train'"):
    data.num_examples(cfg, 'bogus')
  # Train views from a slice of the real test split (decodes less; same code path).
  batch = next(train_iter(cfg, gbs=64))
  assert batch['view1'].shape == (64, 32, 32, 3) and batch['view1'].dtype == np.uint8
  assert set(np.unique(batch['label'])) <= set(range(10))
  assert 40 < batch['view1'].mean() < 200 and batch['view1'].std() > 20

  # Process slices (TFDS even split): contiguous halves, so disjoint and covering, in order.
  stream_cfg = cifar_cfg('byol', data_dir=REAL_TFDS, cache=False)
  def records(split, pi, pc):
    source = sources.build_source(stream_cfg, split, pi, pc)
    ds = source.dataset(shuffle_seed=None).batch(2500)
    return [(img, lab) for b in ds.as_numpy_iterator() for img, lab in zip(b['image'], b['label'])]
  full = records('test[:2500]', 0, 1)
  parts = [records('test[:2500]', pi, 2) for pi in range(2)]
  assert len(full) == 2500 and [len(p) for p in parts] == [1250, 1250]
  assert [r[0] for r in parts[0] + parts[1]] == [r[0] for r in full]

  # Eval: in order, no augmentation (identity on 32 px CIFAR), padded last batch.
  batches = list(data.make_eval_iterator(cfg, split='test[:2500]', global_batch_size=1024,
                                         process_index=0, process_count=1))
  assert len(batches) == 3 and batches[-1]['mask'].sum() == 2500 - 2 * 1024
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(labels, [r[1] for r in full[:2500]])
  for i in (0, 1, 2047):
    decoded = tf.io.decode_png(full[i][0]).numpy()
    np.testing.assert_array_equal(batches[i // 1024]['image'][i % 1024], decoded)


# ------------------------------------------------------------------------------------------------
# Folder hygiene: hidden folders, class mismatch, balanced eval subsets
# ------------------------------------------------------------------------------------------------

def _class_folder(root, split, classes, per_class):
  for i, c in enumerate(classes):
    d = root / split / c
    d.mkdir(parents=True)
    for k in range(per_class):
      _write_image(d / f'{k}.png', 31 * i + k)


def test_hidden_folders_are_never_classes(tmp_path):
  _class_folder(tmp_path, 'train', ['cat', 'dog'], 2)
  (tmp_path / 'train' / '.ipynb_checkpoints').mkdir()
  _write_image(tmp_path / 'train' / 'cat' / '.hidden.png', 1)
  paths, labels, classes = sources.list_image_folder(str(tmp_path), 'train')
  assert classes == ('cat', 'dog') and labels == [0, 0, 1, 1]
  assert not any('/.' in p for p in paths)


def test_train_and_test_class_folders_must_match(tmp_path):
  _class_folder(tmp_path, 'train', ['cat', 'dog', 'emu'], 1)
  _class_folder(tmp_path, 'val', ['cat', 'dog', 'fox'], 1)
  cfg = folder_cfg(str(tmp_path))
  with pytest.raises(data.DataConfigError, match=r"train/ has classes not in val/: \['emu'\]; "
                     r"val/ has classes not in train/: \['fox'\]"):
    data.check_same_classes(cfg, 'train', 'val')
  data.check_same_classes(cfg, 'train', 'train')


def test_balanced_subset_covers_classes_and_is_seeded():
  labels = np.repeat(np.arange(6), [50, 50, 50, 50, 3, 50])   # class 4 has only 3
  idx = data.balanced_subset(labels, 60, seed=0)
  counts = np.bincount(labels[idx], minlength=6)
  assert counts.sum() == 60 and counts[4] == 3 and counts.min() >= 3
  assert counts[[0, 1, 2, 3, 5]].max() - counts[[0, 1, 2, 3, 5]].min() <= 1
  np.testing.assert_array_equal(idx, data.balanced_subset(labels, 60, seed=0))
  assert not np.array_equal(idx, data.balanced_subset(labels, 60, seed=1))


def test_eval_subset_of_a_class_ordered_folder_is_balanced_and_process_count_free(tmp_path):
  """The monitor's first-N-files subset held classes 0-3 of 6; now every class, and the same
  images for 1 and 2 processes."""
  _class_folder(tmp_path, 'train', [f'c{i}' for i in range(6)], 8)
  cfg = folder_cfg(str(tmp_path))
  one = sources.build_folder_source(cfg, 'train', 0, 1, max_examples=12)
  assert sorted(np.bincount(one.labels, minlength=6).tolist()) == [2] * 6
  two = [sources.build_folder_source(cfg, 'train', p, 2, max_examples=12) for p in (0, 1)]
  assert sorted(np.concatenate([s.paths for s in two]).tolist()) == sorted(one.paths.tolist())


# ------------------------------------------------------------------------------------------------
# Process-count independence: global batches and subsets
# ------------------------------------------------------------------------------------------------


def global_batches(cfg, gbs, pc, steps, start_step=0, seed=0):
  """Global batches ``start_step, ...`` as ``pc`` hosts feed them: each simulated host's iterator
  (``process_index=p``), rows concatenated in process order."""
  its = [train_iter(cfg, gbs=gbs, seed=seed, start_step=start_step, pi=p, pc=pc)
         for p in range(pc)]
  out = []
  for _ in range(steps):
    parts = [next(it) for it in its]
    out.append({k: np.concatenate([part[k] for part in parts]) for k in parts[0]})
  return out


@pytest.mark.slow
def test_global_batches_do_not_depend_on_process_count_real_cifar10():
  """A faked 2-process run used to differ from one process from its first step: each host
  shuffled its own slice and drew augmentations by host-local row."""
  assert HAVE_CIFAR, 'set TFDS_DATA_DIR to a data dir with cifar10 (../shared/data/tfds)'
  # Blur on: every colour op runs. Global batch 128 = 2 augmentation groups of 64: one process
  # runs both, two processes one each, four processes pad half a group each.
  cfg = cifar_cfg('byol', data_dir=REAL_TFDS, train_split='test[:640]', blur=True)
  assert data.steps_per_epoch(cfg, 128) == 5
  one = global_batches(cfg, 128, 1, steps=6)  # crosses into epoch 1
  for pc in (2, 4):
    assert_batches_equal(global_batches(cfg, 128, pc, steps=6), one)
  assert_batches_equal(global_batches(cfg, 128, 2, steps=2, start_step=4), one[4:])  # resume
  # Epoch 0 is a permutation of the 640 images (their labels), epoch 1 another order.
  split_labels = sources.build_source(cfg, 'test[:640]').labels
  epoch0 = np.concatenate([b['label'] for b in one[:5]])
  assert sorted(epoch0.tolist()) == sorted(split_labels.tolist())
  assert not np.array_equal(one[5]['label'], epoch0[:128])
  assert not np.array_equal(one[0]['view1'], one[0]['view2'])


@pytest.mark.slow
def test_global_batches_do_not_depend_on_process_count_folder(labelled_folder):
  """Image folders: per-example crops seeded by the global position, colour by groups."""
  cfg = folder_cfg(labelled_folder, 'aps')
  one = global_batches(cfg, 4, 1, steps=5)  # 3 steps per epoch
  for pc in (2, 4):
    assert_batches_equal(global_batches(cfg, 4, pc, steps=5), one)
  assert_batches_equal(global_batches(cfg, 4, 4, steps=2, start_step=3), one[3:])  # resume
  assert sorted(np.concatenate([b['label'] for b in one[:3]]).tolist()) == list(range(12))


def test_augment_group_size():
  from ssl_jax.data import pipeline
  assert [pipeline.augment_group_size(b) for b in (8, 48, 128, 512, 4096, 96, 100, 97)] == [
      8, 48, 64, 64, 64, 48, 50, 1]


def test_tfds_array_subsets_are_balanced_seeded_and_process_count_free():
  """The kNN monitor's TFDS subsets used to be each host's first examples: a different set of
  images for every process count."""
  assert HAVE_CIFAR, 'set TFDS_DATA_DIR to a data dir with cifar10 (../shared/data/tfds)'
  cfg = cifar_cfg(data_dir=REAL_TFDS)
  one = sources.build_source(cfg, 'test', max_examples=100, subset_seed=0)
  assert np.bincount(one.labels, minlength=10).tolist() == [10] * 10
  full = sources.build_source(cfg, 'test')
  keep = data.balanced_subset(full.labels, 100, 0)
  np.testing.assert_array_equal(one.images, full.images[keep])
  other = sources.build_source(cfg, 'test', max_examples=100, subset_seed=1)
  assert not np.array_equal(one.images, other.images)
  parts = [sources.build_source(cfg, 'test', p, 3, max_examples=100) for p in range(3)]
  np.testing.assert_array_equal(np.concatenate([p.images for p in parts]), one.images)
  assert [sources.num_examples(cfg, 'test', p, 3, max_examples=100) for p in range(3)] == [
      len(p.labels) for p in parts]
  # The eval iterator reads exactly that subset, padded, for 1 and 2 processes.
  for pc in (1, 2):
    hosts = [list(data.make_eval_iterator(cfg, split='test', global_batch_size=32,
                                          process_index=p, process_count=pc, max_examples=100))
             for p in range(pc)]
    assert len({len(h) for h in hosts}) == 1
    images = np.concatenate([b['image'][b['mask']] for h in hosts for b in h])
    np.testing.assert_array_equal(images, one.images)


def test_streamed_tfds_subset_is_a_seeded_window_for_every_process_count(monkeypatch):
  assert HAVE_CIFAR, 'set TFDS_DATA_DIR to a data dir with cifar10 (../shared/data/tfds)'
  cfg = cifar_cfg(data_dir=REAL_TFDS, cache=False)

  def records(pi, pc, seed, split='test[1000:3000]'):
    source = sources.build_source(cfg, split, pi, pc, max_examples=300, subset_seed=seed)
    assert isinstance(source, sources.TfdsSource)
    got = list(source.dataset(shuffle_seed=None).as_numpy_iterator())
    return [e['image'] for e in got], np.array([e['label'] for e in got])

  images, labels = records(0, 1, seed=0)
  assert len(images) == 300 and sources.num_examples(cfg, 'test[1000:3000]', max_examples=300,
                                                      subset_seed=0) == 300
  # A window of the stored order of the sliced split, at the seeded offset.
  split = sources.stream_subset_split(sources.tfds_builder(cfg), 'test[1000:3000]', 300, 0)
  lo = int(split.split('[')[1].split(':')[0])
  assert split == f'test[{lo}:{lo + 300}]' and 1000 <= lo <= 2700
  stored = list(sources.build_source(cfg, 'test').dataset(None).skip(lo).take(300)
                .as_numpy_iterator())
  assert [e['image'] for e in stored] == images
  # TFDS stores CIFAR shuffled: the window holds every class.
  assert np.bincount(labels, minlength=10).min() >= 10
  halves = [records(p, 2, seed=0) for p in range(2)]
  assert halves[0][0] + halves[1][0] == images
  assert records(0, 1, seed=1)[0] != images
  # A dataset stored unshuffled has no random window: one clear error, never a class-order subset.
  monkeypatch.setattr(type(sources.tfds_builder(cfg).info), 'disable_shuffling',
                      property(lambda self: True))
  with pytest.raises(data.DataConfigError, match=r'stored unshuffled.*use the whole split'):
    sources.build_source(cfg, 'test', max_examples=300)


def test_monitor_warns_when_the_bank_misses_a_test_class():
  import warnings
  from ssl_jax.evals import features
  with pytest.warns(features.MonitorSubsetWarning,
                    match=r"6 examples of 'train'.*test class\(es\) \[4, 5\]"):
    features.check_bank_classes(np.array([0, 1, 2, 3, 3, 0]), np.array([0, 5, 4, -1]), 'train')
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    features.check_bank_classes(np.arange(6), np.array([0, 5, 4, -1]), 'train')
