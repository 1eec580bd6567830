"""Row gathers from arrays sharded along 'data', without gathering the array.

``gather_rows(bank, indices)[b, j] = bank[indices[b, j]]`` (zeros for an index outside
``[0, N)``, e.g. the -1 that ``knn.topk_cosine`` returns when fewer than k rows are valid). On a
sharded bank each shard looks up the indices that fall in its row range (zeros elsewhere) and
the partial results are summed over 'data' (reduce-scattered to the owner of each query row:
B x k x d / n values per device — the bank itself never moves).

``take_within_pools(x, indices, pool)[b, ...] = x[indices[b, ...]]`` when every index points into
row ``b``'s own pool of ``pool`` consecutive rows (CutMix partners of the same device, FT's
shard-local permutation): a pool that lies on one device is read on that device, nothing moves.

Both take the mesh as an argument (``mesh``: a ``Mesh``, or its ``AbstractMesh`` inside
``jax.jit``; ``None``: one device — the ambient mesh is not read).
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
  """``bank[indices]`` for ``bank`` [N, ...] (sharded on its leading axis) and int ``indices``.

  Sharded bank: when the leading axis of ``indices`` (the queries) divides over 'data', the
  partial lookups are reduce-scattered to the device that owns each query row (the result is
  sharded like a batch: ``B k d / n`` per device instead of an all-reduce of ``B k d``);
  otherwise all-reduced (a replicated result).
  """
  n = sharding.mesh_data_size(mesh)
  if n == 1 or bank.shape[0] % n:
    return _local_gather(bank, indices, 0)
  shard_rows = bank.shape[0] // n
  scatter = indices.ndim >= 1 and indices.shape[0] % n == 0

  def reduce(x):
    if scatter:
      return jax.lax.psum_scatter(x, sharding.DATA, scatter_dimension=0, tiled=True)
    return jax.lax.psum(x, sharding.DATA)

  def per_shard(bank_shard, idx):
    offset = jax.lax.axis_index(sharding.DATA) * shard_rows
    part = _local_gather(bank_shard, idx, offset)
    if jnp.issubdtype(part.dtype, jnp.integer) or part.dtype == jnp.bool_:
      return reduce(part.astype(jnp.int32)).astype(part.dtype)
    return reduce(part)

  return jax.shard_map(per_shard, mesh=mesh, in_specs=(P(sharding.DATA), P()),
                       out_specs=P(sharding.DATA) if scatter else P(),
                       check_vma=False)(bank, indices)


def take_within_pools(x: jax.Array, indices: jax.Array, pool: int, *, mesh=None) -> jax.Array:
  """``x[indices]`` (rows) for ``indices`` that stay in their row's pool.

  ``x`` [N, ...] (sharded along 'data' or not), ``indices`` [N, ...] int with
  ``indices[b, ...] // pool == b // pool`` (the caller's promise: pools are ``pool`` consecutive
  rows, ``pool`` divides N). Returns ``[N, indices.shape[1:], x.shape[1:]]``. When each pool
  lies on one device of ``mesh`` (``pool`` divides the rows per device) every device reads its
  own rows
  (``shard_map``): no collective. Otherwise (one pool spanning devices, e.g. the whole global
  batch) it is ``jnp.take``, and XLA moves the rows it needs.
  """
  n = sharding.mesh_data_size(mesh)
  rows = x.shape[0]
  if rows % pool:
    raise ValueError(f'pool={pool} does not divide the {rows} rows')
  if n == 1 or not sharding.pool_is_local(pool, rows, n):
    return jnp.take(x, indices, axis=0)
  per = rows // n

  def local(xs, idx):
    return jnp.take(xs, idx - jax.lax.axis_index(sharding.DATA) * per, axis=0)

  return jax.shard_map(local, mesh=mesh,
                       in_specs=(P(sharding.DATA), P(sharding.DATA)),
                       out_specs=P(sharding.DATA), check_vma=False)(x, indices)
