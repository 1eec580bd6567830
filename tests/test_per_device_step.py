"""The per-device pieces of the step (ssl_jax.sharding): one gradient all-reduce per step,
BatchNorm statistics over all devices or over groups of devices, per-device concatenation, and
the method state placed by its declared specs (a size that does not divide is an error)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import method_steps
from harness import load_config
from hlo_utils import collective_summary, compiled_text, scaling
from ssl_jax import config_lib, sharding, train
from ssl_jax.models import heads
from ssl_jax.state import method_state_shardings


def _allreduce_bytes(parts, mesh, batch) -> int:
  with jax.set_mesh(mesh):
    text = compiled_text(parts.train_step, parts.abstract, sharding.global_batch(mesh, batch))
  return scaling.collectives(text)['all-reduce']['bytes']


@pytest.mark.slow   # compiles the step on 1 and 4 devices
@pytest.mark.slow
def test_byol_gradients_are_all_reduced_once_and_equal_one_device(monkeypatch):
  """BYOL applies the online network twice; the trainer's step all-reduces its gradients once
  (plain ``jax.value_and_grad`` reduces each application's: one more copy of the gradients),
  and 4 devices give the 1-device losses."""
  c = load_config('byol')
  c.batch_size = 16
  rs = np.random.RandomState(0)
  batches = [method_steps.random_batch(c, rs) for _ in range(2)]
  one, _, _ = method_steps.run(c, 1, batches)
  four, _, s4 = method_steps.run(c, 4, batches)
  np.testing.assert_allclose(four, one, rtol=2e-5)
  net = 4 * sum(x.size for x in jax.tree.leaves(s4.params))

  parts, mesh = method_steps.build(c, 4)
  once = _allreduce_bytes(parts, mesh, batches[0])
  monkeypatch.setattr(sharding, 'value_and_grad_reduced_once',
                      lambda fn, p, has_aux=False, **_: jax.value_and_grad(fn, has_aux=has_aux)(p))
  parts, mesh = method_steps.build(c, 4)
  plain = _allreduce_bytes(parts, mesh, batches[0])
  assert abs((plain - once) - net) < 0.05 * net, (plain, once, net)
  assert once < 1.3 * net, (once, net)


def _mlp(bn_axis=()):
  return heads.MLP(hidden_dim=8, out_dim=4, num_layers=2, use_bn=True, bn_axis=bn_axis)


@pytest.mark.parametrize('group', [2, -1])
def test_bn_statistics_over_groups_of_devices(group):
  """Groups of 2 of 4 devices: each group normalises with its own rows' statistics (= the
  plain module on that group's rows), the stored running statistics are the groups' mean, and
  the statistics all-reduces span 2 devices. -1: global statistics (= the plain module)."""
  rs = np.random.RandomState(0)
  x = rs.randn(16, 5).astype(np.float32)
  plain = _mlp()
  variables = plain.init(jax.random.key(0), x[:2])
  groups = sharding.bn_axis_index_groups(group, 4)
  model = _mlp((sharding.DATA, groups))
  mesh = sharding.make_mesh(4)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P('data')))
    fn = jax.jit(lambda p, bs, x: sharding.apply_per_device(model, p, bs, x, mesh=mesh,
                                                             grouped=groups is not None))
    out, bs = fn(variables['params'], variables['batch_stats'], xs)
    ops = scaling.collective_ops(compiled_text(fn, variables['params'],
                                               variables['batch_stats'], xs), 4)
  rows = 8 if group == 2 else 16
  refs = [plain.apply(variables, x[i:i + rows], train=True, mutable=['batch_stats'])
          for i in range(0, 16, rows)]
  np.testing.assert_allclose(np.asarray(out), np.concatenate([r[0] for r in refs]), atol=2e-5)
  want_bs = jax.tree.map(lambda *a: np.mean(a, axis=0), *[r[1]['batch_stats'] for r in refs])
  for a, b in zip(jax.tree.leaves(bs), jax.tree.leaves(want_bs)):
    np.testing.assert_allclose(np.asarray(a), b, atol=1e-5)
  stats_groups = {op[2] for op in ops if op[0] == 'all-reduce'}
  assert (2 in stats_groups) == (group == 2) and 4 in stats_groups, ops


def test_bn_group_size_is_validated_and_resolved():
  assert sharding.bn_axis_index_groups(-1, 8) is None
  assert sharding.bn_axis_index_groups(8, 8) is None
  assert sharding.bn_axis_index_groups(4, 8) == ((0, 1, 2, 3), (4, 5, 6, 7))
  c = load_config('moco')
  c.model.bn_group_size = 3
  with pytest.raises(config_lib.ConfigError, match=r'config\.model\.bn_group_size=3 is invalid'):
    train.validate_config(c, num_devices=4)
  c.model.bn_group_size = 2
  train.validate_config(c, num_devices=4)


def test_concat_per_device_keeps_rows_on_their_device():
  a = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  b = -a
  mesh = sharding.make_mesh(4)
  with jax.set_mesh(mesh):
    sh = NamedSharding(mesh, P('data'))
    fn = jax.jit(lambda a, b: sharding.split_per_device(
        sharding.concat_per_device([a, b], mesh=mesh), [8, 8], mesh=mesh))
    cat = jax.jit(lambda a, b: sharding.concat_per_device([a, b], mesh=mesh))(
        jax.device_put(a, sh), jax.device_put(b, sh))
    back = fn(jax.device_put(a, sh), jax.device_put(b, sh))
    assert sum(v['count'] for v in collective_summary(
        fn, jax.device_put(a, sh), jax.device_put(b, sh)).values()) == 0
  np.testing.assert_array_equal(np.asarray(back[0]), a)
  np.testing.assert_array_equal(np.asarray(back[1]), b)
  # Device 0 holds rows 0-1 of a then rows 0-1 of b.
  np.testing.assert_array_equal(np.asarray(cat)[:4], np.concatenate([a[:2], b[:2]]))
  np.testing.assert_array_equal(np.asarray(sharding.concat_per_device([a, b], mesh=None)),
                                np.concatenate([a, b]))           # no mesh: plain concatenate


def test_method_state_placed_by_declared_specs():
  mesh = sharding.make_mesh(4)
  abstract = {'bank': jax.ShapeDtypeStruct((1022, 8), jnp.float32),
              'centroids': jax.ShapeDtypeStruct((10, 8), jnp.float32),
              'ptr': jax.ShapeDtypeStruct((), jnp.int32)}
  with pytest.raises(config_lib.ConfigError,
                     match=r"method state 'bank' has 1022 rows, which do not divide over the 4 "
                           r"devices .* a multiple of 4 \(e\.g\. 1024\)"):
    method_state_shardings(abstract, mesh, {'bank': P('data'), 'centroids': P(), 'ptr': P()})
  abstract['bank'] = jax.ShapeDtypeStruct((1024, 8), jnp.float32)
  got = method_state_shardings(abstract, mesh, {'bank': P('data'), 'centroids': P(),
                                                'ptr': P()})
  assert got['bank'].spec == P('data') and got['centroids'].spec == P()
  with pytest.raises(ValueError, match='do not match'):
    method_state_shardings(abstract, mesh, {'bank': P('data')})
  # A subtree spec: every level's queue of CsMl.
  nested = {'queues': {'a': jax.ShapeDtypeStruct((64, 4), jnp.float32),
                       'b': jax.ShapeDtypeStruct((64, 4), jnp.float32)}}
  got = method_state_shardings(nested, mesh, {'queues': P('data')})
  assert got['queues']['b'].spec == P('data')


def test_every_method_declares_its_state_and_moco_queue_must_divide():
  from ssl_jax import methods
  for name in ('byol', 'moco', 'ft', 'msf', 'clim', 'csml'):
    c = load_config(name)
    m = methods.get(name)(c, 100)
    abstract = jax.eval_shape(m.init_state, jax.random.key(0))
    method_state_shardings(abstract, sharding.make_mesh(4), m.state_specs())   # no error
  c = load_config('moco')
  c.batch_size = 16
  c.method.queue_size = 1022
  with pytest.raises(config_lib.ConfigError, match=r"'queue' has 1022 rows.* 4 devices"):
    method_steps.build(c, 4)
