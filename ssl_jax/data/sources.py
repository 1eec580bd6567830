"""Data sources: a TFDS dataset or an image folder, each read per host (process).

Three kinds, chosen by :func:`build_source`:

* :class:`ArraySource` — a TFDS split whose images all have one fixed shape (CIFAR) with
  ``data_cfg.cache`` on: the whole split decoded once into memory (numpy) on every host,
  memoised per process, and read by random access (exact shuffles and O(1) resume).
* :class:`FolderSource` — ``root/<split>/<class>/**/*.jpg|png`` (labels = index of the sorted
  class directories; sub-folders are read, symbolically linked ones included, each directory
  once by its real path so a link cycle is skipped with a warning) or ``root/<split>/*.jpg|png``
  (no labels: label -1). Random access by path; every file is validated once when the source is
  built (see :func:`validate_images`) and undecodable files are skipped with a warning naming
  each one. :func:`check_folder_source` (training and every offline mode) compares the class
  folders of the train and eval splits and sets or checks ``num_classes``.
* :class:`TfdsSource` — any other TFDS split, streamed from its record files with per-epoch
  file shuffling and a shuffle buffer; images are decoded after the resume skip.

:func:`build_source` gives one host's slice: a contiguous even split (:func:`even_slice`, sizes
differ by at most one) of the arrays or the file list, ``tfds.split_for_jax_process`` of a
streamed split. The train iterator instead reads random-access sources whole on every host
(``process_count=1``) and takes its rows of each global batch (see ``pipeline``).

Labels that reach a loss are range-checked when a source is built: in-memory arrays and image
folders by their labels, streamed TFDS by the dataset info's class count
(:func:`check_label_range`, :func:`check_tfds_num_classes`): one-line :class:`DataConfigError`.

Subsets (``max_examples`` > 0: the kNN monitor's bank and test set, quick evals) are drawn from
the whole split *before* the per-host slicing, so every process count sees the same examples:

* arrays and image folders: :func:`balanced_subset` (seeded by ``subset_seed``, class-balanced);
* streamed TFDS: a seeded window ``split[o:o + max_examples]`` of the stored order (TFDS writes
  records in a key-hash shuffled order, so the window is a random, roughly class-proportional
  sample; an exactly balanced draw would need a pass over every record for its label, ~0.35 ms
  per record here: minutes for ImageNet). A dataset stored unshuffled (TFDS
  ``disable_shuffling``) has no such window: the request is an error.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import logging
import os
import socket
from typing import Any
from urllib.parse import urlparse

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ssl_jax import paths

log = logging.getLogger('ssl_jax.data')

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')
VALIDATE_MODES = ('decode', 'header', 'none')
SOURCES = ('tfds', 'folder')


def _tfds_reader_replaced() -> bool:
  """True while ``DatasetBuilder.as_dataset`` is not TFDS's own (``tfds.testing.mock_data``
  or another patch): its examples are not the stored dataset's, so nothing is downloaded for
  it and what it returns never enters, or is served from, the per-process cache. Read at each
  call from the class itself (the raw attribute: access through the descriptor yields new
  objects), never saved at import."""
  reader = vars(tfds.core.dataset_builder.DatasetBuilder)['as_dataset']
  return (getattr(reader, '__module__', None), getattr(reader, '__qualname__', None)) != (
      'tensorflow_datasets.core.dataset_builder', 'DatasetBuilder.as_dataset')


def clear_cache() -> None:
  """Forgets the decoded arrays and validated folders memoised in this process."""
  _load_arrays.cache_clear()
  _folder_all.cache_clear()


class DatasetNotFound(FileNotFoundError):
  """The dataset's files are not where we looked; the message says how to fix it."""


class DataConfigError(ValueError):
  """A data setting that cannot be used (unknown name, split, source); the message names the
  ``--config.data.*`` flag."""


# ----------------------------------------------------------------------------------------------
# Source types
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ArraySource:
  """Decoded in memory (a whole split, or one host's slice of it): uint8 images [n, H, W, 3],
  int32 labels [n]."""
  images: np.ndarray
  labels: np.ndarray

  @property
  def num_examples(self) -> int:
    return int(self.images.shape[0])


@dataclasses.dataclass
class FolderSource:
  """This host's slice of an image folder: file paths and int32 labels (-1 = unlabelled)."""
  paths: np.ndarray   # object array of str
  labels: np.ndarray  # int32
  class_names: tuple[str, ...]
  num_skipped: int = 0

  @property
  def num_examples(self) -> int:
    return int(len(self.paths))


