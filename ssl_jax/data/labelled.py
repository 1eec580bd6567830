"""Labelled train input for the linear probe and fine-tuning: shuffled, augmented (RandomResized-
Crop + flip, or the eval transform) batches of ``{'image', 'label'}`` from a split or a subset of
it, deterministic in ``(seed, step)`` so a resumed probe sees the same batches. Seeds, sources
and the crop/flip stages are the train pipeline's (``pipeline``, ``sources``, ``views``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ssl_jax import paths
from ssl_jax.data import augment as aug_lib
from ssl_jax.data import pipeline, sources, views

AUGMENTS = ('rrc_flip', 'none')

_INT64_MAX = np.iinfo(np.int64).max


@functools.lru_cache(maxsize=None)
def _view_spec(size: int, crop_scale: tuple[float, float]):
  return (views.ViewSpec('image', size=size, crop_scale=crop_scale, flip_p=0.5,
                         jitter=(0.0, 0.0, 0.0, 0.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0,
                         solarize_p=0.0),)


def example_ids(data_cfg, split: str) -> np.ndarray:
  """Per-example string ids of ``split`` in reading order: TFDS 'file_name' (ImageNet) or 'id'
  (CIFAR); folder datasets: the file name. Used to match a subset file of image ids."""
  if data_cfg.get('source', 'tfds') == 'folder':
    src = sources.build_source(data_cfg, split, 0, 1)
    return np.array([paths.basename(p) for p in src.paths])
  builder = sources.tfds_builder(data_cfg)
  key = next((k for k in ('file_name', 'id') if k in builder.info.features), None)
  if key is None:
    raise ValueError(f'{data_cfg.name} has no per-example id feature (file_name / id), so a '
                     'subset file cannot be matched; accepted: a label fraction instead.')
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(options=sources.deterministic_options()))
  ds = ds.map(tf.autograph.experimental.do_not_convert(lambda e: e[key])).batch(4096)
  return np.concatenate([b.astype(str) for b in ds.as_numpy_iterator()])


def split_labels(data_cfg, split: str) -> np.ndarray:
  """All labels of ``split`` in reading order (for subset selection)."""
  src = sources.build_source(data_cfg, split, 0, 1)
  if isinstance(src, (sources.ArraySource, sources.FolderSource)):
    return np.asarray(src.labels)
  ds = src.dataset(shuffle_seed=None).map(
      tf.autograph.experimental.do_not_convert(lambda e: e['label'])).batch(4096)
  return np.concatenate(list(ds.as_numpy_iterator())).astype(np.int32)


@dataclasses.dataclass
class LabelledInput:
  """An infinite iterator of ``{'image': uint8 [b, S, S, 3], 'label': int32 [b]}`` (this host's
  slice of each global batch) and the number of steps that make one epoch of the (subset)."""
  iterator: Iterator[dict[str, np.ndarray]]
  steps_per_epoch: int
  num_examples: int


def num_selected(data_cfg, split: str, indices: np.ndarray | None = None,
                 max_examples: int = -1) -> int:
  """How many examples :func:`labelled_train_iterator` draws from (one epoch = this // batch)."""
  total = pipeline.num_examples(data_cfg, split) if indices is None else len(indices)
  return min(total, max_examples) if max_examples > 0 else total


def labelled_train_iterator(data_cfg, *, split: str, global_batch_size: int, seed: int,
                            augment: str = 'rrc_flip',
                            crop_scale: Sequence[float] = (0.08, 1.0), start_step: int = 0,
                            indices: np.ndarray | None = None, max_examples: int = -1,
                            process_index: int | None = None,
                            process_count: int | None = None,
                            subset_seed: int = 0) -> LabelledInput:
  """Shuffled, augmented, labelled batches of ``split`` (or of its examples ``indices``).

  Deterministic in ``(seed, step)``: ``start_step=s`` yields what a fresh iterator yields from
  its s-th batch on. Epoch ``e`` visits the selected examples in a permutation seeded by
  ``(seed, e)`` (drop remainder); crops are seeded by each example's stream position and flips
  by the step. Random-access sources (in-memory arrays, image folders) select exactly
  ``indices`` over the whole split and give each host an even share. Streamed TFDS sources read
  each host's own slice; there ``indices`` refer to positions in the full split too.

  ``augment``: ``'rrc_flip'`` (RandomResizedCrop(``crop_scale``, 3/4-4/3) + flip p 0.5) or
  ``'none'`` (the eval transform: shorter side to ``eval_resize``, centre crop).
  """
  if augment not in AUGMENTS:
    raise ValueError(f'augment={augment!r} is invalid; accepted: {", ".join(AUGMENTS)}')
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  b = pipeline.local_batch_size(global_batch_size, pc)
  root = tf.constant([pipeline._py_seed(seed, 0), pipeline._py_seed(seed, 1)], tf.int64)
  full = sources.build_source(data_cfg, split, 0, 1)
  if not isinstance(full, sources.TfdsSource):  # random access over the whole split
    ds, total, spe = _random_access(full, data_cfg, split, global_batch_size, b, pi, pc, root,
                                    start_step, indices, max_examples, subset_seed)
  else:
    ds, total, spe = _streamed(data_cfg, split, global_batch_size, b, pi, pc, seed, start_step,
                               indices, max_examples, subset_seed)
  ds = _augment(ds, data_cfg, augment, crop_scale, b, pi, root)
  return LabelledInput(iterator=ds.as_numpy_iterator(), steps_per_epoch=spe,
                       num_examples=total)


def _check_batch(total: int, global_batch_size: int, data_cfg, split: str) -> int:
  spe = total // global_batch_size
  if spe < 1:
    raise ValueError(f'batch_size={global_batch_size} exceeds the {total} selected examples '
                     f'of {data_cfg.name}/{split}; accepted: a batch <= {total}.')
  return spe


def _random_access(src, data_cfg, split, global_batch_size, b, pi, pc, root, start_step,
                   indices, max_examples, subset_seed):
  """In-memory arrays or an image folder: exactly ``indices`` of the whole split, an even
  share per host, epoch ``e`` in a permutation seeded by ``(seed, e)``."""
  sel = np.arange(src.num_examples) if indices is None else np.asarray(indices, np.int64)
  if 0 < max_examples < len(sel):  # a seeded class-balanced draw, never the first N
    sel = sel[sources.balanced_subset(src.labels[sel], max_examples, subset_seed)]
  total = len(sel)
  spe = _check_batch(total, global_batch_size, data_cfg, split)
  mine = sel[sources.even_slice(total, pi, pc)]
  n_h = len(mine)
  per_epoch = spe * b
  shuffle_root = aug_lib.fold_in(root, 1)
  if isinstance(src, sources.ArraySource):
    images = tf.constant(src.images[mine])
    labels = tf.constant(src.labels[mine])

    def load(i):
      return tf.gather(images, i), tf.gather(labels, i)
  else:
    paths = tf.constant(src.paths[mine].astype(str))
    labels = tf.constant(src.labels[mine])

    def load(i):
      return sources.decode_image(tf.io.read_file(tf.gather(paths, i))), tf.gather(labels, i)

  def read(pos):
    seed_e = aug_lib.fold_in(shuffle_root, pos // per_epoch)
    i = tf.random.experimental.index_shuffle(pos % per_epoch, seed=seed_e, max_index=n_h - 1)
    image, label = load(i)
    return {'image': image, 'label': label, '_pos': pos}

  ds = tf.data.Dataset.range(start_step * b, _INT64_MAX)
  ds = ds.map(tf.autograph.experimental.do_not_convert(read),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds, total, spe


def _streamed(data_cfg, split, global_batch_size, b, pi, pc, seed, start_step, indices,
              max_examples, subset_seed):
  """Streamed TFDS: this host's slice, filtered to the selected positions, shuffled in a
  buffer seeded by ``(seed, host)``."""
  kw = {'max_examples': max_examples, 'subset_seed': subset_seed} if max_examples > 0 else {}
  src = sources.build_source(data_cfg, split, pi, pc, **kw)
  ds = src.builder.as_dataset(split=src.split, shuffle_files=indices is None,
                              decoders={'image': tfds.decode.SkipDecoding()},
                              read_config=tfds.ReadConfig(
                                  shuffle_seed=pipeline._py_seed(seed, pi),
                                  options=sources.deterministic_options()))
  has_labels = src.has_labels
  dnc = tf.autograph.experimental.do_not_convert
  ds = ds.map(dnc(lambda e: {'image': e['image'], 'label': tf.cast(e['label'], tf.int32)
                             if has_labels else tf.constant(-1, tf.int32)}))
  total = sources.num_examples(data_cfg, split, **kw)
  if indices is not None:
    # Positions of this host's slice within the split (TFDS even split into pc parts).
    offset = sum(sources.tfds_num_examples(data_cfg, split, p, pc) for p in range(pi))
    sel = np.asarray(indices, np.int64)
    local = sel[(sel >= offset) & (sel < offset + src.num_examples)] - offset
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(local, tf.int64), tf.ones(len(local), tf.int64)), default_value=0)
    ds = ds.enumerate().filter(dnc(lambda i, e: table.lookup(i) > 0)).map(dnc(lambda i, e: e))
    total = len(sel)
  spe = _check_batch(total, global_batch_size, data_cfg, split)
  buffer = int(min(data_cfg.get('shuffle_buffer') or 10_000, max(total // pc, 1)))
  ds = ds.repeat().shuffle(buffer, seed=pipeline._py_seed(seed, pi, 1),
                           reshuffle_each_iteration=True)
  ds = ds.skip(start_step * b).enumerate(start=start_step * b)
  ds = ds.map(dnc(lambda pos, e: {'image': sources.decode_image(e['image']),
                                  'label': e['label'], '_pos': pos}),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds, total, spe


def _augment(ds, data_cfg, augment, crop_scale, b, pi, root):
  """Per example: the crop (seeded by the stream position) or the eval transform; per batch:
  the flips (seeded by the step); batched to this host's ``b``."""
  size = int(data_cfg.image_size)
  resize = int(data_cfg.get('eval_resize') or size)
  specs = _view_spec(size, (float(crop_scale[0]), float(crop_scale[1])))
  example_root = aug_lib.fold_in(aug_lib.fold_in(root, pi), 4)
  flip_root = aug_lib.fold_in(aug_lib.fold_in(root, pi), 3)
  if augment == 'rrc_flip':
    crop = views.traced_crop_views_example(specs)
    finish = views.traced_finish_views_batch(specs)

    def per_example(e):
      out = crop(e['image'], aug_lib.fold_in(example_root, e['_pos']))
      out['label'] = e['label']
      out['_pos'] = e['_pos']
      return out

    def per_batch(batch):
      step = batch['_pos'][0] // b
      out = finish(batch, aug_lib.fold_in(flip_root, step))
      return {'image': out['image'], 'label': out['label']}
  else:
    def per_example(e):
      return {'image': aug_lib.resize_shorter_center_crop(e['image'], resize, size),
              'label': e['label']}

    def per_batch(batch):
      return batch

  dnc = tf.autograph.experimental.do_not_convert
  ds = ds.map(dnc(per_example), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(b, drop_remainder=True)
  ds = ds.map(dnc(per_batch), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(sources.deterministic_options())
