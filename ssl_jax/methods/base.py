"""The method contract.

A method declares its network, its method state (queues, banks, centroids: global arrays),
the ``PartitionSpec`` of every state entry (``state_specs``: ``P('data')`` = sharded on the
leading axis, ``P()`` = replicated; nothing is placed implicitly) and one pure loss function;
the trainer does everything else (optimizer, EMA target, BatchNorm statistics, sharding,
checkpoints, metrics, evals). Randomness enters only through ``rng``; ``loss`` never reads the
config — everything it needs is captured as plain attributes when the method is constructed.

    loss(params, target_params, method_state, batch_stats, batch, rng, step)
        -> (scalar, LossAux(metrics, method_state, batch_stats, features, scores))

``params`` reach the network only through ``forward``: on a multi-device mesh the trainer passes
one copy per device (``sharding.PerDevice``) so the gradient is all-reduced once per step, and
``forward`` runs the network per device (``sharding.apply_per_device``) with BatchNorm
statistics over all devices or over groups of ``config.model.bn_group_size`` devices.
"""
from __future__ import annotations

import abc
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax import sharding
from ssl_jax.models import ssl_model

Array = jax.Array


class LossAux(NamedTuple):
  metrics: dict[str, Array]        # scalars, averaged over the global batch
  method_state: dict[str, Any]     # new queues / banks / pointers
  batch_stats: Any                 # new BatchNorm running statistics of the online network
  features: Array                  # online backbone features of the first view (online probe)
  scores: dict[str, Array]         # 'pos' [B] and 'neg' [B, m] cosine scores for histograms


QUANTILE_SAMPLE = 16384


class CrossDeviceTrafficWarning(UserWarning):
  """A method setting makes the step move images or a queue between devices (named, not silent:
  e.g. CLIM's ``partner_pool=-1`` on a pod all-gathers the image batch)."""


def warn_traffic(message: str) -> None:
  """Warn (at trace time, once per compile) that the step moves more than it must."""
  warnings.warn(message, CrossDeviceTrafficWarning, stacklevel=2)


