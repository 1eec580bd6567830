r"""CLIM — Center-wise Local Image Mixture (Li, Zhang & Xiong, arXiv 2011.02697, BMVC 2021).

No official code. The abstract fixes the ingredients (positives from *other* images: local
neighbours of the anchor, kept only if closer to the anchor's cluster centre — "center-wise
local selection" —, instantiated by image mixing as a smoothing regulariser, plus
multi-resolution crops); the rest is our reconstruction ([inferred] in ``METHODS.md``), with the
choices recorded in ``configs/clim.py``.

One step, on MoCo v2 (``q = n(online(.))``, keys ``k = n(target(x_2))``, queue ``Q``, tau):

1. **Clusters.** A bank ``Z`` [N, d] of past keys over the dataset (FIFO, ~1 epoch) with their
   labels (diagnostics only) and cluster ids. When the bank is full and the last clustering is
   ``kmeans_every`` steps old (or there is none), spherical k-means on ``Z`` (inside the jitted
   step under ``jax.lax.cond``) gives unit centroids ``c`` [C, d] and the rows' cluster ids.
   New keys get ``a(k) = argmax_c k . c`` when written, so ``bank_clusters[j] = argmax_c
   Z_j . c`` holds for every row at every step (ids stay consistent with the bank).
2. **Center-wise local selection** (``center_wise_select``), for anchor ``i`` with key ``z_i``,
   cluster ``a_i`` and centre ``c = c_{a_i}``::

       N_K(i) = top-K_j cos(z_i, z_j)          over the candidates j != i
       S(i)   = { j in N_K(i) : a_j = a_i  and  z_j . c > z_i . c }

   One ``j`` is drawn uniformly from ``S(i)`` (``sample_selected``); if ``S(i)`` is empty (or
   no clustering exists yet) ``j = i``, the instance positive.
   **Candidates = the current global batch's keys.** The bank holds features, not images, and
   the mixed image needs the positive's pixels, which only the current batch has. So the bank
   serves the clustering (centroids that reflect the whole dataset), and the neighbours are
   searched among the batch's own keys (exact top-K over the sharded batch with
   ``knn.topk_cosine``, self excluded). A global batch of 256 with C = 100 clusters on CIFAR-10
   gives ~2.5 same-cluster candidates per anchor; when none passes, the anchor falls back to
   itself (logged as ``clim/selected_frac``).
3. **Mixing.** ``lam ~ Beta(alpha, alpha)`` per anchor; ``x~_i = CutMix(x_1[i], x_1[j], lam)``
   (``ssl_jax.ops.mixing``: a box of area ~ (1 - lam) from ``x_1[j]`` pasted into ``x_1[i]``);
   ``w_i`` = the exact kept-area ratio of ``x_1[i]`` (not the nominal lam).
4. **Loss** (``q~ = n(online(x~))``)::

       L_mix = mean_i [ w_i NCE(q~_i, k_i; Q) + (1 - w_i) NCE(q~_i, k_j; Q) ]
       NCE(q, k; Q) = -log( e^{q.k/tau} / (e^{q.k/tau} + sum_m e^{q.Q_m/tau}) )
       L_moco = mean over query views v in {x_1, x_lr0, x_lr1, ...} of mean_i NCE(q_v,i, k_i; Q)
       L = L_moco + mix_weight * L_mix

   The low-resolution crops (``data.views = 'multi_res'``: 'view_lr0', 'view_lr1', ...) are
   extra queries against the same keys; each resolution is its own static shape, so the step
   compiles once. ``x_1`` and ``x~`` share one online forward (a [2B] batch, so BatchNorm
   statistics are over both); each low-resolution view is one more forward.
5. Enqueue ``k`` into the queue and into the bank (with labels and cluster ids).

Diagnostics: ``clim/selected_frac`` (anchors with a non-empty ``S(i)``), ``clim/num_selected``
(mean ``|S(i)|``), ``clim/pos_purity`` (selected positives sharing the anchor's label),
``clim/cluster_purity`` (bank rows whose label is the majority label of their cluster, at the
last clustering), ``clim/kmeans_objective`` (mean cosine to the centroid), ``clim/area_ratio``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import config_lib
from ssl_jax.methods import base, moco
from ssl_jax.ops import gather, kmeans, knn, losses, memory_bank, mixing

_HIGHEST = jax.lax.Precision.HIGHEST


def topk_excluding(queries: jax.Array, candidates: jax.Array, k: int, *,
                   exclude: jax.Array | None = None, valid: jax.Array | None = None,
                   mesh=None) -> tuple[jax.Array, jax.Array]:
  """``knn.topk_cosine`` without candidate ``exclude[b]`` for query b (e.g. itself, when the
  queries are the candidates): the top ``k + 1`` are searched and the excluded entry (if
  present) removed, the others keeping their order. Returns (scores, indices) [B, k]."""
  if exclude is None:
    return knn.topk_cosine(queries, candidates, k, valid=valid, mesh=mesh)
  scores, idx = knn.topk_cosine(queries, candidates, k + 1, valid=valid, mesh=mesh)
  is_ex = idx == jnp.asarray(exclude, jnp.int32)[:, None]
  order = jnp.argsort(is_ex.astype(jnp.int32), axis=1, stable=True)[:, :k]
  return (jnp.take_along_axis(scores, order, axis=1), jnp.take_along_axis(idx, order, axis=1))


def center_wise_select(anchor_feats: jax.Array, candidate_feats: jax.Array,
                       anchor_cluster: jax.Array, candidate_clusters: jax.Array,
                       centroids: jax.Array, k: int, *, exclude: jax.Array | None = None,
                       valid: jax.Array | None = None, mesh=None
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Center-wise local selection.

  For anchor ``i`` (unit ``z_i`` [B, d], cluster ``a_i`` [B]) and candidates ``z_j`` [N, d]
  with clusters ``a_j`` [N] and unit centroids ``c`` [C, d]::

      N_k(i) = top-k_j  z_i . z_j     (j != exclude[i], valid[j]; ties -> lowest j)
      keep_ij = [a_j = a_i] and [z_j . c_{a_i} > z_i . c_{a_i}]    for j in N_k(i)

  Returns ``indices`` [B, k] int32 (descending cosine; -1 where fewer than k candidates
  exist), ``keep`` [B, k] bool and ``scores`` [B, k] (the cosines). Anchors with
  ``a_i < 0`` keep nothing. The candidates may be sharded along 'data' (never gathered).
  """
  scores, idx = topk_excluding(anchor_feats, candidate_feats, k, exclude=exclude, valid=valid,
                               mesh=mesh)
  present = idx >= 0
  safe = jnp.maximum(idx, 0)
  cand = gather.gather_rows(candidate_feats, safe, mesh=mesh).astype(jnp.float32)  # [B, k, d]
  cand_cluster = gather.gather_rows(candidate_clusters, safe, mesh=mesh)           # [B, k]
  anchor_cluster = jnp.asarray(anchor_cluster, jnp.int32)
  c = jnp.take(centroids.astype(jnp.float32), jnp.maximum(anchor_cluster, 0), axis=0)
  anchor_cos = jnp.einsum('bd,bd->b', anchor_feats.astype(jnp.float32), c, precision=_HIGHEST)
  cand_cos = jnp.einsum('bkd,bd->bk', cand, c, precision=_HIGHEST)
  keep = (present & (cand_cluster == anchor_cluster[:, None]) &
          (cand_cos > anchor_cos[:, None]) & (anchor_cluster >= 0)[:, None])
  return idx, keep, scores


