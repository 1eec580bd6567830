"""Mesh, global-batch assembly, partition specs, and the per-device pieces of the step.

One mesh axis, ``'data'``. Everything global (a batch, a queue, a memory bank) is stored
sharded along its leading axis over ``'data'``; parameters and scalars are replicated.
The mesh uses ``AxisType.Auto`` (GSPMD propagation), so code inside ``jax.jit`` is written
with global semantics and XLA inserts the collectives.

Two places are written per device (``jax.shard_map``), because global semantics would make
XLA move more than it must:

* **The network.** ``apply_per_device`` runs a Flax model on each device's rows, with BatchNorm
  statistics all-reduced explicitly over ``'data'`` (``axis_name``), over all devices or over
  groups of ``bn_group_size`` consecutive devices (SimCLR's / big_vision's practice on pods).
* **The gradient.** ``value_and_grad_reduced_once`` differentiates the loss with respect to one
  copy of the parameters per device (``PerDevice``): every application of the network (BYOL's
  two views, CLIM's resolutions) adds its gradient to the device's own copy, and the copies
  are summed once at the end, one all-reduce of the gradients per step. Under plain GSPMD each
  application's weight gradient is reduced on its own (XLA:CPU has no all-reduce
  reassociation pass; ``benchmarks/scaling.py`` read 2 x 140 MB for BYOL).

On one device none of this is used: the step is exactly the single-device program.

Every function whose program depends on the device count takes the mesh (``mesh``; ``None``
means one device) or the device count (``n_dev``) as an argument; none reads the ambient mesh
(``jax.set_mesh``).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = 'data'


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first ``num_devices`` global devices (all by default)."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if n < 1 or n > len(devices):
    raise ValueError(f'num_devices={num_devices} is invalid: this process sees '
                     f'{len(devices)} global devices; pick 1..{len(devices)}.')
  return jax.make_mesh((n,), (DATA,), axis_types=(AxisType.Auto,),
                       devices=devices[:n])


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over ``'data'``."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def mesh_data_size(mesh: Mesh | AbstractMesh | None) -> int:
  """Size of the ``'data'`` axis of ``mesh`` (1 for ``None``, an empty mesh or no such axis).

  ``mesh`` is a ``Mesh`` or, inside ``jax.jit``, the ``AbstractMesh`` of one; the ambient
  mesh is never read here.
  """
  if mesh is None or mesh.empty or DATA not in mesh.axis_names:
    return 1
  return mesh.shape[DATA]


def global_batch(mesh: Mesh, local_batch: Any) -> Any:
  """Assemble per-process numpy batches into global ``jax.Array``s sharded along ``'data'``."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


def replica_batch(mesh: Mesh, local_batches: list[Any]) -> Any:
  """One per-process numpy batch per replica -> global ``jax.Array``s ``[replicas, B, ...]``,
  the replica axis unsharded and the batch axis sharded along ``'data'``."""
  sharding = NamedSharding(mesh, P(None, DATA))
  return jax.tree.map(
      lambda *xs: jax.make_array_from_process_local_data(sharding, np.stack(xs)),
      *local_batches)


# ---------------------------------------------------------------------------------------------
# Pools of rows that live on one device (partner search, FT's negative interpolation).
# ---------------------------------------------------------------------------------------------
def resolve_pool(setting: int, rows: int, n_dev: int) -> int:
  """Rows per pool for a ``*_pool`` config value over ``rows`` global rows.

  ``0``: the rows of one device (``rows / n_dev``; all of them on one device); ``-1``: all
  rows; ``N > 0``: ``N`` (must divide ``rows``). Pools are consecutive rows, so a pool lies on
  one device iff its size divides the rows per device. ``n_dev``: devices on 'data'.
  """
  if setting == 0:
    return rows // n_dev
  if setting == -1:
    return rows
  if setting < -1 or rows % setting:
    raise ValueError(f'pool size {setting} is invalid for {rows} rows; accepted: 0 (per '
                     f'device), -1 (all rows) or a divisor of {rows}')
  return setting


