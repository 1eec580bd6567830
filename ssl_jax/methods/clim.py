r"""CLIM — Center-wise Local Image Mixture (Li, Zhang & Xiong, arXiv 2011.02697, BMVC 2021).

No official code. The abstract fixes the ingredients (positives from *other* images: local
neighbours of the anchor, kept only if closer to the anchor's cluster centre — "center-wise
local selection" —, instantiated by image mixing as a smoothing regulariser, plus
multi-resolution crops); the rest is our reconstruction, with the choices and why in
``docs/recipes/clim.md`` ("What is known", "Choices and why") and the presets in
``configs/clim.py``.

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

   One ``j`` is drawn uniformly from ``S(i)`` (``ops.selection.sample_selected``); if ``S(i)``
   is empty (or no clustering exists yet) ``j = i``, the instance positive.
   **Candidates = the anchor's pool of the current batch** (``method.partner_pool``). The bank
   holds features, not images, and the mixed image needs the positive's pixels, which only the
   current batch has. So the bank serves the clustering (centroids that reflect the whole
   dataset), and the neighbours are searched among the batch's own keys (self excluded). The
   pool: ``0`` (default) = the images on the anchor's device, so neither the search nor the
   partner's pixels leave the device (on one device: the whole global batch, as before);
   ``N > 0`` = consecutive groups of N images (the same partners on any device count; nothing
   moves when N divides the per-device batch); ``-1`` = the whole global batch on any device
   count (on a pod the image batch is all-gathered every step, 633 MB at 8 chips for the
   ImageNet preset; a ``base.CrossDeviceTrafficWarning`` says so). A pool of 256 with C = 100
   clusters on CIFAR-10 gives ~2.5 same-cluster candidates per anchor; when none passes, the
   anchor falls back to itself (logged as ``clim/selected_frac``).
3. **Mixing.** ``lam ~ Beta(alpha, alpha)`` per anchor; ``x~_i = CutMix(x_1[i], x_1[j], lam)``
   (``ssl_jax.ops.mixing``: a box of area ~ (1 - lam) from ``x_1[j]`` pasted into ``x_1[i]``);
   ``w_i`` = the exact kept-area ratio of ``x_1[i]`` (not the nominal lam). ``x_1[j]`` comes
   from the anchor's pool (``gather.take_within_pools``).
4. **Loss** (``q~ = n(online(x~))``)::

       L_mix = mean_i [ w_i NCE(q~_i, k_i; Q) + (1 - w_i) NCE(q~_i, k_j; Q) ]
       NCE(q, k; Q) = -log( e^{q.k/tau} / (e^{q.k/tau} + sum_m e^{q.Q_m/tau}) )
       L_moco = mean over query views v in {x_1, x_lr0, x_lr1, ...} of mean_i NCE(q_v,i, k_i; Q)
       L = L_moco + mix_weight * L_mix

   The low-resolution crops (``data.views = 'multi_res'``: 'view_lr0', 'view_lr1', ...) are
   extra queries against the same keys; each resolution is its own static shape, so the step
   compiles once. ``x_1`` and ``x~`` share one online forward (a [2B] batch, so BatchNorm
   statistics are over both; concatenated per device, ``sharding.concat_per_device``); each
   low-resolution view is one more forward.
5. Enqueue ``k`` into the queue and into the bank (with labels and cluster ids).

Diagnostics: ``clim/selected_frac`` (anchors with a non-empty ``S(i)``), ``clim/num_selected``
(mean ``|S(i)|``), ``clim/pos_purity`` (selected positives sharing the anchor's label),
``clim/cluster_purity`` (bank rows whose label is the majority label of their cluster, at the
last clustering), ``clim/kmeans_objective`` (mean cosine to the centroid), ``clim/area_ratio``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ssl_jax import config_lib, utils, sharding
from ssl_jax.methods import base, moco
from ssl_jax.ops import gather, kmeans, knn, losses, memory_bank, mixing, selection, summaries

_HIGHEST = jax.lax.Precision.HIGHEST


def center_rule(anchor_feats: jax.Array, cand_feats: jax.Array, anchor_cluster: jax.Array,
                cand_clusters: jax.Array, centroids: jax.Array, present: jax.Array) -> jax.Array:
  """``keep_ij = present_ij and [a_j = a_i] and [z_j . c_{a_i} > z_i . c_{a_i}] and a_i >= 0``
  for anchors ``z_i`` [B, d] and their candidates ``z_j`` [B, k, d] (clusters [B], [B, k])."""
  anchor_cluster = jnp.asarray(anchor_cluster, jnp.int32)
  c = jnp.take(centroids.astype(jnp.float32), jnp.maximum(anchor_cluster, 0), axis=0)
  anchor_cos = jnp.einsum('bd,bd->b', anchor_feats.astype(jnp.float32), c, precision=_HIGHEST)
  cand_cos = jnp.einsum('bkd,bd->bk', cand_feats.astype(jnp.float32), c, precision=_HIGHEST)
  return (present & (cand_clusters == anchor_cluster[:, None]) &
          (cand_cos > anchor_cos[:, None]) & (anchor_cluster >= 0)[:, None])


def center_wise_select(anchor_feats: jax.Array, candidate_feats: jax.Array,
                       anchor_cluster: jax.Array, candidate_clusters: jax.Array,
                       centroids: jax.Array, k: int, *, exclude: jax.Array | None = None,
                       valid: jax.Array | None = None, mesh=None,
                       recall_target: float | None = None
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Center-wise local selection.

  For anchor ``i`` (unit ``z_i`` [B, d], cluster ``a_i`` [B]) and candidates ``z_j`` [N, d]
  with clusters ``a_j`` [N] and unit centroids ``c`` [C, d]::

      N_k(i) = top-k_j  z_i . z_j     (j != exclude[i], valid[j]; ties -> lowest j)
      keep_ij = [a_j = a_i] and [z_j . c_{a_i} > z_i . c_{a_i}]    for j in N_k(i)

  Returns ``indices`` [B, k] int32 (descending cosine; -1 where fewer than k candidates
  exist), ``keep`` [B, k] bool and ``scores`` [B, k] (the cosines). Anchors with
  ``a_i < 0`` keep nothing. The candidates may be sharded along 'data' (never gathered).
  ``recall_target`` < 1: approximate search (``knn.topk_cosine``).
  """
  scores, idx = knn.topk_excluding(anchor_feats, candidate_feats, k, exclude=exclude,
                                   valid=valid, mesh=mesh, recall_target=recall_target)
  present = idx >= 0
  safe = jnp.maximum(idx, 0)
  cand = gather.gather_rows(candidate_feats, safe, mesh=mesh).astype(jnp.float32)  # [B, k, d]
  cand_cluster = gather.gather_rows(candidate_clusters, safe, mesh=mesh)           # [B, k]
  keep = center_rule(anchor_feats, cand, anchor_cluster, cand_cluster, centroids, present)
  return idx, keep, scores


