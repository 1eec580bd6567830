"""Score and embedding summaries a step reports as metrics (pure, jit-able, shard-friendly).

* ``score_summary(pos, neg)``: mean, std and 10/50/90% quantiles of positive and negative cosine
  scores (FT's visualisation; every contrastive method logs them);
* ``embedding_summary(z)``: the collapse diagnostic ``mean_j std_i n(z)_ij`` (SimSiam Sec. 4.1);
* ``in_batch_scores(q, k)``: positive / negative scores for methods without explicit negatives;
* ``quantile_sample(x)``: the bounded even grid the quantiles are read from.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

QUANTILE_SAMPLE = 16384


def quantile_sample(x: Array, max_elems: int = QUANTILE_SAMPLE) -> Array:
  """A deterministic strided sample of at most ``max_elems`` entries of ``x`` (flattened).

  Exact quantiles of MoCo's [B, 65,536] negative scores need a sort of 4M floats per step
  (1.8 s on a 2-core CPU, longer than the network); the quantile metrics are read from an even
  grid over rows and columns instead: ``x[::r, ::c]`` with ``r = ceil(B / max_elems)`` and
  ``c = ceil(K / (max_elems // rows_kept))``. The grid is sliced along both axes, so a
  [B, K] array sharded along K is never gathered. ``x`` with ``<= max_elems`` entries is
  returned whole (flattened).
  """
  if x.size <= max_elems:
    return x.ravel()
  x2 = x.reshape(x.shape[0], -1) if x.ndim >= 2 else x[:, None]
  rows, cols = x2.shape
  r = -(-rows // max_elems)
  kept_rows = -(-rows // r)
  c = -(-cols // max(max_elems // kept_rows, 1))
  return x2[::r, ::c].ravel()


def score_summary(pos: Array, neg: Array, prefix: str = 'score') -> dict[str, Array]:
  """Mean, std and 10/50/90% quantiles of positive and negative scores (FT's visualisation).

  Mean and std are over every score; the quantiles over :func:`quantile_sample` (all scores
  when there are at most 16,384, else an even grid of 16,384 of them).
  """
  out = {}
  for name, x in (('pos', pos), ('neg', neg)):
    x = x.astype(jnp.float32)
    q10, q50, q90 = jnp.quantile(quantile_sample(x), jnp.asarray([0.1, 0.5, 0.9]))
    out.update({f'{prefix}/{name}_mean': jnp.mean(x), f'{prefix}/{name}_std': jnp.std(x),
                f'{prefix}/{name}_q10': q10, f'{prefix}/{name}_q50': q50,
                f'{prefix}/{name}_q90': q90})
  return out


def embedding_summary(z: Array) -> dict[str, Array]:
  """Collapse diagnostic (SimSiam, Chen & He 2021, Sec. 4.1): per-dimension std of ``n(z)``.

      s = mean_j std_i( z_ij / ||z_i|| )     over the global batch i, dimensions j of d

  A healthy embedding spread over the sphere has ``s ~ 1/sqrt(d)``; a collapsed one (every image
  on one direction) has ``s -> 0``. ``collapse/embed_std_ratio`` is ``s * sqrt(d)`` (~1 healthy,
  -> 0 collapsed), the number the trainer's collapse warning reads.
  """
  z = z.astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  s = jnp.mean(jnp.std(z, axis=0))
  return {'collapse/embed_std': s, 'collapse/embed_std_ratio': s * jnp.sqrt(z.shape[-1] * 1.0)}


def in_batch_scores(q: Array, k: Array, m: int = 16) -> tuple[Array, Array]:
  """Cosine scores of each anchor with its own key (``pos`` [B]) and with the keys of the next
  ``m`` images of the global batch (``neg`` [B, m]), for methods without explicit negatives."""
  sim = q @ k.T
  b = sim.shape[0]
  cols = (jnp.arange(b)[:, None] + 1 + jnp.arange(min(m, b - 1))[None, :]) % b
  return jnp.diagonal(sim), jnp.take_along_axis(sim, cols, axis=1)