@dataclasses.dataclass
class TfdsSource:
  """A streamed TFDS split (this host's slice); images stay encoded until decoded by the caller."""
  builder: Any
  split: Any           # the per-process split (string or tfds split object)
  num_examples: int
  has_labels: bool

  def dataset(self, shuffle_seed: int | None) -> tf.data.Dataset:
    """Records ``{'image': encoded bytes, 'label': int32}``, files shuffled by ``shuffle_seed``."""
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed,
                                  options=deterministic_options())
    ds = _as_dataset(self.builder, self.split, shuffle_files=shuffle_seed is not None,
                     read_config=read_config,
                     decoders={'image': tfds.decode.SkipDecoding()})
    return ds.map(_no_autograph(lambda e: _image_label(e, self.has_labels)))


def _no_autograph(fn):
  """tf.data function without AutoGraph conversion (plain graph code; conversion is slow)."""
  return tf.autograph.experimental.do_not_convert(fn)


def deterministic_options() -> tf.data.Options:
  """tf.data options with deterministic ordering on."""
  options = tf.data.Options()
  options.deterministic = True
  return options


def _image_label(example: dict, has_labels: bool) -> dict:
  label = (tf.cast(example['label'], tf.int32) if has_labels else tf.constant(-1, tf.int32))
  return {'image': example['image'], 'label': label}


# ----------------------------------------------------------------------------------------------
# TFDS
# ----------------------------------------------------------------------------------------------


def resolve_data_dir(data_cfg) -> str | None:
  """``data_cfg.data_dir``, else ``$TFDS_DATA_DIR``, else None (TFDS: ~/tensorflow_datasets)."""
  return data_cfg.get('data_dir') or os.environ.get('TFDS_DATA_DIR') or None


def _missing_message(name: str, data_dir: str | None) -> str:
  where = data_dir or '~/tensorflow_datasets (TFDS default; $TFDS_DATA_DIR is unset)'
  return (f'TFDS dataset {name!r} was not found in data_dir={where!r}. Fix: point '
          f'--config.data.data_dir (or the TFDS_DATA_DIR environment variable) at a directory that '
          f'holds {name}/<version>/, or prepare it there: on a machine with network access '
          f'`tfds build {name} --data_dir=DIR` (or --config.data.download=True) downloads it; '
          f'manual datasets such as imagenet2012 need the archives in DIR/downloads/manual.')


def tfds_builder(data_cfg):
  """The TFDS builder for ``data_cfg.name``; ValueError for an unknown name."""
  data_dir = resolve_data_dir(data_cfg)
  try:
    builder = tfds.builder(data_cfg.name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataConfigError(f'Unknown TFDS dataset name {data_cfg.name!r} (--config.data.name). '
                     f'See tfds.list_builders() for accepted names.') from e
  if data_cfg.get('download') and not _tfds_reader_replaced() and not builder.is_prepared():
    download_and_prepare(builder, data_dir)
  return builder


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f'{type(e).__name__}: {text.splitlines()[0][:300]}' if text else type(e).__name__


def download_and_prepare(builder, data_dir: str | None, *, connect_timeout_s: float = 10.0
                         ) -> None:
  """``builder.download_and_prepare()`` (``--config.data.download=True`` and the dataset is not
  prepared in ``data_dir``), with one-line errors.

  Before TFDS starts (its downloader retries a failed request for minutes), every host the
  dataset's recorded URLs name is connected to once (``connect_timeout_s``): with no network the
  run stops at once with a :class:`DatasetNotFound` naming the data dir to fill instead. Any
  failure of TFDS itself (network, disk, a manual dataset such as imagenet2012 without its
  archives, a missing module) is one line too.
  """
  name = builder.name
  where = data_dir or '~/tensorflow_datasets (TFDS default; $TFDS_DATA_DIR is unset)'
  fix = (f'put a prepared TFDS data dir at --config.data.data_dir or TFDS_DATA_DIR (now '
         f'{where!r}; `tfds build {name} --data_dir=DIR` prepares one on a machine with network)')
  manual = bool(getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None))
  if not manual:
    try:
      urls = list(type(builder).url_infos or {})
    except Exception:  # pylint: disable=broad-except  (no recorded checksums: TFDS will tell)
      urls = []
    for url in urls:
      u = urlparse(url)
      if not u.hostname:
        continue
      port = u.port or {'http': 80, 'https': 443, 'ftp': 21}.get(u.scheme, 443)
      try:
        socket.create_connection((u.hostname, port), timeout=connect_timeout_s).close()
      except OSError as e:
        raise DatasetNotFound(f'could not download {name} (no network: cannot reach '
                              f'{u.hostname}:{port}: {_first_line(e)}); {fix}.') from e
  log.info('Downloading and preparing TFDS %s into %s.', name, where)
  try:
    builder.download_and_prepare()
  except ImportError as e:
    raise DataConfigError(f'could not prepare {name}: {_first_line(e)}; install the '
                          f'requirements (pip install -r requirements.txt) or {fix}.') from e
  except Exception as e:  # pylint: disable=broad-except  (one line; the cause stays chained)
    what = 'a manual download: its archives go in DATA_DIR/downloads/manual' if manual else \
        _first_line(e)
    raise DatasetNotFound(f'could not download {name} ({what}); {fix}.') from e


