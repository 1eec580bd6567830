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

  ``pi`` and the device count (``method.interp_pool``, default 0). On one device ``pi`` is a
  uniform permutation of all K rows: the official law, exactly (``randperm(K)`` every step).
  On ``n`` devices the queue is stored in ``n`` blocks of ``K/n`` consecutive rows, and a
  uniform permutation of all rows would move the whole queue between devices every step
  (``benchmarks/scaling.py`` read 32 MB at K = 65,536). So ``pi`` permutes each block of
  ``pool`` consecutive rows uniformly and independently (``pool = K/n`` by default: each
  device's own rows; nothing moves). What changes: a negative's partner ``Q[pi(m)]`` is a
  uniform draw from the ``pool`` rows of its block instead of all K rows. Why it is
  statistically the same: the queue is a FIFO of keys of shuffled images, so the rows of a
  block are as exchangeable as the rows of the queue (they are only closer in age: at most
  ``pool / B`` steps apart instead of ``K / B``, i.e. keys of a slightly more similar EMA
  encoder); the loss is a sum over rows of a function of the pair ``(Q_m, Q_pi(m))``, whose
  expectation depends on the pair's distribution only, and a row is paired with itself
  (``Q'_m = Q_m``) with probability ``1/pool`` instead of ``1/K`` (1/8192 vs 1/65,536 at 8
  devices). ``interp_pool = N`` makes the law the same on every device count (blocks of N
  rows; nothing moves when N divides ``K/n``), ``-1`` the official law on any device count
  (the queue moves; a ``base.CrossDeviceTrafficWarning`` says so).
* Loss: InfoNCE over ``[q_hat . k_hat, q_hat . Q'^T] / tau`` with the positive at index 0.

The coefficients are drawn from the step's ``rng``; the pure functions below take them as
arguments so they can be checked exactly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import config_lib, sharding
from ssl_jax.methods import base, moco
from ssl_jax.ops import gather, losses, memory_bank, summaries


def extrapolate_positives(q: jax.Array, k: jax.Array, lam) -> tuple[jax.Array, jax.Array]:
  """``q_hat = lam q + (1 - lam) k``, ``k_hat = lam k + (1 - lam) q`` (lam = lam_ex in (1, 2))."""
  return lam * q + (1.0 - lam) * k, lam * k + (1.0 - lam) * q


def interpolate_negatives(negatives: jax.Array, perm: jax.Array, lam, *,
                          pool: int | None = None, mesh=None) -> jax.Array:
  """``Q' = lam Q + (1 - lam) Q[perm]`` (lam = lam_in in (0, 1)).

  ``pool``: ``perm`` keeps every row in its block of ``pool`` consecutive rows
  (``draw_coefficients(..., pool=pool)``), so a block on one device of ``mesh`` is read there
  (``gather.take_within_pools``: nothing moves). None: any permutation (``Q[perm]``).
  """
  if pool is None:
    return lam * negatives + (1.0 - lam) * negatives[perm]
  return lam * negatives + (1.0 - lam) * gather.take_within_pools(negatives, perm, pool,
                                                                  mesh=mesh)


def pool_permutation(rng, size: int, pool: int) -> jax.Array:
  """``pi`` [size]: each block of ``pool`` consecutive indices permuted uniformly and
  independently (``pi(m) // pool == m // pool``); ``pool = size``: ``randperm(size)``."""
  if pool == size:
    return jax.random.permutation(rng, size)
  g = size // pool
  local = jax.vmap(lambda r: jax.random.permutation(r, pool))(jax.random.split(rng, g))
  return (local + (jnp.arange(g) * pool)[:, None]).reshape(size).astype(jnp.int32)


def draw_coefficients(rng, *, ex_alpha: float, in_alpha: float, queue_size: int,
                      pool: int | None = None):
  """``lam_ex = 1 + Beta(ex_alpha, ex_alpha)``, ``lam_in ~ Beta(in_alpha, in_alpha)``, ``pi``.

  ``pi = pool_permutation(r, queue_size, pool)`` (``pool`` None: a uniform permutation of all
  rows, the official law).
  """
  r_ex, r_in, r_perm = jax.random.split(rng, 3)
  lam_ex = 1.0 + jax.random.beta(r_ex, ex_alpha, ex_alpha)
  lam_in = jax.random.beta(r_in, in_alpha, in_alpha)
  perm = pool_permutation(r_perm, queue_size, queue_size if pool is None else pool)
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
    self.interp_pool = int(m.get('interp_pool', 0))

  @classmethod
  def validate_config(cls, config):
    super().validate_config(config)
    for key in ('ex_alpha', 'in_alpha'):
      v = config.method[key]
      if not (isinstance(v, (int, float)) and v > 0):
        raise config_lib.ConfigError(
            f'config.method.{key}={v!r} is invalid; accepted: a Beta parameter > 0')
    pool = config.method.get('interp_pool', 0)
    config_lib.require(isinstance(pool, int) and not isinstance(pool, bool) and (
        pool in (0, -1) or (pool > 0 and config.method.queue_size % pool == 0)),
        'method.interp_pool', pool, '0 (the queue rows of one device), -1 (the whole queue) or '
        f'a divisor of method.queue_size ({config.method.queue_size})')

  def loss(self, ctx, batch):
    queue = ctx.method_state['queue']
    o1, batch_stats = ctx.forward(ctx.batch_stats, batch['view1'])
    k = losses.l2_normalize(ctx.target_forward(batch_stats, batch['view2'])['proj'])
    q = losses.l2_normalize(o1['proj'])
    pool = sharding.resolve_pool(self.interp_pool, self.queue_size, ctx.num_devices)
    if self.interpolate and not sharding.pool_is_local(pool, self.queue_size, ctx.num_devices):
      base.warn_traffic(f'ft: method.interp_pool={self.interp_pool} spans devices: the permuted '
                        f'queue ({self.queue_size} x {self.embed_dim}) moves between devices '
                        'every step; 0 (or a divisor of the rows per device) moves nothing')
    lam_ex, lam_in, perm = draw_coefficients(ctx.rng, ex_alpha=self.ex_alpha,
                                             in_alpha=self.in_alpha, queue_size=self.queue_size,
                                             pool=pool)
    q_hat, k_hat = (extrapolate_positives(q, k, lam_ex) if self.extrapolate else (q, k))
    if self.renormalize:
      q_hat, k_hat = losses.l2_normalize(q_hat), losses.l2_normalize(k_hat)
    negs = (interpolate_negatives(queue, perm, lam_in, pool=pool, mesh=ctx.mesh)
            if self.interpolate else queue)
    # Not ``losses.info_nce``: its stop-gradient on the key would cut the gradient that reaches
    # q through the extrapolated key k_hat.
    pos = jnp.sum(q_hat * k_hat, axis=-1)
    neg = losses.queue_logits(q_hat, negs, 1.0, mesh=ctx.mesh)
    loss = losses.info_nce_from_logits(pos / self.temperature, neg / self.temperature)
    new_queue, new_ptr = memory_bank.enqueue(queue, ctx.method_state['queue_ptr'], k,
                                             mesh=ctx.mesh)
    # The visualisation of the paper: scores of the transformed pairs and of the raw pairs.
    raw_pos = jnp.sum(q * k, axis=-1)
    metrics = {'loss': loss, 'ft/lam_ex': lam_ex, 'ft/lam_in': lam_in,
               **summaries.score_summary(pos, neg), **summaries.embedding_summary(o1['proj']),
               'score/exp_pos_mean': jnp.mean(jnp.exp(pos / self.temperature)),
               'score/exp_neg_mean': jnp.mean(jnp.exp(neg / self.temperature)),
               'score/raw_pos_mean': jnp.mean(raw_pos)}
    return loss, base.LossAux(metrics, {'queue': new_queue, 'queue_ptr': new_ptr}, batch_stats,
                              o1['features'], {'pos': pos, 'neg': neg[:, :64]})
