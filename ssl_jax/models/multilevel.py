"""A ResNet with a projection head on several stages (CsMl's multi-level views).

For each level ``l`` in ``levels`` (``'stage1'`` .. ``'stage4'``)::

  h_l = mean_{y, x} stage_l(x)[:, y, x, :]          global average pool (float32)
  z_l = projector_l(h_l)                            its own MLP (named ``projector_<level>``)

``stage4``'s pool is the backbone's ``pooled`` output (the representation probes read). The
module returns the backbone's dict plus ``features`` (= ``pooled``), ``levels``
(``{level: z_l}``) and ``proj`` (= ``z`` of the last level, so code written for ``SSLNet`` still
reads the top projection). It takes ``SSLNet``'s call arguments (``with_predictor`` is
ignored: there is no predictor), so the trainer's probes and kNN monitor use it unchanged.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from ssl_jax.models import heads, normalize as normalize_lib, ssl_model

LEVELS = ('stage1', 'stage2', 'stage3', 'stage4')


class MultiLevelSSLNet(nn.Module):
  """Backbone -> {level: projector_level(GAP(stage_level))}; see the module docstring."""
  backbone: nn.Module
  levels: Sequence[str]
  hidden_dim: int
  out_dim: int
  num_layers: int = 2
  use_bn: bool = False
  dtype: Any = jnp.float32
  bn_axis: tuple = ()          # of the heads' BatchNorms (the backbone has its own)

  @nn.compact
  def __call__(self, images, train: bool = True, with_predictor: bool = True
               ) -> dict[str, Any]:
    del with_predictor
    out = dict(self.backbone(normalize_lib.normalize(images), train=train))
    out['features'] = out['pooled']
    levels = {}
    for level in self.levels:
      if level not in LEVELS:
        raise ValueError(f'unknown level {level!r}; accepted: {", ".join(LEVELS)}')
      h = out['pooled'] if level == 'stage4' else jnp.mean(
          out[level].astype(jnp.float32), axis=(1, 2))
      levels[level] = heads.MLP(hidden_dim=self.hidden_dim, out_dim=self.out_dim,
                                num_layers=self.num_layers, use_bn=self.use_bn, dtype=self.dtype,
                                bn_axis=self.bn_axis, name=f'projector_{level}')(h, train=train)
    out['levels'] = levels
    out['proj'] = levels[self.levels[-1]]
    return out


def build_multilevel_net(model_cfg: ml_collections.ConfigDict, levels: Sequence[str], *,
                         image_size: int | None = None, bn_axis: tuple = ()) -> MultiLevelSSLNet:
  """``MultiLevelSSLNet`` from ``config.model`` (ResNet backbone; every level's projector has
  ``model.projector``'s widths). ``bn_axis`` as in ``ssl_model.build_ssl_net``."""
  if model_cfg.backbone.startswith('vit'):
    raise ValueError(f'model.backbone={model_cfg.backbone!r} has no stages; the multi-level '
                     'network needs a ResNet (resnet18, resnet34, resnet50, resnet_tiny)')
  p = model_cfg.projector
  return MultiLevelSSLNet(backbone=ssl_model.build_backbone(model_cfg, image_size, bn_axis),
                          levels=tuple(levels), hidden_dim=int(p.hidden_dim),
                          out_dim=int(p.out_dim), num_layers=int(p.num_layers),
                          use_bn=bool(p.use_bn), dtype=ssl_model.compute_dtype(model_cfg.dtype),
                          bn_axis=tuple(bn_axis))
