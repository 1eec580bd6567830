"""Input pipeline: sources (TFDS or image folder), view recipes, tf.data iterators.

The trainer's API::

  from ssl_jax import data
  cfg = data.default_data_config('cifar10')        # then set cfg.views = 'moco', ...
  it = data.make_train_iterator(cfg, global_batch_size=512, seed=0, start_step=step)
  batch = next(it)  # this host's slice: {'view1': uint8 [b,32,32,3], 'view2': ..., 'label': [b]}
  for batch in data.make_eval_iterator(cfg, split=cfg.eval_split, global_batch_size=512): ...
  x = data.normalize(batch['view1'])  # on device, inside jit

Config fields (``default_data_config``):

==================  =============================================================================
name                TFDS builder name ('cifar10', 'imagenet2012'), or a label for a folder dataset;
                    'synthetic': random uint8 images of this config's shape, no input pipeline
                    (step benchmarks; ``data/synthetic.py``, ``synthetic_examples`` per epoch)
source              'tfds' or 'folder'
data_dir            TFDS data dir; None -> $TFDS_DATA_DIR, else TFDS's default
download            let TFDS download and prepare a missing dataset (needs network; off by
                    default: a run never touches the network unless asked, and on a pod every
                    host would download at once; with no network the run stops at once with one
                    line naming the data dir to fill)
folder_root         image folder root: <root>/<split>/<class>/**/*.jpg|png (sub-folders, linked
                    ones included, are read) or <root>/<split>/*.jpg (unlabelled)
folder_validate     'decode' (every file decoded once at start-up; bad ones skipped and named),
                    'header' (PIL verify only), 'none'
train_split         e.g. 'train' (TFDS slicing such as 'train[:10%]' works)
eval_split          e.g. 'test' / 'validation' / 'val'
image_size          side of the (main) train views and of eval images
eval_resize         eval: shorter side resized to this, then centre crop image_size
num_classes         number of labels (for probes). Image folders: from the class folders unless
                    set (<= 0 or the preset's own value: from the folders; another value must
                    equal them; ``check_folder_source``). Labels outside [0, num_classes) stop
                    the run when the data is loaded.
views               recipe name: 'byol', 'moco', 'weak_strong', 'multi_res', 'aps' (views.RECIPES)
crop_scale          None -> each recipe's own RandomResizedCrop scale; (lo, hi) overrides all views
blur                False disables every Gaussian blur (CIFAR presets)
extra_resolutions   sides of the low-resolution views of 'multi_res' ('view_lr0', ...)
shuffle_buffer      shuffle buffer of streamed TFDS sources (array/folder sources shuffle fully)
cache               decode a fixed-shape TFDS split into memory once per process (CIFAR)
num_workers         tf.data parallelism (map calls and private thread pool); None -> AUTOTUNE
==================  =============================================================================
"""
from __future__ import annotations

import importlib

import ml_collections

from ssl_jax.data import synthetic
from ssl_jax.data.recipes import RECIPES, ViewSpec, get_recipe, resolve_views  # noqa: F401 (TF-free)

# Everything else loads TensorFlow, so it is imported on first use (PEP 562): importing
# ``ssl_jax.data`` (and so the trainer, the methods and the synthetic source) needs no TF.
_LAZY = {
    'MEAN_RGB': 'pipeline', 'STDDEV_RGB': 'pipeline', 'local_batch_size': 'pipeline',
    'normalize': 'pipeline',
    'DataConfigError': 'sources', 'DatasetNotFound': 'sources', 'balanced_subset': 'sources',
    'clear_cache': 'sources', 'build_source': 'sources', 'FolderSummary': 'sources',
}


def _hide_accelerators_from_tf() -> None:
  """tf.data runs on the host CPU; keep TensorFlow off any accelerator so it reserves no memory
  there (as big_vision and the Flax examples do)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # devices already initialised by the caller: leave them
    pass


def __getattr__(name: str):
  if name not in _LAZY:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  _hide_accelerators_from_tf()
  value = getattr(importlib.import_module(f'ssl_jax.data.{_LAZY[name]}'), name)
  globals()[name] = value
  return value


_COMMON = dict(
    source='tfds', data_dir=None, download=False, folder_root=None, folder_validate='decode',
    train_split='train', views='byol', crop_scale=None, num_workers=None)

PRESETS: dict[str, dict] = {
    'cifar10': dict(_COMMON, name='cifar10', eval_split='test', image_size=32, eval_resize=32,
                    num_classes=10, blur=False, extra_resolutions=(24, 16),
                    shuffle_buffer=50_000, cache=True),
    'cifar100': dict(_COMMON, name='cifar100', eval_split='test', image_size=32, eval_resize=32,
                     num_classes=100, blur=False, extra_resolutions=(24, 16),
                     shuffle_buffer=50_000, cache=True),
    # ImageNet-100 (the CMC class list) is not in TFDS: an image folder with train/ and val/.
    'imagenet100': dict(_COMMON, name='imagenet100', source='folder', eval_split='val',
                        image_size=224, eval_resize=256, num_classes=100, blur=True,
                        extra_resolutions=(160, 128, 96), shuffle_buffer=16_384, cache=False),
    'imagenet': dict(_COMMON, name='imagenet2012', eval_split='validation', image_size=224,
                     eval_resize=256, num_classes=1000, blur=True,
                     extra_resolutions=(160, 128, 96), shuffle_buffer=16_384, cache=False),
}


# ---------------------------------------------------------------------------------------------
# The trainer's entry points: the synthetic source (TF-free) or the tf.data pipeline.
# ---------------------------------------------------------------------------------------------
def _pipeline():
  _hide_accelerators_from_tf()
  return importlib.import_module('ssl_jax.data.pipeline')


def _sources():
  _hide_accelerators_from_tf()
  return importlib.import_module('ssl_jax.data.sources')


def make_train_iterator(data_cfg, *, global_batch_size: int, seed: int, start_step: int = 0,
                        process_index: int | None = None, process_count: int | None = None,
                        **kwargs):
  """This host's slices of the global train batches (``pipeline.make_train_iterator``)."""
  if synthetic.is_synthetic(data_cfg):
    pi, pc = _process(process_index, process_count)
    return synthetic.make_train_iterator(data_cfg, local_batch=global_batch_size // pc,
                                         seed=seed, process_index=pi)
  return _pipeline().make_train_iterator(
      data_cfg, global_batch_size=global_batch_size, seed=seed, start_step=start_step,
      process_index=process_index, process_count=process_count, **kwargs)