def center_wise_select_in_pools(feats: jax.Array, clusters: jax.Array, centroids: jax.Array,
                                k: int, pool: int, *, mesh=None,
                                recall_target: float | None = None
                                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``center_wise_select(z, z, a, a, c, k, exclude=arange(B))`` with the candidates of anchor
  ``i`` restricted to its pool of ``pool`` consecutive rows (``knn.topk_within_pools``)::

      N_k(i) = top-k_{j in pool(i), j != i}  z_i . z_j,   keep_ij as in ``center_rule``

  A pool on one device of ``mesh`` is searched and read on that device. With ``pool = B`` it
  equals the global search. Returns (indices [B, k] int32, -1 past ``pool - 1``; keep; scores).
  """
  scores, idx = knn.topk_within_pools(feats, k, pool, mesh=mesh, recall_target=recall_target)
  present = idx >= 0
  rows = jnp.arange(feats.shape[0], dtype=jnp.int32)[:, None]
  safe = jnp.where(present, idx, rows)                    # stays in the row's pool
  cand = gather.take_within_pools(feats, safe, pool, mesh=mesh).astype(jnp.float32)  # [B, k, d]
  cand_cluster = gather.take_within_pools(clusters, safe, pool, mesh=mesh)            # [B, k]
  keep = center_rule(feats, cand, clusters, cand_cluster, centroids, present)
  return idx, keep, scores


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
    self.partner_pool = int(m.get('partner_pool', 0))
    self.recall_target = float(config.knn.get('recall_target', 1.0))
    self.num_classes = int(config.data.num_classes)
    if not utils.is_set(m.kmeans_every_steps) and steps_per_epoch is None:
      raise ValueError('clim: method.kmeans_every_epochs needs steps_per_epoch (the trainer '
                       'passes it); or set method.kmeans_every_steps')
    self.kmeans_every = utils.steps(m, 'kmeans_every', steps_per_epoch or 1)
    extra = config.data.get('extra_resolutions') or ()
    self.query_views = ('view1',) + (
        tuple(f'view_lr{i}' for i in range(len(extra))) if config.data.views == 'multi_res'
        else ())

  @classmethod
  def validate_config(cls, config):
    super().validate_config(config)
    m = config.method
    req = config_lib.require

    def is_int(v):
      return isinstance(v, int) and not isinstance(v, bool)

    b = config.batch_size
    req(is_int(m.bank_size) and m.bank_size >= b, 'method.bank_size', m.bank_size,
        f'an integer >= batch_size ({b})')
    req(is_int(m.num_clusters) and 1 <= m.num_clusters <= m.bank_size, 'method.num_clusters',
        m.num_clusters, f'an integer in 1..bank_size ({m.bank_size})')
    req(is_int(m.kmeans_iters) and m.kmeans_iters >= 0, 'method.kmeans_iters', m.kmeans_iters,
        'an integer >= 0')
    req(is_int(m.k) and 1 <= m.k < b, 'method.k', m.k,
        f'an integer in 1..batch_size - 1 ({b - 1}); the neighbours are searched in the batch')
    req(isinstance(m.mix_alpha, (int, float)) and m.mix_alpha > 0, 'method.mix_alpha',
        m.mix_alpha, 'a Beta parameter > 0')
    req(isinstance(m.mix_weight, (int, float)) and m.mix_weight >= 0, 'method.mix_weight',
        m.mix_weight, 'a number >= 0')
    pool = m.get('partner_pool', 0)
    req(is_int(pool) and (pool in (0, -1) or (pool >= 2 and b % pool == 0)),
        'method.partner_pool', pool, '0 (the images of one device), -1 (the whole global batch) '
        f'or a divisor >= 2 of batch_size ({b})')
    req(m.kmeans_every_steps > 0 or m.kmeans_every_epochs > 0,
        'method.kmeans_every_steps/kmeans_every_epochs',
        (m.kmeans_every_steps, m.kmeans_every_epochs),
        'kmeans_every_steps > 0, or kmeans_every_epochs > 0')
    req(config.data.views in ('multi_res', 'moco'), 'data.views', config.data.views,
        'multi_res, moco (no low-resolution queries) for clim')

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

  def state_specs(self):
    # The bank and its ids are sharded; the centroids (C x d, read whole by every device to
    # assign keys) and the scalars are replicated.
    specs = super().state_specs()
    specs.update({'bank': P(sharding.DATA), 'bank_labels': P(sharding.DATA),
                  'bank_clusters': P(sharding.DATA), 'bank_ptr': P(), 'bank_count': P(),
                  'centroids': P(), 'kmeans_step': P(), 'kmeans_objective': P(),
                  'cluster_purity': P()})
    return specs

  # -------------------------------------------------------------------------------------------
  def refresh_clusters(self, state, step, rng, *, mesh):
    """k-means on the bank when it is full and the last clustering is ``kmeans_every`` steps
    old (or absent); otherwise the stored clustering. Returns the clustering fields."""
    keys = ('centroids', 'bank_clusters', 'kmeans_step', 'kmeans_objective', 'cluster_purity')
    last = state['kmeans_step']
    step = jnp.asarray(step, jnp.int32)
    full = state['bank_count'] >= self.bank_size
    due = full & ((last < 0) | (step - last >= self.kmeans_every))

    def run(_):
      cents, assign, obj = kmeans.kmeans(state['bank'], self.num_clusters, self.kmeans_iters, rng,
                                         mesh=mesh)
      purity = cluster_purity(assign, state['bank_labels'], self.num_clusters, self.num_classes)
      return {'centroids': cents.astype(jnp.float32), 'bank_clusters': assign.astype(jnp.int32),
              'kmeans_step': step, 'kmeans_objective': obj.astype(jnp.float32),
              'cluster_purity': purity.astype(jnp.float32)}

    def keep(_):
      return {key: state[key] for key in keys}

    return jax.lax.cond(due, run, keep, None)

  def select_partners(self, ctx, k, anchor_cluster, k_cluster, centroids, rng):
    """Step 2: center-wise local selection among the keys of each anchor's pool (self
    excluded) and one draw from ``S(i)``. Returns ``(j, has_sel, nn_idx, keep, nn_cos, pool)``."""
    b = k.shape[0]
    self_idx = jnp.arange(b, dtype=jnp.int32)
    pool = base.resolve_partner_pool('clim', self.partner_pool, b, ctx.num_devices)
    if pool == b:
      nn_idx, keep, nn_cos = center_wise_select(k, k, anchor_cluster, k_cluster, centroids,
                                                self.k, exclude=self_idx, mesh=ctx.mesh,
                                                recall_target=self.recall_target)
    else:
      nn_idx, keep, nn_cos = center_wise_select_in_pools(
          k, anchor_cluster, centroids, self.k, pool, mesh=ctx.mesh,
          recall_target=self.recall_target)
    j, has_sel = selection.sample_selected(rng, nn_idx, keep, self_idx)
    return j, has_sel, nn_idx, keep, nn_cos, pool

  def loss(self, ctx, batch):
    x1, x2 = batch['view1'], batch['view2']
    labels = batch['label']
    b = x1.shape[0]
    mesh, state = ctx.mesh, ctx.method_state
    r_km, r_pick, r_lam, r_box = jax.random.split(ctx.rng, 4)
    queue = state['queue']

    k = losses.l2_normalize(ctx.target_forward(ctx.batch_stats, x2)['proj'])

    # 1. clusters (refreshed on schedule), the batch keys' cluster ids. The barriers order the
    # clustering after the target forward and before every online forward: k-means' Lloyd loop
    # holds cross-device all-reduces, and letting them interleave with the networks' BatchNorm
    # all-reduces (independent in the dataflow) risks a collective deadlock (seen on
    # multi-device CPU runs with a similar loop).
    cl_keys = ('bank', 'bank_labels', 'bank_count', 'bank_clusters', 'centroids', 'kmeans_step',
               'kmeans_objective', 'cluster_purity')
    cl_in, k = jax.lax.optimization_barrier(({key: state[key] for key in cl_keys}, k))
    clus = self.refresh_clusters(cl_in, ctx.step, r_km, mesh=mesh)
    low_res = {key: batch[key] for key in self.query_views[1:]}
    clus, x1, low_res = jax.lax.optimization_barrier((clus, x1, low_res))
    has_clusters = clus['kmeans_step'] >= 0
    k_cluster, _ = kmeans.assign(k, clus['centroids'], mesh=mesh)
    anchor_cluster = jnp.where(has_clusters, k_cluster, -1)

    # 2. center-wise local selection among the keys of the anchor's pool (self excluded).
    j, has_sel, nn_idx, keep, nn_cos, pool = self.select_partners(
        ctx, k, anchor_cluster, k_cluster, clus['centroids'], r_pick)

    # 3. CutMix of the anchor's query view with the selected positive's query view.
    lam = mixing.sample_beta(r_lam, self.mix_alpha, self.mix_alpha, (b,))
    x_mix, w = mixing.cutmix(x1, gather.take_within_pools(x1, j, pool, mesh=mesh), lam, r_box)

    # 4. online forward: [x1; x~] together (per device), then each low-resolution query view.
    o, batch_stats = ctx.forward(ctx.batch_stats,
                                 sharding.concat_per_device([x1, x_mix], mesh=mesh))
    q1, q_mix = sharding.split_per_device(losses.l2_normalize(o['proj']), [b, b], mesh=mesh)
    l_inst, pos, neg = self.contrast(q1, k, queue, mesh=mesh)
    inst_terms = [l_inst]
    for key in self.query_views[1:]:
      o_r, batch_stats = ctx.forward(batch_stats, low_res[key])
      inst_terms.append(self.contrast(losses.l2_normalize(o_r['proj']), k, queue, mesh=mesh)[0])
    l_moco = sum(inst_terms) / len(inst_terms)
    k_j = gather.take_within_pools(k, j, pool, mesh=mesh)
    l_mix = losses.mixed_info_nce(q_mix, k, k_j, w, queue, self.temperature, mesh=mesh)
    loss = l_moco + self.mix_weight * l_mix

    # 5. enqueue keys (queue), keys + labels + cluster ids (bank).
    new_queue, new_qptr = memory_bank.enqueue(queue, state['queue_ptr'], k, mesh=mesh)
    ptr = state['bank_ptr']
    bank, new_ptr = memory_bank.enqueue(state['bank'], ptr, k, mesh=mesh)
    bank_labels, _ = memory_bank.enqueue(state['bank_labels'], ptr, labels, mesh=mesh)
    bank_clusters, _ = memory_bank.enqueue(clus['bank_clusters'], ptr, k_cluster, mesh=mesh)
    count = memory_bank.update_count(state['bank_count'], b, self.bank_size)
    new_state = {'queue': new_queue, 'queue_ptr': new_qptr, 'bank': bank,
                 'bank_labels': bank_labels, 'bank_clusters': bank_clusters, 'bank_ptr': new_ptr,
                 'bank_count': count, 'centroids': clus['centroids'],
                 'kmeans_step': clus['kmeans_step'],
                 'kmeans_objective': clus['kmeans_objective'],
                 'cluster_purity': clus['cluster_purity']}

    labels_j = gather.take_within_pools(labels, j, pool, mesh=mesh)
    labelled = (labels >= 0) & (labels_j >= 0) & has_sel
    same = labelled & (labels_j == labels)
    metrics = {'loss': loss, 'clim/loss_moco': l_moco, 'clim/loss_mix': l_mix,
               'clim/selected_frac': jnp.mean(has_sel.astype(jnp.float32)),
               'clim/num_selected': jnp.mean(jnp.sum(keep, axis=1).astype(jnp.float32)),
               'clim/pos_purity': jnp.sum(same) / jnp.maximum(jnp.sum(labelled), 1),
               'clim/nn_cos': jnp.mean(jnp.where(nn_idx >= 0, nn_cos, 0.0)),
               'clim/area_ratio': jnp.mean(w),
               'clim/kmeans_objective': clus['kmeans_objective'],
               'clim/cluster_purity': clus['cluster_purity'],
               'clim/has_clusters': has_clusters.astype(jnp.float32),
               **summaries.score_summary(pos, neg),
               **summaries.embedding_summary(
                   sharding.split_per_device(o['proj'], [b, b], mesh=mesh)[0])}
    feats = sharding.split_per_device(o['features'], [b, b], mesh=mesh)[0]
    return loss, base.LossAux(metrics, new_state, batch_stats, feats,
                              {'pos': pos, 'neg': neg[:, :64]})
