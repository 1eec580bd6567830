"""Frozen features of a split, for every evaluator (the listed evaluators during training and in
``--mode=eval``, ``--mode=knn``, the cached linear probe, fine-tuning's evaluation, embeddings).

:func:`extract` runs a jitted ``feature_fn(variables, images) -> dict`` over a split (eval
transform: shorter side resized, centre crop; batches sharded along ``'data'``) and returns host
arrays with the labels. :class:`ExtractionCache` shares one extraction between the evaluators
of a round (the kNN and online-probe evaluators read the same eval images once);
:func:`frozen_feature_fn` is the evaluators' feature function, the same in training and in
``--mode=eval``. Subsets (``max_examples`` > 0) are drawn over the whole split before the
per-host slicing (``ssl_jax.data.sources.build_source``: seeded class-balanced draws for
in-memory arrays and image folders, a seeded window of TFDS's hash-shuffled stored order for
streamed splits), so an evaluator scores the same images for every process count.
:func:`check_bank_classes` reports a kNN bank that misses a class of the test set with a
:class:`MonitorSubsetWarning`.
"""
from __future__ import annotations

import collections
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ssl_jax import data as data_lib
from ssl_jax import sharding
from ssl_jax.ops import losses


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


def frozen_feature_fn(apply: Callable, probe=None) -> Callable:
  """The evaluators' ``feature_fn(variables, images) -> dict`` (jit it): ``'features'``, the
  L2-normalised float32 output ``apply({'params', 'batch_stats'}, images)['features']`` of the
  eval-mode network, and ``'probe_logits'``, the online probe (a Flax module, applied to the
  unnormalised features) when ``probe`` is given and ``variables`` holds ``'probe'``. Training
  (``train.make_feature_fn``) and ``--mode=eval`` build it here, so both score alike."""

  def feature_fn(variables, images):
    out = apply({'params': variables['params'], 'batch_stats': variables['batch_stats']}, images)
    f = out['features'].astype(jnp.float32)
    res = {'features': losses.l2_normalize(f)}
    if probe is not None and 'probe' in variables:
      res['probe_logits'] = probe.apply(variables['probe'], f)
    return res

  return feature_fn


class ExtractionCache:
  """:func:`extract` shared by the evaluators of one round.

  Each evaluator says at build time which extractions it reads per run
  (:meth:`expect`: split, ``max_examples``, batch size); an extraction more than one evaluator
  reads is kept after the first read and dropped after the last, so two evaluators that run at
  the same step on the same images extract once. Entries hold a reference to the variables they
  were computed for: a read with other variables (the next round) starts afresh. Nothing is kept
  between rounds once every expected read is done, and an evaluator that runs alone (on its own
  schedule) extracts for itself, as without a cache.
  """

  def __init__(self, feature_fn: Callable, data_cfg, mesh):
    self.feature_fn, self.data_cfg, self.mesh = feature_fn, data_cfg, mesh
    self._readers: collections.Counter = collections.Counter()   # key -> reads per round
    self._entries: dict[tuple, dict[str, np.ndarray]] = {}
    self._left: dict[tuple, int] = {}
    self._leaves: list | None = None                # the variables the entries belong to

  @staticmethod
  def key(split: str, max_examples: int, batch_size: int, subset_seed: int = 0) -> tuple:
    return (str(split), int(max_examples), int(batch_size), int(subset_seed))

  def expect(self, split: str, max_examples: int, batch_size: int, subset_seed: int = 0) -> None:
    """One evaluator reads this extraction at each of its runs."""
    self._readers[self.key(split, max_examples, batch_size, subset_seed)] += 1

  def get(self, variables: Any, *, split: str, max_examples: int, batch_size: int,
          subset_seed: int = 0) -> dict[str, np.ndarray]:
    """:func:`extract` of ``split`` for ``variables``, read from the cache when an evaluator of
    the same round has extracted it already. The arrays are shared: read them, never write."""
    leaves = jax.tree.leaves(variables)
    if self._leaves is None or len(leaves) != len(self._leaves) or any(
        a is not b for a, b in zip(leaves, self._leaves)):
      self._entries.clear()
      self._left.clear()
      self._leaves = leaves
    key = self.key(split, max_examples, batch_size, subset_seed)
    out = self._entries.get(key)
    if out is None:
      out = extract(self.feature_fn, variables, self.data_cfg, split=split, mesh=self.mesh,
                    batch_size=batch_size, max_examples=max_examples, subset_seed=subset_seed)
      self._left[key] = self._readers[key]
    self._left[key] = self._left.get(key, 1) - 1
    if self._left[key] > 0:
      self._entries[key] = out
    else:
      self._entries.pop(key, None)
    if not self._entries:
      self._leaves = None    # nothing left to share: hold no reference to the variables
    return out
