"""Synthetic data (``config.data.name = 'synthetic'``): random uint8 images and labels of the
preset's shape, with no host pipeline and no TensorFlow.

For measuring the step alone, as NVIDIA's and MLPerf's ``--data-backend synthetic`` do: one
random batch per host is drawn once (seeded by ``seed`` and the process index) and yielded at
every step, so after the first transfer the trainer keeps it on device (``train.py`` places it
once) and the step's throughput carries no input cost. Nothing learnable is in it: losses move,
kNN accuracies stay at chance.

Any preset becomes synthetic with ``--config.data.name=synthetic``; fields read: ``image_size``, ``views`` (+ ``extra_resolutions``: the recipe's view keys and
sizes, :func:`ssl_jax.data.recipes.resolve_views`), ``num_classes``, and
``synthetic_examples`` (the nominal split size that defines an epoch; default 50,000).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ssl_jax.data import recipes

NAME = 'synthetic'
DEFAULT_EXAMPLES = 50_000


def is_synthetic(data_cfg) -> bool:
  return data_cfg.get('name') == NAME


def num_examples(data_cfg) -> int:
  return int(data_cfg.get('synthetic_examples') or DEFAULT_EXAMPLES)


def _rng(seed: int, process_index: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), int(process_index), stream])


def train_batch(data_cfg, local_batch: int, seed: int, process_index: int = 0
                ) -> dict[str, np.ndarray]:
  """One random train batch with the recipe's keys: views uint8 ``[b, S, S, 3]``, 'label'
  int32 ``[b]``, and for recipes that record geometry (APS) 'box*' float32 ``[b, 4]`` (full
  image) and 'flip*' bool ``[b]`` (False)."""
  rng = _rng(seed, process_index, 0)
  batch: dict[str, np.ndarray] = {}
  for spec in recipes.resolve_views(data_cfg):
    batch[spec.key] = rng.integers(0, 256, (local_batch, spec.size, spec.size, 3), np.uint8)
    if spec.box_key:
      batch[spec.box_key] = np.tile(np.array([0.0, 0.0, 1.0, 1.0], np.float32), (local_batch, 1))
    if spec.flip_key:
      batch[spec.flip_key] = np.zeros((local_batch,), bool)
  batch['label'] = rng.integers(0, int(data_cfg.num_classes), (local_batch,)).astype(np.int32)
  return batch


def make_train_iterator(data_cfg, *, local_batch: int, seed: int, process_index: int = 0
                        ) -> Iterator[dict[str, np.ndarray]]:
  """The same random batch at every step (the trainer keeps it on device)."""
  batch = train_batch(data_cfg, local_batch, seed, process_index)
  while True:
    yield batch


def make_eval_iterator(data_cfg, *, local_batch: int, num_batches: int, process_index: int = 0
                       ) -> Iterator[dict[str, np.ndarray]]:
  """``num_batches`` random eval batches: 'image' uint8, 'label' int32, 'mask' (all True)."""
  rng = _rng(0, process_index, 1)
  size = int(data_cfg.image_size)
  for _ in range(num_batches):
    yield {'image': rng.integers(0, 256, (local_batch, size, size, 3), np.uint8),
           'label': rng.integers(0, int(data_cfg.num_classes), (local_batch,)).astype(np.int32),
           'mask': np.ones((local_batch,), bool)}
