"""The mesh of an offline evaluation: ``config.num_devices`` devices (-1: all) on the one
``'data'`` axis, and the global batch sizes checked to divide across them (one line naming the
key when one does not)."""
from __future__ import annotations

from typing import Sequence

from jax.sharding import Mesh

from ssl_jax import config_lib, sharding, utils


def mesh_of(c) -> Mesh:
  """The mesh of ``c.num_devices`` devices (-1: all)."""
  return sharding.make_mesh(utils.optional(c.num_devices))


def check_batch(name: str, batch: int, mesh) -> None:
  """``ConfigError`` naming ``config.<name>`` unless ``batch`` divides across the mesh."""
  n = mesh.shape[sharding.DATA]
  if batch % n:
    raise config_lib.ConfigError(
        f'config.{name}={batch} does not divide across the {n} devices of the mesh; '
        f'accepted: a multiple of {n} (e.g. {max(1, batch // n) * n}).')


def eval_mesh(config, batch_keys: Sequence[str] = ('eval_batch_size',)) -> Mesh:
  """The evaluation mesh, after checking that each ``config.<key>`` batch divides across it."""
  mesh = mesh_of(config)
  for key in batch_keys:
    check_batch(key, config[key], mesh)
  return mesh