def pool_is_local(pool: int, rows: int, n_dev: int) -> bool:
  """Whether every pool of ``pool`` consecutive rows lies on one of ``n_dev`` devices."""
  return (rows // n_dev) % pool == 0


def concat_per_device(xs: list[jax.Array], *, mesh: Mesh | AbstractMesh | None
                      ) -> jax.Array:
  """Concatenate arrays sharded along 'data' so each device keeps its own rows.

  ``jnp.concatenate`` of two ``[B, ...]`` arrays gives rows ``0..2B-1``, which the mesh splits
  into contiguous blocks: device 0 would hold the first ``2B/n`` rows, all from ``xs[0]``, and
  XLA would move images to get there. Here the result is ``[x_0 rows of device 0, x_1 rows of
  device 0, ..., x_0 rows of device 1, ...]``: nothing moves. On one device it is
  ``jnp.concatenate(xs)`` (also for ``mesh=None``). ``split_per_device`` undoes it.
  """
  n = mesh_data_size(mesh)
  if n == 1:
    return jnp.concatenate(xs, axis=0)
  parts = [x.reshape((n, x.shape[0] // n) + x.shape[1:]) for x in xs]
  out = jnp.concatenate(parts, axis=1)
  return out.reshape((-1,) + out.shape[2:])


def split_per_device(x: jax.Array, sizes: list[int], *, mesh: Mesh | AbstractMesh | None
                     ) -> list[jax.Array]:
  """Inverse of ``concat_per_device``: the arrays of global leading sizes ``sizes``."""
  n = mesh_data_size(mesh)
  if n == 1:
    return jnp.split(x, np.cumsum(sizes)[:-1].tolist(), axis=0)
  xr = x.reshape((n, x.shape[0] // n) + x.shape[1:])
  local = [s // n for s in sizes]
  parts = jnp.split(xr, np.cumsum(local)[:-1].tolist(), axis=1)
  return [p.reshape((-1,) + p.shape[2:]) for p in parts]


# ---------------------------------------------------------------------------------------------
# One gradient reduction per step.
# ---------------------------------------------------------------------------------------------
@jax.tree_util.register_pytree_node_class
class PerDevice:
  """A parameter tree with one copy per device: every leaf is ``[n, ...]``, sharded on 'data'.

  Only ``apply_per_device`` reads it (device ``i`` uses copy ``i``); the gradient with respect to
  it holds each device's own contribution, summed once by ``sum_copies``.
  """

  def __init__(self, tree):
    self.tree = tree

  def tree_flatten(self):
    return (self.tree,), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(children[0])


def per_device_copies(tree: Any, mesh: Mesh | AbstractMesh) -> PerDevice:
  """``PerDevice`` of ``tree``: ``[n, ...]`` broadcasts sharded on 'data' (a local copy each)."""
  n = mesh_data_size(mesh)
  spec = NamedSharding(mesh, P(DATA))

  def copy(x):
    y = jnp.broadcast_to(x[None], (n,) + x.shape)
    return jax.lax.with_sharding_constraint(y, spec)

  return PerDevice(jax.tree.map(copy, tree))


def sum_copies(copies: PerDevice) -> Any:
  """``sum_i copies[i]``: the one all-reduce of the gradients."""
  return jax.tree.map(lambda g: jnp.sum(g, axis=0), copies.tree)


def value_and_grad_reduced_once(fn: Callable, params: Any, *, has_aux: bool = False,
                                mesh: Mesh | AbstractMesh | None = None):
  """``jax.value_and_grad(fn, has_aux=has_aux)(params)``, the gradient all-reduced once.

  On a mesh with ``n > 1`` devices ``fn`` receives ``PerDevice(params)`` (pass it on to
  ``apply_per_device``, e.g. through ``StepContext.forward`` of a context built with the same
  mesh); the gradient with respect to the copies stays on each device through every
  application of the network and is summed once. The result is the same gradient
  (``dL/dp = sum_i dL/dp_i`` at ``p_i = p``). On one device this is ``jax.value_and_grad``.
  ``mesh=None``: one device.
  """
  if mesh_data_size(mesh) == 1:
    return jax.value_and_grad(fn, has_aux=has_aux)(params)
  out, grads = jax.value_and_grad(fn, has_aux=has_aux)(per_device_copies(params, mesh))
  return out, sum_copies(grads)


def bn_axis_index_groups(bn_group_size: int, n_dev: int) -> tuple[tuple[int, ...], ...] | None:
  """Consecutive groups of ``bn_group_size`` devices of 'data' (None: all devices, one group).

  ``bn_group_size <= 0`` or ``>= n_dev`` means global statistics. Otherwise it must divide
  ``n_dev``.
  """
  if bn_group_size <= 0 or bn_group_size >= n_dev:
    return None
  if n_dev % bn_group_size:
    raise ValueError(f'config.model.bn_group_size={bn_group_size} does not divide the '
                     f'{n_dev} devices of the mesh; accepted: a divisor of {n_dev}, or -1 (all)')
  return tuple(tuple(range(i, i + bn_group_size)) for i in range(0, n_dev, bn_group_size))


def apply_per_device(model, params, batch_stats, images: jax.Array, *, grouped: bool,
                     mesh: Mesh | AbstractMesh, **kwargs) -> tuple[dict[str, jax.Array], Any]:
  """Training-mode ``model.apply`` on each device's rows; returns (outputs, new batch_stats).

  ``model`` must be built with BatchNorm ``axis_name='data'`` (and its ``axis_index_groups``
  when ``grouped``): the statistics are all-reduced explicitly, one all-reduce per BatchNorm
  layer forward and one backward, as under GSPMD. ``params``: a ``PerDevice`` (device ``i``
  uses copy ``i``; its gradient stays per device) or a replicated tree (e.g. the EMA target).
  ``images`` and array ``kwargs`` (e.g. ``token_indices``) are ``[B, ...]`` sharded along
  'data'; every output is ``[B, ...]`` sharded along 'data'. With groups, the running
  statistics of the groups differ, and the stored ones are their mean over all devices (one
  more all-reduce per application: all running statistics as one flat vector). ``mesh``: the
  mesh of 'data' (a ``Mesh``, or its ``AbstractMesh`` inside ``jax.jit``).
  """
  stacked = isinstance(params, PerDevice)
  tree = params.tree if stacked else params
  arrays = {k: v for k, v in kwargs.items() if isinstance(v, (jax.Array, np.ndarray))}
  static = {k: v for k, v in kwargs.items() if k not in arrays}   # flags, None

  def body(p, bs, x, kw):
    if stacked:
      p = jax.tree.map(lambda a: a[0], p)
    out, mutated = model.apply({'params': p, 'batch_stats': bs}, x, train=True,
                               mutable=['batch_stats'], **kw, **static)
    new_bs = mutated['batch_stats']
    if grouped:   # one all-reduce of all running statistics (one flat vector)
      flat, unravel = jax.flatten_util.ravel_pytree(new_bs)
      new_bs = unravel(jax.lax.pmean(flat, DATA))
    return out, new_bs

  fn = jax.shard_map(body, mesh=mesh,
                     in_specs=(P(DATA) if stacked else P(), P(), P(DATA), P(DATA)),
                     out_specs=(P(DATA), P()), check_vma=False)
  return fn(tree, batch_stats, images, arrays)
