"""FIFO memory banks (ring buffers) stored sharded along ``'data'``.

One ring buffer serves every method that keeps past embeddings: MoCo's (and FT's) negative
queue, MSF's neighbour bank, CLIM's and CsMl's feature banks. A labels bank (int [K]) or an
index bank may ride along: call ``enqueue`` on it with the same ``ptr`` and items of shape [B]
(only the bank's leading axis is special; trailing dims are whatever the items have).

State: ``bank`` [K, ...], ``ptr`` (int32 scalar, next row to write) and, for banks that are
searched, ``count`` (int32 scalar, rows ever written, saturating at K). Because writing starts at
``ptr = 0`` and proceeds in order, the rows written so far are exactly ``0 .. count - 1`` until the
bank wraps, after which all rows are valid: ``valid_mask(count, K)[j] = j < count``. kNN searches
pass that mask (``knn.topk_cosine(..., valid=...)``) so never-written rows are never neighbours.

Enqueue (global batch semantics, identical on 1 device and on a pod):
``bank[(ptr + i) mod K] = items[i]`` for ``i = 0..B-1`` and ``ptr' = (ptr + B) mod K``; B need not
divide K (the write wraps around). If ``B > K`` only the last K items survive (as if written one
by one). On a bank sharded along ``'data'`` each shard writes the rows of its own range
(``shard_map``; items are replicated to every shard, the bank never moves). Under ``jax.jit`` with
the bank donated the write is in place.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ssl_jax import sharding


def _write_rows(bank, rows, items, offset):
  """Scatter ``items[i]`` to local row ``rows[i] - offset``; rows outside this shard are dropped."""
  local = rows - offset
  inside = (local >= 0) & (local < bank.shape[0])
  local = jnp.where(inside, local, bank.shape[0])          # out of bounds -> dropped
  return bank.at[local].set(items.astype(bank.dtype), mode='drop')


def enqueue(bank: jax.Array, ptr: jax.Array, items: jax.Array, *, mesh=None
            ) -> tuple[jax.Array, jax.Array]:
  """FIFO write: ``bank[(ptr + i) mod K] = items[i]``, ``ptr' = (ptr + B) mod K``.

  ``bank`` [K, ...] (leading axis sharded over ``'data'`` or not), ``ptr`` int scalar,
  ``items`` [B, ...] with ``items.shape[1:] == bank.shape[1:]`` (cast to ``bank.dtype``).
  Returns the new bank (same sharding) and the new pointer (int32). When ``B > K`` only the last
  K items are kept. Sharded path: ``mesh`` (a ``Mesh``, or its ``AbstractMesh`` inside
  ``jax.jit``) with a ``'data'`` axis of size > 1 dividing K; ``mesh=None``: one device (the
  ambient mesh is not read).
  """
  k_rows = bank.shape[0]
  b = items.shape[0]
  if items.shape[1:] != bank.shape[1:]:
    raise ValueError(f'items {items.shape} do not fit bank {bank.shape}: trailing dims differ')
  ptr = jnp.asarray(ptr, jnp.int32)
  new_ptr = (ptr + b) % k_rows
  if b > k_rows:                      # only the last K items survive a full lap
    ptr = (ptr + (b - k_rows)) % k_rows
    items = items[b - k_rows:]
    b = k_rows
  rows = (ptr + jnp.arange(b, dtype=jnp.int32)) % k_rows   # distinct since b <= K
  n_dev = sharding.mesh_data_size(mesh)
  if n_dev == 1 or k_rows % n_dev:
    return _write_rows(bank, rows, items, 0), new_ptr
  shard_rows = k_rows // n_dev

  def per_shard(bank_shard, rows, items):
    return _write_rows(bank_shard, rows, items, jax.lax.axis_index(sharding.DATA) * shard_rows)

  new_bank = jax.shard_map(per_shard, mesh=mesh,
                           in_specs=(P(sharding.DATA), P(), P()),
                           out_specs=P(sharding.DATA))(bank, rows, items)
  return new_bank, new_ptr


def valid_mask(count: jax.Array, size: int) -> jax.Array:
  """``valid[j] = j < count`` (bool [size]): rows ever written by a bank filled from ``ptr = 0``."""
  return jnp.arange(size, dtype=jnp.int32) < jnp.asarray(count, jnp.int32)


def update_count(count: jax.Array, num_items: int, size: int) -> jax.Array:
  """``count' = min(count + B, K)`` (saturates, so it never overflows)."""
  return jnp.minimum(jnp.asarray(count, jnp.int32) + num_items, size).astype(jnp.int32)


__all__ = ['enqueue', 'valid_mask', 'update_count']
