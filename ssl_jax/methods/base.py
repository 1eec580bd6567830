"""The method contract.

A method declares its network, its method state (queues, banks, centroids: global arrays),
the ``PartitionSpec`` of every state entry (``state_specs``: ``P('data')`` = sharded on the
leading axis, ``P()`` = replicated; nothing is placed implicitly) and one pure loss function;
the trainer does everything else (optimizer, EMA target, BatchNorm statistics, sharding,
checkpoints, metrics, evals). Randomness enters only through ``ctx.rng``; ``loss`` never reads
the config — everything it needs is captured as plain attributes when the method is
constructed.

    loss(ctx: StepContext, batch)
        -> (scalar, LossAux(metrics, method_state, batch_stats, features, scores))

``batch`` holds the views (uint8 images sharded along 'data', ``'label'``, and what the view
recipe adds). ``ctx`` (a ``StepContext``) holds every other input of the step, explicitly:

    ctx.params          online parameters; on a multi-device mesh one copy per device (a
                        ``sharding.PerDevice``), read only through ``ctx.forward``
    ctx.target_params   EMA target parameters (same tree, plain)
    ctx.method_state    queues, banks, centroids (``init_state``, placed by ``state_specs``)
    ctx.batch_stats     BatchNorm running statistics of the online network
    ctx.step            int32 scalar: optimizer steps taken
    ctx.rng             this step's key
    ctx.mesh            the mesh of 'data' (a ``Mesh``, or its ``AbstractMesh`` inside
                        ``jax.jit``; ``None``: one device). Every op whose program depends on the
                        device count takes it (``mesh=ctx.mesh``); ``ctx.num_devices`` is the
                        size of its 'data' axis
    ctx.apply           the network, ``Method.apply``; a loss calls it through

    out, batch_stats = ctx.forward(batch_stats, images, with_predictor=True, **kw)
    out = ctx.target_forward(batch_stats, images, **kw)

``ctx.forward`` is the online network in training mode and returns its outputs and updated
BatchNorm statistics; ``ctx.target_forward`` the EMA target (no predictor; BatchNorm on the
batch's own statistics) under stop-gradient. Both hide the per-device copies: on a mesh with
``n > 1`` devices the network runs per device (``sharding.apply_per_device``) with BatchNorm
statistics all-reduced over all devices or over groups of ``config.model.bn_group_size``, and
the gradient reaches the copies the trainer passed (``sharding.value_and_grad_reduced_once``
with the same mesh: one all-reduce of the gradients per step). On one device it is
``model.apply``.

The trainer builds the context once per step, inside the function it differentiates::

    def loss_fn(params):
      ctx = method.context(params, target_params=state.target_params,
                           method_state=state.method_state, batch_stats=state.batch_stats,
                           step=state.step, rng=rng, mesh=mesh)
      return method.loss(ctx, batch)

Score and embedding summaries for the metrics are in ``ssl_jax.ops.summaries``.
"""
from __future__ import annotations

import abc
import dataclasses
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import AbstractMesh, Mesh

from ssl_jax import sharding
from ssl_jax.models import ssl_model

Array = jax.Array


class LossAux(NamedTuple):
  metrics: dict[str, Array]        # scalars, averaged over the global batch
  method_state: dict[str, Any]     # new queues / banks / pointers
  batch_stats: Any                 # new BatchNorm running statistics of the online network
  features: Array                  # online backbone features of the first view (online probe)
  scores: dict[str, Array]         # 'pos' [B] and 'neg' [B, m] cosine scores for histograms


class CrossDeviceTrafficWarning(UserWarning):
  """A method setting makes the step move images or a queue between devices (named, not silent:
  e.g. CLIM's ``partner_pool=-1`` on a pod all-gathers the image batch)."""


def warn_traffic(message: str) -> None:
  """Warn (at trace time, once per compile) that the step moves more than it must."""
  warnings.warn(message, CrossDeviceTrafficWarning, stacklevel=2)


def resolve_partner_pool(method: str, partner_pool: int, batch: int, num_devices: int) -> int:
  """``sharding.resolve_pool`` for a method's ``partner_pool`` setting, with a
  :class:`CrossDeviceTrafficWarning` when the pool spans devices (CLIM, CsMl)."""
  pool = sharding.resolve_pool(partner_pool, batch, num_devices)
  if not sharding.pool_is_local(pool, batch, num_devices):
    warn_traffic(f'{method}: method.partner_pool={partner_pool} spans devices: the partner '
                 'images are gathered across devices every step; 0 (the images of one device) '
                 'moves none')
  return pool


