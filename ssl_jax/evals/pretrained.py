"""What every offline evaluation shares: the pretrained network, its features, the eval config.

``load_pretrained(WORKDIR)`` reads a training run written by ``ssl_jax.train``::

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
average pool / ViT CLS) and ``proj`` (projector output). ``extract`` runs it over a split
(sharded along ``'data'``, centre-crop eval transform) and returns host arrays.

``run_export(config, workdir)`` is ``--mode=export``: the backbone as a torchvision state dict
(``backbone.pth``, loadable with ``torch.load``) and as ``backbone.npz``.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssl_jax import config_lib
from ssl_jax import data as data_lib
from ssl_jax import sharding

WEIGHTS = ('online', 'target')
FEATURES = ('backbone', 'projector')


class PretrainedNotFound(FileNotFoundError):
  """WORKDIR holds no usable training run; the message says what is missing."""


def log(msg: str) -> None:
  logging.info(msg)
  if jax.process_index() == 0:
    print(msg, flush=True)


# =============================================================================================
# Loading a training run
# =============================================================================================
def checkpoint_steps(workdir: str) -> list[int]:
  """Completed checkpoint steps in ``WORKDIR/checkpoints``, ascending (temporary dirs skipped)."""
  root = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(root):
    return []
  steps = []
  for name in os.listdir(root):
    if re.fullmatch(r'\d+', name) and os.path.isdir(os.path.join(root, name, 'state')):
      steps.append(int(name))
  return sorted(steps)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise PretrainedNotFound(
        f'{path} does not exist: --config.pretrained={workdir!r} is not a training workdir. '
        'Accepted: the --workdir of a `python -m ssl_jax.main --mode=train` run (it holds '
        'config.json and checkpoints/<step>/).')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_state(workdir: str, *, step: int | None = None,
                  items: tuple[str, ...] = ('step', 'params', 'batch_stats')
                  ) -> tuple[dict[str, Any], int]:
  """The raw ``state`` pytree (nested dicts of numpy arrays) of checkpoint ``step``.

  ``step=None``: the newest checkpoint that restores (a damaged one is skipped with a warning).

  Restores only the top-level entries in ``items`` (e.g. 'params', 'batch_stats',
  'target_params', 'probe_params'); an empty tuple restores everything.
  """
  steps = checkpoint_steps(workdir)
  if not steps:
    raise PretrainedNotFound(
        f'No checkpoint in {os.path.join(workdir, "checkpoints")} (expected '
        'checkpoints/<step>/state from a training run). Train first, or point '
        '--config.pretrained at a workdir that has one.')
  if step is not None:
    if step not in steps:
      raise PretrainedNotFound(f'checkpoint step {step} is not in {workdir}/checkpoints; '
                               f'accepted: {steps}')
    return _restore_step(workdir, step, items), int(step)
  # Newest first; a damaged checkpoint is skipped with a warning (as the trainer's resume does).
  for i, s in enumerate(reversed(steps)):
    try:
      return _restore_step(workdir, s, items), int(s)
    except PretrainedNotFound:
      raise
    except Exception as e:  # noqa: BLE001 — any failure means this checkpoint is unusable
      if i == len(steps) - 1:
        raise
      log(f'WARNING: checkpoint {workdir}/checkpoints/{s} could not be restored '
          f'({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}); '
          'trying the previous one.')
  raise AssertionError('unreachable')


class _ItemMetadataFilter(logging.Filter):
  """Orbax warns ``Metadata file does not exist: .../<step>/state/_CHECKPOINT_METADATA`` on every
  item-level restore: that file lives one level up, in the step directory, by design. Only that
  expected line is dropped; every other Orbax warning is kept."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return not (msg.startswith('Metadata file does not exist')
                and msg.endswith(os.path.join('state', '_CHECKPOINT_METADATA')))


logging.getLogger('absl').addFilter(_ItemMetadataFilter())


def _restore_step(workdir: str, step: int, items: tuple[str, ...]) -> dict[str, Any]:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.abspath(workdir), 'checkpoints', str(step), 'state')
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path)
  tree = getattr(tree, 'item_metadata', tree)
  tree = getattr(tree, 'tree', tree)
  missing = [k for k in items if k not in tree]
  if missing:
    raise PretrainedNotFound(f'checkpoint {path} has no {missing}; it holds {sorted(tree)}.')
  wanted = {k: tree[k] for k in items} if items else dict(tree)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  try:
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=restore_args, partial_restore=bool(items)))
  except Exception:  # noqa: BLE001 — older Orbax layouts: restore everything, then select
    full_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), dict(tree))
    state = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=full_args))
    return {k: state[k] for k in (items or state)}


