"""CsMl: the multi-positive loss vs numpy and vs the shared op, neighbour retrieval sharded =
unsharded, per-level queues, the mixing partner's pool (a pod's per-device pools reproduced on
one device), and a tiny run of the trainer's step (compiles once, the loss decreases)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import method_steps
from harness import load_config
from ssl_jax import sharding
from ssl_jax.methods import csml
from ssl_jax.ops import losses


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
  fn = jax.jit(csml.retrieve_neighbours, static_argnames=('n', 'threshold', 'mesh'))
  want = fn(keys, bank, n=6, threshold=0.2, valid=valid)
  mesh = sharding.make_mesh(4)
  with jax.set_mesh(mesh):
    bank_s = jax.device_put(bank, NamedSharding(mesh, P('data')))
    valid_s = jax.device_put(valid, NamedSharding(mesh, P('data')))
    got = fn(keys, bank_s, n=6, threshold=0.2, valid=valid_s, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))     # indices
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))     # keep
  np.testing.assert_allclose(np.asarray(got[2]), np.asarray(want[2]), atol=1e-6)
  idx, keep, scores = (np.asarray(a) for a in want)
  assert np.all(idx < 44)
  np.testing.assert_array_equal(keep, scores >= 0.2)
  brute = np.argsort(-(keys @ bank[:44].T), axis=1, kind='stable')[:, :6]
  np.testing.assert_array_equal(idx, brute)


# ---------------------------------------------------------------------------------------------
def _tiny_config(**method):
  c = load_config('csml')
  c.batch_size = 16
  c.data.image_size = 16
  c.model.projector.update({'hidden_dim': 32, 'out_dim': 16})
  c.method.queue_size = 256
  c.method.update(method)
  c.optimizer.update({'name': 'sgd', 'base_lr': 0.8, 'warmup_steps': 0, 'warmup_epochs': 0.0})
  return c


@pytest.mark.slow
def test_tiny_run_per_level_queues_and_loss_decreases():
  c = _tiny_config()
  parts, mesh = method_steps.build(c, 1)
  method = parts.method
  assert method.levels == ('stage3', 'stage4')
  assert {'projector_stage3', 'projector_stage4', 'backbone'} <= set(parts.abstract.params)
  batch = method_steps.random_batch(c, np.random.RandomState(0))
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: compiles.append(event) if event.endswith('backend_compile_duration')
      else None)
  with jax.set_mesh(mesh):
    state = parts.init(jax.random.key(0))
    ms0 = jax.device_get(state.method_state)
    # The keys the step will enqueue: the EMA target (= the online net at init) on view2.
    t = jax.jit(lambda p, bs, x: method.apply(p, bs, x, mesh=mesh, with_predictor=False)[0])(
        state.target_params, state.batch_stats, batch['view2'])
    gb = sharding.global_batch(mesh, batch)
    state, met0, _ = parts.train_step(state, gb)
    ms1 = jax.device_get(state.method_state)
    # Each level's queue got that level's normalised target keys at rows 0..15, nothing else.
    for lvl in method.levels:
      want = np.asarray(losses.l2_normalize(t['levels'][lvl]))
      np.testing.assert_allclose(ms1['queues'][lvl][:16], want, atol=1e-5)
      np.testing.assert_array_equal(ms1['queues'][lvl][16:], ms0['queues'][lvl][16:])
    assert not np.allclose(ms1['queues']['stage3'][:16], ms1['queues']['stage4'][:16])
    np.testing.assert_array_equal(ms1['queue_labels'][:16], batch['label'])
    assert int(ms1['queue_ptr']) == 16 and int(ms1['queue_count']) == 16
    # Step 0 had no written rows: one positive per anchor (MoCo). Step 1 finds neighbours.
    assert float(met0['csml/num_pos']) == 1.0
    compiles.clear()
    state, met1, _ = parts.train_step(state, gb)
    assert not compiles, compiles         # the second step runs the first step's program
    assert float(met1['csml/num_pos']) > 1.0
    # With the method state and the step frozen (a fixed objective) the optimizer lowers the loss.
    frozen, step = jax.device_get(state.method_state), int(state.step)
    hist = []
    for _ in range(6):
      state, met, _ = parts.train_step(state.replace(
          method_state=jax.device_put(frozen, parts.shardings.method_state),
          step=jax.device_put(jnp.int32(step), parts.shardings.step)), gb)
      hist.append(float(met['loss']))
  assert hist[-1] < hist[0] - 0.1, hist


@pytest.mark.slow   # compiles the step on 1 and 4 devices
@pytest.mark.slow
def test_per_device_pools_on_four_devices_equal_one_device():
  """partner_pool=0 on 4 devices (4 images each) is partner_pool=4 on one device."""
  rs = np.random.RandomState(1)
  batches = [method_steps.random_batch(_tiny_config(), rs) for _ in range(3)]
  one, m1, _ = method_steps.run(_tiny_config(partner_pool=4), 1, batches)
  four, m4, _ = method_steps.run(_tiny_config(), 4, batches)
  np.testing.assert_allclose(four, one, rtol=2e-5)
  for a, b in zip(m1, m4):
    np.testing.assert_allclose(b['csml/mix_selected_frac'], a['csml/mix_selected_frac'])
    np.testing.assert_allclose(b['csml/num_pos'], a['csml/num_pos'])