@dataclasses.dataclass(frozen=True)
class StepContext:
  """The explicit inputs of one step besides the views (see the module docstring)."""
  params: Any                                   # online; a sharding.PerDevice on n > 1 devices
  target_params: Any                            # EMA target
  method_state: dict[str, Any]                  # queues / banks / centroids
  batch_stats: Any                              # BatchNorm running statistics (online)
  step: Array                                   # int32 scalar: optimizer steps taken
  rng: Array | None                             # this step's key
  mesh: Mesh | AbstractMesh | None              # 'data' mesh; None: one device
  apply: Callable[..., tuple[dict[str, Array], Any]]   # Method.apply

  @property
  def num_devices(self) -> int:
    """Devices on the mesh's 'data' axis (1 without a mesh)."""
    return sharding.mesh_data_size(self.mesh)

  def forward(self, batch_stats, images: Array, *, with_predictor: bool = True,
              **kw) -> tuple[dict[str, Array], Any]:
    """Online training forward of ``images``: ``(outputs, updated batch_stats)``."""
    return self.apply(self.params, batch_stats, images, mesh=self.mesh,
                      with_predictor=with_predictor, **kw)

  def target_forward(self, batch_stats, images: Array, **kw) -> dict[str, Array]:
    """EMA target forward under stop-gradient (no predictor; BatchNorm on the batch's own
    statistics, the updated running statistics are dropped)."""
    out, _ = self.apply(self.target_params, batch_stats, images, mesh=self.mesh,
                        with_predictor=False, **kw)
    return jax.lax.stop_gradient(out)


class Method(abc.ABC):
  """Base class: builds ``SSLNet`` from ``config.model``, runs it (``apply``) and builds the
  step context (``context``)."""

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
  def apply(self, params, batch_stats, images, *, mesh: Mesh | AbstractMesh | None,
            with_predictor: bool = True, **kw) -> tuple[dict[str, Array], Any]:
    """Training-mode forward of the network; returns (outputs, updated batch_stats).

    On a ``mesh`` whose 'data' axis has ``n > 1`` devices it runs per device
    (``sharding.apply_per_device``): BatchNorm statistics all-reduced over all devices, or over
    groups of ``bn_group_size``; ``params`` may be a ``sharding.PerDevice`` (the trainer's, so
    the gradient is reduced once per step) or a plain tree (the EMA target). On one device
    (``mesh`` None or of size 1) it is ``model.apply``. A loss calls it through
    ``StepContext.forward`` / ``target_forward``.
    """
    n = sharding.mesh_data_size(mesh)
    if n > 1:
      groups = sharding.bn_axis_index_groups(self.bn_group_size, n)
      key = (n, groups)
      if key not in self._per_device_models:
        self._per_device_models[key] = self.build_model(bn_axis=(sharding.DATA, groups))
      return sharding.apply_per_device(self._per_device_models[key], params, batch_stats, images,
                                       grouped=groups is not None, mesh=mesh,
                                       with_predictor=with_predictor, **kw)
    if isinstance(params, sharding.PerDevice):
      raise ValueError('per-device parameter copies (sharding.PerDevice) reach the network only '
                       'on a multi-device mesh: build the step context with the mesh that '
                       'sharding.value_and_grad_reduced_once used')
    out, mutated = self.model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                    train=True, with_predictor=with_predictor,
                                    mutable=['batch_stats'], **kw)
    return out, mutated['batch_stats']

  def context(self, params, *, target_params, method_state: dict[str, Any], batch_stats,
              step, rng: Array | None, mesh: Mesh | AbstractMesh | None) -> StepContext:
    """The ``StepContext`` of one step: ``params`` as given (a ``sharding.PerDevice`` inside
    ``sharding.value_and_grad_reduced_once`` on several devices), the network ``self.apply``."""
    return StepContext(params=params, target_params=target_params, method_state=method_state,
                       batch_stats=batch_stats, step=step, rng=rng, mesh=mesh, apply=self.apply)

  @abc.abstractmethod
  def loss(self, ctx: StepContext, batch: dict[str, Array]) -> tuple[Array, LossAux]:
    """The method's objective; returns ``(loss, LossAux)``."""
