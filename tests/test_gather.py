"""ssl_jax.ops.gather against numpy indexing: rows of a sharded bank (never gathered), and rows
within pools (read on their own device: no collective)."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from hlo_utils import collective_summary
from ssl_jax import sharding
from ssl_jax.ops import gather


def test_gather_rows_sharded_equals_numpy():
  rs = np.random.RandomState(0)
  bank = rs.randn(64, 5).astype(np.float32)
  labels = rs.randint(0, 9, 64).astype(np.int32)
  idx = rs.randint(-1, 64, (8, 3)).astype(np.int32)            # -1: zeros
  want = np.where(idx[..., None] >= 0, bank[np.maximum(idx, 0)], 0.0)
  want_l = np.where(idx >= 0, labels[np.maximum(idx, 0)], 0)
  np.testing.assert_array_equal(np.asarray(gather.gather_rows(bank, idx)), want)
  mesh = sharding.make_mesh(4)
  with jax.set_mesh(mesh):
    sh = NamedSharding(mesh, P('data'))
    bs, ls = jax.device_put(bank, sh), jax.device_put(labels, sh)
    fn = jax.jit(lambda bank, idx: gather.gather_rows(bank, idx, mesh=mesh))
    got = fn(bs, idx)                                  # 8 query rows: reduce-scattered
    assert got.sharding.spec == P('data')
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(fn(ls, idx)), want_l)
    odd = fn(bs, idx[:3])                               # 3 rows: all-reduced, replicated
    np.testing.assert_array_equal(np.asarray(odd), want[:3])
    c = collective_summary(fn, bs, idx)
    assert c['all-gather']['count'] == 0                # the bank never moves
    assert c['reduce-scatter']['bytes'] + c['all-reduce']['bytes'] <= want.nbytes


def test_take_within_pools_equals_numpy_and_stays_on_device():
  rs = np.random.RandomState(1)
  x = rs.randn(16, 4, 3).astype(np.float32)
  rows = np.arange(16)
  idx = (rows // 4 * 4 + rs.randint(0, 4, 16)).astype(np.int32)          # within pools of 4
  idx2 = (rows[:, None] // 4 * 4 + rs.randint(0, 4, (16, 2))).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(gather.take_within_pools(x, idx, 4)), x[idx])
  mesh = sharding.make_mesh(4)
  with jax.set_mesh(mesh):
    sh = NamedSharding(mesh, P('data'))
    xs = jax.device_put(x, sh)
    fn = jax.jit(lambda x, i: gather.take_within_pools(x, i, 4, mesh=mesh))
    np.testing.assert_array_equal(np.asarray(fn(xs, jax.device_put(idx, sh))), x[idx])
    np.testing.assert_array_equal(np.asarray(fn(xs, jax.device_put(idx2, sh))), x[idx2])
    assert sum(v['count'] for v in collective_summary(
        fn, xs, jax.device_put(idx, sh)).values()) == 0
    # Pools of 8 span 2 devices (4 rows each): the same values, rows move.
    idx8 = (rows // 8 * 8 + rs.randint(0, 8, 16)).astype(np.int32)
    fn8 = jax.jit(lambda x, i: gather.take_within_pools(x, i, 8, mesh=mesh))
    np.testing.assert_array_equal(np.asarray(fn8(xs, idx8)), x[idx8])
