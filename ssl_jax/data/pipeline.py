"""Train and eval iterators: per-host, deterministic given (seed, step), resumable exactly.

Train stream: global batch ``B``, ``P`` processes; host ``p`` feeds rows ``[p * b, (p + 1) * b)``
of every global batch (``b = B // P``); ``E`` = steps per epoch = train examples // ``B``. Row
``r`` of global batch ``s`` has the global position ``s * B + r``.

* Random-access sources (decoded arrays, image folders) are read whole on every host. The
  example at global position ``s * B + r`` is entry ``(s mod E) * B + r`` of a permutation of the
  whole split seeded by (seed, epoch ``s // E``), computed on the fly with
  ``tf.random.experimental.index_shuffle`` (each epoch uses the first ``E * B`` entries: drop
  remainder, reshuffled every epoch). Resuming at step ``s`` starts there: no skipping at all.
* Augmentation randomness depends on (seed, global position) only. Per-example crops (image
  folders, streams) are seeded by the example's global position. Batched draws (the crops of
  decoded arrays, the colour stage of every source) are made per *group* of ``G`` consecutive
  rows of the global batch (:func:`augment_group_size`: the largest divisor of ``B`` up to 64),
  seeded by (seed, step, group index); a host whose rows cover only part of a group pads that
  part to ``G`` rows (extra augmentation work only when ``G`` does not divide ``b``).
* Hence, for random-access sources, each global batch — its examples, their order and every
  pixel of every view — is the same for every process count (hosts' batches concatenated in
  process order), and ``make_train_iterator(..., start_step=s)`` yields exactly the batches an
  iterator from step 0 yields from its s-th batch on.
* Streamed TFDS sources (no random access) are read per host: host ``p`` reads its
  ``tfds.split_for_jax_process`` slice, files and a shuffle buffer shuffled with integer seeds
  of (seed, epoch), and uses the first ``E * b`` examples of it per epoch; a resume skips the
  within-epoch offset on the still-encoded records. Which examples form a global batch, and
  in which order, therefore depends on the process count (the augmentation of a given position
  does not); resume is exact for a fixed process count.
"""
from __future__ import annotations

import logging
import math
from typing import Iterator

import numpy as np
import tensorflow as tf

from ssl_jax.data import augment
from ssl_jax.data import sources
from ssl_jax.data import views

log = logging.getLogger('ssl_jax.data')

# ImageNet statistics (RGB, [0, 1] scale), used by the model wrapper on device.
from ssl_jax.models.normalize import MEAN_RGB, STDDEV_RGB, normalize  # noqa: E402,F401

_INT64_MAX = np.iinfo(np.int64).max
# Tags that separate the independent random streams derived from one seed.
_TAG_SHUFFLE, _TAG_CROP, _TAG_COLOR, _TAG_EXAMPLE = 1, 2, 3, 4
# Largest number of rows of one batched augmentation draw (see augment_group_size).
AUGMENT_GROUP = 64


# ----------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count='
                     f'{process_count}).')
  return int(process_index), int(process_count)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """Per-host batch; ValueError unless ``global_batch_size`` divides evenly."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not a positive multiple of '
                     f'process_count={process_count}.')
  return global_batch_size // process_count


def num_examples(data_cfg, split: str) -> int:
  """Examples in ``split`` (all hosts; image folders: after skipping undecodable files)."""
  return sources.num_examples(data_cfg, split)


def steps_per_epoch(data_cfg, global_batch_size: int) -> int:
  """Train examples // global batch (the remainder is dropped each epoch)."""
  n = num_examples(data_cfg, data_cfg.train_split)
  steps = n // global_batch_size
  if steps < 1:
    raise sources.DataConfigError(f'global_batch_size={global_batch_size} exceeds the {n} examples of '
                     f'{data_cfg.name}/{data_cfg.train_split}.')
  return steps


# ----------------------------------------------------------------------------------------------
# Seeds and options
# ----------------------------------------------------------------------------------------------


