"""Weighted-kNN monitor and online-probe test accuracy, on frozen features of the current network.

Features of a train-split subset (the bank) and of the test split are extracted with the online
backbone in eval mode (running BatchNorm statistics, no augmentation), L2-normalised, and each
test image is classified by a weighted vote of its k nearest bank entries (cosine similarity,
weights ``exp(s / T)``, k = 200, T = 0.1 by default — the InstDisc/lightly monitor). The online
linear probe (trained inside the train step on stop-gradient features) is scored on the same
test features. Both numbers are labelled as measured *during* training
(``monitor/knn_top1``, ``online_probe/test_top1``), never as offline evaluations.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from ssl_jax import data as data_lib
from ssl_jax import sharding



def extract(feature_fn: Callable, variables: Any, data_cfg, *, split: str, mesh,
            batch_size: int, max_examples: int = -1) -> dict[str, np.ndarray]:
  """Run ``feature_fn(variables, images) -> dict`` over a split; return host arrays (mask applied)."""
  it = data_lib.make_eval_iterator(data_cfg, split=split, global_batch_size=batch_size,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count(),
                                   max_examples=max_examples)
  if max_examples > 0:
    it = itertools.islice(it, -(-max_examples // batch_size))
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
  result = {k: np.concatenate(v) for k, v in chunks.items()}
  if max_examples > 0:
    result = {k: v[:max_examples] for k, v in result.items()}
  return result


def evaluate(feature_fn: Callable, variables: Any, data_cfg, *, mesh, knn_cfg,
             num_classes: int) -> dict[str, float]:
  """kNN top-1 and online-probe top-1 on the test split."""
  bank = extract(feature_fn, variables, data_cfg, split=data_cfg.train_split, mesh=mesh,
                 batch_size=knn_cfg.batch_size, max_examples=knn_cfg.train_examples)
  test = extract(feature_fn, variables, data_cfg, split=data_cfg.eval_split, mesh=mesh,
                 batch_size=knn_cfg.batch_size, max_examples=knn_cfg.eval_examples)
  from ssl_jax.ops import knn  # noqa: PLC0415
  pred = knn.weighted_knn_predict(test['features'], bank['features'], bank['label'],
                                  num_classes, k=min(knn_cfg.k, len(bank['label'])),
                                  temperature=knn_cfg.temperature)
  pred = np.asarray(pred)
  if pred.ndim == 2:
    pred = pred.argmax(-1)
  out = {'monitor/knn_top1': float(np.mean(pred == test['label']))}
  if 'probe_logits' in test:
    out['online_probe/test_top1'] = float(np.mean(test['probe_logits'].argmax(-1) == test['label']))
  return out
