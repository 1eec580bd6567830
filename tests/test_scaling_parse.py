"""benchmarks/scaling.py reads collectives and their bytes from compiled HLO: check it on a
program whose collectives we know."""
from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import conftest
from ssl_jax import sharding

_spec = importlib.util.spec_from_file_location('scaling', conftest.REPO / 'benchmarks' / 'scaling.py')
scaling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scaling)


def test_shape_bytes():
  assert scaling.shape_bytes('f32[4,8]{1,0}') == 128
  assert scaling.shape_bytes('(bf16[10], s32[3,2])') == 20 + 24
  assert scaling.shape_bytes('f32[]') == 4


def test_collectives_counted_with_their_bytes():
  mesh = sharding.make_mesh()
  n = mesh.shape[sharding.DATA]

  def f(x, y):
    s = jax.lax.psum(x, sharding.DATA)                              # all-reduce of f32[64, 32]
    g = jax.lax.all_gather(y, sharding.DATA, tiled=True)            # all-gather to f32[4n, 16]
    return s, g

  fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P(sharding.DATA)),
                             out_specs=(P(), P()), check_vma=False))
  x = jnp.ones((64, 32), jnp.float32)
  y = jnp.ones((4 * n, 16), jnp.float32)
  c = scaling.collectives(fn.lower(x, y).compile().as_text())
  assert c['all-reduce'] == {'count': 1, 'bytes': 64 * 32 * 4}
  assert c["all-gather"] == {"count": 1, "bytes": 4 * n * 16 * 4}
  assert c['reduce-scatter']['count'] == 0


def test_ring_model():
  p = scaling.PLATFORMS['H100']
  # 8 chips in one node: 2 (n-1)/n S / bw + latency.
  t = scaling.comm_time('all-reduce', 1e9, 8, p)
  assert abs(t - (p['intra'][1] + 2 * 7 / 8 * 1e9 / p['intra'][0])) < 1e-12
  # More nodes cost more; one chip costs nothing.
  assert scaling.comm_time('all-reduce', 1e9, 64, p) > t
  assert scaling.comm_time('all-reduce', 1e9, 1, p) == 0.0
