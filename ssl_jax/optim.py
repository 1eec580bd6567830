"""Optimizers and schedules: SGD, LARS, AdamW with linear warm-up + cosine; EMA tau schedules.

``lr(t)``: linear warm-up from 0 to ``base_lr * batch_size / 256`` over the warm-up steps, then
cosine decay to ``peak * end_lr_factor`` at the last step.
LARS (BYOL): weight decay and the trust ratio skip biases and normalisation parameters (every
parameter with ``ndim <= 1``). SGD (MoCo/MSF) applies weight decay to every parameter, like
``torch.optim.SGD(weight_decay=...)``. AdamW (APS) likewise decays every parameter.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax


def peak_lr(config: ml_collections.ConfigDict) -> float:
  return config.optimizer.base_lr * config.batch_size / 256.0


def warmup_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  if config.optimizer.warmup_steps >= 0:
    return int(config.optimizer.warmup_steps)
  return int(round(config.optimizer.warmup_epochs * steps_per_epoch))


def lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                total_steps: int) -> optax.Schedule:
  peak = peak_lr(config)
  warm = min(warmup_steps(config, steps_per_epoch), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warm,
      decay_steps=max(total_steps, warm + 1), end_value=peak * config.optimizer.end_lr_factor)


def decay_mask(params):
  """True for weights that get weight decay / LARS adaptation (not biases or norm params)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  o = config.optimizer
  if o.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(o.weight_decay),
                     optax.sgd(schedule, momentum=o.momentum, nesterov=o.nesterov))
  elif o.name == 'lars':
    tx = optax.lars(schedule, weight_decay=o.weight_decay, weight_decay_mask=decay_mask,
                    trust_coefficient=o.trust_coefficient, trust_ratio_mask=decay_mask,
                    momentum=o.momentum, nesterov=o.nesterov)
  elif o.name == 'adamw':
    tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
  else:
    raise ValueError(f'config.optimizer.name={o.name!r}; accepted: sgd, lars, adamw')
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx


def ema_schedule(config: ml_collections.ConfigDict, total_steps: int):
  """Target EMA rate: BYOL's ``1 - (1 - base)(cos(pi t / T) + 1) / 2``, or a constant."""
  base = float(config.ema.base)
  if config.ema.schedule == 'constant':
    return lambda step: jnp.asarray(base, jnp.float32)

  def tau(step):
    t = jnp.minimum(step.astype(jnp.float32) / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - base) * (jnp.cos(math.pi * t) + 1.0) / 2.0
  return tau


def probe_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The online linear probe: SGD with momentum, constant lr, no weight decay."""
  return optax.sgd(config.probe.lr, momentum=config.probe.momentum, nesterov=True)
