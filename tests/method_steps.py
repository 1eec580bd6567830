"""The trainer's own step (``train.build``) on a chosen number of simulated devices, and random
batches of the right views, for method tests that run a few steps without the input pipeline."""
from __future__ import annotations

import jax
import numpy as np

from ssl_jax import data, methods, sharding, train


def build(config, num_devices: int, *, steps_per_epoch: int = 100, total_steps: int = 100):
  """``(parts, mesh)``: ``train.build`` for ``config`` on the first ``num_devices`` devices."""
  train.validate_config(config, num_devices=num_devices)
  mesh = sharding.make_mesh(num_devices)
  method = methods.get(config.method.name)(config, steps_per_epoch)
  return train.build(config, mesh, method, steps_per_epoch=steps_per_epoch,
                     total_steps=total_steps), mesh


def random_batch(config, rs: np.random.RandomState, num_classes: int = 3) -> dict:
  """uint8 views of every key the config's view recipe makes, and labels (numpy, global)."""
  b = config.batch_size
  batch = {v.key: rs.randint(0, 256, (b, v.size, v.size, 3)).astype(np.uint8)
           for v in data.resolve_views(config.data)}
  batch['label'] = rs.randint(0, num_classes, (b,)).astype(np.int32)
  return batch


def run(config, num_devices: int, batches: list[dict], *, seed: int = 0):
  """Init with ``seed`` and take one step per batch; returns (losses, metrics, final state)."""
  parts, mesh = build(config, num_devices)
  losses, metrics = [], []
  with jax.set_mesh(mesh):
    state = parts.init(jax.random.key(seed))
    for b in batches:
      state, m, _ = parts.train_step(state, sharding.global_batch(mesh, b))
      losses.append(float(m['loss']))
      metrics.append(jax.device_get(m))
  return losses, metrics, state
