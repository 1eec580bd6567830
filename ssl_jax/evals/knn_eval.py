r"""Offline kNN evaluation (``--mode=knn``): k and temperature sweeps on frozen features.

    python -m ssl_jax.main --mode=knn --config=configs/eval_knn.py:cifar10 \
        --config.pretrained=WORKDIR --workdir=EVAL_DIR

The bank is the train split's features (centre crop, no augmentation, eval-mode network), the
queries the eval split's. Features are the backbone's (average pool / CLS) or the projector's
output (``features='projector'``). Two classifiers, both labelled in the tag:

* **weighted** (InstDisc / lightly): cosine similarity ``s`` of L2-normalised features, the
  ``k`` nearest vote with weight ``exp(s / T)``; every ``k`` in ``ks`` x ``T`` in
  ``temperatures`` (lightly's k = 200, T = 0.1 by default). Tag
  ``offline_knn/top1_weighted_k200_t0.1``.
* **unweighted** (MSF): majority vote of the ``k`` nearest, ``k`` in ``unweighted_ks``
  (MSF reports 1-NN and 20-NN). Tag ``offline_knn/top1_unweighted_k20``.

``metric='euclidean'`` ranks by L2 distance instead (``s = -|q - b|``; features are
L2-normalised first only if ``l2_normalize``). Everything runs on device: the bank is sharded
along ``'data'``, queries are processed in chunks of ``chunk_size``; with the cosine metric one
search for the largest k serves the whole sweep (the k nearest are a prefix of the k_max
nearest). Ties in the vote go to the lowest class id.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import config_lib, sharding
from ssl_jax import writers
from ssl_jax.evals import devices, eval_config, evaluators, features, metrics, report
from ssl_jax.evals import pretrained as pre_lib
from ssl_jax.ops import knn as knn_ops
from ssl_jax.ops import losses

METRICS = ('cosine', 'euclidean')
TAG = 'offline_knn'


def weighted_name(k: int, t: float) -> str:
  return f'weighted_k{k}_t{t:g}'


def unweighted_name(k: int) -> str:
  return f'unweighted_k{k}'


def _settings(ks, temperatures, unweighted_ks, n):
  out = []
  for k in ks:
    for t in temperatures:
      out.append((weighted_name(k, t), min(int(k), n), float(t), 'exp'))
  for k in unweighted_ks:
    out.append((unweighted_name(k), min(int(k), n), 1.0, 'none'))
  return out


@functools.partial(jax.jit, static_argnames=('k', 'chunk_size', 'mesh', 'recall_target'))
def _search_chunks(queries, bank, bank_labels, valid, *, k, chunk_size, mesh,
                   recall_target=None):
  """Top-k cosine scores [Q, k] and the neighbours' labels [Q, k], queries in chunks."""
  q = queries.shape[0]
  n_chunks = -(-q // chunk_size)
  qp = jnp.pad(queries, ((0, n_chunks * chunk_size - q), (0, 0)))
  qp = qp.reshape(n_chunks, chunk_size, queries.shape[1])

  def one(qc):
    s, i = knn_ops.topk_cosine(qc, bank, k, valid=valid, mesh=mesh,
                               recall_target=recall_target)
    lab = jnp.where(i >= 0, jnp.take(bank_labels, jnp.maximum(i, 0), axis=0), -1)
    return s, lab

  s, lab = jax.lax.map(one, qp)
  return s.reshape(-1, k)[:q], lab.reshape(-1, k)[:q]


@functools.partial(jax.jit, static_argnames=('k', 'num_classes', 'temperature', 'weighting'))
def _vote(sims, labels, *, k, num_classes, temperature, weighting):
  return knn_ops.knn_vote(sims[:, :k], labels[:, :k], num_classes, temperature=temperature,
                          weighting=weighting)


def knn_classify(bank_feats, bank_labels, query_feats, *, num_classes: int,
                 ks: Sequence[int] = (200,), temperatures: Sequence[float] = (0.1,),
                 unweighted_ks: Sequence[int] = (), metric: str = 'cosine',
                 l2_normalize: bool = True, chunk_size: int = 256, mesh=None,
                 recall_target: float | None = None) -> dict[str, np.ndarray]:
  """Class scores ``[Q, C]`` of every kNN setting, keyed ``weighted_k{k}_t{T}`` /
  ``unweighted_k{k}``. ``k`` larger than the bank is clipped to the bank size.

  ``metric='cosine'`` L2-normalises both sides (always); ``'euclidean'`` only if
  ``l2_normalize``. Bank rows with label < 0 never vote.
  """
  if metric not in METRICS:
    raise ValueError(f'metric={metric!r} is invalid; accepted: {", ".join(METRICS)}')
  bank = np.asarray(bank_feats, np.float32)
  labels = np.asarray(bank_labels, np.int32)
  queries = np.asarray(query_feats, np.float32)
  if metric == 'cosine' or l2_normalize:
    bank = np.asarray(losses.l2_normalize(jnp.asarray(bank)))
    queries = np.asarray(losses.l2_normalize(jnp.asarray(queries)))
  n = len(labels)
  settings = _settings(ks, temperatures, unweighted_ks, n)
  if not settings:
    raise ValueError('no kNN setting: ks/temperatures and unweighted_ks are all empty')
  n_dev = 1 if mesh is None else mesh.shape[sharding.DATA]
  pad = (-n) % n_dev
  valid = np.arange(n + pad) < n
  bank_p = np.concatenate([bank, np.zeros((pad, bank.shape[1]), np.float32)]) if pad else bank
  labels_p = np.concatenate([labels, -np.ones(pad, np.int32)]) if pad else labels
  if mesh is not None:
    spec = NamedSharding(mesh, P(sharding.DATA))
    bank_d, labels_d, valid_d = (jax.device_put(x, spec) for x in (bank_p, labels_p, valid))
  else:
    bank_d, labels_d, valid_d = jnp.asarray(bank_p), jnp.asarray(labels_p), jnp.asarray(valid)
  q_d = jnp.asarray(queries)
  chunk = int(max(1, min(chunk_size, len(queries))))
  out = {}
  if metric == 'cosine':
    kmax = max(k for _, k, _, _ in settings)
    sims, nb_labels = _search_chunks(q_d, bank_d, labels_d, valid_d, k=kmax,
                                     chunk_size=chunk, mesh=mesh, recall_target=recall_target)
    for name, k, t, w in settings:
      out[name] = np.asarray(_vote(sims, nb_labels, k=k, num_classes=int(num_classes),
                                   temperature=t, weighting=w))
  else:
    for name, k, t, w in settings:
      out[name] = np.asarray(knn_ops.weighted_knn_predict(
          q_d, bank_d, labels_d, int(num_classes), k=k, temperature=t, metric='euclidean',
          chunk_size=chunk, weighting=w, valid=valid_d, mesh=mesh))
  return out


def accuracies(scores: dict[str, np.ndarray], labels) -> dict[str, float]:
  """``top1_<setting>`` and ``top5_<setting>`` (top-5 capped at the number of classes)."""
  labels = jnp.asarray(labels, jnp.int32)
  n = max(int(jnp.sum(labels >= 0)), 1)
  out = {}
  for name, s in scores.items():
    c = s.shape[-1]
    corr = metrics.topk_correct(jnp.asarray(s), labels, (1, min(5, c)))
    out[f'top1_{name}'] = float(corr[1]) / n
    out[f'top5_{name}'] = float(corr[min(5, c)]) / n
  return out


def validate(c: ml_collections.ConfigDict) -> None:
  eval_config.validate_common(c)
  req = config_lib.require
  req(c.metric in METRICS, 'metric', c.metric, ', '.join(METRICS))
  req(c.features in pre_lib.FEATURES, 'features', c.features, ', '.join(pre_lib.FEATURES))
  for key in ('ks', 'unweighted_ks'):
    v = tuple(c[key])
    req(all(isinstance(k, int) and k >= 1 for k in v), key, v, 'a list of integers >= 1')
  t = tuple(c.temperatures)
  req(all(isinstance(x, (int, float)) and x > 0 for x in t), 'temperatures', t,
      'a list of numbers > 0')
  req(bool(c.ks and c.temperatures) or bool(c.unweighted_ks), 'ks/unweighted_ks',
      (tuple(c.ks), tuple(c.unweighted_ks)), 'at least one k')
  req(isinstance(c.chunk_size, int) and c.chunk_size > 0, 'chunk_size', c.chunk_size,
      'a positive integer')


def holdout_split(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices ``(fit, held_out)`` of a seeded, class-stratified split of the train features:
  ``round(fraction * n_c)`` of each class ``c`` (at least one when the class has two or more)
  are held out. Used to choose k and T without looking at the test split."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  held = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    m = int(round(fraction * len(idx)))
    if len(idx) >= 2:
      m = min(max(m, 1), len(idx) - 1)
    else:
      m = 0
    held.append(rng.permutation(idx)[:m])
  held = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
  fit = np.setdiff1d(np.arange(len(labels)), held)
  return fit, held


def _grid(settings_acc: dict[str, float], acc5: dict[str, float]) -> list[dict[str, Any]]:
  """The sweep as a list in numeric order (weighted by k then T, then unweighted by k)."""
  rows = []
  for name, top1 in settings_acc.items():
    if name.startswith('weighted_'):
      k, t = name[len('weighted_k'):].split('_t')
      key = (0, int(k), float(t))
      row = {'setting': name, 'weighting': 'exp', 'k': int(k), 'temperature': float(t)}
    else:
      key = (1, int(name[len('unweighted_k'):]), 0.0)
      row = {'setting': name, 'weighting': 'none', 'k': key[1]}
    row.update({'top1': top1, 'top5': acc5[name]})
    rows.append((key, row))
  return [r for _, r in sorted(rows, key=lambda kr: kr[0])]


def run(config: ml_collections.ConfigDict, workdir: str, **unused) -> dict[str, Any]:
  """``--mode=knn``: k and T chosen on a held-out part of the train split; test accuracy of that
  setting, plus the whole grid on the test split for reference (labelled, never used to choose).
  Also in ``EVAL_DIR/results.json`` and TensorBoard."""
  del unused
  validate(config)
  frac = float(config.get('selection_holdout', 0.1))
  config_lib.require(0.0 < frac < 1.0, 'selection_holdout', frac, 'a fraction in (0, 1)')
  mesh = devices.eval_mesh(config)
  pre, data_cfg, net, pre_step = pre_lib.load_for_eval(config)
  t0 = time.time()
  kw_knn = dict(num_classes=int(data_cfg.num_classes), ks=tuple(config.ks),
                temperatures=tuple(config.temperatures),
                unweighted_ks=tuple(config.unweighted_ks), metric=config.metric,
                l2_normalize=config.l2_normalize, chunk_size=config.chunk_size, mesh=mesh)
  with jax.set_mesh(mesh):
    variables = net.variables(mesh)
    fn = jax.jit(net.feature_fn(config.features))
    kw = dict(mesh=mesh, batch_size=config.eval_batch_size)
    bank = features.extract(fn, variables, data_cfg, split=data_cfg.train_split,
                           max_examples=config.train_examples, **kw)
    test = features.extract(fn, variables, data_cfg, split=data_cfg.eval_split,
                           max_examples=config.eval_examples, **kw)
    t_feat = time.time() - t0
    # 1. Selection on the train split: the held-out part queries the rest.
    fit, held = holdout_split(bank['label'], frac, int(config.get('selection_seed', 0)))
    val_scores = knn_classify(bank['features'][fit], bank['label'][fit],
                              bank['features'][held], **kw_knn)
    # 2. Test: the whole train split is the bank.
    scores = knn_classify(bank['features'], bank['label'], test['features'], **kw_knn)
  val_acc = accuracies(val_scores, bank['label'][held])
  acc = accuracies(scores, test['label'])
  names = list(scores)
  selected = max(names, key=lambda n: (val_acc[f'top1_{n}'], -names.index(n)))
  writer = writers.create(workdir, just_logging=jax.process_index() > 0)
  writer.write_scalars(pre_step, {f'{TAG}/{k}': v for k, v in acc.items()})
  writer.write_scalars(pre_step, {f'{TAG}/selected_top1': acc[f'top1_{selected}'],
                                  f'{TAG}/selected_top5': acc[f'top5_{selected}']})
  writer.flush()
  test_grid = _grid({n: acc[f'top1_{n}'] for n in names}, {n: acc[f'top5_{n}'] for n in names})
  val_grid = _grid({n: val_acc[f'top1_{n}'] for n in names},
                   {n: val_acc[f'top5_{n}'] for n in names})
  out: dict[str, Any] = {
      'selected': selected,
      'selected_on': f'{len(held)} held-out {data_cfg.train_split} images (bank: the other '
                     f'{len(fit)}); seed {int(config.get("selection_seed", 0))}',
      'selected_holdout_top1': val_acc[f'top1_{selected}'],
      'test_top1': acc[f'top1_{selected}'], 'test_top5': acc[f'top5_{selected}'],
      'holdout_grid': val_grid,
      'test_grid_for_reference_only': test_grid,
      'accuracies': acc,
      'pretrained': config.pretrained, 'pretrained_step': pre_step, 'method': pre.method.name,
      'backbone': pre.model.backbone, 'dataset': data_cfg.name, 'features': config.features,
      'metric': config.metric, 'bank_size': int(len(bank['label'])),
      'num_queries': int(len(test['label'])), 'time_features_s': t_feat,
      'time_s': time.time() - t0}
  report.write_json(workdir, 'results.json', out)
  lines = [f'  {r["setting"]:<28} held-out top-1 {100 * v["top1"]:6.2f}% | test top-1 '
           f'{100 * r["top1"]:6.2f}% | test top-5 {100 * r["top5"]:6.2f}%'
           for r, v in zip(test_grid, val_grid)]
  report.log(f'Offline kNN ({config.features} features, {config.metric}; bank '
             f'{out["bank_size"]} {data_cfg.train_split}, {out["num_queries"]} '
             f'{data_cfg.eval_split} queries). Grid (test column for reference only):\n'
             + '\n'.join(lines) +
             f'\nSelected on {out["selected_on"]}: {selected} -> test top-1 '
             f'{100 * out["test_top1"]:.2f}% | top-5 {100 * out["test_top5"]:.2f}%. '
             f'Written to {workdir}/results.json.')
  return out


# =============================================================================================
# The kNN evaluator (config.evals.<name>.type = 'knn', during training and in --mode=eval)
# =============================================================================================
class KnnEvaluator(evaluators.Evaluator):
  """Weighted kNN top-1 of frozen features (``monitor/knn_top1``): ``train_examples`` images of
  the train split (a seeded class-balanced subset when fewer than the split) form the bank,
  ``eval_examples`` of the eval split query it; eval transform (centre crop), eval-mode network.
  Config fields: ``k``, ``temperature``, ``train_examples``, ``eval_examples`` (<= 0: the whole
  split), ``batch_size``. The search is approximate when the run's ``knn.recall_target`` (the
  methods' bank searches' setting) is < 1. ``--mode=knn`` sweeps k and T with the same
  :func:`knn_classify`.
  """

  def __init__(self, cfg, feature_fn, ctx: evaluators.Context, *, name: str = 'knn'):
    super().__init__(cfg, feature_fn, ctx, name=name)
    # config.knn.recall_target < 1: approximate top-k (approx_max_k; TPU), as the bank searches.
    search = ctx.run_config.get('knn') if ctx.run_config is not None else None
    recall = None if search is None else search.get('recall_target', 1.0)
    self.recall_target = None if recall is None or recall >= 1.0 else float(recall)

  @staticmethod
  def validate(cfg, key: str) -> None:
    req = config_lib.require
    req(isinstance(cfg.k, int) and cfg.k >= 1, f'{key}.k', cfg.k, 'an integer >= 1')
    req(isinstance(cfg.temperature, (int, float)) and cfg.temperature > 0, f'{key}.temperature',
        cfg.temperature, 'a number > 0')
    req(isinstance(cfg.batch_size, int) and cfg.batch_size > 0, f'{key}.batch_size',
        cfg.batch_size, 'a positive integer')

  def reads(self) -> list[tuple[str, int]]:
    return [(self.ctx.data.train_split, int(self.cfg.train_examples)),
            (self.ctx.data.eval_split, int(self.cfg.eval_examples))]

  def headline(self) -> dict[str, str]:
    return {'monitor/knn_top1': f'kNN top-1 (weighted k={self.cfg.k}, T={self.cfg.temperature}, '
                                'frozen backbone)'}

  def run(self, variables) -> Iterator[tuple[str, float]]:
    (train_split, n_bank), (eval_split, n_test) = self.reads()
    bank = self.extract(variables, train_split, n_bank)
    test = self.extract(variables, eval_split, n_test)
    features.check_bank_classes(bank['label'], test['label'], train_split)
    k, t = int(self.cfg.k), float(self.cfg.temperature)
    scores = knn_classify(bank['features'], bank['label'], test['features'],
                          num_classes=self.ctx.num_classes, ks=(k,), temperatures=(t,),
                          mesh=self.ctx.mesh, recall_target=self.recall_target)
    pred = next(iter(scores.values())).argmax(-1)
    yield 'monitor/knn_top1', float(np.mean(pred == test['label']))
