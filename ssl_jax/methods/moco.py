"""MoCo v2 (Chen et al. 2020): InfoNCE against a queue of EMA-encoded keys.

    q = n(online(x_1)),  k = n(target(x_2))  (stop-gradient)
    logits = [q.k, q.queue^T] / tau,   L = CE(logits, 0),   then enqueue k

The queue holds ``queue_size`` keys *globally* (65,536 by default), stored sharded along
'data' and enqueued with the global batch, so results do not change with the device count
(solo-learn/lightly keep per-GPU queues). The key encoder is the trainer's EMA target
(``ema.schedule='constant'``, ``ema.base=0.999``), updated after the optimizer step.
Shuffle-BN is not needed: BatchNorm statistics are over the global batch, and the MoCo v2
projector has no BatchNorm.

``symmetric=True`` is solo-learn's MoCo v2+ form (``solo/methods/mocov2plus.py``) and the
official CIFAR demo's: ``L = (CE(q_1; k_2, queue_2) + CE(q_2; k_1, queue_1)) / 2`` with one queue
per view — ``queue`` holds past view-2 keys (contrasted with ``q_1``), ``queue_view1`` past
view-1 keys (contrasted with ``q_2``), both enqueued with this batch's keys of their view. The
average keeps the loss on the asymmetric loss's scale, so a reference lr is the same step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ssl_jax import config_lib, sharding
from ssl_jax.methods import base
from ssl_jax.ops import losses, memory_bank, summaries


class Method(base.Method):
  name = 'moco'
  uses_predictor = False

  def __init__(self, config, steps_per_epoch=None):
    super().__init__(config, steps_per_epoch)
    self.queue_size = int(config.method.queue_size)
    self.temperature = float(config.method.temperature)
    self.symmetric = bool(config.method.get('symmetric', False))
    self.embed_dim = int(config.model.projector.out_dim)

  # Methods built on MoCo (FT, CLIM, CsMl) follow their papers' one-directional loss.
  supports_symmetric = True

  @classmethod
  def validate_config(cls, config):
    m = config.method
    if m.get('symmetric', False) and not cls.supports_symmetric:
      raise config_lib.ConfigError(
          f'config.method.symmetric=True is invalid for {config.method.name}; accepted: False '
          '(its objective is one-directional, as in its paper)')
    if not (isinstance(m.queue_size, int) and m.queue_size >= config.batch_size):
      raise config_lib.ConfigError(
          f'config.method.queue_size={m.queue_size!r} is invalid; accepted: an integer >= '
          f'config.batch_size ({config.batch_size})')
    if not m.temperature > 0:
      raise config_lib.ConfigError(
          f'config.method.temperature={m.temperature!r} is invalid; accepted: a number > 0')

  def init_state(self, rng):
    r1, r2 = jax.random.split(rng)
    queue = losses.l2_normalize(jax.random.normal(r1, (self.queue_size, self.embed_dim)))
    state = {'queue': queue, 'queue_ptr': jnp.zeros((), jnp.int32)}
    if self.symmetric:
      state['queue_view1'] = losses.l2_normalize(
          jax.random.normal(r2, (self.queue_size, self.embed_dim)))
    return state

  def state_specs(self):
    specs = {'queue': P(sharding.DATA), 'queue_ptr': P()}
    if self.symmetric:
      specs['queue_view1'] = P(sharding.DATA)
    return specs

  def contrast(self, q, k, queue, *, mesh):
    """InfoNCE of normalised ``q`` against ``k`` and the queue (``losses.info_nce``); returns
    (loss, pos, neg) with the cosine scores ``pos`` [B] and ``neg`` [B, K]."""
    loss, (pos, neg) = losses.info_nce(q, k, queue, self.temperature, mesh=mesh,
                                       with_scores=True)
    return loss, pos, neg

  def loss(self, ctx, batch):
    x1, x2 = batch['view1'], batch['view2']
    queue = ctx.method_state['queue']
    o1, batch_stats = ctx.forward(ctx.batch_stats, x1)
    k2 = losses.l2_normalize(ctx.target_forward(batch_stats, x2)['proj'])
    q1 = losses.l2_normalize(o1['proj'])
    loss, pos, neg = self.contrast(q1, k2, queue, mesh=ctx.mesh)
    ptr = ctx.method_state['queue_ptr']
    new_queue, new_ptr = memory_bank.enqueue(queue, ptr, k2, mesh=ctx.mesh)
    new_state = {'queue': new_queue, 'queue_ptr': new_ptr}
    if self.symmetric:
      o2, batch_stats = ctx.forward(batch_stats, x2)
      k1 = losses.l2_normalize(ctx.target_forward(batch_stats, x1)['proj'])
      queue1 = ctx.method_state['queue_view1']
      loss2, _, _ = self.contrast(losses.l2_normalize(o2['proj']), k1, queue1, mesh=ctx.mesh)
      loss = (loss + loss2) / 2
      new_state['queue_view1'], _ = memory_bank.enqueue(queue1, ptr, k1, mesh=ctx.mesh)
    metrics = {'loss': loss, **summaries.score_summary(pos, neg),
               **summaries.embedding_summary(o1['proj'])}
    return loss, base.LossAux(metrics, new_state, batch_stats, o1['features'],
                              {'pos': pos, 'neg': neg[:, :64]})