def quantile_sample(x: Array, max_elems: int = QUANTILE_SAMPLE) -> Array:
  """A deterministic strided sample of at most ``max_elems`` entries of ``x`` (flattened).

  Exact quantiles of MoCo's [B, 65,536] negative scores need a sort of 4M floats per step
  (1.8 s on a 2-core CPU, longer than the network); the quantile metrics are read from an even
  grid over rows and columns instead: ``x[::r, ::c]`` with ``r = ceil(B / max_elems)`` and
  ``c = ceil(K / (max_elems // rows_kept))``. The grid is sliced along both axes, so a
  [B, K] array sharded along K is never gathered. ``x`` with ``<= max_elems`` entries is
  returned whole (flattened).
  """
  if x.size <= max_elems:
    return x.ravel()
  x2 = x.reshape(x.shape[0], -1) if x.ndim >= 2 else x[:, None]
  rows, cols = x2.shape
  r = -(-rows // max_elems)
  kept_rows = -(-rows // r)
  c = -(-cols // max(max_elems // kept_rows, 1))
  return x2[::r, ::c].ravel()


def score_summary(pos: Array, neg: Array, prefix: str = 'score') -> dict[str, Array]:
  """Mean, std and 10/50/90% quantiles of positive and negative scores (FT's visualisation).

  Mean and std are over every score; the quantiles over :func:`quantile_sample` (all scores
  when there are at most 16,384, else an even grid of 16,384 of them).
  """
  out = {}
  for name, x in (('pos', pos), ('neg', neg)):
    x = x.astype(jnp.float32)
    q10, q50, q90 = jnp.quantile(quantile_sample(x), jnp.asarray([0.1, 0.5, 0.9]))
    out.update({f'{prefix}/{name}_mean': jnp.mean(x), f'{prefix}/{name}_std': jnp.std(x),
                f'{prefix}/{name}_q10': q10, f'{prefix}/{name}_q50': q50,
                f'{prefix}/{name}_q90': q90})
  return out


def embedding_summary(z: Array) -> dict[str, Array]:
  """Collapse diagnostic (SimSiam, Chen & He 2021, Sec. 4.1): per-dimension std of ``n(z)``.

      s = mean_j std_i( z_ij / ||z_i|| )     over the global batch i, dimensions j of d

  A healthy embedding spread over the sphere has ``s ~ 1/sqrt(d)``; a collapsed one (every image
  on one direction) has ``s -> 0``. ``collapse/embed_std_ratio`` is ``s * sqrt(d)`` (~1 healthy,
  -> 0 collapsed), the number the trainer's collapse warning reads.
  """
  z = z.astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  s = jnp.mean(jnp.std(z, axis=0))
  return {'collapse/embed_std': s, 'collapse/embed_std_ratio': s * jnp.sqrt(z.shape[-1] * 1.0)}


def in_batch_scores(q: Array, k: Array, m: int = 16) -> tuple[Array, Array]:
  """Cosine scores of each anchor with its own key (``pos`` [B]) and with the keys of the next
  ``m`` images of the global batch (``neg`` [B, m]), for methods without explicit negatives."""
  sim = q @ k.T
  b = sim.shape[0]
  cols = (jnp.arange(b)[:, None] + 1 + jnp.arange(min(m, b - 1))[None, :]) % b
  return jnp.diagonal(sim), jnp.take_along_axis(sim, cols, axis=1)


class Method(abc.ABC):
  """Base class: builds ``SSLNet`` from ``config.model`` and gives forward helpers."""

  name = 'base'
  # View keys: ``first_view`` is the one whose online features feed the online probe.
  first_view = 'view1'
  uses_predictor = True
  # False for methods without a momentum encoder (APS by default): no EMA update, no ``tau``.
  uses_ema_target = True

  def __init__(self, config: ml_collections.ConfigDict, steps_per_epoch: int | None = None):
    """``steps_per_epoch``: computed once by the trainer; needed only by methods with a
    schedule given in epochs (CLIM's k-means period), which raise if it is missing."""
    self.steps_per_epoch = steps_per_epoch
    self.image_size = int(config.data.image_size)
    self.model_config = config.model
    # -1: BatchNorm statistics over all devices; N: over groups of N consecutive devices.
    self.bn_group_size = int(config.model.get('bn_group_size', -1))
    self.model = self.build_model()
    self._per_device_models = {}

  def build_model(self, bn_axis: tuple = ()):
    """The network; ``bn_axis = (axis_name, axis_index_groups)`` for the per-device step."""
    return ssl_model.build_ssl_net(self.model_config, image_size=self.image_size,
                                   with_predictor=self.uses_predictor, bn_axis=bn_axis)

  @staticmethod
  def validate_config(config: ml_collections.ConfigDict) -> None:
    """Method-specific checks (raise ``config_lib.ConfigError``)."""

  def sample_input(self, batch_size: int = 2) -> Array:
    return jnp.zeros((batch_size, self.image_size, self.image_size, 3), jnp.uint8)

  def init_variables(self, rng: Array) -> dict[str, Any]:
    """``{'params': ..., 'batch_stats': ...}`` of the online network."""
    return self.model.init(rng, self.sample_input(), train=True)

  def init_state(self, rng: Array) -> dict[str, Any]:
    """Method state (queues, banks, ...), placed by ``state_specs``."""
    del rng
    return {}

  def state_specs(self) -> dict[str, Any]:
    """A ``PartitionSpec`` per ``init_state`` entry (same tree): ``P('data')`` for a bank or
    queue sharded on its leading axis (whose size must divide the mesh's 'data' axis: the
    trainer stops with an error naming the entry otherwise), ``P()`` for a replicated entry
    (pointers, counters, centroids every device reads whole)."""
    return {}

  # ---------------------------------------------------------------------------------------
  def forward(self, params, batch_stats, images, *, train: bool = True,
              with_predictor: bool = True, **kw) -> tuple[dict[str, Array], Any]:
    """Online forward; returns (outputs, updated batch_stats).

    On a mesh whose 'data' axis has ``n > 1`` devices a training forward runs per device
    (``sharding.apply_per_device``): BatchNorm statistics all-reduced over all devices, or
    over groups of ``bn_group_size``; ``params`` may be a ``sharding.PerDevice`` (the trainer's,
    so the gradient is reduced once per step) or a plain tree. On one device it is
    ``model.apply``.
    """
    n = sharding.mesh_data_size()
    if train and n > 1:
      groups = sharding.bn_axis_index_groups(self.bn_group_size, n)
      key = (n, groups)
      if key not in self._per_device_models:
        self._per_device_models[key] = self.build_model(bn_axis=(sharding.DATA, groups))
      return sharding.apply_per_device(self._per_device_models[key], params, batch_stats, images,
                                       grouped=groups is not None,
                                       with_predictor=with_predictor, **kw)
    if isinstance(params, sharding.PerDevice):
      raise ValueError('per-device parameter copies are only read by a training forward on a '
                       'multi-device mesh')
    out, mutated = self.model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                    train=train, with_predictor=with_predictor,
                                    mutable=['batch_stats'], **kw)
    return out, mutated['batch_stats']

  def target_forward(self, target_params, batch_stats, images, **kw) -> dict[str, Array]:
    """EMA target forward under stop-gradient (BatchNorm on the batch's own statistics)."""
    out, _ = self.forward(target_params, batch_stats, images, train=True, with_predictor=False,
                          **kw)
    return jax.lax.stop_gradient(out)

  @abc.abstractmethod
  def loss(self, params, target_params, method_state, batch_stats, batch, rng, step):
    """The method's objective; returns ``(loss, LossAux)``."""
