"""Optimizers and schedules: SGD, LARS, AdamW with linear warm-up + cosine; EMA tau schedules.

``lr(t)``: linear warm-up from 0 to ``base_lr * batch_size / 256`` over the warm-up steps, then
cosine decay to ``peak * end_lr_factor`` at the last step.
LARS (BYOL): weight decay and the trust ratio skip biases and normalisation parameters (every
parameter with ``ndim <= 1``); the update is solo-learn's ``LARS`` (``solo/utils/lars.py``),
see :func:`lars`. SGD (MoCo/MSF) applies weight decay to every parameter, like
``torch.optim.SGD(weight_decay=...)``. AdamW (APS) likewise decays every parameter.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ssl_jax import utils


def peak_lr(config: ml_collections.ConfigDict) -> float:
  return config.optimizer.base_lr * config.batch_size / 256.0


def warmup_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """``optimizer.warmup_steps`` when >= 0 (0: no warm-up), else ``warmup_epochs`` in steps."""
  if config.optimizer.warmup_steps >= 0:
    return int(config.optimizer.warmup_steps)
  return utils.steps(config.optimizer, 'warmup', steps_per_epoch, default=0)


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


class LarsState(NamedTuple):
  count: jax.Array


def scale_by_lars(schedule: optax.Schedule, *, weight_decay: float, trust_coefficient: float,
                  clip: bool, eps: float = 1e-8, mask=None) -> optax.GradientTransformation:
  """LARS direction ``d`` per tensor (before momentum and before the learning rate).

  For an adapted tensor ``w`` (``mask`` True: not a bias or norm parameter) with gradient ``g``,
  when ``||w|| > 0`` and ``||g|| > 0``::

      r = eta * ||w|| / (||g|| + wd * ||w|| + eps)
      r = min(r / lr_t, 1)                 if clip (solo-learn's ``clip_lr``)
      d = r * (g + wd * w)

  otherwise (and for every tensor outside ``mask``) ``d = g``: no decay, no adaptation. With
  ``clip`` the effective per-tensor step is ``min(r, lr_t) * (g + wd w)``: the trust ratio
  can only lower the scheduled lr, never raise it.
  """

  def init_fn(params):
    del params
    return LarsState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params):
    lr = schedule(state.count)
    m = mask(params) if callable(mask) else (mask if mask is not None else
                                                jax.tree.map(lambda _: True, params))

    def one(g, w, adapt):
      if not adapt:
        return g
      w_norm = jnp.linalg.norm(w.ravel())
      g_norm = jnp.linalg.norm(g.ravel())
      r = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
      if clip:
        r = jnp.minimum(r / lr, 1.0)
      ok = (w_norm > 0) & (g_norm > 0)
      return jnp.where(ok, r * (g + weight_decay * w), g)

    out = jax.tree.map(one, updates, params, m)
    return out, LarsState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def lars(schedule: optax.Schedule, *, weight_decay: float, trust_coefficient: float,
         momentum: float, nesterov: bool = False, clip: bool = False,
         mask=decay_mask) -> optax.GradientTransformation:
  """solo-learn's LARS, step for step (``solo/utils/lars.py``, ``exclude_bias_n_norm=True``).

      d_t   = scale_by_lars(g_t)            (see :func:`scale_by_lars`)
      buf_t = momentum * buf_{t-1} + d_t    (buf_0 = d_0, as torch's clone on the first step)
      w_t   = w_{t-1} - lr_t * buf_t        (nesterov: lr_t * (d_t + momentum * buf_t))

  Unlike ``optax.lars`` the momentum buffer holds un-scaled directions (the lr multiplies
  after it, as in torch), and the trust ratio's denominator is ``||g|| + wd ||w||``.
  """
  return optax.chain(
      scale_by_lars(schedule, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                    clip=clip, mask=mask),
      optax.trace(decay=momentum, nesterov=nesterov),
      optax.scale_by_learning_rate(schedule))


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  o = config.optimizer
  if o.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(o.weight_decay),
                     optax.sgd(schedule, momentum=o.momentum, nesterov=o.nesterov))
  elif o.name == 'lars':
    tx = lars(schedule, weight_decay=o.weight_decay, trust_coefficient=o.trust_coefficient,
              momentum=o.momentum, nesterov=o.nesterov, clip=bool(o.get('trust_clip', False)))
  elif o.name == 'adamw':
    tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
  else:
    raise ValueError(f'config.optimizer.name={o.name!r}; accepted: sgd, lars, adamw')
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx


def ema_schedule(config: ml_collections.ConfigDict, total_steps: int):
  """Target EMA rate: ``final - (final - base)(cos(pi t / T) + 1) / 2`` (BYOL: final 1;
  solo-learn's MoCo v2+: 0.99 -> 0.999), or the constant ``base``."""
  base = float(config.ema.base)
  final = float(config.ema.get('final', 1.0))
  if config.ema.schedule == 'constant':
    return lambda step: jnp.asarray(base, jnp.float32)

  def tau(step):
    t = jnp.minimum(step.astype(jnp.float32) / max(total_steps, 1), 1.0)
    return final - (final - base) * (jnp.cos(math.pi * t) + 1.0) / 2.0
  return tau


def probe_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The online linear probe: SGD with momentum, constant lr, no weight decay."""
  return optax.sgd(config.probe.lr, momentum=config.probe.momentum, nesterov=True)


# ---------------------------------------------------------------------------------------------
# The evaluators' optimizers (linear probe, fine-tuning): schedules in epochs of the eval data
# ---------------------------------------------------------------------------------------------
EVAL_SCHEDULES = ('cosine', 'step', 'constant')


def epoch_schedule(base_lr: float, batch_size: int, steps_per_epoch: int, epochs: float, *,
                schedule: str = 'cosine', step_epochs: Sequence[float] = (),
                step_factor: float = 0.1, warmup_epochs: float = 0.0) -> optax.Schedule:
  """``lr = base_lr * B / 256``; cosine to 0 over the run, steps of ``step_factor`` at
  ``step_epochs``, or constant; optional linear warm-up."""
  if schedule not in EVAL_SCHEDULES:
    raise ValueError(f'schedule={schedule!r} is invalid; accepted: {", ".join(EVAL_SCHEDULES)}')
  peak = base_lr * batch_size / 256.0
  total = max(int(round(epochs * steps_per_epoch)), 1)
  warm = min(int(round(warmup_epochs * steps_per_epoch)), total - 1)
  if schedule == 'cosine':
    main = optax.cosine_decay_schedule(peak, max(total - warm, 1))
  elif schedule == 'step':
    main = optax.piecewise_constant_schedule(
        peak, {max(int(round(e * steps_per_epoch)) - warm, 1): step_factor
               for e in step_epochs})
  else:
    main = optax.constant_schedule(peak)
  if warm <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), main], [warm])


def probe_sgd(schedule: optax.Schedule, *, momentum: float = 0.9, nesterov: bool = False,
        weight_decay: float = 0.0) -> optax.GradientTransformation:
  """SGD + momentum; weight decay on weight matrices only (not biases), as a probe should."""
  parts = []
  if weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay,
                                           mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
  parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
  return optax.chain(*parts)


def finetune_optimizer(o: ml_collections.ConfigDict, lr_fn) -> optax.GradientTransformation:
  """Fine-tuning: SGD (:func:`probe_sgd`) or AdamW, both with weight decay on weight matrices
  only; the ``head`` subtree's lr is ``o.head_lr_mult`` times the backbone's."""
  def base(schedule):
    if o.name == 'sgd':
      return probe_sgd(schedule, momentum=o.momentum, nesterov=o.nesterov,
                       weight_decay=o.weight_decay)
    return optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                       mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))

  def labels(params):
    return {k: jax.tree.map(lambda _: 'head' if k == 'head' else 'backbone', v)
            for k, v in params.items()}

  mult = float(o.head_lr_mult)
  return optax.multi_transform({'backbone': base(lr_fn),
                                'head': base(lambda s: mult * lr_fn(s))}, labels)