def make_eval_iterator(data_cfg, *, split: str, global_batch_size: int,
                       process_index: int | None = None, process_count: int | None = None,
                       max_examples: int = -1, **kwargs):
  """One pass over this host's slice of ``split`` (``pipeline.make_eval_iterator``)."""
  if synthetic.is_synthetic(data_cfg):
    pi, pc = _process(process_index, process_count)
    n = synthetic.num_examples(data_cfg) if max_examples <= 0 else max_examples
    return synthetic.make_eval_iterator(data_cfg, local_batch=global_batch_size // pc,
                                        num_batches=-(-n // global_batch_size), process_index=pi)
  return _pipeline().make_eval_iterator(
      data_cfg, split=split, global_batch_size=global_batch_size, process_index=process_index,
      process_count=process_count, max_examples=max_examples, **kwargs)


def num_examples(data_cfg, split: str) -> int:
  if synthetic.is_synthetic(data_cfg):
    return synthetic.num_examples(data_cfg)
  return _pipeline().num_examples(data_cfg, split)


def steps_per_epoch(data_cfg, global_batch_size: int) -> int:
  """Train examples // global batch (the remainder is dropped each epoch)."""
  if synthetic.is_synthetic(data_cfg):
    return max(1, synthetic.num_examples(data_cfg) // global_batch_size)
  return _pipeline().steps_per_epoch(data_cfg, global_batch_size)


def check_folder_source(data_cfg, train_split: str, eval_split: str):
  """The data checks every run passes before it reads a label (training and every offline
  mode): ``sources.check_folder_source``. For an image folder: the same class folders in both
  splits, at least 2 classes, ``num_classes`` equal to the folders (set from them in place
  unless the user set it; see ``sources.num_classes_is_set``); returns a ``FolderSummary``.
  TFDS: ``num_classes`` <= 0 is set from the dataset info; returns None (labels are
  range-checked when loaded). Failures: one-line ``DataConfigError``."""
  if synthetic.is_synthetic(data_cfg):
    return None
  return _sources().check_folder_source(data_cfg, train_split, eval_split)


def check_same_classes(data_cfg, train_split: str, eval_split: str):
  """The trainer's name for :func:`check_folder_source` (the full check)."""
  return check_folder_source(data_cfg, train_split, eval_split)


def describe(data_cfg) -> str:
  """A short description for a banner: ``folder /data/pets (12 classes)``,
  ``tfds cifar10 (10 classes)``, ``synthetic 32x32 (10 classes)``. Cheap: no TFDS read; a
  folder not yet checked costs one listing of its train split."""
  n = data_cfg.get('num_classes')
  classes = f' ({int(n)} classes)' if n is not None and int(n) > 0 else ''
  if synthetic.is_synthetic(data_cfg):
    return f'synthetic {data_cfg.image_size}x{data_cfg.image_size}{classes}'
  if data_cfg.get('source', 'tfds') == 'folder':
    return _sources().describe(data_cfg)
  return f'{data_cfg.get("source", "tfds")} {data_cfg.name}{classes}'


def num_skipped(data_cfg, split: str) -> int:
  return 0 if synthetic.is_synthetic(data_cfg) else _sources().num_skipped(data_cfg, split)


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


def default_data_config(dataset: str) -> ml_collections.ConfigDict:
  """The preset data config of ``dataset`` ('cifar10', 'cifar100', 'imagenet100', 'imagenet')."""
  if dataset not in PRESETS:
    raise ValueError(f'Unknown dataset preset {dataset!r}; accepted: {sorted(PRESETS)}.')
  cfg = ml_collections.ConfigDict(dict(PRESETS[dataset], dataset=dataset))
  return cfg


__all__ = [
    'DataConfigError', 'DatasetNotFound', 'FolderSummary', 'balanced_subset', 'build_source',
    'check_folder_source', 'check_same_classes', 'describe', 'num_skipped', 'MEAN_RGB',
    'PRESETS', 'RECIPES', 'STDDEV_RGB', 'ViewSpec', 'clear_cache',
    'default_data_config', 'get_recipe', 'local_batch_size', 'make_eval_iterator',
    'make_train_iterator', 'normalize', 'num_examples', 'resolve_views', 'steps_per_epoch',
]
