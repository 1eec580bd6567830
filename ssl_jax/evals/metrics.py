"""Classification metrics of the evaluators (probe, fine-tune, kNN): pure, on device arrays."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def topk_correct(logits: jax.Array, labels: jax.Array, ks: Sequence[int] = (1, 5)
                 ) -> dict[int, jax.Array]:
  """Number of rows whose label is among the top-k logits, per k (rows with label < 0 skipped).

  Ties count against the label: rank = #classes with a strictly larger logit, plus the
  equal-logit classes with a lower id.
  """
  c = logits.shape[-1]
  own = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[:, None], axis=1)
  ids = jnp.arange(c)[None, :]
  rank = jnp.sum((logits > own) | ((logits == own) & (ids < labels[:, None])), axis=1)
  ok = labels >= 0
  return {k: jnp.sum((rank < k) & ok) for k in ks}


def top1_top5(logits, labels) -> dict[str, float]:
  """Top-1 / top-5 accuracy (top-C when there are fewer than 5 classes) over labels >= 0."""
  c = logits.shape[-1]
  corr = topk_correct(jnp.asarray(logits), jnp.asarray(labels), (1, min(5, c)))
  n = max(int(np.sum(np.asarray(labels) >= 0)), 1)
  return {'top1': float(corr[1]) / n, 'top5': float(corr[min(5, c)]) / n}
