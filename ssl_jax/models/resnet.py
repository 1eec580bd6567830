"""ResNet-18/34/50 backbones (Flax Linen) in torchvision's layout, returning per-stage features.

Architecture (He et al. 2016, as ``torchvision.models.resnet``)::

  stem 'imagenet':  conv1 7×7/2 (pad 3) – bn1 – ReLU – max-pool 3×3/2 (pad 1)   # → H/4
  stem 'cifar':     conv1 3×3/1 (pad 1) – bn1 – ReLU                            # → H
  stage1 = layer1   planes = b,   stride 1
  stage2 = layer2   planes = 2b,  stride 2
  stage3 = layer3   planes = 4b,  stride 2
  stage4 = layer4   planes = 8b,  stride 2
  pooled = mean over H, W of stage4 (float32)

with base width ``b = 64·width`` (or ``base_width``). Blocks:

* ``BasicBlock`` (expansion 1): ``3×3/s – BN – ReLU – 3×3 – BN``, + shortcut, ReLU.
* ``Bottleneck`` (expansion 4, "v1.5"): ``1×1 – BN – ReLU – 3×3/s – BN – ReLU – 1×1 – BN``,
  + shortcut, ReLU. The stride sits on the 3×3 conv, as in torchvision.

The shortcut is the identity, or ``1×1/s conv – BN`` when the stride or the channel count changes.
Every conv is bias-free with explicit symmetric padding (``k // 2``), so output sizes and values
equal PyTorch's for any input size (Flax's ``'SAME'`` pads stride-2 convs asymmetrically; we don't
use it). Feature-map strides relative to the input: imagenet stem 4/8/16/32, cifar stem 1/2/4/8.

Parameter names map onto torchvision's state dict by a fixed rule (``ssl_jax.export`` applies it)::

  conv1 / bn1                       → conv1.* / bn1.*
  layer{i}_{j} / conv{k} / bn{k}    → layer{i}.{j}.conv{k}.* / layer{i}.{j}.bn{k}.*
  layer{i}_{j} / downsample_conv    → layer{i}.{j}.downsample.0.*
  layer{i}_{j} / downsample_bn      → layer{i}.{j}.downsample.1.*
  conv ``kernel`` [kh, kw, in, out] → ``weight`` [out, in, kh, kw]
  BN ``scale``, ``bias``            → ``weight``, ``bias``
  BN batch_stats ``mean``, ``var``  → ``running_mean``, ``running_var``

Initialisation as torchvision: conv kernels ``N(0, 2 / fan_out)`` (Kaiming normal, mode fan_out,
untruncated), BN scale 1 and bias 0 (``zero_init_residual=True`` sets the last BN scale of each
block to 0, as torchvision's flag of that name).

BatchNorm is ``nn.BatchNorm(momentum=0.9, epsilon=1e-5)`` (≡ PyTorch momentum 0.1). By default
it has no ``axis_name``: under ``jax.jit`` with the batch sharded over the ``'data'`` mesh axis the
batch statistics are over the global batch. The trainer's multi-device step runs the model per
device (``ssl_jax.sharding.apply_per_device``) and builds it with ``bn_axis_name='data'``: the
statistics are then all-reduced over all devices, or over ``bn_axis_index_groups`` (groups of
devices, ``config.model.bn_group_size``). One difference from
PyTorch: the running variance is updated with the biased batch variance (PyTorch uses the unbiased
one); it only matters for tiny batches.

Precision: parameters and BN statistics are float32; ``dtype`` (e.g. ``jnp.bfloat16``) is the
compute dtype of the convolutions and of the activations; BN reduces in float32. The stage maps are
returned in the compute dtype; ``pooled`` is always float32.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

#: torchvision's conv init: kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')  # untruncated

STEMS = ('cifar', 'imagenet')

#: name → (block kind, blocks per stage, default base width).
RESNET_SPECS: dict[str, tuple[str, tuple[int, int, int, int], int]] = {
    'resnet18': ('basic', (2, 2, 2, 2), 64),
    'resnet34': ('basic', (3, 4, 6, 3), 64),
    'resnet50': ('bottleneck', (3, 4, 6, 3), 64),
    'resnet_tiny': ('basic', (1, 1, 1, 1), 8),
}

_EXPANSION = {'basic': 1, 'bottleneck': 4}


def _conv(features: int, kernel: int, stride: int, dtype: Dtype, name: str) -> nn.Conv:
  """Bias-free conv with PyTorch's symmetric padding ``kernel // 2``."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=conv_init, name=name)


