"""Projection / prediction MLPs (Flax Linen).

``MLP`` with ``num_layers = L`` is::

  for l in 0 .. L-2:  x = ReLU(BN_l(Dense_l(x)))          # hidden layers, width hidden_dim
                                                         # (BN_l only if use_bn)
  x = Dense_{L-1}(x)                                     # out_dim
  x = BN_{L-1}(x)                                        # if last_bn; affine iff last_bn_affine

Presets (the papers' heads):

* BYOL / MSF projector and predictor: ``MLP(4096, 256)`` — Linear–BN–ReLU–Linear.
* MoCo v2 projector: ``MLP(2048, 128, use_bn=False)`` — Linear–ReLU–Linear.
* APS (MoCo v3-style) projector: ``MLP(h, d, num_layers=3, use_bias=False, last_bn=True,
  last_bn_affine=False)`` — Linear(no bias)–BN–ReLU–Linear–BN–ReLU–Linear–BN(no scale, no bias).

Submodules are named ``dense_{l}`` and ``bn_{l}``. ``use_bias`` applies to every Dense layer.
BatchNorm is ``nn.BatchNorm(momentum=0.9, epsilon=1e-5)``, with no ``axis_name`` by default (global
batch statistics under ``jax.jit`` with a sharded batch) or ``bn_axis`` under the trainer's
per-device step, as in ``resnet.py``. Dense init is Flax's
default (LeCun normal kernel, zero bias). ``dtype`` is the compute dtype; parameters, BN
reductions and the output are float32.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


class MLP(nn.Module):
  """Projector / predictor MLP; see the module docstring.

  Attributes:
    hidden_dim: width of the hidden layers.
    out_dim: output width.
    num_layers: number of Dense layers (>= 1; 1 is a single Linear, + BN if ``last_bn``).
    use_bn: BN after each hidden Dense layer.
    last_bn: BN after the last Dense layer.
    last_bn_affine: whether that last BN has a scale and a bias.
    use_bias: bias in the Dense layers.
    dtype: compute dtype.
    bn_axis: ``(axis_name, axis_index_groups)`` of the BatchNorms (``()``: statistics over the
      batch the module sees; ``resnet.ResNet`` has the same field).

  ``__call__(x [B, D], train) -> [B, out_dim]`` float32.
  """
  hidden_dim: int
  out_dim: int
  num_layers: int = 2
  use_bn: bool = True
  last_bn: bool = False
  last_bn_affine: bool = True
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  bn_axis: tuple = ()

  @nn.compact
  def __call__(self, x, train: bool = True):
    if self.num_layers < 1:
      raise ValueError(f'MLP num_layers must be >= 1, got {self.num_layers}')
    axis_name, groups = self.bn_axis if self.bn_axis else (None, None)

    def bn(name, affine=True):
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                          use_scale=affine, use_bias=affine, dtype=self.dtype,
                          param_dtype=jnp.float32, axis_name=axis_name,
                          axis_index_groups=groups, name=name)

    x = jnp.asarray(x, self.dtype)
    for l in range(self.num_layers - 1):
      x = nn.Dense(self.hidden_dim, use_bias=self.use_bias, dtype=self.dtype,
                   param_dtype=jnp.float32, name=f'dense_{l}')(x)
      if self.use_bn:
        x = bn(f'bn_{l}')(x)
      x = nn.relu(x)
    last = self.num_layers - 1
    x = nn.Dense(self.out_dim, use_bias=self.use_bias, dtype=self.dtype,
                 param_dtype=jnp.float32, name=f'dense_{last}')(x)
    if self.last_bn:
      x = bn(f'bn_{last}', self.last_bn_affine)(x)
    return x.astype(jnp.float32)
