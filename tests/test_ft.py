"""FT: transforms against numpy with fixed coefficients, their geometry, the plots, a short run."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.methods import ft
from ssl_jax.ops import losses

import harness


def _n(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_extrapolation_matches_numpy_and_makes_positives_harder():
  r = np.random.default_rng(0)
  q, k = _n(r.normal(size=(16, 8))), _n(r.normal(size=(16, 8)))
  for lam in (1.0, 1.3, 1.9):
    qh, kh = ft.extrapolate_positives(jnp.asarray(q), jnp.asarray(k), lam)
    np.testing.assert_allclose(qh, lam * q + (1 - lam) * k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kh, lam * k + (1 - lam) * q, rtol=1e-5, atol=1e-6)
    pos_hat = np.sum(np.asarray(qh) * np.asarray(kh), -1)
    pos = np.sum(q * k, -1)
    if lam > 1:
      assert np.all(pos_hat < pos)   # the point of the method: harder positives


def test_interpolated_negatives_lie_on_the_segment_between_parents():
  r = np.random.default_rng(1)
  queue = _n(r.normal(size=(32, 8)))
  perm = r.permutation(32)
  lam = 0.37
  got = np.asarray(ft.interpolate_negatives(jnp.asarray(queue), jnp.asarray(perm), lam))
  np.testing.assert_allclose(got, lam * queue + (1 - lam) * queue[perm], rtol=1e-5, atol=1e-6)
  # On the segment: got - Q[perm] is parallel to Q - Q[perm] with ratio lam in [0, 1].
  d_all, d_part = queue - queue[perm], got - queue[perm]
  nz = np.linalg.norm(d_all, axis=-1) > 1e-6
  ratio = np.sum(d_part * d_all, -1)[nz] / np.sum(d_all * d_all, -1)[nz]
  np.testing.assert_allclose(ratio, lam, rtol=1e-5)
  off_segment = d_part[nz] - ratio[:, None] * d_all[nz]
  np.testing.assert_allclose(np.linalg.norm(off_segment, axis=-1), 0, atol=1e-6)


def test_transformed_logits_match_independent_formula():
  r = np.random.default_rng(2)
  q, k, queue = _n(r.normal(size=(4, 8))), _n(r.normal(size=(4, 8))), _n(r.normal(size=(16, 8)))
  lam_ex, lam_in, perm = 1.4, 0.3, r.permutation(16)
  qh, kh = ft.extrapolate_positives(jnp.asarray(q), jnp.asarray(k), lam_ex)
  negs = ft.interpolate_negatives(jnp.asarray(queue), jnp.asarray(perm), lam_in)
  got = losses.info_nce(qh, kh, negs, 0.2)
  qn = lam_ex * q + (1 - lam_ex) * k
  kn = lam_ex * k + (1 - lam_ex) * q
  qq = lam_in * queue + (1 - lam_in) * queue[perm]
  logits = np.concatenate([np.sum(qn * kn, -1, keepdims=True), qn @ qq.T], 1) / 0.2
  ref = np.mean(np.log(np.sum(np.exp(logits), 1)) - logits[:, 0])
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_coefficients_have_the_paper_ranges():
  lam_ex, lam_in, perm = jax.jit(lambda r: ft.draw_coefficients(
      r, ex_alpha=2.0, in_alpha=1.6, queue_size=10))(jax.random.key(3))
  assert 1.0 < float(lam_ex) < 2.0 and 0.0 < float(lam_in) < 1.0
  assert sorted(np.asarray(perm).tolist()) == list(range(10))


@pytest.mark.slow
def test_short_real_run_writes_score_plots_and_loss_decreases(tmp_path):
  c = harness.load_config('ft')
  c.optimizer.base_lr = 2.0
  c.method.queue_size = 64   # filled after 2 steps: before that the loss rises as it fills
  c.score_hist_every_steps = 8
  res = harness.short_real_run(c, tmp_path, steps=32, batch=32, examples=256)
  first, last = harness.decreased(res, skip=3)
  assert last < first, (first, last)
  pngs = sorted(os.listdir(tmp_path / 'score_plots'))
  assert pngs[:1] == ['epoch_0001.png'] and len(pngs) == 4, pngs
  assert os.path.getsize(tmp_path / 'score_plots' / pngs[-1]) > 5_000
  from tensorboard.backend.event_processing import event_accumulator
  ev = [f for f in os.listdir(tmp_path) if f.startswith('events.out')]
  acc = event_accumulator.EventAccumulator(str(tmp_path / ev[0]),
                                           size_guidance={'histograms': 0, 'tensors': 0})
  acc.Reload()
  tags = acc.Tags()
  all_tags = set(tags.get('histograms', [])) | set(tags.get('tensors', []))
  assert {'scores/pos', 'scores/neg'} <= all_tags, tags
  scalars = set(tags.get('scalars', [])) | all_tags
  assert {'score/pos_q50', 'collapse/embed_std_ratio', 'collapse/flag'} <= scalars


# ---------------------------------------------------------------------------------------------
# The negative interpolation on several devices: permutations within pools of the queue.
def test_pool_permutation_law():
  """pool = size: jax.random.permutation (the official randperm). pool < size: every block of
  ``pool`` rows is mapped onto itself, and each row's partner is uniform over its block."""
  r = jax.random.key(7)
  np.testing.assert_array_equal(np.asarray(ft.pool_permutation(r, 12, 12)),
                                np.asarray(jax.random.permutation(r, 12)))
  draws = np.stack([np.asarray(ft.pool_permutation(jax.random.key(s), 12, 4))
                    for s in range(600)])
  for p in draws:
    assert sorted(p.tolist()) == list(range(12))
    np.testing.assert_array_equal(p // 4, np.arange(12) // 4)
  counts = np.stack([np.bincount(draws[:, m], minlength=12) for m in range(12)])  # [row, partner]
  for m in range(12):
    block = slice(m // 4 * 4, m // 4 * 4 + 4)
    assert counts[m].sum() == counts[m, block].sum() == 600
    assert np.all(np.abs(counts[m, block] - 150) < 45), counts[m]   # ~5 sigma of Binomial(600, 1/4)


def test_pooled_interpolation_matches_numpy_and_moves_no_queue():
  from hlo_utils import collective_summary
  from jax.sharding import NamedSharding, PartitionSpec as P
  from ssl_jax import sharding
  r = np.random.default_rng(3)
  queue = _n(r.normal(size=(64, 8))).astype(np.float32)
  perm = np.asarray(ft.pool_permutation(jax.random.key(0), 64, 16))
  want = 0.3 * queue + 0.7 * queue[perm]
  np.testing.assert_allclose(ft.interpolate_negatives(jnp.asarray(queue), perm, 0.3, pool=16),
                             want, rtol=1e-5, atol=1e-6)
  mesh = sharding.make_mesh(4)
  with jax.set_mesh(mesh):
    qs = jax.device_put(queue, NamedSharding(mesh, P('data')))
    fn = jax.jit(lambda q, p: ft.interpolate_negatives(q, p, 0.3, pool=16, mesh=mesh))
    np.testing.assert_allclose(fn(qs, perm), want, rtol=1e-5, atol=1e-6)
    assert sum(v['count'] for v in collective_summary(fn, qs, perm).values()) == 0
    whole = jax.jit(lambda q, p: ft.interpolate_negatives(q, p, 0.3))   # any permutation
    assert sum(v['bytes'] for v in collective_summary(whole, qs, perm).values()) > 0


def _step_config(**method):
  c = harness.load_config('ft')
  c.batch_size = 16
  c.data.image_size = 16
  c.method.update(method)
  return c


@pytest.mark.slow   # compiles the step on 1 and 4 devices
@pytest.mark.slow
def test_pod_law_reproduced_on_one_device_and_queue_never_moves():
  """interp_pool=0 on 4 devices (blocks of K/4 rows) is interp_pool=K/4 on one device; the
  4-device step moves no queue-sized array; interp_pool=-1 (whole queue) says it moves it."""
  import re
  import warnings
  import method_steps
  from hlo_utils import compiled_text
  from ssl_jax import sharding
  from ssl_jax.methods import base
  k = _step_config().method.queue_size
  rs = np.random.RandomState(0)
  batches = [method_steps.random_batch(_step_config(), rs) for _ in range(3)]
  one, _, _ = method_steps.run(_step_config(interp_pool=k // 4), 1, batches)
  four, _, _ = method_steps.run(_step_config(), 4, batches)
  np.testing.assert_allclose(four, one, rtol=2e-5)

  def queue_collectives(c):
    parts, mesh = method_steps.build(c, 4)
    d = c.model.projector.out_dim
    b = sharding.global_batch(mesh, batches[0])
    with jax.set_mesh(mesh), warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      text = compiled_text(parts.train_step, parts.abstract, b)
    ops = [l for l in text.splitlines()
           if re.search(r'(all-gather|all-reduce|all-to-all|collective-permute)(-start)?\(', l)
           and re.search(rf'\[({k}|{k // 4}),{d}\]', l.split(' all-')[0].split(' collective')[0])]
    return ops, [w for w in caught if issubclass(w.category, base.CrossDeviceTrafficWarning)]

  ops, traffic = queue_collectives(_step_config())
  assert not ops and not traffic, (ops, traffic)
  ops, traffic = queue_collectives(_step_config(interp_pool=-1))
  assert ops and traffic
