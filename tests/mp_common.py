"""Shared by the multi-process worker and the single-process reference of the same run."""
import importlib.util
import os

import jax
import numpy as np

from ssl_jax import methods, sharding, train

STEPS = 3
GLOBAL_BATCH = 16


def config():
  spec = importlib.util.spec_from_file_location(
      'moco_cfg', os.path.join(os.path.dirname(__file__), '..', 'configs', 'moco.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config('cifar10,runlocal')
  c.batch_size = GLOBAL_BATCH
  c.method.queue_size = 64
  return c


def global_batch_np(step: int) -> dict:
  r = np.random.default_rng(1000 + step)
  return {'view1': r.integers(0, 256, (GLOBAL_BATCH, 32, 32, 3), dtype=np.uint8),
          'view2': r.integers(0, 256, (GLOBAL_BATCH, 32, 32, 3), dtype=np.uint8),
          'label': r.integers(0, 10, (GLOBAL_BATCH,)).astype(np.int32)}


def run_steps(process_index: int, process_count: int):
  """MoCo (global queue, global BN) for STEPS steps on a 4-device mesh; losses + params."""
  c = config()
  mesh = sharding.make_mesh()
  assert mesh.shape[sharding.DATA] == 4, mesh
  method = methods.get('moco')(c)
  parts = train.build(c, mesh, method, steps_per_epoch=100, total_steps=100)
  local = GLOBAL_BATCH // process_count
  rows = slice(process_index * local, (process_index + 1) * local)
  losses = []
  with jax.set_mesh(mesh):
    state = parts.init(jax.random.key(0))
    for step in range(STEPS):
      batch = {k: v[rows] for k, v in global_batch_np(step).items()}
      state, metrics, _ = parts.train_step(state, sharding.global_batch(mesh, batch))
      losses.append(float(metrics['loss'].addressable_data(0)))
    params = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
    queue = state.method_state['queue']
    from jax.experimental import multihost_utils
    params.append(np.asarray(multihost_utils.process_allgather(queue, tiled=True)))
  return losses, params
