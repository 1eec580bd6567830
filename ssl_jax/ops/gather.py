"""Row gathers from a bank sharded along 'data', without gathering the bank.

``gather_rows(bank, indices)[b, j] = bank[indices[b, j]]`` (zeros for an index outside
``[0, N)``, e.g. the -1 that ``knn.topk_cosine`` returns when fewer than k rows are valid). On a sharded bank each shard looks
up the indices that fall in its row range (zeros elsewhere) and the partial results are summed
over 'data' (a psum of B x k x d values — the bank itself never moves).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ssl_jax import sharding


def _local_gather(bank, indices, offset):
  local = indices - offset
  inside = (local >= 0) & (local < bank.shape[0])
  rows = jnp.take(bank, jnp.clip(local, 0, bank.shape[0] - 1), axis=0)
  mask = inside.reshape(inside.shape + (1,) * (bank.ndim - 1))
  return jnp.where(mask, rows, jnp.zeros_like(rows))


def gather_rows(bank: jax.Array, indices: jax.Array, *, mesh=None) -> jax.Array:
  """``bank[indices]`` for ``bank`` [N, ...] (sharded on its leading axis) and int ``indices``."""
  n = sharding.mesh_data_size(mesh)
  if n == 1 or bank.shape[0] % n:
    return _local_gather(bank, indices, 0)
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  shard_rows = bank.shape[0] // n

  def per_shard(bank_shard, idx):
    offset = jax.lax.axis_index(sharding.DATA) * shard_rows
    part = _local_gather(bank_shard, idx, offset)
    if jnp.issubdtype(part.dtype, jnp.integer) or part.dtype == jnp.bool_:
      return jax.lax.psum(part.astype(jnp.int32), sharding.DATA).astype(part.dtype)
    return jax.lax.psum(part, sharding.DATA)

  return jax.shard_map(per_shard, mesh=mesh, in_specs=(P(sharding.DATA), P()),
                       out_specs=P(), check_vma=False)(bank, indices)