def _root_seed(seed: int) -> tf.Tensor:
  seed = int(seed) & 0xFFFFFFFFFFFFFFFF
  return tf.constant([seed & 0x7FFFFFFF, seed >> 31], tf.int64)


def _py_seed(*values: int) -> int:
  """A 31-bit integer seed from integers (for APIs that take Python ints)."""
  return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]
                                    ).generate_state(1)[0] & 0x7FFFFFFF)


def _graph_fn(fn):
  """Marks a tf.data map function as plain graph code (no AutoGraph: it has no tensor-dependent
  Python control flow, and conversion costs seconds at pipeline construction)."""
  return tf.autograph.experimental.do_not_convert(fn)


def _map(ds: tf.data.Dataset, fn, parallel: int | None = None) -> tf.data.Dataset:
  """``ds.map`` in order, without AutoGraph."""
  if parallel is None:
    return ds.map(_graph_fn(fn))
  return ds.map(_graph_fn(fn), num_parallel_calls=parallel, deterministic=True)


def _options(data_cfg) -> tf.data.Options:
  options = sources.deterministic_options()
  workers = data_cfg.get('num_workers')
  if workers:
    options.threading.private_threadpool_size = int(workers)
  return options


def _parallel(data_cfg) -> int:
  return int(data_cfg.get('num_workers') or tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------


def augment_group_size(global_batch_size: int) -> int:
  """Rows of one batched augmentation draw: the largest divisor of the global batch that is at
  most ``AUGMENT_GROUP`` (a function of the global batch only, so of no process count)."""
  return max(d for d in range(1, min(AUGMENT_GROUP, global_batch_size) + 1)
             if global_batch_size % d == 0)


def _pad_rows(x: tf.Tensor, before: int, after: int) -> tf.Tensor:
  """``x`` with ``before``/``after`` rows of zeros (False for bool) around it."""
  if not before and not after:
    return x
  zeros = lambda n: tf.zeros(tf.concat([[n], tf.shape(x)[1:]], 0), x.dtype)  # noqa: E731
  return tf.concat([zeros(before), x, zeros(after)], 0)


class _Plan:
  """Everything the train dataset builders share."""

  def __init__(self, data_cfg, global_batch_size, seed, start_step, process_index,
               process_count):
    self.cfg = data_cfg
    self.specs = views.resolve_views(data_cfg)
    self.process_index, self.process_count = _processes(process_index, process_count)
    self.global_batch = int(global_batch_size)
    self.local_batch = local_batch_size(global_batch_size, self.process_count)
    self.row0 = self.process_index * self.local_batch  # this host's first row of a batch
    self.steps_per_epoch = steps_per_epoch(data_cfg, global_batch_size)
    self.per_epoch = self.steps_per_epoch * self.global_batch   # examples per epoch (all hosts)
    self.local_per_epoch = self.steps_per_epoch * self.local_batch  # streamed: per host
    if start_step < 0:
      raise ValueError(f'start_step={start_step} must be >= 0.')
    self.start_step = int(start_step)
    self.seed = int(seed)
    root = _root_seed(seed)
    self.shuffle_root = augment.fold_in(root, _TAG_SHUFFLE)
    self.group_root = augment.fold_in(root, _TAG_COLOR)
    self.example_root = augment.fold_in(root, _TAG_EXAMPLE)
    # This host's rows [row0, row0 + b) cut at the augmentation-group boundaries:
    # (group index in the batch, rows lo:hi of the local batch, zero rows to pad before/after).
    g = augment_group_size(self.global_batch)
    b, r0 = self.local_batch, self.row0
    self.segments = []
    for k in range(r0 // g, (r0 + b - 1) // g + 1):
      lo, hi = max(r0, k * g), min(r0 + b, (k + 1) * g)
      self.segments.append((k, lo - r0, hi - r0, lo - k * g, (k + 1) * g - hi))
    self.group = g

  def check_source(self, source, streamed: bool) -> None:
    need = self.local_per_epoch if streamed else self.per_epoch
    if source.num_examples < need:
      raise ValueError(
          f'Process {self.process_index}/{self.process_count} holds {source.num_examples} '
          f'examples of {self.cfg.name}/{self.cfg.train_split} but an epoch needs {need}.')

  def global_position(self, local: tf.Tensor) -> tf.Tensor:
    """Global position(s) of this host's stream counter(s) ``local`` (``step * b + i``)."""
    b = self.local_batch
    return local // b * self.global_batch + self.row0 + local % b

  def shuffled_index(self, position: tf.Tensor, num: int) -> tf.Tensor:
    """Index into the whole split of global position(s) ``position`` (int64 scalar, or a vector
    within one epoch: a batch)."""
    first = position if position.shape.rank == 0 else position[0]
    epoch = first // self.per_epoch
    seed = augment.fold_in(self.shuffle_root, epoch)
    return tf.random.experimental.index_shuffle(position - epoch * self.per_epoch, seed=seed,
                                                max_index=num - 1)

  def by_group(self, fn, batch: dict, step: tf.Tensor) -> dict:
    """``fn(rows, seed)`` (a batched augmentation) over this host's rows of global batch
    ``step``, one call per augmentation group, seeded by (seed, step, group)."""
    step_seed = augment.fold_in(self.group_root, step)
    parts = []
    for k, lo, hi, before, after in self.segments:
      rows = {key: _pad_rows(v[lo:hi], before, after) for key, v in batch.items()}
      out = fn(rows, augment.fold_in(step_seed, k))
      parts.append({key: v[before:before + hi - lo] for key, v in out.items()})
    if len(parts) == 1:
      return parts[0]
    return {key: tf.concat([p[key] for p in parts], 0) for key in parts[0]}

  def finish(self, batch: dict) -> dict:
    """Colour stage of a local batch that carries its global positions in '_pos'."""
    step = batch['_pos'][0] // self.global_batch
    finish = views.traced_finish_views_batch(self.specs)
    rows = {k: v for k, v in batch.items() if k != '_pos'}
    return self.by_group(lambda r, seed: finish(r, augment.fold_in(seed, _TAG_COLOR)), rows,
                         step)


def _array_dataset(plan: _Plan, source: sources.ArraySource) -> tf.data.Dataset:
  """Whole-batch pipeline over in-memory arrays: gather, crop, flip, colour — all batched."""
  images = tf.constant(source.images)
  labels = tf.constant(source.labels)
  num = source.num_examples
  b = plan.local_batch
  crop = views.traced_crop_views_batch(plan.specs)
  finish = views.traced_finish_views_batch(plan.specs)

  def augment_rows(rows, seed):
    out = crop(rows['image'], augment.fold_in(seed, _TAG_CROP))
    out['label'] = rows['label']
    return finish(out, augment.fold_in(seed, _TAG_COLOR))

  def make_batch(step):
    positions = plan.global_position(step * b + tf.range(b, dtype=tf.int64))
    idx = plan.shuffled_index(positions, num)
    batch = {'image': tf.gather(images, idx), 'label': tf.gather(labels, idx)}
    return plan.by_group(augment_rows, batch, step)

  ds = tf.data.Dataset.range(plan.start_step, _INT64_MAX)
  return _map(ds, make_batch, _parallel(plan.cfg))


def _per_example_dataset(plan: _Plan, ds: tf.data.Dataset) -> tf.data.Dataset:
  """``{'image': encoded, 'label', '_pos'}`` records -> decoded, cropped, batched, finished."""
  def crop(example):
    image = sources.decode_image(example['image'])
    out = views.traced_crop_views_example(plan.specs)(
        image, augment.fold_in(plan.example_root, example['_pos']))
    out['label'] = example['label']
    out['_pos'] = example['_pos']
    return out

  par = _parallel(plan.cfg)
  ds = _map(ds, crop, par)
  ds = ds.batch(plan.local_batch, drop_remainder=True)
  return _map(ds, plan.finish, par)


def _folder_dataset(plan: _Plan, source: sources.FolderSource) -> tf.data.Dataset:
  """Random access by path: this host's stream counter -> global position -> index -> file."""
  paths = tf.constant(source.paths.astype(str))
  labels = tf.constant(source.labels)
  num = source.num_examples

  def read(local):
    position = plan.global_position(local)
    idx = plan.shuffled_index(position, num)
    return {'image': tf.io.read_file(tf.gather(paths, idx)), 'label': tf.gather(labels, idx),
            '_pos': position}

  ds = tf.data.Dataset.range(plan.start_step * plan.local_batch, _INT64_MAX)
  ds = _map(ds, read, _parallel(plan.cfg))
  return _per_example_dataset(plan, ds)


def _stream_epoch(plan: _Plan, source: sources.TfdsSource, epoch: int,
                  offset: int) -> tf.data.Dataset:
  """One epoch of a streamed TFDS source (this host's slice) from example ``offset`` of the
  host's epoch on."""
  ds = source.dataset(shuffle_seed=_py_seed(plan.seed, epoch, 0))
  buffer = min(int(plan.cfg.get('shuffle_buffer') or 0), source.num_examples)
  if buffer > 1:
    ds = ds.shuffle(buffer, seed=_py_seed(plan.seed, epoch, 1), reshuffle_each_iteration=False)
  ds = ds.take(plan.local_per_epoch).skip(offset)  # skip before any decoding
  ds = ds.enumerate(start=epoch * plan.local_per_epoch + offset)
  ds = _map(ds, lambda local, e: {'image': e['image'], 'label': e['label'],
                                  '_pos': plan.global_position(local)})
  return _per_example_dataset(plan, ds)


def _strip(batch: dict) -> dict:
  return {k: v for k, v in batch.items() if not k.startswith('_')}


def make_train_iterator(data_cfg, *, global_batch_size: int, seed: int, start_step: int = 0,
                        process_index: int | None = None, process_count: int | None = None
                        ) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator over this host's slices of the global train batches from ``start_step``.

  Each batch: the recipe's views (uint8 ``[b, S, S, 3]``; ``b`` = global // process_count),
  'label' (int32 ``[b]``, -1 without labels) and, for 'aps', 'box1'/'box2' (float32
  ``[b, 4]``) and 'flip1'/'flip2' (bool ``[b]``). See the module docstring for determinism.
  """
  plan = _Plan(data_cfg, global_batch_size, seed, start_step, process_index, process_count)
  # Random-access sources: the whole split on every host; streams: this host's slice.
  source = sources.build_source(data_cfg, data_cfg.train_split)
  streamed = isinstance(source, sources.TfdsSource)
  if streamed and plan.process_count > 1:
    source = sources.build_source(data_cfg, data_cfg.train_split, plan.process_index,
                                  plan.process_count)
  plan.check_source(source, streamed)
  log.info('Train input: %s/%s, %d examples %s, process %d/%d (rows %d:%d of each global '
           'batch), %d steps/epoch, views %s, augmentation groups of %d rows, from step %d.',
           data_cfg.name, data_cfg.train_split, source.num_examples,
           'in this host\'s slice' if streamed else 'read by every host', plan.process_index,
           plan.process_count, plan.row0, plan.row0 + plan.local_batch, plan.steps_per_epoch,
           [s.key for s in plan.specs], plan.group, plan.start_step)
  if isinstance(source, sources.TfdsSource):
    return _stream_iterator(plan, source)
  if isinstance(source, sources.ArraySource):
    ds = _array_dataset(plan, source)
  else:
    ds = _folder_dataset(plan, source)
  ds = _map(ds, _strip).prefetch(tf.data.AUTOTUNE).with_options(_options(data_cfg))
  if isinstance(source, sources.FolderSource):
    return _naming_bad_files(ds.as_numpy_iterator(), source)
  return ds.as_numpy_iterator()


def _naming_bad_files(it: Iterator[dict], source) -> Iterator[dict]:
  """A folder iterator whose decode error names the file(s): with ``folder_validate='none'``
  a bad image reaches the decoder, whose TF error does not say which file it was."""
  while True:
    try:
      batch = next(it)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as e:
      bad = [p for p, ok in zip(source.paths, sources.validate_images(list(source.paths)))
             if not ok]
      raise sources.DataConfigError(
          f'undecodable image file(s) in the image folder: {bad[:10] or "(not found again)"}'
          f'{" ..." if len(bad) > 10 else ""} ({len(bad)} in all; TF: '
          f'{str(e).strip().splitlines()[0][:120]}). Remove them, or set '
          '--config.data.folder_validate=decode to skip them with a warning.') from e
    yield batch


def _stream_iterator(plan: _Plan, source: sources.TfdsSource) -> Iterator[dict]:
  epoch, within = divmod(plan.start_step, plan.steps_per_epoch)
  offset = within * plan.local_batch
  while True:
    ds = _stream_epoch(plan, source, epoch, offset)
    ds = _map(ds, _strip).prefetch(tf.data.AUTOTUNE).with_options(_options(plan.cfg))
    yield from ds.as_numpy_iterator()
    epoch, offset = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# Eval
# ----------------------------------------------------------------------------------------------


def make_eval_iterator(data_cfg, *, split: str, global_batch_size: int,
                       process_index: int | None = None, process_count: int | None = None,
                       max_examples: int = -1, subset_seed: int = 0
                       ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this host's slice of ``split`` (or of its subset), in order, no augmentation.

  ``max_examples`` > 0 reads a subset drawn from ``subset_seed`` over the whole split before
  the per-host slicing (``sources.build_source``: class-balanced for arrays and folders, a
  seeded window of the stored order for streamed TFDS), so the union of the hosts' examples is
  the same for every process count.

  Batches: 'image' uint8 ``[b, S, S, 3]`` (shorter side resized to ``data_cfg.eval_resize``,
  centre crop ``data_cfg.image_size``), 'label' int32 ``[b]``, 'mask' bool ``[b]``. The last
  batch is padded to ``b`` with zero images, label -1 and mask False, and every host yields
  the same number of batches (that of the largest host slice) so a jitted global step sees the
  same shapes everywhere.
  """
  pi, pc = _processes(process_index, process_count)
  b = local_batch_size(global_batch_size, pc)
  size = int(data_cfg.image_size)
  resize = int(data_cfg.get('eval_resize') or size)
  subset = dict(max_examples=max_examples, subset_seed=subset_seed)
  source = sources.build_source(data_cfg, split, pi, pc, **subset)
  if isinstance(source, sources.ArraySource):
    ds = tf.data.Dataset.from_tensor_slices({'image': source.images, 'label': source.labels})
  elif isinstance(source, sources.FolderSource):
    ds = tf.data.Dataset.from_tensor_slices({'path': source.paths.astype(str),
                                             'label': source.labels})
    ds = _map(ds, lambda e: {'image': sources.decode_image(tf.io.read_file(e['path'])),
                             'label': e['label']}, _parallel(data_cfg))
  else:
    ds = _map(source.dataset(shuffle_seed=None),
              lambda e: {'image': sources.decode_image(e['image']), 'label': e['label']},
              _parallel(data_cfg))
  ds = _map(ds, lambda e: {'image': augment.resize_shorter_center_crop(e['image'], resize, size),
                           'label': e['label'], 'mask': tf.constant(True)}, _parallel(data_cfg))
  largest = source.num_examples if pc == 1 else max(
      sources.num_examples(data_cfg, split, p, pc, **subset) for p in range(pc))
  num_batches = max(1, math.ceil(largest / b))
  pad = tf.data.Dataset.from_tensors({'image': tf.zeros([size, size, 3], tf.uint8),
                                      'label': tf.constant(-1, tf.int32),
                                      'mask': tf.constant(False)}).repeat()
  ds = ds.concatenate(pad).take(num_batches * b).batch(b, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(data_cfg))
  return ds.as_numpy_iterator()
