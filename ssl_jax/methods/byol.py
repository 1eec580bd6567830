"""BYOL (Grill et al. 2020): predict the EMA target's projection of the other view.

    p_i = predictor(projector(backbone(x_i)))          online, views i = 1, 2
    z_i = projector'(backbone'(x_i))                     EMA target, stop-gradient
    L   = (2 - 2 n(p_1).n(z_2)) + (2 - 2 n(p_2).n(z_1)),  mean over the global batch

The target's EMA rate follows ``tau = 1 - (1 - tau_base)(cos(pi t / T) + 1) / 2`` (the trainer's
``ema.schedule='cosine'``). ``symmetric=False`` keeps only the first term (BYOL-asym, the MSF
paper's baseline).
"""
from __future__ import annotations

from ssl_jax.methods import base
from ssl_jax.ops import losses, summaries


class Method(base.Method):
  name = 'byol'

  def __init__(self, config, steps_per_epoch=None):
    super().__init__(config, steps_per_epoch)
    self.symmetric = bool(config.method.get('symmetric', True))

  def loss(self, ctx, batch):
    x1, x2 = batch['view1'], batch['view2']
    o1, batch_stats = ctx.forward(ctx.batch_stats, x1)
    t2 = ctx.target_forward(batch_stats, x2)
    loss = losses.byol_loss(o1['pred'], t2['proj'])
    if self.symmetric:
      o2, batch_stats = ctx.forward(batch_stats, x2)
      t1 = ctx.target_forward(batch_stats, x1)
      loss = loss + losses.byol_loss(o2['pred'], t1['proj'])
    # Scores for the pos/neg visualisation: n(p1) against n(z2) of the same / other images.
    q = losses.l2_normalize(o1['pred'])
    k = losses.l2_normalize(t2['proj'])
    pos, neg = summaries.in_batch_scores(q, k)
    metrics = {'loss': loss, **summaries.score_summary(pos, neg),
               **summaries.embedding_summary(o1['proj'])}
    return loss, base.LossAux(metrics, ctx.method_state, batch_stats, o1['features'],
                              {'pos': pos, 'neg': neg})

