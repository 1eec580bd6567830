"""Self-supervised objectives as pure functions (formulas in each docstring).

All losses compute in float32 whatever the input dtype (bf16 activations are upcast before
normalisation, logits and log-sum-exp), and return the mean over the batch. Losses against a
queue sharded along 'data' take the mesh (``mesh``: a ``Mesh``, or its ``AbstractMesh`` inside
``jax.jit``; ``None``: one device — the ambient mesh is not read).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import sharding


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """``n(x) = x / max(||x||, eps)``, computed in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def byol_loss(p: jax.Array, z: jax.Array) -> jax.Array:
  """BYOL regression loss ``mean_b (2 - 2 n(p_b) . n(sg(z_b)))``.

  ``p`` is the online prediction, ``z`` the target projection (stop-gradient applied here).
  The symmetric BYOL objective is ``byol_loss(p1, z2) + byol_loss(p2, z1)``.
  """
  p = l2_normalize(p)
  z = l2_normalize(jax.lax.stop_gradient(z))
  return jnp.mean(2.0 - 2.0 * jnp.sum(p * z, axis=-1))


def info_nce_from_logits(pos: jax.Array, neg: jax.Array) -> jax.Array:
  """Cross-entropy with the positive at index 0: ``mean_b [logsumexp([pos_b, neg_b]) - pos_b]``.

  ``pos``: [B] logits (already divided by the temperature), ``neg``: [B, K] logits.
  """
  pos = pos.astype(jnp.float32)
  neg = neg.astype(jnp.float32)
  lse = jnp.logaddexp(pos, jax.nn.logsumexp(neg, axis=-1))
  return jnp.mean(lse - pos)


def info_nce(q: jax.Array, k: jax.Array, negatives: jax.Array, temperature: float, *,
             mesh=None, with_scores: bool = False):
  """MoCo InfoNCE.

  ``logits_b = [q_b . k_b, q_b . negatives^T] / tau``;
  ``L = mean_b -log softmax(logits_b)[0]``.
  ``q``, ``k`` [B, d] and ``negatives`` [K, d] are expected L2-normalised; ``k`` and
  ``negatives`` are treated as constants (stop-gradient). ``negatives`` may be a queue sharded
  along 'data' of ``mesh`` (scored by ``queue_logits``: it never moves).

  Returns ``L``; with ``with_scores=True``, ``(L, (pos, neg))``: the cosines ``q_b . k_b`` [B]
  and ``q_b . negatives^T`` [B, K] (before the division by ``tau``), the scores a step logs.
  """
  q = q.astype(jnp.float32)
  k = jax.lax.stop_gradient(k).astype(jnp.float32)
  negatives = jax.lax.stop_gradient(negatives).astype(jnp.float32)
  pos = jnp.sum(q * k, axis=-1)
  neg = queue_logits(q, negatives, 1.0, mesh=mesh)
  loss = info_nce_from_logits(pos / temperature, neg / temperature)
  return (loss, (pos, neg)) if with_scores else loss


def queue_logits(q: jax.Array, queue: jax.Array, temperature: float, *, mesh=None
                 ) -> jax.Array:
  """``q Q^T / tau``: logits of queries ``q`` [B, d] against a queue ``Q`` [K, d], [B, K] float32.

  On a ``mesh`` with several devices the queue is sharded along its rows and the logits stay
  sharded along K (each device scores the queries against its own rows; only the queries move,
  B x d), so a following ``logsumexp`` over K is a reduction of B numbers per device.
  """
  logits = jnp.einsum('bd,kd->bk', q, queue.astype(q.dtype),
                      preferred_element_type=jnp.float32) / temperature
  if sharding.mesh_data_size(mesh) > 1:
    logits = jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, P(None, sharding.DATA)))
  return logits


