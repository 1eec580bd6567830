"""Mesh, global-batch assembly and partition specs.

One mesh axis, ``'data'``. Everything global (a batch, a queue, a memory bank) is stored
sharded along its leading axis over ``'data'``; parameters and scalars are replicated.
The mesh uses ``AxisType.Auto`` (GSPMD propagation), so code inside ``jax.jit`` is written
with global semantics and XLA inserts the collectives (e.g. BatchNorm statistics over the
global batch become an all-reduce).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

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


def mesh_data_size(mesh: Mesh | None = None) -> int:
  """Size of the ``'data'`` axis of ``mesh`` or of the context mesh (1 if none)."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or DATA not in mesh.axis_names:
    return 1
  return mesh.shape[DATA]


def leading_axis_spec(x: Any, n: int) -> P:
  """``P('data')`` for arrays whose leading dim is a multiple of n (banks, queues), else ``P()``."""
  shape = getattr(x, 'shape', ())
  if len(shape) >= 1 and shape[0] >= n and shape[0] % n == 0 and n > 1:
    return P(DATA)
  return P()


def global_batch(mesh: Mesh, local_batch: Any) -> Any:
  """Assemble per-process numpy batches into global ``jax.Array``s sharded along ``'data'``."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)
