"""What every offline evaluation shares: the pretrained network, its features, the eval config.

``ssl_jax.checkpoint.load_pretrained(WORKDIR)`` reads a training run written by ``ssl_jax.train``::

  WORKDIR/config.json                     the run's config (ml_collections.ConfigDict)
  WORKDIR/checkpoints/<step>/state        the TrainState (Orbax PyTree)
  WORKDIR/checkpoints/<step>/meta         {'step', 'epoch', ...} (JSON)

The newest step's ``state`` item is restored with Orbax *without a target*: the structure comes
from the checkpoint's own metadata and every leaf is restored as a host numpy array (so a run
trained on 8 GPUs or a TPU pod is evaluated on any device count, and no method code is needed
to rebuild the TrainState). Only ``params`` / ``batch_stats`` (and ``target_params`` when asked
for the EMA weights) are read from disk, not the optimizer moments or memory banks.

``FrozenNet`` wraps the pretraining ``SSLNet`` (backbone + projector, no predictor) in eval mode
(BatchNorm running statistics) and gives ``features`` (the representation probes read: ResNet
average pool / ViT CLS) and ``proj`` (projector output). ``ssl_jax.evals.features.extract`` runs it over a split
(sharded along ``'data'``, centre-crop eval transform) and returns host arrays.

``--mode=export`` is ``ssl_jax.export.run``; reading checkpoints is ``ssl_jax.checkpoint``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config_lib, utils, paths
from ssl_jax import data as data_lib
from ssl_jax import sharding

WEIGHTS = ckpt_lib.WEIGHTS
FEATURES = ('backbone', 'projector')


def log(msg: str) -> None:
  logging.info(msg)
  if jax.process_index() == 0:
    print(msg, flush=True)


# Reading a training run lives in ssl_jax/checkpoint.py (with everything else about workdirs).
PretrainedNotFound = ckpt_lib.PretrainedNotFound
load_pretrained = ckpt_lib.load_pretrained
restore_state = ckpt_lib.restore_state


# =============================================================================================
# Eval configs: shared fields, data config, validation
# =============================================================================================
def base_eval_config(arg: str | None) -> tuple[ml_collections.ConfigDict, list[str]]:
  """Fields every eval mode reads; returns (config, the unparsed tokens of ``arg``).

  ``arg`` is comma-separated: a dataset preset (cifar10, cifar100, imagenet100, imagenet),
  ``runlocal`` (tiny: a few hundred examples; also returned with the other tokens so that the
  mode's config can shrink its own fields) and mode-specific tokens.
  """
  c = ml_collections.ConfigDict()
  c.pretrained = ''            # the training run's --workdir
  c.checkpoint_step = -1       # -1: newest
  c.weights = 'online'         # 'online' or 'target' (EMA)
  c.dataset = ''               # '' -> the pretraining dataset; else a preset name
  c.source = ''                # '' -> the pretraining run's (or preset's); 'tfds' or 'folder'
  c.data_dir = ''              # TFDS data dir ('' -> $TFDS_DATA_DIR)
  c.folder_root = ''           # image-folder datasets (with source 'folder')
  c.train_split = ''           # '' -> the dataset's train split
  c.eval_split = ''            # '' -> the dataset's eval split
  c.train_examples = -1        # > 0: a seeded class-balanced subset of N train examples
  c.eval_examples = -1         # > 0: a seeded class-balanced subset of N eval examples
  c.eval_batch_size = 512      # feature extraction / evaluation batch (global)
  c.seed = 0
  c.num_devices = -1           # -1: all devices
  c.export = ml_collections.ConfigDict({'formats': ('pth', 'npz'), 'include_probe': False})
  rest = []
  for token in filter(None, (t.strip() for t in (arg or '').split(','))):
    if token in config_lib.DATASETS:
      c.dataset = token
    else:
      rest.append(token)
  if 'runlocal' in rest:
    c.train_examples = 512
    c.eval_examples = 256
    c.eval_batch_size = 128
  return c, rest


def reject_tokens(tokens: list[str], accepted: list[str]) -> None:
  if tokens:
    raise config_lib.ConfigError(
        f'config arg token(s) {tokens} not recognised; accepted: a dataset '
        f'({", ".join(config_lib.DATASETS)}), runlocal, {", ".join(accepted)}')


require = config_lib.require


def validate_common(c: ml_collections.ConfigDict) -> None:
  require(bool(c.pretrained), 'pretrained', c.pretrained,
          'the --workdir of a training run (--config.pretrained=WORKDIR)')
  require(c.weights in WEIGHTS, 'weights', c.weights, ', '.join(WEIGHTS))
  require(c.dataset == '' or c.dataset in data_lib.PRESETS, 'dataset', c.dataset,
          "'' (the pretraining dataset) or " + ', '.join(sorted(data_lib.PRESETS)))
  require(isinstance(c.eval_batch_size, int) and c.eval_batch_size > 0, 'eval_batch_size',
          c.eval_batch_size, 'a positive integer')


def eval_data_config(c: ml_collections.ConfigDict, pre: ml_collections.ConfigDict
                     ) -> ml_collections.ConfigDict:
  """The data config of an evaluation: the pretraining run's, or the preset ``c.dataset``, with
  the eval config's overrides. An override that the resulting source would not read is an error
  naming the key that would (never silently ignored)."""
  if c.dataset:
    d = data_lib.default_data_config(c.dataset)
    origin = f'the preset {c.dataset!r} (from the config argument)'
  else:
    d = ml_collections.ConfigDict(pre.data.to_dict())
    origin = f'the training run {c.pretrained!r}'
  if c.get('source'):
    require(c.source in ('tfds', 'folder'), 'source', c.source, "'tfds' or 'folder'")
    d.source = c.source
  source = d.get('source', 'tfds')
  if c.get('folder_root') and source != 'folder':
    raise config_lib.ConfigError(
        f'--config.folder_root={c.folder_root!r} is not read: the evaluation data is the TFDS '
        f'dataset {d.name!r} of {origin}. To evaluate the image folder add --config.source=folder.')
  if c.get('data_dir') and source == 'folder':
    raise config_lib.ConfigError(
        f'--config.data_dir={c.data_dir!r} is not read: the evaluation data is an image folder '
        f'({origin}); set --config.folder_root instead.')
  for key in ('data_dir', 'folder_root', 'train_split', 'eval_split'):
    if c.get(key):
      d[key] = c[key]
  if source == 'folder' and not d.get('folder_root'):
    raise config_lib.ConfigError('the evaluation data is an image folder but no folder is set: '
                                 'add --config.folder_root=ROOT.')
  return d


def checked_eval_data_config(c: ml_collections.ConfigDict, pre: ml_collections.ConfigDict
                             ) -> ml_collections.ConfigDict:
  """:func:`eval_data_config`, then the data checks training runs too
  (``data.check_folder_source``: for an image folder, the same class folders in the train and
  eval splits, at least 2 classes, ``num_classes`` from the folders). Every offline mode
  (knn, linear, finetune, embed) builds its data config here.

  An offline head (kNN vote, linear probe, fine-tuning head) is new, and an eval config has no
  ``num_classes`` key, so for an image folder ``num_classes`` always comes from the folders
  evaluated (not from the training run's config, which may name another folder)."""
  d = eval_data_config(c, pre)
  before = d.get('num_classes')
  if d.get('source', 'tfds') == 'folder':
    d.num_classes = -1
  summary = data_lib.check_folder_source(d, d.train_split, d.eval_split)
  if summary is not None and not summary.class_names:   # unlabelled folder: nothing to derive
    d.num_classes = before
  log(f'Evaluation data: {data_lib.describe(d)}, splits {d.train_split!r} / {d.eval_split!r}.')
  return d


def mesh_of(c: ml_collections.ConfigDict):
  n = utils.optional(c.num_devices)
  return sharding.make_mesh(n)


def check_batch(name: str, batch: int, mesh) -> None:
  n = mesh.shape[sharding.DATA]
  if batch % n:
    raise config_lib.ConfigError(
        f'config.{name}={batch} does not divide across the {n} devices of the mesh; '
        f'accepted: a multiple of {n} (e.g. {max(1, batch // n) * n}).')


def eval_mesh(config, batch_keys=('eval_batch_size',)):
  """The evaluation mesh, after checking that each ``config.<key>`` batch divides across it."""
  mesh = mesh_of(config)
  for key in batch_keys:
    check_batch(key, config[key], mesh)
  return mesh


# =============================================================================================
# The frozen network and feature extraction
# =============================================================================================
class FrozenNet:
  """The pretrained backbone (+ projector) of a training run, for evaluation.

  ``apply(variables, images_uint8, train=False) -> {'features', 'proj'?, ...}``;
  ``variables = {'params', 'batch_stats'}`` as built by :meth:`variables`.
  """

  def __init__(self, pre_config: ml_collections.ConfigDict, params, batch_stats, *,
               image_size: int):
    from ssl_jax.models import ssl_model  # pylint: disable=import-outside-toplevel
    self.config = pre_config
    self.backbone_name = pre_config.model.backbone
    self.has_projector = 'projector' in params
    model_cfg = ml_collections.ConfigDict(pre_config.model.to_dict())
    if not self.has_projector:
      model_cfg.projector = None
    self.model = ssl_model.build_ssl_net(model_cfg, image_size=image_size,
                                         with_predictor=False)
    keep = ('backbone', 'projector')
    self.params = {k: v for k, v in params.items() if k in keep}
    self.batch_stats = {k: v for k, v in (batch_stats or {}).items() if k in keep}

  def variables(self, mesh=None) -> dict[str, Any]:
    v = {'params': self.params, 'batch_stats': self.batch_stats}
    if mesh is None:
      return jax.tree.map(jnp.asarray, v)
    return jax.device_put(v, sharding.replicated(mesh))

  def apply(self, variables, images, *, train: bool = False, mutable=False):
    return self.model.apply(variables, images, train=train, with_predictor=False,
                            mutable=mutable)

  def feature_fn(self, which: str = 'backbone', *, l2: bool = False) -> Callable:
    """``fn(variables, images) -> {'features': [B, d] f32}`` (jit it)."""
    if which not in FEATURES:
      raise ValueError(f'features={which!r} is invalid; accepted: {", ".join(FEATURES)}')
    if which == 'projector' and not self.has_projector:
      raise ValueError("features='projector' but the pretrained network has no projector; "
                       "accepted: 'backbone'")
    key = 'features' if which == 'backbone' else 'proj'

    def fn(variables, images):
      f = self.apply(variables, images)[key].astype(jnp.float32)
      if l2:
        f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
      return {'features': f}
    return fn


def load_for_eval(c: ml_collections.ConfigDict):
  """``(pre_config, data_cfg, FrozenNet, step)`` for an eval config ``c``."""
  pre, params, batch_stats, step = load_pretrained(
      c.pretrained, weights=c.weights,
      step=utils.optional(c.checkpoint_step))
  data_cfg = checked_eval_data_config(c, pre)
  net = FrozenNet(pre, params, batch_stats, image_size=int(data_cfg.image_size))
  log(f'Loaded {pre.method.name} / {pre.model.backbone} ({c.weights} weights) from '
      f'{c.pretrained}/checkpoints/{step}; evaluating on {data_cfg.name}.')
  return pre, data_cfg, net, step


def write_json(workdir: str, name: str, payload: dict[str, Any]) -> str:
  """``WORKDIR/name`` as JSON, whole or not at all (``paths.write_json``), by process 0."""
  path = paths.join(workdir, name)
  if jax.process_index() == 0:
    paths.write_json(path, payload)
  return path