def _as_dataset(builder, split, **kwargs) -> tf.data.Dataset:
  """``builder.as_dataset`` with a clear error when the data is missing."""
  try:
    return builder.as_dataset(split=split, **kwargs)
  except AssertionError as e:
    if 'could not find data' in str(e):
      data_dir = builder._data_dir_root  # pylint: disable=protected-access
      raise DatasetNotFound(_missing_message(builder.name, data_dir)) from e
    raise


def check_split(builder, split: str) -> None:
  """ValueError naming ``split`` and the accepted split names, if the builder knows its splits."""
  known = list(builder.info.splits.keys())
  if not known:  # not generated yet (or mocked): as_dataset reports missing data
    return
  try:
    builder.info.splits[split]
  except (KeyError, ValueError) as e:
    raise DataConfigError(f'Unknown split {split!r} for dataset {builder.name!r}; accepted: '
                     f'{sorted(known)} (optionally sliced, e.g. "train[:10%]").') from e


def process_split(split: str, process_index: int, process_count: int):
  """This host's slice of ``split`` (TFDS even split)."""
  if process_count == 1:
    return split
  return tfds.split_for_jax_process(split, process_index=process_index,
                                    process_count=process_count)


def _count(builder, split) -> int:
  """Examples in ``split``: from the dataset info, else (mocked/unknown) by counting records."""
  try:
    n = builder.info.splits[split].num_examples
    if n:
      return int(n)
  except (KeyError, ValueError, TypeError, AttributeError):
    pass
  ds = _as_dataset(builder, split, decoders={'image': tfds.decode.SkipDecoding()})
  cardinality = int(ds.cardinality().numpy())
  if cardinality >= 0:
    return cardinality
  return int(ds.reduce(np.int64(0), _no_autograph(lambda c, _: c + 1)).numpy())


def _is_cached_arrays(data_cfg, builder) -> bool:
  """Whether the dataset's splits are decoded into memory (:class:`ArraySource`) rather than
  streamed: ``data_cfg.cache`` on and images of one fixed shape."""
  return bool(data_cfg.get('cache')) and _fixed_image_shape(builder) is not None


def stream_subset_split(builder, split: str, max_examples: int, subset_seed: int) -> str:
  """The split string of a streamed subset: ``split`` itself when ``max_examples`` <= 0 or
  covers it, else the window ``name[o:o + max_examples]`` of its stored order at an offset
  ``o`` drawn from ``subset_seed`` (the same on every host: slice it per host afterwards).

  TFDS stores records in a key-hash shuffled order, so a window is a random sample; a dataset
  prepared with ``disable_shuffling`` may be stored in class order, so it raises.
  """
  total = _count(builder, split)
  if not 0 < max_examples < total:
    return split
  if getattr(builder.info, 'disable_shuffling', False):
    raise DataConfigError(
        f'{builder.name} is stored unshuffled (TFDS disable_shuffling), so a subset of '
        f'{max_examples} of its {total} {split!r} records would follow the stored (possibly '
        f'class) order; use the whole split (max_examples/train_examples/eval_examples = -1) '
        f'or a cached source (--config.data.cache=True, fixed-shape images).')
  instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
  if len(instructions) != 1:
    raise DataConfigError(f'a subset of the streamed split {split!r} needs a single split '
                          f'(e.g. "train" or "train[:50%]"), not a union.')
  start = instructions[0].from_ or 0
  offset = int(np.random.default_rng(subset_seed).integers(0, total - max_examples + 1))
  return f'{instructions[0].splitname}[{start + offset}:{start + offset + max_examples}]'


def tfds_num_examples(data_cfg, split: str, process_index: int = 0, process_count: int = 1,
                      *, max_examples: int = -1, subset_seed: int = 0) -> int:
  """Examples of ``split`` (or of its subset, see :func:`build_tfds_source`) on host
  ``process_index`` of ``process_count``."""
  builder = tfds_builder(data_cfg)
  check_split(builder, split)
  if _is_cached_arrays(data_cfg, builder):
    total = _count(builder, split)
    n = min(total, max_examples) if max_examples > 0 else total
    part = even_slice(n, process_index, process_count)
    return part.stop - part.start
  split = stream_subset_split(builder, split, max_examples, subset_seed)
  return _count(builder, process_split(split, process_index, process_count))