def load_pretrained(workdir: str, *, weights: str = 'online', step: int | None = None
                    ) -> tuple[ml_collections.ConfigDict, Any, Any, int]:
  """``(config, params, batch_stats, step)`` of the newest checkpoint of a training run.

  ``params``/``batch_stats`` are the whole network's (``'backbone'``, ``'projector'``, ...), as
  numpy. ``weights='online'`` (default: the online network, which BYOL/MoCo evaluate) or
  ``'target'`` (the EMA target; BatchNorm statistics are the online network's).
  Raises ``PretrainedNotFound`` when WORKDIR has no config.json or no checkpoint.
  """
  if weights not in WEIGHTS:
    raise ValueError(f'weights={weights!r} is invalid; accepted: {", ".join(WEIGHTS)}')
  config = read_config(workdir)
  key = 'params' if weights == 'online' else 'target_params'
  state, step = restore_state(workdir, step=step, items=('step', key, 'batch_stats'))
  return config, state[key], state.get('batch_stats', {}), step


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
  c.train_examples = -1        # > 0: only the first N train examples (quick runs)
  c.eval_examples = -1         # > 0: only the first N eval examples
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


def mesh_of(c: ml_collections.ConfigDict):
  n = None if c.num_devices in (-1, None) else int(c.num_devices)
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


def extract(feature_fn: Callable, variables, data_cfg, *, split: str, mesh, batch_size: int,
            max_examples: int = -1) -> dict[str, np.ndarray]:
  """``feature_fn`` over ``split`` (eval transform, in order) -> host arrays incl. 'label'."""
  from ssl_jax.evals import knn_monitor  # pylint: disable=import-outside-toplevel
  return knn_monitor.extract(feature_fn, variables, data_cfg, split=split, mesh=mesh,
                             batch_size=batch_size, max_examples=max_examples)


def load_for_eval(c: ml_collections.ConfigDict):
  """``(pre_config, data_cfg, FrozenNet, step)`` for an eval config ``c``."""
  pre, params, batch_stats, step = load_pretrained(
      c.pretrained, weights=c.weights,
      step=None if c.checkpoint_step in (-1, None) else int(c.checkpoint_step))
  data_cfg = eval_data_config(c, pre)
  net = FrozenNet(pre, params, batch_stats, image_size=int(data_cfg.image_size))
  log(f'Loaded {pre.method.name} / {pre.model.backbone} ({c.weights} weights) from '
      f'{c.pretrained}/checkpoints/{step}; evaluating on {data_cfg.name}.')
  return pre, data_cfg, net, step


def write_json(workdir: str, name: str, payload: dict[str, Any]) -> str:
  path = os.path.join(workdir, name)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path + '.tmp', 'w') as f:
      json.dump(payload, f, indent=2, sort_keys=True, default=float)
    os.replace(path + '.tmp', path)
  return path


# =============================================================================================
# --mode=export
# =============================================================================================
def run_export(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """Write ``backbone.pth`` / ``backbone.npz`` (torchvision ResNet keys) to ``workdir``."""
  from ssl_jax import export  # pylint: disable=import-outside-toplevel
  validate_common(config)
  formats = tuple(config.export.formats)
  for fmt in formats:
    require(fmt in export.FORMATS, 'export.formats', formats, ', '.join(export.FORMATS))
  pre, params, batch_stats, step = load_pretrained(
      config.pretrained, weights=config.weights,
      step=None if config.checkpoint_step in (-1, None) else int(config.checkpoint_step))
  if not str(pre.model.backbone).startswith('resnet'):
    raise config_lib.ConfigError(
        f'--mode=export writes torchvision ResNet state dicts; the pretrained backbone is '
        f'{pre.model.backbone!r}. Accepted: a resnet* backbone.')
  fc = None
  if config.export.include_probe:
    probe, _ = restore_state(config.pretrained, step=step, items=('probe_params',))
    fc = probe['probe_params']['params']
  out = {}
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    for fmt in formats:
      path = export.export_resnet(params['backbone'], batch_stats.get('backbone', {}),
                                  os.path.join(workdir, f'backbone.{fmt}'), fmt=fmt, fc=fc)
      out[fmt] = str(path)
      log(f'Exported {pre.model.backbone} ({pre.model.stem} stem) from '
          f'{config.pretrained}/checkpoints/{step} to {path}.')
  sd_base = int(np.asarray(export.to_torchvision_state_dict(
      params['backbone'], batch_stats.get('backbone', {}))['conv1.weight']).shape[0])
  how = {
      'drop_in': "from ssl_jax.export import torchvision_model; model = torchvision_model("
                 f"{out.get('pth') or out.get('npz') or 'backbone.pth'!r})  # raw uint8 "
                 "[N,3,H,W] in, features out",
      'by_hand': export.load_snippet(pre.model.backbone, pre.model.stem, sd_base).split('\n'),
      'preprocessing': {'scale': '1/255', 'mean': list(export.MEAN_RGB),
                        'std': list(export.STDDEV_RGB), 'layout': 'RGB'},
  }
  if sd_base != 64:
    how['by_hand'] = [f'base width {sd_base} != 64: use torchvision_model (it rebuilds '
                      'torchvision.models.ResNet at this width)']
  write_json(workdir, 'export.json', {'pretrained': config.pretrained, 'step': step,
                                      'backbone': pre.model.backbone, 'stem': pre.model.stem,
                                      'base_width': sd_base, 'files': out, 'load': how})
  if jax.process_index() == 0:
    log('Load it in PyTorch: ' + how['drop_in'] + f' (export.json has the by-hand recipe).')
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """``--mode=export``."""
  return run_export(config, workdir)