def mixed_info_nce(q: jax.Array, k_a: jax.Array, k_b: jax.Array, w: jax.Array,
                   queue: jax.Array, temperature: float, *, mesh=None) -> jax.Array:
  """InfoNCE of mixed queries against the keys of both parents (CLIM's and CsMl's mixing term).

      NCE(q, k; Q) = logsumexp([q.k, q.Q^T] / tau) - q.k / tau
      L = mean_i [ w_i NCE(q_i, k_a_i; Q) + (1 - w_i) NCE(q_i, k_b_i; Q) ]

  ``q``, ``k_a``, ``k_b`` [B, d] and ``queue`` [K, d] unit; ``w`` [B] in [0, 1] (the share of
  parent ``a``). Each parent's key is scored against the shared queue (``queue_logits``, sharded
  along K).
  """
  neg = queue_logits(q, queue, temperature, mesh=mesh)            # [B, K], sharded along K
  lse_neg = jax.nn.logsumexp(neg, axis=-1)
  pos_a = jnp.sum(q * k_a, axis=-1) / temperature
  pos_b = jnp.sum(q * k_b, axis=-1) / temperature
  nce_a = jnp.logaddexp(pos_a, lse_neg) - pos_a
  nce_b = jnp.logaddexp(pos_b, lse_neg) - pos_b
  w = w.astype(jnp.float32)
  return jnp.mean(w * nce_a + (1.0 - w) * nce_b)


def multi_positive_info_nce(q: jax.Array, candidates: jax.Array,
                            positive_mask: jax.Array, temperature: float,
                            valid_mask: jax.Array | None = None) -> jax.Array:
  """InfoNCE with several positives per anchor (a positive mask over the candidate set).

  ``s_bj = q_b . c_bj / tau`` over candidates ``c_bj`` (``candidates`` is [B, M, d] per-anchor
  candidates, or [M, d] shared by all anchors), ``P_b = {j : positive_mask[b, j]}``:

      L = mean_b  -(1/|P_b|) sum_{p in P_b} [ s_bp - logsumexp_{a in valid_b} s_ba ]

  i.e. every positive is scored against the whole candidate set (positives and negatives), as in
  the CsMl objective. With one positive (the key at index 0) it is exactly MoCo's InfoNCE.
  Inputs may be bf16: similarities are accumulated in float32 and the log-sum-exp is the
  max-shifted float32 one. ``valid_mask`` (same shape as ``positive_mask``) removes candidates
  from the denominator (e.g. never-written bank rows). Anchors with no positive contribute 0
  and are excluded from the mean.
  """
  if candidates.ndim == 2:
    s = jnp.einsum('bd,md->bm', q, candidates,
                   preferred_element_type=jnp.float32)
  else:
    s = jnp.einsum('bd,bmd->bm', q, candidates,
                   preferred_element_type=jnp.float32)
  s = s / temperature
  positive_mask = positive_mask.astype(bool)
  if valid_mask is not None:
    valid_mask = valid_mask.astype(bool)
    s_den = jnp.where(valid_mask, s, -jnp.inf)
    positive_mask = positive_mask & valid_mask
  else:
    s_den = s
  lse = jax.nn.logsumexp(s_den, axis=-1, keepdims=True)
  log_prob = s - lse
  num_pos = jnp.sum(positive_mask, axis=-1)
  per_anchor = -jnp.sum(jnp.where(positive_mask, log_prob, 0.0), axis=-1) / jnp.maximum(num_pos, 1)
  has_pos = num_pos > 0
  return jnp.sum(jnp.where(has_pos, per_anchor, 0.0)) / jnp.maximum(jnp.sum(has_pos), 1)


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  mask: jax.Array | None = None) -> jax.Array:
  """``mean_b [logsumexp(logits_b) - logits_b[y_b]]`` over examples with ``mask`` (default all)."""
  logits = logits.astype(jnp.float32)
  labels_safe = jnp.maximum(labels, 0)
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
      logits, labels_safe[:, None], axis=-1)[:, 0]
  if mask is None:
    return jnp.mean(nll)
  mask = mask.astype(jnp.float32)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