def _fixed_image_shape(builder) -> tuple[int, ...] | None:
  try:
    shape = tuple(builder.info.features['image'].shape)
  except (KeyError, AttributeError):
    return None
  return shape if all(d is not None for d in shape) else None


@functools.lru_cache(maxsize=4)
def _load_arrays(name: str, data_dir: str | None, split: str, download: bool) -> ArraySource:
  """Decodes the whole ``split`` into numpy once per process (memoised)."""
  cfg = {'name': name, 'data_dir': data_dir, 'download': download}
  builder = tfds_builder(_Cfg(cfg))
  has_labels = 'label' in builder.info.features
  ds = _as_dataset(builder, split, shuffle_files=False, read_config=tfds.ReadConfig(
      options=deterministic_options()))
  ds = ds.map(_no_autograph(lambda e: _image_label(e, has_labels)),
              num_parallel_calls=tf.data.AUTOTUNE)
  images, labels = [], []
  for batch in ds.batch(1024).prefetch(2).as_numpy_iterator():
    images.append(batch['image'])
    labels.append(batch['label'])
  if not images:
    raise ValueError(f'Split {split!r} of {name!r} is empty.')
  images = np.concatenate(images)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  log.info('Cached %d decoded images of %s/%s in memory: %.0f MB.', len(images), name, split,
           images.nbytes / 2**20)
  return ArraySource(images=images, labels=np.concatenate(labels).astype(np.int32))


def check_label_range(labels: np.ndarray, num_classes: int | None, what: str) -> None:
  """One-line :class:`DataConfigError` when labels (-1 = unlabelled aside) fall outside
  ``[0, num_classes)``: they would reach a loss as out-of-range indices (NaN, or a silently
  wrong one-hot). ``num_classes`` <= 0 or None: not known yet, nothing to check."""
  if num_classes is None or int(num_classes) <= 0 or len(labels) == 0:
    return
  n = int(num_classes)
  labels = np.asarray(labels)
  bad = (labels != -1) & ((labels < 0) | (labels >= n))
  if bad.any():
    hi = int(labels.max())
    raise DataConfigError(
        f'{int(bad.sum())} of {len(labels)} labels of {what} are outside [0, {n}) (labels '
        f'{int(labels[labels != -1].min())}..{hi}); set --config.data.num_classes={hi + 1} '
        f'(--config.data.num_classes={n} now).')


def tfds_label_classes(builder) -> int | None:
  """``builder.info.features['label'].num_classes`` (a ClassLabel), else None."""
  try:
    features = builder.info.features
    if 'label' not in features.keys():
      return None
    n = getattr(features['label'], 'num_classes', None)
    return int(n) if n else None
  except Exception:  # pylint: disable=broad-except
    return None


def check_tfds_num_classes(builder, num_classes: int | None) -> None:
  """A streamed TFDS split is not read ahead: its labels are range-checked from the dataset
  info (``features['label'].num_classes`` vs ``num_classes``), as one-line
  :class:`DataConfigError`."""
  k = tfds_label_classes(builder)
  if k is None or num_classes is None or int(num_classes) <= 0 or k <= int(num_classes):
    return
  raise DataConfigError(
      f'{builder.name} has {k} classes (TFDS info: labels 0..{k - 1}), so labels '
      f'{int(num_classes)}..{k - 1} are outside [0, {int(num_classes)}); set '
      f'--config.data.num_classes={k} (--config.data.num_classes={int(num_classes)} now).')


class _Cfg(dict):
  """Minimal dict-backed stand-in for a ConfigDict (``.get`` and attribute access)."""

  def __getattr__(self, key):
    return self[key]