def sample_selected(rng: jax.Array, indices: jax.Array, keep: jax.Array,
                    fallback: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One index per row drawn uniformly from ``{indices[b, m] : keep[b, m]}``, else
  ``fallback[b]``. Returns (chosen [B] int32, has_selection [B] bool)."""
  u = jax.random.uniform(rng, keep.shape)
  pick = jnp.argmax(jnp.where(keep, u, -1.0), axis=1)
  chosen = jnp.take_along_axis(indices, pick[:, None], axis=1)[:, 0]
  has = jnp.any(keep, axis=1)
  return jnp.where(has, chosen, jnp.asarray(fallback, jnp.int32)).astype(jnp.int32), has


def mixed_info_nce(q: jax.Array, k_a: jax.Array, k_b: jax.Array, w: jax.Array,
                   queue: jax.Array, temperature: float) -> jax.Array:
  """``mean_i [w_i NCE(q_i, k_a_i; Q) + (1 - w_i) NCE(q_i, k_b_i; Q)]`` (the CLIM mixing term).

  ``NCE(q, k; Q) = logsumexp([q.k, q.Q^T] / tau) - q.k / tau``; each target is scored against
  its own key and the shared queue. Inputs unit [B, d] (queue [K, d]); ``w`` [B] in [0, 1].
  """
  neg = moco.queue_logits(q, queue, temperature)                  # [B, K], sharded along K
  lse_neg = jax.nn.logsumexp(neg, axis=-1)
  pos_a = jnp.sum(q * k_a, axis=-1) / temperature
  pos_b = jnp.sum(q * k_b, axis=-1) / temperature
  nce_a = jnp.logaddexp(pos_a, lse_neg) - pos_a
  nce_b = jnp.logaddexp(pos_b, lse_neg) - pos_b
  w = w.astype(jnp.float32)
  return jnp.mean(w * nce_a + (1.0 - w) * nce_b)


def cluster_purity(assignments: jax.Array, labels: jax.Array, num_clusters: int,
                   num_classes: int) -> jax.Array:
  """``sum_c max_y |{j : a_j = c, y_j = y}| / |{j : y_j >= 0}|`` (rows with label < 0 ignored)."""
  labelled = labels >= 0
  y = jnp.where(labelled, labels, num_classes)          # out of range -> dropped
  counts = jnp.zeros((num_clusters, num_classes), jnp.int32).at[assignments, y].add(
      1, mode='drop')
  return jnp.sum(jnp.max(counts, axis=1)) / jnp.maximum(jnp.sum(labelled), 1)


class Method(moco.Method):
  name = 'clim'
  supports_symmetric = False

  def __init__(self, config, steps_per_epoch=None):
    super().__init__(config, steps_per_epoch)
    m = config.method
    self.bank_size = int(m.bank_size)
    self.num_clusters = int(m.num_clusters)
    self.kmeans_iters = int(m.kmeans_iters)
    self.k = int(m.k)
    self.mix_alpha = float(m.mix_alpha)
    self.mix_weight = float(m.mix_weight)
    self.num_classes = int(config.data.num_classes)
    if int(m.kmeans_every_steps) > 0:
      self.kmeans_every = int(m.kmeans_every_steps)
    else:
      if steps_per_epoch is None:
        raise ValueError('clim: method.kmeans_every_epochs needs steps_per_epoch (the trainer '
                         'passes it); or set method.kmeans_every_steps')
      self.kmeans_every = max(1, int(round(float(m.kmeans_every_epochs) * steps_per_epoch)))
    extra = config.data.get('extra_resolutions') or ()
    self.query_views = ('view1',) + (
        tuple(f'view_lr{i}' for i in range(len(extra))) if config.data.views == 'multi_res'
        else ())

  @classmethod
  def validate_config(cls, config):
    super().validate_config(config)
    m = config.method

    def need(cond, key, accepted):
      if not cond:
        raise config_lib.ConfigError(
            f'config.method.{key}={m[key]!r} is invalid; accepted: {accepted}')

    def is_int(v):
      return isinstance(v, int) and not isinstance(v, bool)

    need(is_int(m.bank_size) and m.bank_size >= config.batch_size, 'bank_size',
         f'an integer >= batch_size ({config.batch_size})')
    need(is_int(m.num_clusters) and 1 <= m.num_clusters <= m.bank_size, 'num_clusters',
         f'an integer in 1..bank_size ({m.bank_size})')
    need(is_int(m.kmeans_iters) and m.kmeans_iters >= 0, 'kmeans_iters', 'an integer >= 0')
    need(is_int(m.k) and 1 <= m.k < config.batch_size, 'k',
         f'an integer in 1..batch_size - 1 ({config.batch_size - 1}); the neighbours are '
         'searched in the global batch')
    need(isinstance(m.mix_alpha, (int, float)) and m.mix_alpha > 0, 'mix_alpha',
         'a Beta parameter > 0')
    need(isinstance(m.mix_weight, (int, float)) and m.mix_weight >= 0, 'mix_weight',
         'a number >= 0')
    if not (m.kmeans_every_steps > 0 or m.kmeans_every_epochs > 0):
      raise config_lib.ConfigError(
          f'config.method.kmeans_every_steps={m.kmeans_every_steps!r} and '
          f'config.method.kmeans_every_epochs={m.kmeans_every_epochs!r} are invalid; accepted: '
          'kmeans_every_steps > 0, or kmeans_every_epochs > 0')
    if config.data.views not in ('multi_res', 'moco'):
      raise config_lib.ConfigError(
          f'config.data.views={config.data.views!r} is invalid for clim; accepted: multi_res, '
          'moco (no low-resolution queries)')

  def init_state(self, rng):
    state = super().init_state(rng)
    state.update({
        'bank': jnp.zeros((self.bank_size, self.embed_dim), jnp.float32),
        'bank_labels': jnp.full((self.bank_size,), -1, jnp.int32),
        'bank_clusters': jnp.full((self.bank_size,), -1, jnp.int32),
        'bank_ptr': jnp.zeros((), jnp.int32),
        'bank_count': jnp.zeros((), jnp.int32),
        'centroids': jnp.zeros((self.num_clusters, self.embed_dim), jnp.float32),
        'kmeans_step': jnp.full((), -1, jnp.int32),       # step of the last clustering (-1: none)
        'kmeans_objective': jnp.zeros((), jnp.float32),
        'cluster_purity': jnp.zeros((), jnp.float32),
    })
    return state

  # -------------------------------------------------------------------------------------------
  def refresh_clusters(self, state, step, rng):
    """k-means on the bank when it is full and the last clustering is ``kmeans_every`` steps
    old (or absent); otherwise the stored clustering. Returns the clustering fields."""
    keys = ('centroids', 'bank_clusters', 'kmeans_step', 'kmeans_objective', 'cluster_purity')
    last = state['kmeans_step']
    step = jnp.asarray(step, jnp.int32)
    full = state['bank_count'] >= self.bank_size
    due = full & ((last < 0) | (step - last >= self.kmeans_every))

    def run(_):
      cents, assign, obj = kmeans.kmeans(state['bank'], self.num_clusters, self.kmeans_iters, rng)
      purity = cluster_purity(assign, state['bank_labels'], self.num_clusters, self.num_classes)
      return {'centroids': cents.astype(jnp.float32), 'bank_clusters': assign.astype(jnp.int32),
              'kmeans_step': step, 'kmeans_objective': obj.astype(jnp.float32),
              'cluster_purity': purity.astype(jnp.float32)}

    def keep(_):
      return {key: state[key] for key in keys}

    return jax.lax.cond(due, run, keep, None)

  def loss(self, params, target_params, method_state, batch_stats, batch, rng, step):
    x1, x2 = batch['view1'], batch['view2']
    labels = batch['label']
    b = x1.shape[0]
    r_km, r_pick, r_lam, r_box = jax.random.split(rng, 4)
    queue = method_state['queue']

    k = losses.l2_normalize(self.target_forward(target_params, batch_stats, x2)['proj'])

    # 1. clusters (refreshed on schedule), the batch keys' cluster ids. The barriers order the
    # clustering after the target forward and before every online forward: k-means' Lloyd loop
    # holds cross-device all-reduces, and letting them interleave with the networks' BatchNorm
    # all-reduces (independent in the dataflow) risks a collective deadlock (seen on
    # multi-device CPU runs with a similar loop).
    cl_keys = ('bank', 'bank_labels', 'bank_count', 'bank_clusters', 'centroids', 'kmeans_step',
               'kmeans_objective', 'cluster_purity')
    cl_in, k = jax.lax.optimization_barrier(({key: method_state[key] for key in cl_keys}, k))
    clus = self.refresh_clusters(cl_in, step, r_km)
    low_res = {key: batch[key] for key in self.query_views[1:]}
    clus, x1, low_res = jax.lax.optimization_barrier((clus, x1, low_res))
    has_clusters = clus['kmeans_step'] >= 0
    k_cluster, _ = kmeans.assign(k, clus['centroids'])
    anchor_cluster = jnp.where(has_clusters, k_cluster, -1)

    # 2. center-wise local selection among the batch's own keys (self excluded).
    self_idx = jnp.arange(b, dtype=jnp.int32)
    nn_idx, keep, nn_cos = center_wise_select(k, k, anchor_cluster, k_cluster,
                                              clus['centroids'], self.k, exclude=self_idx)
    j, has_sel = sample_selected(r_pick, nn_idx, keep, self_idx)

    # 3. CutMix of the anchor's query view with the selected positive's query view.
    lam = mixing.sample_beta(r_lam, self.mix_alpha, self.mix_alpha, (b,))
    x_mix, w = mixing.cutmix(x1, jnp.take(x1, j, axis=0), lam, r_box)

    # 4. online forward: [x1; x~] together, then each low-resolution query view.
    o, batch_stats = self.forward(params, batch_stats, jnp.concatenate([x1, x_mix], axis=0))
    q_all = losses.l2_normalize(o['proj'])
    q1, q_mix = q_all[:b], q_all[b:]
    l_inst, pos, neg = self.contrast(q1, k, queue)
    inst_terms = [l_inst]
    for key in self.query_views[1:]:
      o_r, batch_stats = self.forward(params, batch_stats, low_res[key])
      inst_terms.append(self.contrast(losses.l2_normalize(o_r['proj']), k, queue)[0])
    l_moco = sum(inst_terms) / len(inst_terms)
    k_j = jnp.take(k, j, axis=0)
    l_mix = mixed_info_nce(q_mix, k, k_j, w, queue, self.temperature)
    loss = l_moco + self.mix_weight * l_mix

    # 5. enqueue keys (queue), keys + labels + cluster ids (bank).
    new_queue, new_qptr = memory_bank.enqueue(queue, method_state['queue_ptr'], k)
    ptr = method_state['bank_ptr']
    bank, new_ptr = memory_bank.enqueue(method_state['bank'], ptr, k)
    bank_labels, _ = memory_bank.enqueue(method_state['bank_labels'], ptr, labels)
    bank_clusters, _ = memory_bank.enqueue(clus['bank_clusters'], ptr, k_cluster)
    count = memory_bank.update_count(method_state['bank_count'], b, self.bank_size)
    new_state = {'queue': new_queue, 'queue_ptr': new_qptr, 'bank': bank,
                 'bank_labels': bank_labels, 'bank_clusters': bank_clusters, 'bank_ptr': new_ptr,
                 'bank_count': count, 'centroids': clus['centroids'],
                 'kmeans_step': clus['kmeans_step'],
                 'kmeans_objective': clus['kmeans_objective'],
                 'cluster_purity': clus['cluster_purity']}

    labelled = (labels >= 0) & (jnp.take(labels, j) >= 0) & has_sel
    same = labelled & (jnp.take(labels, j) == labels)
    metrics = {'loss': loss, 'clim/loss_moco': l_moco, 'clim/loss_mix': l_mix,
               'clim/selected_frac': jnp.mean(has_sel.astype(jnp.float32)),
               'clim/num_selected': jnp.mean(jnp.sum(keep, axis=1).astype(jnp.float32)),
               'clim/pos_purity': jnp.sum(same) / jnp.maximum(jnp.sum(labelled), 1),
               'clim/nn_cos': jnp.mean(jnp.where(nn_idx >= 0, nn_cos, 0.0)),
               'clim/area_ratio': jnp.mean(w),
               'clim/kmeans_objective': clus['kmeans_objective'],
               'clim/cluster_purity': clus['cluster_purity'],
               'clim/has_clusters': has_clusters.astype(jnp.float32),
               **base.score_summary(pos, neg), **base.embedding_summary(o['proj'][:b])}
    return loss, base.LossAux(metrics, new_state, batch_stats, o['features'][:b],
                              {'pos': pos, 'neg': neg[:, :64]})
