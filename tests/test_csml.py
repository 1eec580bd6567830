"""CsMl: the multi-positive loss vs numpy and vs the shared op, neighbour retrieval sharded =
unsharded, per-level queues, and a tiny run (compiles once, the loss decreases)."""
from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import config_lib, methods, sharding
from ssl_jax.methods import csml
from ssl_jax.ops import losses

_CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs')


def _unit(rs, *shape):
  x = rs.randn(*shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_multi_positive_queue_nce_matches_numpy_and_shared_op():
  rs = np.random.RandomState(0)
  b, d, kq, n, tau = 5, 8, 24, 4, 0.2
  q, k, queue = _unit(rs, b, d), _unit(rs, b, d), _unit(rs, kq, d)
  nb_idx = np.stack([rs.choice(kq, n, replace=False) for _ in range(b)]).astype(np.int32)
  nb_keep = rs.rand(b, n) > 0.4
  nb_keep[0] = False                       # an anchor with only its own key: MoCo's InfoNCE
  nb_idx[0, 0] = -1                        # ignored (not kept)

  ref = []
  for i in range(b):
    s = np.concatenate([[q[i] @ k[i]], queue @ q[i]]).astype(np.float64) / tau
    lse = np.log(np.sum(np.exp(s)))
    pos = [0] + [1 + m for m, kp in zip(nb_idx[i], nb_keep[i]) if kp]
    ref.append(-np.mean([s[p] - lse for p in pos]))
  got = jax.jit(csml.multi_positive_queue_nce, static_argnums=5)(q, k, queue, nb_idx, nb_keep,
                                                                 tau)
  np.testing.assert_allclose(float(got), np.mean(ref), rtol=1e-5)

  # The same number from the shared op with per-anchor candidates [k_i; Q] and a positive mask.
  cands = np.concatenate([k[:, None], np.broadcast_to(queue, (b, kq, d))], axis=1)
  mask = np.zeros((b, 1 + kq), bool)
  mask[:, 0] = True
  for i in range(b):
    mask[i, 1 + nb_idx[i][nb_keep[i]]] = True
  shared = jax.jit(losses.multi_positive_info_nce, static_argnums=3)(q, cands, mask, tau)
  np.testing.assert_allclose(float(got), float(shared), rtol=1e-5)


def test_neighbour_retrieval_on_four_sharded_devices_equals_unsharded():
  rs = np.random.RandomState(1)
  keys, bank = _unit(rs, 8, 16), _unit(rs, 64, 16)
  valid = np.arange(64) < 44                      # a bank not yet full
  fn = jax.jit(csml.retrieve_neighbours, static_argnames=('n', 'threshold'))
  want = fn(keys, bank, n=6, threshold=0.2, valid=valid)
  mesh = sharding.make_mesh(4)
  with jax.set_mesh(mesh):
    bank_s = jax.device_put(bank, NamedSharding(mesh, P('data')))
    valid_s = jax.device_put(valid, NamedSharding(mesh, P('data')))
    got = fn(keys, bank_s, n=6, threshold=0.2, valid=valid_s)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))     # indices
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))     # keep
  np.testing.assert_allclose(np.asarray(got[2]), np.asarray(want[2]), atol=1e-6)
  idx, keep, scores = (np.asarray(a) for a in want)
  assert np.all(idx < 44)
  np.testing.assert_array_equal(keep, scores >= 0.2)
  brute = np.argsort(-(keys @ bank[:44].T), axis=1, kind='stable')[:, :6]
  np.testing.assert_array_equal(idx, brute)


# ---------------------------------------------------------------------------------------------
def _tiny_config():
  spec = importlib.util.spec_from_file_location('csml_cfg', os.path.join(_CONFIGS, 'csml.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config('cifar10,runlocal')
  c.batch_size = 16
  c.data.image_size = 16
  c.model.projector.update({'hidden_dim': 32, 'out_dim': 16})
  c.method.queue_size = 256
  config_lib.validate(c, num_devices=1)
  return c


def test_tiny_run_per_level_queues_and_loss_decreases():
  method = methods.get('csml')(_tiny_config())
  assert method.levels == ('stage3', 'stage4')
  variables = method.init_variables(jax.random.key(0))
  params, bs = variables['params'], variables['batch_stats']
  assert {'projector_stage3', 'projector_stage4', 'backbone'} <= set(params)
  tx = optax.sgd(0.05, momentum=0.9)

  @jax.jit
  def step(params, opt, target, ms, bs, batch, rng):
    (loss, aux), g = jax.value_and_grad(method.loss, has_aux=True)(
        params, target, ms, bs, batch, rng, jnp.int32(0))
    upd, opt = tx.update(g, opt, params)
    params = optax.apply_updates(params, upd)
    target = jax.tree.map(lambda t, p: 0.9 * t + 0.1 * p, target, params)
    return params, opt, target, aux.method_state, aux.batch_stats, loss, aux.metrics

  rs = np.random.RandomState(0)
  img = lambda: rs.randint(0, 256, (16, 16, 16, 3)).astype(np.uint8)   # noqa: E731
  batch = {'view1': img(), 'view2': img(), 'label': rs.randint(0, 3, (16,)).astype(np.int32)}
  ms0 = method.init_state(jax.random.key(1))
  opt = tx.init(params)
  new = step(params, opt, params, ms0, bs, batch, jax.random.key(0))
  ms1 = new[3]
  # Each level's queue got that level's normalised target keys at rows 0..15, nothing else.
  t = jax.jit(method.target_forward)(params, bs, batch['view2'])
  for lvl in method.levels:
    want = np.asarray(losses.l2_normalize(t['levels'][lvl]))
    np.testing.assert_allclose(np.asarray(ms1['queues'][lvl][:16]), want, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ms1['queues'][lvl][16:]),
                                  np.asarray(ms0['queues'][lvl][16:]))
  assert not np.allclose(np.asarray(ms1['queues']['stage3'][:16]),
                         np.asarray(ms1['queues']['stage4'][:16]))
  np.testing.assert_array_equal(np.asarray(ms1['queue_labels'][:16]), batch['label'])
  assert int(ms1['queue_ptr']) == 16 and int(ms1['queue_count']) == 16
  # Step 0 had no written rows: one positive per anchor (MoCo). Step 1 finds neighbours.
  assert float(new[6]['csml/num_pos']) == 1.0
  params, opt, target, ms, bs, _, met = step(*new[:5], batch, jax.random.key(1))
  assert float(met['csml/num_pos']) > 1.0
  # With the method state frozen (a fixed objective) the optimizer lowers the loss.
  hist = []
  for _ in range(6):
    params, opt, target, _, bs, loss, _ = step(params, opt, target, ms, bs, batch,
                                               jax.random.key(0))
    hist.append(float(loss))
  assert hist[-1] < hist[0] - 0.1, hist
  assert step._cache_size() == 1
