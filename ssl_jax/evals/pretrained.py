"""The pretrained network of a training run, for offline evaluation.

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
average pool / ViT CLS) and ``proj`` (projector output). ``ssl_jax.evals.features.extract`` runs
it over a split (sharded along ``'data'``, centre-crop eval transform) and returns host arrays.
:func:`load_for_eval` builds it for an eval config (``ssl_jax.evals.eval_config``).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import sharding, utils
from ssl_jax.evals import eval_config, report

FEATURES = ('backbone', 'projector')


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
  pre, params, batch_stats, step = ckpt_lib.load_pretrained(
      c.pretrained, weights=c.weights, step=utils.optional(c.checkpoint_step),
      replica=c.get('replica', -1))
  data_cfg = eval_config.checked_eval_data_config(c, pre)
  net = FrozenNet(pre, params, batch_stats, image_size=int(data_cfg.image_size))
  report.log(f'Loaded {pre.method.name} / {pre.model.backbone} ({c.weights} weights) from '
             f'{c.pretrained}/checkpoints/{step}{eval_config.replica_text(c, pre)}; evaluating on '
             f'{data_cfg.name}.')
  return pre, data_cfg, net, step
