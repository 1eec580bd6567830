"""FT: transforms against numpy with fixed coefficients, their geometry, the plots, a short run."""
import os

import jax
import jax.numpy as jnp
import numpy as np

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
