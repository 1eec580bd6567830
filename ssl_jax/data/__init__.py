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
name                TFDS builder name ('cifar10', 'imagenet2012'), or a label for a folder dataset
source              'tfds' or 'folder'
data_dir            TFDS data dir; None -> $TFDS_DATA_DIR, else TFDS's default
download            let TFDS download and prepare a missing dataset (needs network)
folder_root         image folder root: <root>/<split>/<class>/*.jpg|png or <root>/<split>/*.jpg
folder_validate     'decode' (every file decoded once at start-up; bad ones skipped and named),
                    'header' (PIL verify only), 'none'
train_split         e.g. 'train' (TFDS slicing such as 'train[:10%]' works)
eval_split          e.g. 'test' / 'validation' / 'val'
image_size          side of the (main) train views and of eval images
eval_resize         eval: shorter side resized to this, then centre crop image_size
num_classes         number of labels (for probes)
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

import ml_collections
import tensorflow as tf

# tf.data runs on the host CPU; keep TensorFlow off any accelerator so it reserves no memory
# there (as big_vision and the Flax examples do).
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # devices already initialised by the caller: leave them
  pass

from ssl_jax.data.pipeline import MEAN_RGB  # noqa: E402
from ssl_jax.data.pipeline import STDDEV_RGB  # noqa: E402
from ssl_jax.data.pipeline import local_batch_size  # noqa: E402
from ssl_jax.data.pipeline import make_eval_iterator  # noqa: E402
from ssl_jax.data.pipeline import make_train_iterator  # noqa: E402
from ssl_jax.data.pipeline import normalize  # noqa: E402
from ssl_jax.data.pipeline import num_examples  # noqa: E402
from ssl_jax.data.pipeline import steps_per_epoch  # noqa: E402
from ssl_jax.data.sources import DataConfigError, DatasetNotFound  # noqa: E402
from ssl_jax.data.sources import balanced_subset, check_same_classes, num_skipped  # noqa: E402
from ssl_jax.data.sources import clear_cache  # noqa: E402
from ssl_jax.data.views import RECIPES  # noqa: E402
from ssl_jax.data.views import ViewSpec  # noqa: E402
from ssl_jax.data.views import get_recipe  # noqa: E402
from ssl_jax.data.views import resolve_views  # noqa: E402

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


def default_data_config(dataset: str) -> ml_collections.ConfigDict:
  """The preset data config of ``dataset`` ('cifar10', 'cifar100', 'imagenet100', 'imagenet')."""
  if dataset not in PRESETS:
    raise ValueError(f'Unknown dataset preset {dataset!r}; accepted: {sorted(PRESETS)}.')
  cfg = ml_collections.ConfigDict(dict(PRESETS[dataset], dataset=dataset))
  return cfg


__all__ = [
    'DataConfigError', 'DatasetNotFound', 'balanced_subset', 'check_same_classes', 'num_skipped', 'MEAN_RGB', 'PRESETS', 'RECIPES', 'STDDEV_RGB', 'ViewSpec', 'clear_cache',
    'default_data_config', 'get_recipe', 'local_batch_size', 'make_eval_iterator',
    'make_train_iterator', 'normalize', 'num_examples', 'resolve_views', 'steps_per_epoch',
]