def build_tfds_source(data_cfg, split: str, process_index: int = 0, process_count: int = 1,
                      *, max_examples: int = -1, subset_seed: int = 0
                      ) -> ArraySource | TfdsSource:
  """An :class:`ArraySource` when caching a fixed-shape dataset, else a :class:`TfdsSource`.

  Arrays: the whole split is decoded (once per process); ``max_examples`` > 0 keeps a
  :func:`balanced_subset` of it; then host ``process_index`` gets its :func:`even_slice`.
  Streams: ``max_examples`` > 0 reads the seeded window :func:`stream_subset_split`; then
  ``tfds.split_for_jax_process``. Either way the union over hosts is the same for every
  process count.
  """
  builder = tfds_builder(data_cfg)
  check_split(builder, split)
  if _is_cached_arrays(data_cfg, builder):
    load = _load_arrays.__wrapped__ if _tfds_reader_replaced() else _load_arrays
    full = load(data_cfg.name, resolve_data_dir(data_cfg), split, bool(data_cfg.get('download')))
    check_label_range(full.labels, data_cfg.get('num_classes'), f'{data_cfg.name}/{split}')
    if 0 < max_examples < full.num_examples:
      keep = balanced_subset(full.labels, max_examples, subset_seed)
      full = ArraySource(images=full.images[keep], labels=full.labels[keep])
    if process_count == 1:
      return full
    part = even_slice(full.num_examples, process_index, process_count)
    return ArraySource(images=full.images[part], labels=full.labels[part])
  if data_cfg.get('cache'):
    log.warning('data_cfg.cache is on but %s images have no fixed shape; streaming instead.',
                data_cfg.name)
  check_tfds_num_classes(builder, data_cfg.get('num_classes'))
  psplit = process_split(stream_subset_split(builder, split, max_examples, subset_seed),
                         process_index, process_count)
  return TfdsSource(builder=builder, split=psplit, num_examples=_count(builder, psplit),
                    has_labels='label' in builder.info.features)


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def _walk_images(class_dir: str):
  """Image files under ``class_dir``, sub-folders included (sorted, hidden entries skipped).

  Local folders: symbolically linked sub-folders are followed; each directory is read once,
  by its real path, so a link cycle (``a/loop -> a``) or a second link to a folder already read
  is skipped with one warning naming it (never a hang, never an image twice). ``gs://`` has no
  links.
  """
  local = not paths.is_remote(class_dir)
  seen: set[str] = set()
  # Local only: the real path of a folder, the symlink-cycle guard (no run path is opened here).
  real = paths.realpath
  seen.add(real(class_dir))
  for dirpath, dirnames, filenames in paths.walk(class_dir, followlinks=local):
    keep = []
    for d in sorted(d for d in dirnames if not d.startswith('.')):
      r = real(paths.join(dirpath, d))
      if r in seen:
        log.warning('Skipping %s: a link to %s, which is already read (a link cycle or a '
                    'second link to one folder).', paths.join(dirpath, d), r)
        continue
      seen.add(r)
      keep.append(d)
    dirnames[:] = keep
    for f in sorted(filenames):
      if _is_image(f):
        yield paths.join(dirpath, f)


def list_image_folder(root: str, split: str) -> tuple[list[str], list[int], tuple[str, ...]]:
  """Sorted files of ``root/<split>``: (paths, labels, class names).

  With class sub-directories, labels index the sorted class names (files directly in
  ``root/<split>`` are then ignored, with a warning); without, every label is -1.
  """
  if not root:
    raise DataConfigError('--config.data.folder_root is not set: point it at a directory holding '
                     '<split>/<class>/*.jpg (or <split>/*.jpg).')
  split_dir = paths.join(root, split)
  if not paths.isdir(split_dir):
    have = [d for d in paths.listdir(root) if paths.isdir(paths.join(root, d))] \
        if paths.isdir(root) else None
    if have is None:
      raise DatasetNotFound(f'Image folder root {root!r} does not exist (--config.data.folder_root).')
    raise DataConfigError(f'Unknown split {split!r}: no directory {split_dir!r}; accepted '
                     f'(sub-directories of {root!r}): {have}.')
  # Hidden entries (.ipynb_checkpoints, .DS_Store, ...) are never classes or images.
  entries = [e for e in paths.listdir(split_dir) if not e.startswith('.')]
  classes = tuple(d for d in entries if paths.isdir(paths.join(split_dir, d)))
  loose = [f for f in entries if _is_image(f) and paths.isfile(paths.join(split_dir, f))]
  files, labels = [], []
  if classes:
    if loose:
      log.warning('%d image files directly in %s are ignored because class directories '
                  'exist.', len(loose), split_dir)
    for label, cls in enumerate(classes):
      for f in _walk_images(paths.join(split_dir, cls)):
        files.append(f)
        labels.append(label)
  else:
    files = [paths.join(split_dir, f) for f in loose]
    labels = [-1] * len(files)
  if not files:
    raise DatasetNotFound(f'No images ({"/".join(IMAGE_EXTENSIONS)}) under {split_dir!r}.')
  return files, labels, classes


def _check_decode(path: str) -> str | None:
  try:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    if image.shape[0] == 0 or image.shape[1] == 0:
      return 'empty image'
    return None
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}'


def _check_header(path: str) -> str | None:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    with Image.open(io.BytesIO(paths.read_bytes(path)) if paths.is_remote(path) else path) as im:  # PIL, not the built-in: gs:// read via paths
      im.verify()
    return None
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'


