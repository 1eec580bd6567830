"""Frozen features of a split, for every evaluator (the kNN evaluator during training and in
``--mode=knn``, the cached linear probe, fine-tuning's evaluation, embeddings).

:func:`extract` runs a jitted ``feature_fn(variables, images) -> dict`` over a split (eval
transform: shorter side resized, centre crop; batches sharded along ``'data'``) and returns host
arrays with the labels. Subsets (``max_examples`` > 0) are drawn over the whole split before the
per-host slicing (``ssl_jax.data.sources.build_source``: seeded class-balanced draws for
in-memory arrays and image folders, a seeded window of TFDS's hash-shuffled stored order for
streamed splits), so an evaluator scores the same images for every process count.
:func:`check_bank_classes` reports a kNN bank that misses a class of the test set with a
:class:`MonitorSubsetWarning`.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from ssl_jax import data as data_lib
from ssl_jax import sharding


class MonitorSubsetWarning(UserWarning):
  """The kNN bank holds no example of some class of the test set (its score is then capped)."""


def check_bank_classes(bank_labels: np.ndarray, test_labels: np.ndarray, split: str) -> None:
  """:class:`MonitorSubsetWarning` naming the test classes (labels >= 0) absent from the bank."""
  missing = sorted(set(np.unique(test_labels).tolist()) - set(np.unique(bank_labels).tolist())
                   - {-1})
  if missing:
    warnings.warn(f'kNN evaluator: the bank ({len(bank_labels)} examples of {split!r}) holds no '
                  f'example of test class(es) {missing[:20]}{" ..." if len(missing) > 20 else ""}'
                  '; raise train_examples.', MonitorSubsetWarning, stacklevel=2)


def extract(feature_fn: Callable, variables: Any, data_cfg, *, split: str, mesh,
            batch_size: int, max_examples: int = -1, subset_seed: int = 0
            ) -> dict[str, np.ndarray]:
  """Run ``feature_fn(variables, images) -> dict`` over a split, or over its subset of
  ``max_examples`` drawn from ``subset_seed`` (see the module docstring); return host arrays
  (padding removed). The examples are the same for every process count; their order is that
  of the global eval batches (each batch: process 0's rows, then process 1's, ...)."""
  it = data_lib.make_eval_iterator(data_cfg, split=split, global_batch_size=batch_size,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count(),
                                   max_examples=max_examples, subset_seed=subset_seed)
  chunks: dict[str, list[np.ndarray]] = {}
  for local in it:
    mask_local = local.pop('mask')
    batch = sharding.global_batch(mesh, local)
    out = feature_fn(variables, batch['image'])
    out['label'] = batch['label']
    out = multihost_utils.process_allgather(out, tiled=True)
    mask = np.asarray(multihost_utils.process_allgather(
        sharding.global_batch(mesh, {'m': mask_local})['m'], tiled=True)).astype(bool)
    for k, v in out.items():
      chunks.setdefault(k, []).append(np.asarray(v)[mask])
  return {k: np.concatenate(v) for k, v in chunks.items()}
