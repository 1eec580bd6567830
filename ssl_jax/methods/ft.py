"""FT — Feature Transformation (Zhu et al., ICCV 2021) on MoCo v2.

With ``q = n(online(x1))``, the detached key ``k = n(target(x2))`` and the queue ``Q``:

* **Positive extrapolation** (``lam_ex = 1 + Beta(a, a)``, one scalar per step)::

      q_hat = lam_ex * q + (1 - lam_ex) * k
      k_hat = lam_ex * k + (1 - lam_ex) * q          (gradient reaches q through both)

  With lam_ex > 1 the pair is pushed apart: ``q_hat . k_hat <= q . k`` for unit q, k — harder
  positives. No renormalisation after mixing (the official default; ``renormalize=True`` is the
  ablation).
* **Negative interpolation** (``lam_in ~ Beta(b, b)``, one scalar per step, a random
  permutation ``pi`` of the queue)::

      Q' = lam_in * Q + (1 - lam_in) * Q[pi]

  Only the logits use ``Q'``; the stored queue is enqueued with the original keys.
* Loss: InfoNCE over ``[q_hat . k_hat, q_hat . Q'^T] / tau`` with the positive at index 0.

The coefficients are drawn from the step's ``rng``; the pure functions below take them as
arguments so they can be checked exactly. Note: ``Q[pi]`` on a queue sharded over 'data'
moves the queue between devices once per step (K x d floats, 32 MB at 65,536 x 128 f32),
as the official single-process code does implicitly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import config_lib
from ssl_jax.methods import base, moco
from ssl_jax.ops import losses, memory_bank


def extrapolate_positives(q: jax.Array, k: jax.Array, lam) -> tuple[jax.Array, jax.Array]:
  """``q_hat = lam q + (1 - lam) k``, ``k_hat = lam k + (1 - lam) q`` (lam = lam_ex in (1, 2))."""
  return lam * q + (1.0 - lam) * k, lam * k + (1.0 - lam) * q


def interpolate_negatives(negatives: jax.Array, perm: jax.Array, lam) -> jax.Array:
  """``Q' = lam Q + (1 - lam) Q[perm]`` (lam = lam_in in (0, 1))."""
  return lam * negatives + (1.0 - lam) * negatives[perm]


def draw_coefficients(rng, *, ex_alpha: float, in_alpha: float, queue_size: int):
  """``lam_ex = 1 + Beta(ex_alpha, ex_alpha)``, ``lam_in ~ Beta(in_alpha, in_alpha)``, ``pi``."""
  r_ex, r_in, r_perm = jax.random.split(rng, 3)
  lam_ex = 1.0 + jax.random.beta(r_ex, ex_alpha, ex_alpha)
  lam_in = jax.random.beta(r_in, in_alpha, in_alpha)
  perm = jax.random.permutation(r_perm, queue_size)
  return lam_ex, lam_in, perm


class Method(moco.Method):
  name = 'ft'
  supports_symmetric = False

  def __init__(self, config, steps_per_epoch=None):
    super().__init__(config, steps_per_epoch)
    m = config.method
    self.extrapolate = bool(m.extrapolate)
    self.interpolate = bool(m.interpolate)
    self.ex_alpha = float(m.ex_alpha)
    self.in_alpha = float(m.in_alpha)
    self.renormalize = bool(m.renormalize)

  @classmethod
  def validate_config(cls, config):
    super().validate_config(config)
    for key in ('ex_alpha', 'in_alpha'):
      v = config.method[key]
      if not (isinstance(v, (int, float)) and v > 0):
        raise config_lib.ConfigError(
            f'config.method.{key}={v!r} is invalid; accepted: a Beta parameter > 0')

  def loss(self, params, target_params, method_state, batch_stats, batch, rng, step):
    del step
    queue = method_state['queue']
    o1, batch_stats = self.forward(params, batch_stats, batch['view1'])
    k = losses.l2_normalize(self.target_forward(target_params, batch_stats, batch['view2'])['proj'])
    q = losses.l2_normalize(o1['proj'])
    lam_ex, lam_in, perm = draw_coefficients(rng, ex_alpha=self.ex_alpha, in_alpha=self.in_alpha,
                                             queue_size=self.queue_size)
    q_hat, k_hat = (extrapolate_positives(q, k, lam_ex) if self.extrapolate else (q, k))
    if self.renormalize:
      q_hat, k_hat = losses.l2_normalize(q_hat), losses.l2_normalize(k_hat)
    negs = interpolate_negatives(queue, perm, lam_in) if self.interpolate else queue
    pos = jnp.sum(q_hat * k_hat, axis=-1)
    neg = moco.queue_logits(q_hat, negs, 1.0)
    loss = losses.info_nce_from_logits(pos / self.temperature, neg / self.temperature)
    new_queue, new_ptr = memory_bank.enqueue(queue, method_state['queue_ptr'], k)
    # The visualisation of the paper: scores of the transformed pairs and of the raw pairs.
    raw_pos = jnp.sum(q * k, axis=-1)
    metrics = {'loss': loss, 'ft/lam_ex': lam_ex, 'ft/lam_in': lam_in,
               **base.score_summary(pos, neg), **base.embedding_summary(o1['proj']),
               'score/exp_pos_mean': jnp.mean(jnp.exp(pos / self.temperature)),
               'score/exp_neg_mean': jnp.mean(jnp.exp(neg / self.temperature)),
               'score/raw_pos_mean': jnp.mean(raw_pos)}
    return loss, base.LossAux(metrics, {'queue': new_queue, 'queue_ptr': new_ptr}, batch_stats,
                              o1['features'], {'pos': pos, 'neg': neg[:, :64]})
