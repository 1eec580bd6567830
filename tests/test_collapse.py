"""Collapse diagnostic: the embedding spread against numpy, and the warning's state machine."""
import jax.numpy as jnp
import numpy as np

from ssl_jax.evals import collapse
from ssl_jax.ops import summaries


def test_embedding_summary_matches_numpy_and_separates_healthy_from_collapsed():
  rng = np.random.default_rng(0)
  d = 64
  healthy = rng.normal(size=(512, d)).astype(np.float32)
  n = healthy / np.linalg.norm(healthy, axis=1, keepdims=True)
  want = n.std(axis=0).mean()
  got = summaries.embedding_summary(jnp.asarray(healthy))
  np.testing.assert_allclose(float(got['collapse/embed_std']), want, rtol=1e-5)
  np.testing.assert_allclose(float(got['collapse/embed_std_ratio']), want * np.sqrt(d), rtol=1e-5)
  assert 0.9 < float(got['collapse/embed_std_ratio']) < 1.1          # ~1/sqrt(d) when healthy
  one = rng.normal(size=(1, d)) + 1e-3 * rng.normal(size=(512, d))  # all on one direction
  col = summaries.embedding_summary(jnp.asarray(one, jnp.float32))
  assert float(col['collapse/embed_std_ratio']) < 0.01


def test_monitor_warns_once_on_entering_and_notes_recovery():
  m = collapse.CollapseMonitor()
  healthy = {'collapse/embed_std': 0.1, 'collapse/embed_std_ratio': 0.8,
             'score/pos_mean': 0.7, 'score/neg_mean': 0.1}
  spread_gone = dict(healthy, **{'collapse/embed_std': 0.0004, 'collapse/embed_std_ratio': 0.003})
  alike = dict(healthy, **{'score/pos_mean': 0.998, 'score/neg_mean': 0.997})
  assert m.update(10, dict(healthy)) is None
  line = m.update(20, dict(spread_gone))
  assert line.startswith('WARNING: representations collapsing at step 20 (embedding std 0.0004')
  assert m.update(30, dict(alike)) is None            # still collapsed: no repeated warning
  assert 'pos 0.998 / neg 0.997' in collapse.describe(alike)
  assert m.update(40, dict(healthy)).startswith('Representations recovering at step 40')
  assert m.update(50, dict(alike)).startswith('WARNING: representations collapsing at step 50')
  assert m.warned_steps == [20, 50]
  avg = dict(healthy)
  m.update(60, avg)
  assert avg['collapse/flag'] == 0.0
