"""Our side of the train-step rows: a method's preset on synthetic data, its jitted step compiled
ahead of the timing (in a worker thread), and the object that times it.

Standard library only at import; jax and ssl_jax are reached through the suite or imported
inside the functions, after the suite's import gates."""
from __future__ import annotations

import time

from device_rows.common import xla_flops


def method_config(suite, name: str, preset: str | None = None):
  """The method's ImageNet preset, or ``preset`` (e.g. ``'cifar10'``), on synthetic data (smoke:
  its runlocal CIFAR preset), bf16, ``--batch`` (APS: ``--aps_batch``) per device."""
  from _common import load_config  # noqa: E402  (benchmarks/ is the script's directory)
  a = suite.args
  if a.smoke:
    c = load_config(name, 'cifar10,runlocal' if name != 'aps' else 'cifar10,vit_test,runlocal')
  else:
    c = load_config(name, preset or ('imagenet' if name != 'aps' else 'imagenet,vit_small'))
  c.data.name = 'synthetic'
  c.model.dtype = 'bfloat16'
  c.batch_size = (a.aps_batch if name == 'aps' else a.batch) * suite.n_dev
  cifar = a.smoke or (preset or '').startswith('cifar')
  c.data.synthetic_examples = 50_000 if cifar else 1_281_167
  if a.smoke and name == 'moco':   # as the ImageNet preset: asymmetric, one queue
    c.method.update({'queue_size': 256, 'symmetric': False})
  if a.smoke and name == 'msf':
    c.method.bank_size = 512
  return c


def steps_per_epoch(c) -> int:
  return max(1, int(c.data.synthetic_examples) // int(c.batch_size))


def first_batch(c, seed: int = 0):
  """The numpy batch of ``seed`` (0: the one our step and its torch peer both use)."""
  from ssl_jax import data
  return next(data.make_train_iterator(c.data, global_batch_size=c.batch_size, seed=seed))


def device_batch(suite, c):
  """The first batch on the mesh (:func:`first_batch`), and its numpy form. With
  ``c.replicas = S > 1``: replica r's batch is seed r's, stacked on a leading replica axis
  (``sharding.replica_batch``, as the trainer places them); the numpy form is replica 0's."""
  replicas = int(c.get('replicas', 1))
  if replicas == 1:
    batch_np = first_batch(c)
    return suite.sharding.global_batch(suite.mesh, batch_np), batch_np
  per = [first_batch(c, seed=r) for r in range(replicas)]
  return suite.sharding.replica_batch(suite.mesh, per), per[0]


def prepare_train(suite, name: str, make_method=None, *, preset: str | None = None,
                  replicas: int = 1):
  """Build, lower, compile and initialise a method's train step (runs in a worker thread).
  ``make_method(config, steps_per_epoch)`` replaces ``methods.get(name)`` (APS full tokens);
  ``preset``: see :func:`method_config`; ``replicas = S > 1``: the trainer's step of S seeds
  (``config.replicas``: every state leaf and the batch with a leading replica axis, the step
  vmapped over it: ``replica_program='vmap'`` whatever the backend, the program whose
  "almost free on an accelerator" claim the row measures), replica r initialised and fed as
  seed r."""
  jax = suite.jax
  from ssl_jax import methods, train
  t = time.perf_counter()
  c = method_config(suite, name, preset)
  c.replicas = replicas
  c.replica_program = 'vmap'
  spe = steps_per_epoch(c)
  make_method = make_method or methods.get(c.method.name)
  method = make_method(c, steps_per_epoch=spe)
  parts = train.build(c, suite.mesh, method, steps_per_epoch=spe, total_steps=100 * spe)
  batch, batch_np = device_batch(suite, c)
  with jax.set_mesh(suite.mesh):
    lowered = parts.train_step.lower(parts.abstract, batch)
    compiled = lowered.compile()
    if replicas == 1:
      state = steady_state(jax, parts.init(jax.random.key(0)))
    else:    # banks of replicated states are not pre-filled (BYOL has none)
      state = parts.init(train.initial_keys(c))
  label = name if replicas == 1 else f'{name} x{replicas} replicas'
  return OursTrain(suite, label, compiled, state, batch, batch_np, c, method,
                   xla_flops(lowered, compiled), time.perf_counter() - t)


def steady_state(jax, state):
  """Banks full of random unit rows (``bank_count`` = size): the steady state of MSF / CLIM,
  whose searches and k-means otherwise see an almost empty bank in the first steps."""
  ms = dict(state.method_state)
  if 'bank' not in ms or 'bank_count' not in ms:
    return state
  import jax.numpy as jnp
  bank = ms['bank']

  def fill(key):
    x = jax.random.normal(key, bank.shape, jnp.float32)
    return (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(bank.dtype)

  ms['bank'] = jax.jit(fill, out_shardings=bank.sharding)(jax.random.key(7))
  ms['bank_count'] = jax.device_put(jnp.full_like(ms['bank_count'], bank.shape[0]),
                                    ms['bank_count'].sharding)
  return state.replace(method_state=ms)


class OursTrain:
  """A compiled step of ours with its state and device batch."""

  def __init__(self, suite, name, compiled, state, batch, batch_np, config, method, flops,
               build_s):
    self.suite, self.name, self.compiled, self.state = suite, name, compiled, state
    self.batch, self.batch_np, self.config, self.method = batch, batch_np, config, method
    self.flops, self.build_s = flops, build_s
    self.images = int(config.batch_size)        # per replica
    self.metrics = None

  def run(self, n: int) -> float:
    jax = self.suite.jax
    with jax.set_mesh(self.suite.mesh):
      t = time.perf_counter()
      for _ in range(n):
        out = self.compiled(self.state, self.batch)
        self.state, self.metrics = out[0], out[1]
      jax.block_until_ready((self.state, self.metrics))
    return time.perf_counter() - t

  def check_finite(self):
    loss = self.suite.np.asarray(self.suite.jax.device_get(self.metrics['loss']), float)
    if not self.suite.np.all(self.suite.np.isfinite(loss)):   # one loss per replica, if any
      raise FloatingPointError(f'ours {self.name}: loss {loss.tolist()}')
