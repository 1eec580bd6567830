"""APS: patch indices sampled inside the step, the contrastive loss, tiny training runs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec as P

from harness import load_config
from ssl_jax import methods, sharding, train
from ssl_jax.methods import aps
from ssl_jax.ops import patches


def _config(arg: str = 'cifar10,runlocal'):
  return load_config('aps', arg)


def _batch(b: int, size: int = 32, seed: int = 0) -> dict[str, jax.Array]:
  rs = np.random.RandomState(seed)
  hw = rs.uniform(0.4, 1.0, (2, b, 2))
  y0x0 = rs.uniform(0.0, 1.0, (2, b, 2)) * (1.0 - hw)
  boxes = np.concatenate([y0x0, hw], axis=-1).astype(np.float32)   # (y0, x0, h, w)
  flips = rs.rand(2, b) < 0.5
  return {'view1': jnp.asarray(rs.randint(0, 256, (b, size, size, 3)), jnp.uint8),
          'view2': jnp.asarray(rs.randint(0, 256, (b, size, size, 3)), jnp.uint8),
          'box1': jnp.asarray(boxes[0]), 'box2': jnp.asarray(boxes[1]),
          'flip1': jnp.asarray(flips[0]), 'flip2': jnp.asarray(flips[1]),
          'label': jnp.zeros((b,), jnp.int32)}


def test_indices_sampled_in_step_have_configured_sizes_and_match_selective_sample():
  b = 6
  batch = _batch(b)
  rng = jax.random.key(3)
  # The reference ops, one image at a time (jitted once: eager dispatch is slow here).
  sparse_ref = jax.jit(patches.sparse_chunks, static_argnums=(1, 2))
  sel_ref = jax.jit(patches.selective_sample, static_argnums=(1, 2),
                    static_argnames=('grid', 'power'))
  chunks_ref = jax.jit(patches.selective_chunks, static_argnames=('keep', 'grid', 'power'))
  for mode in ('one', 'all'):
    c = _config()
    c.method.chunk_mode = mode
    m = methods.get('aps')(c)
    n, keep, nc = m.num_patches, m.keep, m.num_chunks
    assert (n, keep, nc) == (64, 16, 4)                   # 32 px, patch 4, ratio 0.25
    idx1, idx2 = jax.device_get(jax.jit(m.sample_indices)(rng, batch))
    # The step's own key derivation, re-done by hand.
    k_perm, k_chunk, k_sel = jax.random.split(rng, 3)
    perm_keys, sel_keys = jax.random.split(k_perm, b), jax.random.split(k_sel, b)
    j = int(jax.random.randint(k_chunk, (), 0, nc))
    for i in range(b):
      geo = dict(grid=m.grid, box1=batch['box1'][i], box2=batch['box2'][i],
                 flip1=batch['flip1'][i], flip2=batch['flip2'][i], power=3.0)
      chunks = np.asarray(sparse_ref(perm_keys[i], n, 0.25))
      if mode == 'one':
        assert idx1.shape == idx2.shape == (b, keep)
        np.testing.assert_array_equal(idx1[i], chunks[j])
        ref2 = sel_ref(sel_keys[i], n, keep, idx1[i], **geo)
      else:
        assert idx1.shape == idx2.shape == (b, nc, keep)
        np.testing.assert_array_equal(idx1[i], chunks)
        assert sorted(idx1[i].ravel().tolist()) == list(range(n))   # chunks tile the grid
        ref2 = chunks_ref(sel_keys[i], idx1[i], keep=keep, **geo)
      np.testing.assert_array_equal(idx2[i], np.asarray(ref2))
      for rows in (idx1[i].reshape(-1, keep), idx2[i].reshape(-1, keep)):
        for r in rows:
          assert len(set(r.tolist())) == keep and r.min() >= 0 and r.max() < n

  # ... and the loss uses exactly these indices: loss == pair_loss(indices from sample_indices),
  # and each direction is ctr (numpy, below) of the network's outputs on those tokens.
  c = _config()
  m = methods.get('aps')(c)
  v = jax.jit(m.init_variables)(jax.random.key(0))
  p, bs = v['params'], v['batch_stats']

  @jax.jit
  def both(p, bs, batch, rng):
    ctx = m.context(p, target_params=p, method_state={}, batch_stats=bs, step=0, rng=rng,
                    mesh=None)
    full, aux = m.loss(ctx, batch)
    i1, i2 = m.sample_indices(rng, batch)
    ref, *_ = m.pair_loss(ctx, bs, batch['view1'], batch['view2'], i1, i2)
    views = [m.model.apply({'params': p, 'batch_stats': bs}, batch[f'view{i}'], train=True,
                           token_indices=idx, mutable=['batch_stats'])[0]
             for i, idx in ((1, i1), (2, i2))]
    out = m.model.apply({'params': p, 'batch_stats': bs}, batch['view1'], train=False,
                        with_predictor=False)
    return full, ref, aux, out, views
  full, ref, aux, out, (o1, o2) = jax.device_get(both(p, bs, batch, rng))
  np.testing.assert_allclose(full, ref, rtol=1e-6)
  t = m.temperature
  l12, l21 = _np_ctr(o1['pred'], o2['proj'], t), _np_ctr(o2['pred'], o1['proj'], t)
  np.testing.assert_allclose(float(aux.metrics['aps/loss_12']), l12, rtol=1e-4)
  np.testing.assert_allclose(float(aux.metrics['aps/loss_21']), l21, rtol=1e-4)
  np.testing.assert_allclose(float(full), l12 + l21, rtol=1e-4)
  np.testing.assert_array_equal(out['features'], out['cls'])   # CLS feeds the projector
  assert aux.features.shape == (b, 32)
  # view2_cover: the mean over images of the view-1 coverage (ops.patches.coverage, checked
  # against numpy in test_patches) of the kept view-2 cells; selective sampling keeps cells that
  # view 1 covers less than the average cell.
  idx1, idx2 = jax.device_get(jax.jit(m.sample_indices)(rng, batch))
  covers = [np.asarray(patches.coverage(idx1[i], grid=m.grid, box1=batch['box1'][i],
                                        box2=batch['box2'][i], flip1=batch['flip1'][i],
                                        flip2=batch['flip2'][i])) for i in range(b)]
  want = np.mean([cov[idx2[i]].mean() for i, cov in enumerate(covers)])
  np.testing.assert_allclose(float(aux.metrics['aps/view2_cover']), want, rtol=1e-5, atol=1e-7)
  assert want < np.mean(covers), (want, np.mean(covers))


def _np_ctr(p, z, t):
  p = p / np.linalg.norm(p, axis=1, keepdims=True)
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  s = (p.astype(np.float64) @ z.T.astype(np.float64)) / t
  s_max = s.max(axis=1, keepdims=True)
  lse = np.log(np.exp(s - s_max).sum(axis=1)) + s_max[:, 0]
  return float(np.mean(lse - np.diag(s)))


def test_contrastive_loss_matches_numpy_and_is_global_under_sharding():
  rs = np.random.RandomState(1)
  p1, p2, z1, z2 = (rs.randn(8, 16).astype(np.float32) for _ in range(4))
  ref = _np_ctr(p1, z2, 0.1) + _np_ctr(p2, z1, 0.1)
  got = aps.contrastive_loss(p1, z2, 0.1) + aps.contrastive_loss(p2, z1, 0.1)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  np.testing.assert_allclose(float(aps.contrastive_loss(p1, z2, 0.5)), _np_ctr(p1, z2, 0.5),
                             rtol=1e-5)
  # The form the step calls: the same loss, and the logits n(p) n(z)^T / tau.
  loss, s = aps.contrastive_loss(p1, z2, 0.1, with_logits=True)
  assert float(loss) == float(aps.contrastive_loss(p1, z2, 0.1))
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)   # noqa: E731
  np.testing.assert_allclose(np.asarray(s), unit(p1) @ unit(z2).T / 0.1, rtol=1e-5, atol=1e-5)
  # Targets are constants: no gradient flows into z.
  gz = jax.grad(lambda z: aps.contrastive_loss(p1, z, 0.1))(z2)
  assert float(jnp.abs(gz).max()) == 0.0
  # Batch sharded over 4 devices: negatives are still the whole global batch.
  mesh = sharding.make_mesh(4)
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P('data')))
  sharded = jax.jit(lambda p1, p2, z1, z2: aps.contrastive_loss(p1, z2, 0.1)
                    + aps.contrastive_loss(p2, z1, 0.1))(put(p1), put(p2), put(z1), put(z2))
  np.testing.assert_allclose(float(sharded), ref, rtol=1e-5)


def test_loss_decreases_on_a_fixed_batch():
  c = _config()
  m = methods.get('aps')(c)
  v = jax.jit(m.init_variables)(jax.random.key(0))
  params, bs = v['params'], v['batch_stats']
  tx = optax.adamw(1e-3, weight_decay=0.05)
  opt = tx.init(params)
  batch = _batch(16, seed=2)

  @jax.jit
  def step(params, bs, opt, i):
    rng = jax.random.key(1)   # the same patch indices every step: a deterministic objective
    def loss(p):
      ctx = m.context(p, target_params=p, method_state={}, batch_stats=bs, step=i, rng=rng,
                      mesh=None)
      return m.loss(ctx, batch)

    (l, aux), g = jax.value_and_grad(loss, has_aux=True)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), aux.batch_stats, opt, l

  hist = []
  for i in range(12):
    params, bs, opt, l = step(params, bs, opt, i)
    hist.append(float(l))
  assert all(np.isfinite(hist))
  assert hist[-1] < 0.5 * hist[0] and hist[-1] < min(hist[:-1]), hist


@pytest.mark.slow
def test_trainer_runs_all_chunks_with_momentum_target_under_mock_data(tmp_path):
  c = _config()
  c.method.update({'chunk_mode': 'all', 'momentum_target': True})
  c.total_steps = 3
  c.batch_size = 16
  c.log_every_steps = 1
  c.checkpoint.every_steps = 100
  c.checkpoint.async_save = False
  for ev in c.evals.values():   # every listed evaluator (kNN, online probe)
    ev.update({'at_start': False, 'at_end': False})
  c.data.shuffle_buffer = 64
  with tfds.testing.mock_data(num_examples=64):
    res = train.train_and_evaluate(c, str(tmp_path))    # 4 simulated devices (conftest)
  assert [s for s, _ in res['loss_history']] == [1, 2, 3]
  assert all(np.isfinite(l) for _, l in res['loss_history'])
  assert 0.0 <= res['last_metrics']['aps/view2_cover'] < 0.9
  # The momentum target is on: the last step (from step 2) logs the EMA schedule's rate
  # tau = final - (final - base)(cos(pi t / T) + 1) / 2 at t = 2, T = 3.
  e = c.ema
  tau = e.final - (e.final - e.base) * (np.cos(np.pi * 2 / 3) + 1) / 2
  np.testing.assert_allclose(res['last_metrics']['tau'], tau, rtol=1e-6)
  assert tau < 1.0