BNAxis = tuple  # (axis_name, axis_index_groups): () for local statistics


def _bn(train: bool, dtype: Dtype, name: str, zero_scale: bool = False,
        bn_axis: BNAxis = ()) -> nn.BatchNorm:
  axis_name, groups = bn_axis if bn_axis else (None, None)
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      param_dtype=jnp.float32,
                      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
                      axis_name=axis_name, axis_index_groups=groups, name=name)


class BasicBlock(nn.Module):
  """``3×3/s – BN – ReLU – 3×3 – BN`` + shortcut, ReLU (expansion 1)."""
  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  zero_init_residual: bool = False
  bn_axis: BNAxis = ()

  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    y = _conv(self.planes, 3, self.stride, self.dtype, 'conv1')(x)
    y = nn.relu(_bn(train, self.dtype, 'bn1', bn_axis=self.bn_axis)(y))
    y = _conv(self.planes, 3, 1, self.dtype, 'conv2')(y)
    y = _bn(train, self.dtype, 'bn2', self.zero_init_residual, self.bn_axis)(y)
    out_ch = self.planes * self.expansion
    if self.stride != 1 or x.shape[-1] != out_ch:
      x = _conv(out_ch, 1, self.stride, self.dtype, 'downsample_conv')(x)
      x = _bn(train, self.dtype, 'downsample_bn', bn_axis=self.bn_axis)(x)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """``1×1 – BN – ReLU – 3×3/s – BN – ReLU – 1×1 (4·planes) – BN`` + shortcut, ReLU (v1.5)."""
  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  zero_init_residual: bool = False
  bn_axis: BNAxis = ()

  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    y = _conv(self.planes, 1, 1, self.dtype, 'conv1')(x)
    y = nn.relu(_bn(train, self.dtype, 'bn1', bn_axis=self.bn_axis)(y))
    y = _conv(self.planes, 3, self.stride, self.dtype, 'conv2')(y)
    y = nn.relu(_bn(train, self.dtype, 'bn2', bn_axis=self.bn_axis)(y))
    y = _conv(self.planes * self.expansion, 1, 1, self.dtype, 'conv3')(y)
    y = _bn(train, self.dtype, 'bn3', self.zero_init_residual, self.bn_axis)(y)
    out_ch = self.planes * self.expansion
    if self.stride != 1 or x.shape[-1] != out_ch:
      x = _conv(out_ch, 1, self.stride, self.dtype, 'downsample_conv')(x)
      x = _bn(train, self.dtype, 'downsample_bn', bn_axis=self.bn_axis)(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """ResNet backbone without the classifier; see the module docstring.

  Attributes:
    stage_sizes: blocks per stage (4 stages).
    block: ``'basic'`` or ``'bottleneck'``.
    base_width: channels of the stem and of stage 1's 3×3 convs (64 for the standard nets).
    stem: ``'imagenet'`` (7×7/2 conv + 3×3/2 max-pool) or ``'cifar'`` (3×3/1 conv, no pool).
    dtype: compute dtype; parameters stay float32.
    zero_init_residual: init the last BN scale of every block to 0 (torchvision's flag).
    bn_axis: ``(axis_name, axis_index_groups)`` of every BatchNorm, or ``()`` (statistics over
      the batch the module sees; see the module docstring).

  ``__call__(x [B, H, W, C], train) -> {'stage1'..'stage4': [B, h_i, w_i, C_i],
  'pooled': [B, C_4]}``.
  """
  stage_sizes: Sequence[int]
  block: str = 'basic'
  base_width: int = 64
  stem: str = 'imagenet'
  dtype: Dtype = jnp.float32
  zero_init_residual: bool = False
  bn_axis: BNAxis = ()

  @nn.compact
  def __call__(self, x, train: bool = True) -> dict[str, Any]:
    if self.stem not in STEMS:
      raise ValueError(f'unknown ResNet stem {self.stem!r}; accepted: {", ".join(STEMS)}')
    if self.block not in _EXPANSION:
      raise ValueError(f'unknown ResNet block {self.block!r}; accepted: {", ".join(_EXPANSION)}')
    block_cls = BasicBlock if self.block == 'basic' else Bottleneck
    x = jnp.asarray(x, self.dtype)
    if self.stem == 'imagenet':
      x = _conv(self.base_width, 7, 2, self.dtype, 'conv1')(x)
    else:
      x = _conv(self.base_width, 3, 1, self.dtype, 'conv1')(x)
    x = nn.relu(_bn(train, self.dtype, 'bn1', bn_axis=self.bn_axis)(x))
    if self.stem == 'imagenet':
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    out = {}
    for i, num_blocks in enumerate(self.stage_sizes):
      planes = self.base_width * 2**i
      for j in range(num_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        x = block_cls(planes, stride, self.dtype, self.zero_init_residual, self.bn_axis,
                      name=f'layer{i + 1}_{j}')(x, train)
      out[f'stage{i + 1}'] = x
    out['pooled'] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return out


def _check_name(name: str) -> tuple[str, tuple[int, int, int, int], int]:
  if name not in RESNET_SPECS:
    raise ValueError(f'unknown ResNet backbone {name!r}; accepted: {", ".join(RESNET_SPECS)}')
  return RESNET_SPECS[name]


def resolve_base_width(name: str, width: float = 1.0, base_width: int | None = None) -> int:
  """Base channel count of ``name``: ``base_width`` if given, else ``round(default · width)``."""
  _, _, default = _check_name(name)
  if base_width is not None:
    if int(base_width) != base_width or base_width < 1:
      raise ValueError(f'base_width must be a positive integer, got {base_width!r}')
    return int(base_width)
  if not width > 0:
    raise ValueError(f'width must be > 0, got {width!r}')
  return max(1, int(round(default * width)))


def get_backbone(name: str, *, stem: str = 'imagenet', dtype: Dtype = jnp.float32,
                 width: float = 1.0, base_width: int | None = None,
                 zero_init_residual: bool = False, bn_axis: BNAxis = ()) -> ResNet:
  """A preset ResNet: ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet_tiny``.

  ``resnet_tiny`` is a BasicBlock net with one block per stage and base width 8, for CPU tests.
  ``width`` multiplies the base width (64, or 8 for ``resnet_tiny``); an explicit ``base_width``
  overrides it. ``bn_axis``: see ``ResNet``. Raises ``ValueError`` for an unknown name or stem.
  """
  block, stages, _ = _check_name(name)
  if stem not in STEMS:
    raise ValueError(f'unknown ResNet stem {stem!r}; accepted: {", ".join(STEMS)}')
  return ResNet(stage_sizes=stages, block=block,
                base_width=resolve_base_width(name, width, base_width), stem=stem, dtype=dtype,
                zero_init_residual=zero_init_residual, bn_axis=tuple(bn_axis))


def feature_dims(name: str, width: float = 1.0, base_width: int | None = None) -> dict[str, int]:
  """Channels of ``stage1``..``stage4`` and ``pooled`` for ``get_backbone(name, width=...)``."""
  block, _, _ = _check_name(name)
  b = resolve_base_width(name, width, base_width) * _EXPANSION[block]
  dims = {f'stage{i + 1}': b * 2**i for i in range(4)}
  dims['pooled'] = dims['stage4']
  return dims


resnet18 = functools.partial(get_backbone, 'resnet18')
resnet34 = functools.partial(get_backbone, 'resnet34')
resnet50 = functools.partial(get_backbone, 'resnet50')
