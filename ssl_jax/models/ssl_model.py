"""The network a method trains: backbone -> projector (-> predictor), on uint8 images.

``SSLNet`` normalises uint8 images on device (``ssl_jax.data.normalize``), runs the backbone,
and returns a dict with the backbone's outputs (per-stage maps for ResNets), ``features`` (the
representation that probes and kNN read: ResNet global-average pool or ViT CLS), ``proj`` and,
when asked, ``pred``. The EMA target reuses the same module with the target parameters and
``with_predictor=False``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from ssl_jax.models import heads, normalize as normalize_lib, resnet


def compute_dtype(name: str):
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]


class SSLNet(nn.Module):
  backbone: nn.Module
  projector: nn.Module | None
  predictor: nn.Module | None = None

  @nn.compact
  def __call__(self, images, train: bool = True, with_predictor: bool = True,
               token_indices=None) -> dict[str, Any]:
    x = normalize_lib.normalize(images)
    if token_indices is None:
      out = dict(self.backbone(x, train=train))
    else:
      out = dict(self.backbone(x, token_indices=token_indices, train=train))
    out['features'] = out['cls'] if 'cls' in out else out['pooled']  # ViT: CLS token
    if self.projector is not None:
      out['proj'] = self.projector(out['features'], train=train)
      if self.predictor is not None and with_predictor:
        out['pred'] = self.predictor(out['proj'], train=train)
    return out


def mlp_from_config(cfg: ml_collections.ConfigDict | None, dtype, **kw) -> nn.Module | None:
  """``heads.MLP`` of a ``config.model.projector`` / ``.predictor`` block (None: no head);
  ``kw`` go to ``MLP`` (e.g. ``bn_axis``)."""
  if cfg is None:
    return None
  return heads.MLP(hidden_dim=cfg.hidden_dim, out_dim=cfg.out_dim, num_layers=cfg.num_layers,
                   use_bn=cfg.use_bn, use_bias=cfg.get('use_bias', True),
                   last_bn=cfg.get('last_bn', False),
                   last_bn_affine=cfg.get('last_bn_affine', True), dtype=dtype, **kw)


# ViT fields of ``config.model`` and the value assumed when a config lacks them: a config.json
# written before the field existed comes from a run whose ViT had a qkv bias and LayerNorm eps
# 1e-6, so its checkpoint is rebuilt as trained. configs/aps.py sets both explicitly (APS
# reference: no qkv bias, eps 1e-5).
VIT_LEGACY_DEFAULTS = {'qkv_bias': True, 'layer_norm_eps': 1e-6}


def build_backbone(model_cfg: ml_collections.ConfigDict, image_size: int | None = None,
                   bn_axis: tuple = (), **vit_overrides) -> nn.Module:
  """The backbone of ``config.model``; ``vit_overrides`` (e.g. ``drop_path_rate``) are ``ViT``
  fields for fine-tuning and are refused for ResNets. ``bn_axis``: ``(axis_name,
  axis_index_groups)`` of a ResNet's BatchNorms (``resnet.ResNet``; ViTs have no BatchNorm)."""
  dtype = compute_dtype(model_cfg.dtype)
  if model_cfg.backbone.startswith('vit'):
    from ssl_jax.models import vit
    kw = {k: model_cfg.get(k, v) for k, v in VIT_LEGACY_DEFAULTS.items()}
    kw.update(vit_overrides)
    return vit.get_vit(model_cfg.backbone, patch_size=model_cfg.get('patch_size', 16),
                       image_size=image_size, dtype=dtype, **kw)
  if vit_overrides:
    raise ValueError(f'{sorted(vit_overrides)} only apply to ViT backbones, not '
                     f'{model_cfg.backbone!r}')
  return resnet.get_backbone(model_cfg.backbone, stem=model_cfg.stem, dtype=dtype,
                             width=model_cfg.width, bn_axis=bn_axis)


def build_ssl_net(model_cfg: ml_collections.ConfigDict, *, image_size: int | None = None,
                  with_predictor: bool = True, bn_axis: tuple = ()) -> SSLNet:
  """Backbone + projector (+ predictor) from ``config.model``.

  ``bn_axis``: ``(axis_name, axis_index_groups)`` for every BatchNorm (the trainer's
  per-device step, ``ssl_jax.sharding.apply_per_device``); ``()`` by default. The variables do
  not depend on it.
  """
  dtype = compute_dtype(model_cfg.dtype)
  predictor = model_cfg.get('predictor') if with_predictor else None
  return SSLNet(backbone=build_backbone(model_cfg, image_size, bn_axis),
                projector=mlp_from_config(model_cfg.get('projector'), dtype, bn_axis=bn_axis),
                predictor=mlp_from_config(predictor, dtype, bn_axis=bn_axis))
