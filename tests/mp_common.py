"""Shared by the multi-process worker and the single-process reference of the same run.

The batches are real CIFAR-10 (the first 256 test images) from the input pipeline: each process
feeds what ``data.make_train_iterator`` gives it for its ``process_index``/``process_count``, so
the test also checks that the global batches do not depend on the process count.
"""
import importlib.util
import os

import jax
import numpy as np

from ssl_jax import data, methods, sharding, train

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
  c.data.train_split = 'test[:256]'  # real CIFAR-10, decoded in a second
  return c


def run_steps(process_index: int, process_count: int):
  """MoCo (global queue, global BN) for STEPS steps on a 4-device mesh; losses + params."""
  c = config()
  mesh = sharding.make_mesh()
  assert mesh.shape[sharding.DATA] == 4, mesh
  method = methods.get('moco')(c)
  parts = train.build(c, mesh, method, steps_per_epoch=100, total_steps=100)
  batches = data.make_train_iterator(c.data, global_batch_size=GLOBAL_BATCH, seed=c.seed,
                                     process_index=process_index, process_count=process_count)
  losses = []
  with jax.set_mesh(mesh):
    state = parts.init(jax.random.key(0))
    for _ in range(STEPS):
      batch = next(batches)
      assert batch['view1'].shape[0] == GLOBAL_BATCH // process_count
      state, metrics, _ = parts.train_step(state, sharding.global_batch(mesh, batch))
      losses.append(float(metrics['loss'].addressable_data(0)))
    params = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
    queue = state.method_state['queue']
    from jax.experimental import multihost_utils
    params.append(np.asarray(multihost_utils.process_allgather(queue, tiled=True)))
  return losses, params
