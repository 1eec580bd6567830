"""ssl_jax.ops.memory_bank: FIFO order and wrap-around against a python list, sharded writes."""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import sharding
from ssl_jax.ops import memory_bank as mb


class _RefRing:
  """Slow reference: a ring buffer written one item at a time, plus the FIFO of the last K."""

  def __init__(self, k, d):
    self.rows = [np.zeros(d, np.float32) for _ in range(k)]
    self.ptr = 0
    self.fifo = collections.deque(maxlen=k)
    self.written = set()

  def push(self, items):
    for item in items:
      self.rows[self.ptr] = item
      self.written.add(self.ptr)
      self.ptr = (self.ptr + 1) % len(self.rows)
      self.fifo.append(item)


def _batches(rng, steps, b, d):
  return [rng.standard_normal((b, d)).astype(np.float32) for _ in range(steps)]


@pytest.mark.parametrize('k,b,steps', [(10, 3, 8), (12, 12, 3), (7, 9, 4)])   # 9 > K = 7
def test_enqueue_matches_python_fifo(k, b, steps):
  rng = np.random.default_rng(k * b)
  ref = _RefRing(k, 4)
  bank, ptr = jnp.zeros((k, 4)), jnp.zeros((), jnp.int32)
  count = jnp.zeros((), jnp.int32)
  step = jax.jit(mb.enqueue, donate_argnums=0)
  for items in _batches(rng, steps, b, 4):
    bank, ptr = step(bank, ptr, items)
    count = mb.update_count(count, b, k)
    ref.push(items)
    np.testing.assert_array_equal(np.asarray(bank), np.stack(ref.rows))
    assert int(ptr) == ref.ptr
    # The rows in ring order starting at ptr are the last K items in FIFO order (when full).
    if len(ref.fifo) == k:
      ring = np.roll(np.asarray(bank), -int(ptr), axis=0)
      np.testing.assert_array_equal(ring, np.stack(ref.fifo))
    valid = np.asarray(mb.valid_mask(count, k))
    np.testing.assert_array_equal(np.flatnonzero(valid), sorted(ref.written))
  assert int(count) == min(steps * b, k)


def test_labels_bank_rides_along():
  rng = np.random.default_rng(0)
  k, b = 10, 4
  feats, labels, ptr = jnp.zeros((k, 3)), jnp.full((k,), -1, jnp.int32), jnp.int32(0)
  ref_f, ref_l = _RefRing(k, 3), _RefRing(k, 1)
  for step in range(4):
    f = rng.standard_normal((b, 3)).astype(np.float32)
    lab = np.arange(step * b, (step + 1) * b, dtype=np.int32)
    feats, new_ptr = mb.enqueue(feats, ptr, f)
    labels, new_ptr2 = mb.enqueue(labels, ptr, lab)
    assert labels.dtype == jnp.int32 and int(new_ptr) == int(new_ptr2)
    ptr = new_ptr
    ref_f.push(f)
    ref_l.push(lab[:, None])
  np.testing.assert_array_equal(np.asarray(labels), np.stack(ref_l.rows)[:, 0])
  np.testing.assert_array_equal(np.asarray(feats), np.stack(ref_f.rows))


def test_sharded_enqueue_matches_and_never_gathers_bank():
  mesh = sharding.make_mesh(4)
  rng = np.random.default_rng(1)
  k, b, d = 24, 10, 5                          # B does not divide K; 6 rows per shard
  spec = NamedSharding(mesh, P(sharding.DATA))
  bank_s = jax.device_put(np.zeros((k, d), np.float32), spec)
  ptr = jnp.int32(0)
  ref = _RefRing(k, d)
  step = jax.jit(lambda bank, ptr, items: mb.enqueue(bank, ptr, items, mesh=mesh))
  with jax.set_mesh(mesh):
    for items in _batches(rng, 5, b, d):
      items_s = jax.device_put(items, NamedSharding(mesh, P()))
      bank_s, ptr = step(bank_s, ptr, items_s)
      ref.push(items)
      np.testing.assert_array_equal(np.asarray(bank_s), np.stack(ref.rows))
    hlo = step.lower(bank_s, ptr, items_s).compile().as_text()
    # Items sharded with the batch (as in a train step): still no gather of the bank.
    items_b = jax.device_put(rng.standard_normal((8, d)).astype(np.float32), spec)
    hlo_b = step.lower(bank_s, ptr, items_b).compile().as_text()
  assert bank_s.sharding.spec == P(sharding.DATA)
  for text in (hlo, hlo_b):
    gathers = [line for line in text.splitlines() if 'all-gather' in line]
    assert not [g for g in gathers if f'f32[{k},{d}]' in g], gathers
  # Explicit mesh argument and an unsharded bank give the same result.
  items = rng.standard_normal((b, d)).astype(np.float32)
  got, p1 = mb.enqueue(bank_s, ptr, items, mesh=mesh)
  want, p2 = mb.enqueue(jnp.asarray(np.asarray(bank_s)), ptr, items)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert int(p1) == int(p2) == (int(ptr) + b) % k


def test_items_must_fit_the_bank():
  with pytest.raises(ValueError, match='trailing dims differ'):
    mb.enqueue(jnp.zeros((6, 3)), jnp.int32(0), jnp.ones((2, 4)))
