"""MSF — Mean Shift for self-supervised learning (Koohpayegani et al., ICCV 2021).

One step, following the official ``train_msf.py``:

1. the target is the EMA of the online backbone + projector (m = 0.99, constant). The official
   code updates the target *before* its forward; our trainer updates it after each optimizer
   step, which produces the same sequence of target weights (target_t = EMA of online_t);
2. ``t = n(target(x_weak))``;
3. ``t`` (and its labels, for diagnostics) is enqueued into the FIFO bank **before** searching,
   so each sample's first neighbour is itself (k = 5 -> self + 4 others);
4. the top-k of ``t`` by cosine over the bank (shard-local top-k, then merge: the bank is
   never gathered; approximate with ``config.knn.recall_target`` < 1); rows never written are
   masked out — the official code starts from random
   unit vectors that can be picked as neighbours until the bank has filled;
5. ``q = n(predictor(online(x_strong)))``;
6. ``L = mean_b (1/k) sum_{j in NN_k(t_b)} (2 - 2 q_b . bank_j)`` (``msf_loss``, the function
   the step calls). Not symmetrised.

With k = 1 this is BYOL-asym (the nearest neighbour of ``t_b`` is ``t_b`` itself).
Diagnostics: ``msf/purity`` (fraction of neighbours sharing the anchor's label, excluding
nothing — self included, as in the paper's plots), ``msf/nn_cos`` (mean target cosine to the
neighbours) and ``msf/online_nn_cos`` (mean ``q . bank_j``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ssl_jax import config_lib, sharding
from ssl_jax.methods import base
from ssl_jax.ops import gather, knn, losses, memory_bank, summaries


def msf_loss(u: jax.Array, v: jax.Array, bank: jax.Array, k: int, *,
             valid: jax.Array | None = None, mesh=None, recall_target: float | None = None,
             with_neighbours: bool = False):
  """``mean_b (1/k) sum_{j in NN_k(v_b)} (2 - 2 u_b . bank_j)``.

  ``u`` (online predictions) and ``v`` (target embeddings) are L2-normalised [B, d]; ``bank``
  [K, d] already holds this batch's ``v`` (``v`` is not added again), sharded along 'data' of
  ``mesh`` or not (never gathered; ``mesh=None``: one device). ``valid`` masks rows that were
  never written. ``recall_target`` < 1: approximate search (``knn.topk_cosine``).

  Returns ``L``; with ``with_neighbours=True``, ``(L, (nn_scores, idx, cos))``: the neighbours'
  target cosines ``v_b . bank_j`` [B, k], their rows ``idx`` [B, k] and the online cosines
  ``u_b . bank_j`` [B, k] (the step's diagnostics).
  """
  nn_scores, idx = knn.topk_cosine(v, bank, k, valid=valid, mesh=mesh,
                                   recall_target=recall_target)
  neighbours = gather.gather_rows(bank, idx, mesh=mesh)  # [B, k, d]
  cos = jnp.einsum('bd,bkd->bk', u.astype(jnp.float32), neighbours.astype(jnp.float32))
  loss = jnp.mean(2.0 - 2.0 * cos)
  return (loss, (nn_scores, idx, cos)) if with_neighbours else loss


class Method(base.Method):
  name = 'msf'
  first_view = 'strong'

  def __init__(self, config, steps_per_epoch=None):
    super().__init__(config, steps_per_epoch)
    m = config.method
    self.k = int(m.k)
    self.bank_size = int(m.bank_size)
    self.embed_dim = int(config.model.projector.out_dim)
    self.online_view = str(m.online_view)
    self.target_view = str(m.target_view)
    self.recall_target = float(config.knn.get('recall_target', 1.0))

  @staticmethod
  def validate_config(config):
    m = config.method
    if not (isinstance(m.k, int) and m.k >= 1):
      raise config_lib.ConfigError(f'config.method.k={m.k!r} is invalid; accepted: an integer >= 1')
    if not (isinstance(m.bank_size, int) and m.bank_size >= max(config.batch_size, m.k)):
      raise config_lib.ConfigError(
          f'config.method.bank_size={m.bank_size!r} is invalid; accepted: an integer >= '
          f'max(batch_size, k) = {max(config.batch_size, m.k)}')
    for key in ('online_view', 'target_view'):
      if m[key] not in ('weak', 'strong'):
        raise config_lib.ConfigError(
            f'config.method.{key}={m[key]!r} is invalid; accepted: weak, strong')

  def init_state(self, rng):
    del rng
    return {'bank': jnp.zeros((self.bank_size, self.embed_dim), jnp.float32),
            'bank_labels': jnp.full((self.bank_size,), -1, jnp.int32),
            'bank_ptr': jnp.zeros((), jnp.int32),
            'bank_count': jnp.zeros((), jnp.int32)}

  def state_specs(self):
    return {'bank': P(sharding.DATA), 'bank_labels': P(sharding.DATA), 'bank_ptr': P(),
            'bank_count': P()}

  def loss(self, ctx, batch):
    x_online, x_target = batch[self.online_view], batch[self.target_view]
    labels = batch['label']
    state, mesh = ctx.method_state, ctx.mesh
    t = losses.l2_normalize(ctx.target_forward(ctx.batch_stats, x_target)['proj'])
    bank, ptr = memory_bank.enqueue(state['bank'], state['bank_ptr'], t, mesh=mesh)
    bank_labels, _ = memory_bank.enqueue(state['bank_labels'], state['bank_ptr'], labels,
                                         mesh=mesh)
    count = jnp.minimum(state['bank_count'] + t.shape[0], self.bank_size)
    valid = memory_bank.valid_mask(count, self.bank_size)

    o, batch_stats = ctx.forward(ctx.batch_stats, x_online)
    q = losses.l2_normalize(o['pred'])
    loss, (nn_scores, idx, cos) = msf_loss(q, t, bank, self.k, valid=valid, mesh=mesh,
                                           recall_target=self.recall_target,
                                           with_neighbours=True)

    nn_labels = gather.gather_rows(bank_labels, idx, mesh=mesh)
    labelled = labels >= 0
    same = (nn_labels == labels[:, None]) & labelled[:, None]
    purity = jnp.sum(same) / jnp.maximum(jnp.sum(labelled) * self.k, 1)
    metrics = {'loss': loss, 'msf/purity': purity, 'msf/nn_cos': jnp.mean(nn_scores),
               'msf/online_nn_cos': jnp.mean(cos)}
    new_state = {'bank': bank, 'bank_labels': bank_labels, 'bank_ptr': ptr, 'bank_count': count}
    # Scores for the pos/neg plots: q against its own target (pos) and other targets (neg).
    pos, neg = summaries.in_batch_scores(q, t)
    metrics.update(summaries.score_summary(pos, neg))
    metrics.update(summaries.embedding_summary(o['proj']))
    return loss, base.LossAux(metrics, new_state, batch_stats, o['features'],
                              {'pos': pos, 'neg': neg})