def validate_images(files: list[str], mode: str = 'decode', num_threads: int | None = None
                    ) -> np.ndarray:
  """Bool mask of the files that can be read; warns naming each bad file, logs the count.

  ``mode``: ``'decode'`` fully decodes each file with ``tf.io.decode_image`` (the decoder the
  pipeline uses, so what passes here decodes later; ~1-5 ms per ImageNet-sized JPEG per
  thread), ``'header'`` only runs PIL's ``verify`` (fast, misses truncated JPEG data),
  ``'none'`` trusts the folder (a bad file then stops training when it is reached).
  Runs in a thread pool (TF and PIL release the GIL while decoding).
  """
  if mode not in VALIDATE_MODES:
    raise DataConfigError(f'Unknown folder_validate mode {mode!r}; accepted: {list(VALIDATE_MODES)}.')
  if mode == 'none':
    return np.ones(len(files), bool)
  check = _check_decode if mode == 'decode' else _check_header
  threads = num_threads or min(32, 2 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    errors = list(pool.map(check, files, chunksize=64))
  ok = np.array([e is None for e in errors], bool)
  for path, err in zip(files, errors):
    if err is not None:
      log.warning('Skipping undecodable image %s (%s).', path, err)
  if not ok.all():
    log.warning('Skipped %d of %d image files that could not be decoded.',
                int((~ok).sum()), len(files))
  return ok


def even_slice(n: int, process_index: int, process_count: int) -> slice:
  """Contiguous slice ``process_index`` of ``process_count`` near-equal parts of ``range(n)``."""
  bounds = [n * i // process_count for i in range(process_count + 1)]
  return slice(bounds[process_index], bounds[process_index + 1])


@functools.lru_cache(maxsize=8)
def _folder_all(root: str, split: str, validate: str) -> FolderSource:
  """The whole validated folder split (memoised per process: validation runs once)."""
  files, labels, classes = list_image_folder(root, split)
  ok = validate_images(files, validate)
  return FolderSource(paths=np.array(files, dtype=object)[ok],
                      labels=np.array(labels, np.int32)[ok], class_names=classes,
                      num_skipped=int((~ok).sum()))


def balanced_subset(labels, n: int, seed: int) -> np.ndarray:
  """Sorted indices of a seeded, class-balanced random draw of ``n`` of ``labels``.

  Each class gets ``n // C`` (the remainder to classes picked by the seed); a class with fewer
  examples gives its shortfall to the others. Unlabelled data (all -1): a uniform draw. The
  draw depends only on (labels, n, seed), never on the process count.
  """
  labels = np.asarray(labels)
  if n <= 0 or n >= len(labels):
    return np.arange(len(labels))
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
  quota = {c: 0 for c in classes}
  left = n
  while left > 0:
    open_ = [c for c in classes if quota[c] < len(pools[c])]
    share, extra = divmod(left, len(open_))
    lucky = set(rng.permutation(open_)[:extra].tolist())
    for c in open_:
      add = min(share + (c in lucky), len(pools[c]) - quota[c])
      quota[c] += add
      left -= add
  return np.sort(np.concatenate([pools[c][:quota[c]] for c in classes]))


def num_skipped(data_cfg, split: str) -> int:
  """Image files of ``split`` skipped as undecodable (image folders; 0 for TFDS)."""
  if data_cfg.get('source', 'tfds') != 'folder':
    return 0
  return _folder_all(data_cfg.folder_root, split,
                     data_cfg.get('folder_validate', 'decode')).num_skipped


@dataclasses.dataclass(frozen=True)
class FolderSummary:
  """What :func:`check_folder_source` found: the class folders shared by both splits (() for
  unlabelled folders), the ``num_classes`` now in the data config and where it came from."""
  root: str
  train_split: str
  eval_split: str
  class_names: tuple[str, ...]
  num_classes: int
  num_classes_from: str      # 'folders' (derived) or 'config' (set, and equal to the folders)
  num_train: int             # usable images of train_split (after validation)
  num_eval: int

  def describe(self) -> str:
    if not self.class_names:
      return f'folder {self.root} (unlabelled)'
    return f'folder {self.root} ({len(self.class_names)} classes)'


def num_classes_is_set(data_cfg) -> bool:
  """Whether ``data_cfg.num_classes`` was chosen by the user for an image folder.

  The rule: a value <= 0 (or None) is "from the folders"; so is the value of the dataset preset
  the config came from (``data_cfg.dataset``, e.g. 10 for cifar10 with
  ``--config.data.source=folder``, 100 for imagenet100): a preset's count describes the preset's
  dataset, not this folder. Any other positive value is set and must equal the folders. (An
  explicit flag equal to the preset's value cannot be told apart from the preset; it is then
  replaced by the folder count, logged.) A config without ``dataset`` counts as set.
  """
  n = data_cfg.get('num_classes')
  if n is None or int(n) <= 0:
    return False
  from ssl_jax.data import PRESETS  # pylint: disable=import-outside-toplevel
  preset = PRESETS.get(data_cfg.get('dataset') or '')
  return preset is None or int(n) != int(preset['num_classes'])


def _one(items) -> str:
  return repr(list(items))


def check_folder_source(data_cfg, train_split: str, eval_split: str) -> FolderSummary | None:
  """The checks every run on an image folder passes before it reads a label (training and every
  offline mode call this): None for other sources (their labels are range-checked when loaded,
  :func:`check_label_range`).

  * ``train_split`` and ``eval_split`` hold the same class folders (labels index the sorted
    folder names, so one stray folder such as ``__MACOSX`` shifts every label after it);
  * a labelled split has at least 2 class folders;
  * ``num_classes`` equals the number of class folders: it is set from the folders (in place,
    ``data_cfg.num_classes``, logged) unless the user set it (:func:`num_classes_is_set`), and a
    set value that disagrees is an error.

  Each failure is one-line :class:`DataConfigError` (``main``: ``Config error: ...``, exit 2).
  Folders without class sub-folders (unlabelled images, label -1) pass: there is nothing to
  compare.
  """
  if data_cfg.get('source', 'tfds') != 'folder':
    n = data_cfg.get('num_classes')
    if data_cfg.get('source', 'tfds') == 'tfds' and (n is None or int(n) <= 0):
      k = tfds_label_classes(tfds_builder(data_cfg))
      if k:
        log.info('num_classes=%d from the TFDS info of %s.', k, data_cfg.name)
        data_cfg.num_classes = k
    return None
  root = data_cfg.folder_root
  validate = data_cfg.get('folder_validate', 'decode')
  a = _folder_all(root, train_split, validate)
  b = _folder_all(root, eval_split, validate) if eval_split != train_split else a
  ca, cb = a.class_names, b.class_names
  where = f'image folder {root}'
  if ca and cb and ca != cb:
    only_a = sorted(set(ca) - set(cb))
    only_b = sorted(set(cb) - set(ca))
    parts = []
    if only_a:
      parts.append(f'{train_split}/ has classes not in {eval_split}/: {_one(only_a)}')
    if only_b:
      parts.append(f'{eval_split}/ has classes not in {train_split}/: {_one(only_b)}')
    if not parts:
      parts.append(f'{train_split}/ and {eval_split}/ name the same classes in another order')
    raise DataConfigError(f'{where}: {"; ".join(parts)}; labels index the sorted class folders, '
                          f'so they would not match. Make both splits hold the same class '
                          f'folders.')
  classes = ca or cb
  for split, c in ((train_split, ca), (eval_split, cb)):
    if len(c) == 1:
      raise DataConfigError(
          f'{where}: {split}/ has one class folder ({c[0]!r}); a labelled folder needs at least '
          f'2 classes (with one, every kNN/probe prediction is right). Add the other class '
          f'folders, or put unlabelled images directly in {split}/.')
  n_cfg = data_cfg.get('num_classes')
  origin = 'config'
  if classes:
    if num_classes_is_set(data_cfg):
      if int(n_cfg) != len(classes):
        raise DataConfigError(
            f'{where}: --config.data.num_classes={int(n_cfg)} but {train_split}/ has '
            f'{len(classes)} class folders; set --config.data.num_classes={len(classes)} (or -1: '
            f'from the folders).')
    else:
      origin = 'folders'
      if n_cfg is None or int(n_cfg) != len(classes):
        log.info('num_classes=%d from the class folders of %s (was %s).', len(classes), root,
                 n_cfg)
      data_cfg.num_classes = len(classes)
  summary = FolderSummary(root=str(root), train_split=train_split, eval_split=eval_split,
                          class_names=tuple(classes), num_classes=int(data_cfg.get('num_classes')
                                                                      or -1),
                          num_classes_from=origin, num_train=a.num_examples,
                          num_eval=b.num_examples)
  _SUMMARIES[(str(root), train_split)] = summary
  return summary


_SUMMARIES: dict[tuple[str, str], FolderSummary] = {}


def check_same_classes(data_cfg, train_split: str, eval_split: str) -> FolderSummary | None:
  """The former name of :func:`check_folder_source` (the trainer calls it): the full check."""
  return check_folder_source(data_cfg, train_split, eval_split)


def describe(data_cfg) -> str:
  """A short description of the data for a banner: ``folder /data/pets (12 classes)``,
  ``tfds cifar10 (10 classes)``. Reads nothing from TFDS; for a folder not checked yet, lists
  the class folders of its train split (one directory listing)."""
  kind = data_cfg.get('source', 'tfds')
  if kind == 'folder':
    root, split = str(data_cfg.get('folder_root')), data_cfg.get('train_split', 'train')
    if (root, split) in _SUMMARIES:
      return _SUMMARIES[(root, split)].describe()
    split_dir = paths.join(root, split)
    try:
      classes = [d for d in paths.listdir(split_dir)
                 if not d.startswith('.') and paths.isdir(paths.join(split_dir, d))]
    except Exception:  # pylint: disable=broad-except  (a banner never fails the run)
      return f'folder {root}'
    return f'folder {root} ({len(classes)} classes)' if classes else f'folder {root} (unlabelled)'
  n = data_cfg.get('num_classes')
  return f'{kind} {data_cfg.get("name")}' + (f' ({int(n)} classes)' if n and int(n) > 0 else '')


def build_folder_source(data_cfg, split: str, process_index: int = 0, process_count: int = 1,
                        *, max_examples: int = -1, subset_seed: int = 0) -> FolderSource:
  """This host's slice of the validated folder split; with ``max_examples`` > 0, of a seeded
  class-balanced subset of it (:func:`balanced_subset`, drawn before the per-host slicing, so
  every process count evaluates the same images)."""
  full = _folder_all(data_cfg.folder_root, split, data_cfg.get('folder_validate', 'decode'))
  if num_classes_is_set(data_cfg):   # else check_folder_source sets it from the folders
    check_label_range(full.labels, data_cfg.num_classes, f'{data_cfg.folder_root}/{split}')
  if 0 < max_examples < full.num_examples:
    keep = balanced_subset(full.labels, max_examples, subset_seed)
    full = dataclasses.replace(full, paths=full.paths[keep], labels=full.labels[keep])
  sl = even_slice(full.num_examples, process_index, process_count)
  return dataclasses.replace(full, paths=full.paths[sl], labels=full.labels[sl])


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def build_source(data_cfg, split: str, process_index: int = 0, process_count: int = 1, *,
                 max_examples: int = -1, subset_seed: int = 0):
  """The source of ``split`` for host ``process_index`` of ``process_count``.

  ``max_examples`` > 0 reads a subset of ``split`` drawn from ``subset_seed`` before the per-host
  slicing (the union over hosts does not depend on the process count): a class-balanced random
  draw for arrays and image folders, a seeded window of the (hash-shuffled) stored order for
  streamed TFDS (see :func:`build_tfds_source`, :func:`build_folder_source`).
  """
  kind = data_cfg.get('source', 'tfds')
  if kind == 'tfds':
    return build_tfds_source(data_cfg, split, process_index, process_count,
                             max_examples=max_examples, subset_seed=subset_seed)
  if kind == 'folder':
    return build_folder_source(data_cfg, split, process_index, process_count,
                               max_examples=max_examples, subset_seed=subset_seed)
  raise DataConfigError(f'Unknown data source {kind!r} (--config.data.source); accepted: {list(SOURCES)}.')


def num_examples(data_cfg, split: str, process_index: int = 0, process_count: int = 1, *,
                 max_examples: int = -1, subset_seed: int = 0) -> int:
  """Examples of ``split`` (or of its subset, as :func:`build_source`) on one host (all hosts
  with the defaults)."""
  kind = data_cfg.get('source', 'tfds')
  if kind == 'tfds':
    return tfds_num_examples(data_cfg, split, process_index, process_count,
                             max_examples=max_examples, subset_seed=subset_seed)
  if kind == 'folder':
    return build_folder_source(data_cfg, split, process_index, process_count,
                               max_examples=max_examples, subset_seed=subset_seed).num_examples
  raise DataConfigError(f'Unknown data source {kind!r} (--config.data.source); accepted: {list(SOURCES)}.')


def class_names(data_cfg, split: str) -> tuple[str, ...] | None:
  """Label names of ``split`` (TFDS ``ClassLabel`` names, or an image folder's class folders),
  or None when the dataset has none."""
  kind = data_cfg.get('source', 'tfds')
  if kind == 'folder':
    return tuple(build_folder_source(data_cfg, split).class_names) or None
  if kind == 'tfds':
    features = tfds_builder(data_cfg).info.features
    label = features['label'] if 'label' in features.keys() else None
    names = getattr(label, 'names', None)
    return tuple(names) if names else None
  raise DataConfigError(f'Unknown data source {kind!r} (--config.data.source); accepted: {list(SOURCES)}.')


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/BMP/GIF bytes -> uint8 [H, W, 3]."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  return tf.ensure_shape(image, [None, None, 3])
