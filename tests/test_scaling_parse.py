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


def test_group_sizes_of_every_replica_group_format():
  n = 8
  assert scaling.group_size('x = f32[2] all-reduce(a), replica_groups={{0,1},{2,3},{4,5},{6,7}}',
                            n) == 2
  assert scaling.group_size('x = f32[2] all-reduce(a), replica_groups=[2,4]<=[8]', n) == 4
  assert scaling.group_size("x = f32[2] all-reduce(a), replica_groups=mesh['axis_0'=2,"
                            "'axis_1'=4,'axis_2'=1] {'axis_1'}", n) == 4
  assert scaling.group_size("x = f32[2] all-reduce(a), replica_groups=mesh['axis_0'=8,"
                            "'axis_1'=1] {'axis_0'}", n) == 8
  assert scaling.group_size('x = f32[2] all-reduce(a), replica_groups={}', n) == 8
  assert scaling.group_size('x = f32[2] collective-permute(a), source_target_pairs={{0,1}}',
                            n) == 2


def test_grouped_collectives_read_from_a_program():
  """A psum over groups of 2 of the 4 devices: one all-reduce spanning 2 devices."""
  mesh = sharding.make_mesh()
  n = mesh.shape[sharding.DATA]
  groups = [list(range(i, i + 2)) for i in range(0, n, 2)]
  fn = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, sharding.DATA, axis_index_groups=groups),
                             mesh=mesh, in_specs=P(sharding.DATA), out_specs=P(sharding.DATA),
                             check_vma=False))
  ops = scaling.collective_ops(fn.lower(jnp.ones((n, 16))).compile().as_text(), n)
  assert [op[:3] for op in ops] == [('all-reduce', 64, 2)]


def test_check_catches_what_must_not_move():
  """Within the limits: the gradients once, BatchNorm statistics, [B, d] exchanges. Over: a
  second copy of the gradients, an image batch, a 65,536-key queue."""
  b, d = 4096, 128

  def result(*extra):
    ops = [('all-reduce', 0, 64, '(f32[1000,256]{1,0}, f32[256]{0}, f32[3,3,64,64]{3,2,1,0})'),
           ('all-reduce', 0, 64, 'f32[2,64]{1,0}'), ('all-reduce', 0, 64, 'f32[2,256]{1,0}'),
           ('all-gather', 0, 64, f'f32[{b},{d}]{{1,0}}'),
           ('all-reduce', 0, 64, f'(f32[{b}]{{0}}, f32[2,64]{{1,0}})')] + list(extra)
    ops = [(k, scaling.shape_bytes(s), g, s) for k, _, g, s in ops]
    coll = {k: {'count': 0, 'bytes': 0} for k in scaling._COLLECTIVES}
    for k, nbytes, _, _ in ops:
      coll[k]['count'] += 1
      coll[k]['bytes'] += nbytes
    shapes = [[1000, 256], [256], [3, 3, 64, 64]]
    return {'method': 'm', 'chips': 64, 'bn_group_size': -1, 'global_batch': b,
            'collectives': coll, 'ops': ops, 'param_shapes': shapes,
            'grad_bytes': 4 * (1000 * 256 + 256 + 9 * 64 * 64), 'bn_pass_bytes': 8 * 320,
            'embed_dim': d}
  ok = result()
  c = scaling.classify(ok)
  assert c['grad'] == ok['grad_bytes'] and c['surplus'] == 0
  assert c['bn'] == 4 * 2 * (64 + 256 + 64)
  assert c['exchange'] == 4 * (b * d + b) and c['largest_exchange'] == 4 * b * d
  assert not scaling.check([ok])
  violations = {
      'gradients all-reduced more than once': ('all-reduce', 0, 64, 'f32[1000,256]{1,0}'),
      'one collective moves': ('all-gather', 0, 64, f'u8[{b},224,224,3]{{3,2,1,0}}'),
      'moves': ('all-gather', 0, 64, f'f32[65536,{d}]{{1,0}}'),
  }
  for message, op in violations.items():
    bad = scaling.check([result(op)])
    assert bad and all(message in line for line in bad[:1]), bad
