"""Exact nearest-neighbour search over a (sharded) memory bank, and kNN classification.

``topk_cosine`` is the search used by MSF (neighbours of the target in its bank), CLIM / CsMl
(local similar samples) and the kNN monitor / evaluation (``weighted_knn_predict``).

How the search is computed (exact, no approximation):

* The bank is scanned in blocks of ``block`` rows (``lax.fori_loop``): per block the scores
  ``S = Q @ bank_blk^T`` ([B, block], small enough to stay in cache) are reduced to their top-k,
  and merged with the running top-k. The full [B, N] score matrix is never materialised.
* Per block, the top-k uses the *chunk-maximum* trick: split the block's columns into chunks of
  ``c``; the top-k elements all lie in the k chunks with the largest maxima (if ``x`` is among the
  top k, its chunk's maximum is ``>= x``, and fewer than k chunks can have a maximum ``> x``). So
  ``top_k(S)`` = ``top_k`` over the ``k * c`` entries of those k chunks. Computing chunk maxima is
  a plain vectorised reduction, much cheaper on CPU than ``lax.top_k`` over all columns.
* Ties are broken towards the lowest bank index, exactly as ``jax.lax.top_k`` on the full row.
* On a bank sharded along ``'data'`` (leading axis) each shard runs the above on its rows
  (queries are replicated into the ``shard_map``), turns local indices into global ones
  (``+ shard_index * rows_per_shard``), and the ``[B, k * n_shards]`` candidates are merged by a
  second top-k. The bank never moves; only ``B * k`` scores and indices per shard do.

Entries of a bank that were never written (``valid[j] = False``) get score ``-inf`` and are
never returned; if fewer than ``k`` valid entries exist, the extra slots hold score ``-inf`` and
index ``-1``.

Approximate search (``recall_target`` < 1, ``config.knn.recall_target``): each block's top-k is
``jax.lax.approx_max_k(S, k, recall_target)`` instead of the exact chunk-maximum top-k (the
merges stay exact). On TPU it is the hardware's partial-reduce top-k (Chern et al. 2022,
arXiv 2206.14286): each true neighbour is returned with probability ~``recall_target``. On CPU
and GPU XLA lowers it to an exact top-k, so results equal the exact search there.
``None`` or ``1.0``: exact (the default).

In-batch searches: ``topk_excluding`` (the queries are the candidates, self excluded) and
``topk_within_pools`` (the same within pools of consecutive rows, e.g. the images of one
device: the search never leaves the device).

The mesh is an argument (``mesh``: a ``Mesh``, or its ``AbstractMesh`` inside ``jax.jit``);
``None`` means one device (the ambient mesh is not read).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ssl_jax import sharding

# Target size (elements) of one block of scores [B, block]: 2M f32 = 8 MiB. Measured on a 2-core
# CPU (benchmarks/bench_knn.py): blocks of 8k-32k bank rows for B = 256 beat one big matmul.
_BLOCK_ELEMS = 1 << 21
_MIN_BLOCK = 1024
_MAX_CHUNK = 256


def _chunk_size(block: int, k: int) -> int:
  """Largest power of two ``c <= 256`` with ``4 k c <= block`` and ``c | block`` (0: no chunking)."""
  c = _MAX_CHUNK
  while c >= 2 and (4 * k * c > block or block % c):
    c //= 2
  return c if c >= 2 else 0


def _merge_topk(s_a, i_a, s_b, i_b, k):
  """Top-k of the union of two candidate lists (``a`` first, so ties prefer ``a``)."""
  s = jnp.concatenate([s_a, s_b], axis=1)
  i = jnp.concatenate([i_a, i_b], axis=1)
  s, j = jax.lax.top_k(s, k)
  return s, jnp.take_along_axis(i, j, axis=1)


def _exact(recall_target) -> bool:
  return recall_target is None or float(recall_target) >= 1.0


def _block_topk(s, k, keep=None, bias=None, recall_target=None):
  """Exact ``top_k`` of the rows of ``s + bias`` [B, M]; entries with ``keep == False`` are -inf.

  ``keep`` (bool) and ``bias`` (f32) are [M] or None. Returns scores [B, k] and column indices
  [B, k] int32 (k <= M). ``recall_target`` < 1: ``jax.lax.approx_max_k`` instead.
  """
  b, m = s.shape

  def adjust(vals, cols=None):  # vals: all M columns, or [B, M'] taken at columns ``cols``
    if bias is not None:
      vals = vals + (bias[None, :] if cols is None else jnp.take(bias, cols))
    if keep is not None:
      vals = jnp.where(keep[None, :] if cols is None else jnp.take(keep, cols), vals, -jnp.inf)
    return vals

  if not _exact(recall_target):
    v, j = jax.lax.approx_max_k(adjust(s), k, recall_target=float(recall_target))
    return v, j.astype(jnp.int32)
  c = _chunk_size(m, k)
  if c == 0 or m // c < k:
    v, j = jax.lax.top_k(adjust(s), k)
    return v, j.astype(jnp.int32)
  nc = m // c
  cmax = jnp.max(adjust(s).reshape(b, nc, c), axis=-1)   # [B, nc]
  _, ci = jax.lax.top_k(cmax, k)                                       # the best k chunks
  ci = jnp.sort(ci, axis=-1).astype(jnp.int32)                         # index order: ties -> low
  cols = (ci[:, :, None] * c + jnp.arange(c, dtype=jnp.int32)).reshape(b, k * c)
  cand = adjust(jnp.take_along_axis(s, cols, axis=1), cols)            # [B, k*c]
  v, j = jax.lax.top_k(cand, k)
  return v, jnp.take_along_axis(cols, j, axis=1)


def _scores(q, rows, precision):
  return jnp.einsum('bd,nd->bn', q, rows, precision=precision,
                    preferred_element_type=jnp.float32)


def _default_block_rows(b: int, k: int) -> int:
  """~2M scores per block; for large k (each block costs top_k calls of size k) >= 160 k rows."""
  rows = max(_MIN_BLOCK, _BLOCK_ELEMS // max(b, 1), 160 * k)
  return max(_MAX_CHUNK, (rows // _MAX_CHUNK) * _MAX_CHUNK)


def _local_topk(q, bank, k, keep=None, bias=None, *, precision=None, block_rows=None,
                recall_target=None):
  """Exact top-k of ``q @ bank^T + bias`` over one device's bank rows (``keep``: bool mask).

  Returns (scores [B, k] f32, indices [B, k] int32, local to ``bank``). If ``k > N`` the extra
  slots hold -inf / index 0 (callers mask them).
  """
  n = bank.shape[0]
  b = q.shape[0]
  kk = min(k, n)
  block_rows = max(block_rows or _default_block_rows(b, kk), 4 * kk)
  if n <= block_rows:
    v, i = _block_topk(_scores(q, bank, precision), kk, keep, bias, recall_target)
  else:
    nb = -(-n // block_rows)
    ragged = n % block_rows != 0
    col = jnp.arange(block_rows, dtype=jnp.int32)

    def block(t):
      # The last block is shifted back to end at row n; rows already seen are masked.
      start = jnp.minimum(t * block_rows, n - block_rows)
      rows = jax.lax.dynamic_slice_in_dim(bank, start, block_rows, axis=0)
      s = _scores(q, rows, precision)
      kp = None if keep is None else jax.lax.dynamic_slice_in_dim(keep, start, block_rows)
      if ragged:
        fresh = start + col >= t * block_rows
        kp = fresh if kp is None else kp & fresh
      bs = None if bias is None else jax.lax.dynamic_slice_in_dim(bias, start, block_rows)
      v, j = _block_topk(s, kk, kp, bs, recall_target)
      return v, j + start

    # Block 0 outside the loop gives the initial carry (with the right sharding/vma type).
    v, i = jax.lax.fori_loop(1, nb, lambda t, c: _merge_topk(*c, *block(t), kk),
                             block(jnp.int32(0)))
  if kk < k:
    v = jnp.concatenate([v, jnp.full((b, k - kk), -jnp.inf, v.dtype)], axis=1)
    i = jnp.concatenate([i, jnp.zeros((b, k - kk), i.dtype)], axis=1)
  return v, i


def _search(q, bank, k, keep=None, bias=None, payload=None, *, mesh=None, precision=None,
            block_rows=None, recall_target=None):
  """Shared implementation: (scores, global indices, ``payload[indices]`` or None).

  ``keep`` [N] bool, ``bias`` [N] f32 and ``payload`` [N, ...] are sharded like the bank.
  """
  n_dev = sharding.mesh_data_size(mesh)
  n = bank.shape[0]
  kw = dict(precision=precision, block_rows=block_rows, recall_target=recall_target)
  if n_dev == 1 or n % n_dev:
    v, i = _local_topk(q, bank, k, keep, bias, **kw)
    return v, i, (None if payload is None else jnp.take(payload, i, axis=0))
  rows = n // n_dev
  opt = [a for a in (keep, bias, payload) if a is not None]
  has = (keep is not None, bias is not None, payload is not None)

  def per_shard(q, bank, *opt):
    it = iter(opt)
    kp, bs, pl = (next(it) if h else None for h in has)
    v, i = _local_topk(q, bank, k, kp, bs, **kw)
    out = (v[None], (i + jax.lax.axis_index(sharding.DATA) * rows)[None])
    if pl is not None:
      out += (jnp.take(pl, i, axis=0)[None],)
    return out

  spec = P(sharding.DATA)
  outs = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), spec) + (spec,) * len(opt),
                       out_specs=(spec,) * (2 + has[2]))(q, bank, *opt)
  # Merge the [n_dev, B, k] candidates (shard order = index order, so ties prefer low indices).
  b = q.shape[0]
  flat = [jnp.moveaxis(o, 0, 1).reshape((b, n_dev * k) + o.shape[3:]) for o in outs]
  v, j = jax.lax.top_k(flat[0], k)
  i = jnp.take_along_axis(flat[1], j, axis=1)
  pay = None
  if payload is not None:
    pay = jnp.take_along_axis(flat[2], j.reshape(j.shape + (1,) * (payload.ndim - 1)), axis=1)
  return v, i, pay


def topk_cosine(queries: jax.Array, bank: jax.Array, k: int, *, valid: jax.Array | None = None,
                mesh=None, precision=None, block_rows: int | None = None,
                recall_target: float | None = None) -> tuple[jax.Array, jax.Array]:
  """Exact top-k of cosine scores: ``S = Q B^T``, ``(scores, indices) = top_k(S_b, k)``.

  ``queries`` [B, d] and ``bank`` [N, d] are L2-normalised (this is a maximum inner product
  search; normalisation is the caller's). ``valid`` (bool [N], optional): rows with
  ``valid[j] = False`` score ``-inf`` and are never returned; slots left over when fewer than
  ``k`` rows are valid hold score ``-inf`` and index ``-1``.

  Returns ``scores`` [B, k] float32 (descending) and ``indices`` [B, k] int32 into ``bank``;
  ties go to the lowest index (as ``jax.lax.top_k``). Sharded bank (``mesh`` with a ``'data'``
  axis of size > 1, ``N`` divisible by it): shard-local top-k + global merge, the bank is never
  gathered; otherwise (``mesh=None`` included) the single-device path. ``precision`` is passed to the
  matmul (``None``: backend default, exact f32 on CPU). ``block_rows``: rows per scan block
  (default ``max(2M / B, 160 k)``). ``recall_target`` in (0, 1): approximate per-block top-k
  (``jax.lax.approx_max_k``; exact on CPU/GPU, see the module docstring); None or 1: exact.
  """
  if k < 1:
    raise ValueError(f'k={k} is invalid; accepted: an integer >= 1')
  if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
    raise ValueError(f'queries {queries.shape} and bank {bank.shape} must be [B, d] and [N, d]')
  if valid is not None and tuple(valid.shape) != (bank.shape[0],):
    raise ValueError(f'valid has shape {valid.shape}; expected ({bank.shape[0]},)')
  keep = None if valid is None else jnp.asarray(valid, bool)
  _check_recall(recall_target)
  v, i, _ = _search(queries, bank, k, keep, mesh=mesh, precision=precision,
                    block_rows=block_rows, recall_target=recall_target)
  i = jnp.where(v == -jnp.inf, -1, i).astype(jnp.int32)
  return v, i


def _check_recall(recall_target) -> None:
  if recall_target is not None and not 0.0 < float(recall_target) <= 1.0:
    raise ValueError(f'recall_target={recall_target!r} is invalid; accepted: a number in (0, 1] '
                     'or None (1 and None: exact)')


def topk_excluding(queries: jax.Array, candidates: jax.Array, k: int, *,
                   exclude: jax.Array | None = None, valid: jax.Array | None = None,
                   mesh=None, recall_target: float | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """``topk_cosine`` without candidate ``exclude[b]`` for query ``b`` (e.g. itself, when the
  queries are the candidates)::

      (scores, indices)_b = top-k_{j != exclude[b], valid[j]}  q_b . c_j

  Computed as the top ``k + 1`` with the excluded entry (if present) removed, the others keeping
  their order (ties -> lowest index). Returns (scores [B, k] f32, indices [B, k] int32; -inf /
  -1 where fewer than k candidates exist).
  """
  if exclude is None:
    return topk_cosine(queries, candidates, k, valid=valid, mesh=mesh,
                       recall_target=recall_target)
  scores, idx = topk_cosine(queries, candidates, k + 1, valid=valid, mesh=mesh,
                            recall_target=recall_target)
  is_ex = idx == jnp.asarray(exclude, jnp.int32)[:, None]
  order = jnp.argsort(is_ex.astype(jnp.int32), axis=1, stable=True)[:, :k]
  return (jnp.take_along_axis(scores, order, axis=1), jnp.take_along_axis(idx, order, axis=1))


def topk_within_pools(feats: jax.Array, k: int, pool: int, *, mesh=None,
                      recall_target: float | None = None) -> tuple[jax.Array, jax.Array]:
  """Nearest rows of the same pool, self excluded: with pools of ``pool`` consecutive rows
  (``P(b) = {p * pool .. (p + 1) * pool - 1}`` for ``p = b // pool``)::

      (scores, indices)_b = top-k_{j in P(b), j != b}  f_b . f_j

  ``feats`` [B, d] L2-normalised, ``pool`` divides B. Returns (scores [B, k] f32, global
  indices [B, k] int32; ties -> lowest index; -inf / -1 in the slots beyond ``pool - 1``).
  With one pool (``pool = B``) this is ``topk_excluding(f, f, k, exclude=arange(B))`` (the
  sharded search); with several, one ``[pool, pool]`` score block per pool, so a pool that lies
  on one device of ``mesh`` is searched on that device (nothing moves).
  """
  b, _ = feats.shape
  if b % pool:
    raise ValueError(f'pool={pool} does not divide the {b} rows')
  _check_recall(recall_target)
  if pool == b:
    return topk_excluding(feats, feats, k, exclude=jnp.arange(b, dtype=jnp.int32), mesh=mesh,
                          recall_target=recall_target)
  n = sharding.mesh_data_size(mesh)
  if n == 1 or (b // n) % pool:      # one device, or pools spanning devices (XLA moves rows)
    return _pools_topk(feats, k, pool, recall_target, 0)

  def per_shard(f):
    return _pools_topk(f, k, pool, recall_target, jax.lax.axis_index(sharding.DATA) * (b // n))

  spec = P(sharding.DATA)
  return jax.shard_map(per_shard, mesh=mesh, in_specs=spec,
                       out_specs=(spec, spec), check_vma=False)(feats)


def _pools_topk(feats, k, pool, recall_target, offset):
  """``topk_within_pools`` of the rows ``feats`` (whole pools); indices + ``offset``."""
  b = feats.shape[0]
  g = b // pool
  f = feats.reshape(g, pool, feats.shape[-1])
  s = jnp.einsum('gid,gjd->gij', f, f, preferred_element_type=jnp.float32)
  s = jnp.where(jnp.eye(pool, dtype=bool)[None], -jnp.inf, s)
  kk = min(k, pool)
  if _exact(recall_target):
    v, j = jax.lax.top_k(s, kk)
  else:
    v, j = jax.lax.approx_max_k(s, kk, recall_target=float(recall_target))
  idx = j.astype(jnp.int32) + (jnp.arange(g, dtype=jnp.int32) * pool)[:, None, None] + offset
  v, idx = v.reshape(b, kk), idx.reshape(b, kk)
  if kk < k:
    v = jnp.concatenate([v, jnp.full((b, k - kk), -jnp.inf, v.dtype)], axis=1)
    idx = jnp.concatenate([idx, jnp.zeros((b, k - kk), jnp.int32)], axis=1)
  return v, jnp.where(v == -jnp.inf, -1, idx)


def knn_vote(sims: jax.Array, labels: jax.Array, num_classes: int, *,
             temperature: float = 0.1, weighting: str = 'exp') -> jax.Array:
  """Class scores from neighbours: ``score[b, c] = sum_j w_bj [labels_bj = c]``.

  ``sims`` [B, k] (``-inf`` = no neighbour, weight 0), ``labels`` [B, k] int.
  ``weighting='exp'``: ``w = exp(sim / T)`` (InstDisc / lightly kNN monitor);
  ``weighting='none'``: ``w = 1`` (majority vote, as MSF's 1-NN / 20-NN). Returns [B, C] f32.
  A prefix ``sims[:, :k']`` gives the vote of the ``k'`` nearest, so one search serves a k sweep.
  """
  sims = sims.astype(jnp.float32)
  present = sims > -jnp.inf
  if weighting == 'exp':
    w = jnp.exp(jnp.where(present, sims, 0.0) / temperature)
  elif weighting == 'none':
    w = jnp.ones_like(sims)
  else:
    raise ValueError(f"weighting={weighting!r} is invalid; accepted: 'exp', 'none'")
  w = jnp.where(present & (labels >= 0), w, 0.0)
  rows = jnp.broadcast_to(jnp.arange(sims.shape[0])[:, None], sims.shape)
  return jnp.zeros((sims.shape[0], num_classes), jnp.float32).at[rows, labels].add(
      w, mode='drop')


@functools.partial(jax.jit, static_argnames=('num_classes', 'k', 'temperature', 'metric',
                                             'weighting', 'chunk_size', 'mesh', 'recall_target'))
def _knn_predict(query_feats, bank_feats, bank_labels, valid, *, num_classes, k, temperature,
                 metric, weighting, chunk_size, mesh, recall_target):
  qn = query_feats.shape[0]
  bank_feats = bank_feats.astype(jnp.float32)
  bias = None
  if metric == 'euclidean':  # argmax_j (2 q.b_j - |b_j|^2) = argmin_j |q - b_j|^2
    bias = -jnp.sum(bank_feats * bank_feats, axis=1)
  n_chunks = -(-qn // chunk_size)
  pad = n_chunks * chunk_size - qn
  q = jnp.pad(query_feats.astype(jnp.float32), ((0, pad), (0, 0)))
  q = q.reshape(n_chunks, chunk_size, q.shape[1])

  def one_chunk(qc):
    scale = 2.0 if metric == 'euclidean' else 1.0
    v, _, lab = _search(qc * scale, bank_feats, k, valid, bias, bank_labels, mesh=mesh,
                        recall_target=recall_target)
    if metric == 'euclidean':
      d2 = jnp.sum(qc * qc, axis=1, keepdims=True) - v     # |q - b|^2
      v = jnp.where(v > -jnp.inf, -jnp.sqrt(jnp.maximum(d2, 0.0)), -jnp.inf)
    return knn_vote(v, lab, num_classes, temperature=temperature, weighting=weighting)

  scores = jax.lax.map(one_chunk, q)
  return scores.reshape(n_chunks * chunk_size, num_classes)[:qn]


def weighted_knn_predict(query_feats: jax.Array, bank_feats: jax.Array, bank_labels: jax.Array,
                         num_classes: int, k: int = 200, temperature: float = 0.1,
                         metric: str = 'cosine', chunk_size: int = 256, *,
                         weighting: str = 'exp', valid: jax.Array | None = None,
                         mesh=None, recall_target: float | None = None) -> jax.Array:
  """kNN classifier scores ``score[q, c] = sum_{j in NN_k(q)} w_qj [y_j = c]``.

  ``metric='cosine'``: features are L2-normalised by the caller, ``sim = q . b_j`` and
  ``NN_k`` are the k largest; ``metric='euclidean'``: ``NN_k`` are the k nearest in L2 and
  ``sim = -||q - b_j||``. Weights (``knn_vote``): ``w = exp(sim / T)`` for ``weighting='exp'``
  (the InstDisc / lightly weighted kNN, k = 200, T = 0.1) or ``w = 1`` for
  ``weighting='none'`` (unweighted majority vote). Queries are processed on device in chunks of
  ``chunk_size`` (``lax.map``); the bank may be sharded along ``'data'`` of ``mesh`` (never
  gathered).

  Returns class scores [Q, num_classes] float32; the prediction is ``scores.argmax(-1)``
  (ties -> lowest class id). Rows with ``valid = False`` or label < 0 are ignored.
  ``recall_target`` (``config.knn.recall_target``): < 1 searches with ``jax.lax.approx_max_k``
  (TPU; exact on CPU/GPU), None or 1 exactly.
  """
  if metric not in ('cosine', 'euclidean'):
    raise ValueError(f"metric={metric!r} is invalid; accepted: 'cosine', 'euclidean'")
  if weighting not in ('exp', 'none'):
    raise ValueError(f"weighting={weighting!r} is invalid; accepted: 'exp', 'none'")
  n = bank_feats.shape[0]
  if not 1 <= k <= n:
    raise ValueError(f'k={k} is invalid for a bank of {n} rows; accepted: 1..{n}')
  query_feats = jnp.asarray(query_feats)
  chunk_size = int(max(1, min(chunk_size, query_feats.shape[0])))
  _check_recall(recall_target)
  recall_target = None if _exact(recall_target) else float(recall_target)
  return _knn_predict(query_feats, jnp.asarray(bank_feats),
                      jnp.asarray(bank_labels).astype(jnp.int32),
                      None if valid is None else jnp.asarray(valid, bool),
                      num_classes=int(num_classes), k=int(k), temperature=float(temperature),
                      metric=metric, weighting=weighting, chunk_size=chunk_size, mesh=mesh,
                      recall_target=recall_target)


__all__ = ['topk_cosine', 'topk_excluding', 'topk_within_pools', 'knn_vote',
           'weighted_knn_predict']
