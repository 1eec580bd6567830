r"""2-D embeddings of frozen test features and score distributions (``--mode=embed``).

    python -m ssl_jax.main --mode=embed --config=configs/eval_knn.py:cifar10 \
        --config.pretrained=WORKDIR --workdir=EVAL_DIR

* ``embedding.png``: the first ``embed.num_examples`` eval-split images' features (backbone or
  projector, L2-normalised) embedded in 2-D by UMAP (``umap-learn``, if installed) or else
  scikit-learn's t-SNE (PCA init, seeded), coloured by class. Also written as the TensorBoard
  image ``embedding/<umap|tsne>`` and as ``embedding.npz`` (``coords``, ``labels``).
* ``scores.png``: histograms of positive-pair scores (cosine of the features of two augmented
  views of one image, with the pretraining run's view recipe) and negative-pair scores (views
  of different images), on ``embed.score_examples`` eval images — the FT paper's
  visualisation of a trained encoder. TensorBoard image ``scores/distribution``.
"""
from __future__ import annotations

import io
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssl_jax import config_lib, utils, paths, sharding
from ssl_jax import writers
from ssl_jax.evals import devices, eval_config, features, report
from ssl_jax.evals import pretrained as pre_lib
from ssl_jax.evals import score_plots

EMBED_METHODS = ('auto', 'umap', 'tsne')


def umap_available() -> bool:
  try:
    import umap  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    return True
  except ImportError:
    return False


def embed_2d(feats: np.ndarray, *, method: str = 'auto', seed: int = 0,
             perplexity: float = 30.0, num_threads: int | None = 1) -> tuple[np.ndarray, str]:
  """``(coords [N, 2] float32, method used)``; ``'auto'`` = UMAP if installed, else t-SNE.

  ``num_threads`` caps the OpenMP/BLAS threads of the embedding (None: library default). One
  thread is the safe default: on a busy shared host, sklearn's OpenMP spin-waiting made a
  200-point t-SNE take 60 s with 2 threads vs 4 s with 1.
  """
  if method not in EMBED_METHODS:
    raise ValueError(f'embed method {method!r} is invalid; accepted: {", ".join(EMBED_METHODS)}')
  feats = np.asarray(feats, np.float32)
  n = len(feats)
  if n < 5:
    raise ValueError(f'{n} examples are too few for a 2-D embedding; accepted: >= 5')
  if method == 'auto':
    method = 'umap' if umap_available() else 'tsne'
  from threadpoolctl import threadpool_limits  # pylint: disable=import-outside-toplevel
  with threadpool_limits(num_threads):
    coords = _embed(feats, method, seed, perplexity)
  return np.asarray(coords, np.float32), method


def _embed(feats: np.ndarray, method: str, seed: int, perplexity: float) -> np.ndarray:
  n = len(feats)
  if method == 'umap':
    if not umap_available():
      raise ImportError("embed.method='umap' needs umap-learn (pip install umap-learn); "
                        "accepted without it: 'tsne' or 'auto'")
    import umap  # pylint: disable=import-outside-toplevel
    return umap.UMAP(n_components=2, random_state=seed,
                     n_neighbors=min(15, n - 1)).fit_transform(feats)
  from sklearn.manifold import TSNE  # pylint: disable=import-outside-toplevel
  return TSNE(n_components=2, init='pca', random_state=seed,
              perplexity=float(min(perplexity, (n - 1) / 3.0))).fit_transform(feats)


def render_embedding(coords: np.ndarray, labels: np.ndarray, title: str, *,
                     class_names=None, figsize=(7.0, 6.0), dpi: int = 100) -> np.ndarray:
  """Scatter plot of ``coords`` coloured by ``labels`` as a uint8 RGB array [H, W, 3]."""
  from matplotlib.backends import backend_agg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=figsize, dpi=dpi)
  canvas = backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  classes = np.unique(labels)
  cmap = 'tab10' if len(classes) <= 10 else ('tab20' if len(classes) <= 20 else 'gist_ncar')
  sc = ax.scatter(coords[:, 0], coords[:, 1], c=labels, cmap=cmap, s=4, alpha=0.8,
                  linewidths=0)
  if len(classes) <= 20:
    handles, _ = sc.legend_elements(num=None)
    names = [class_names[c] if class_names is not None else str(c) for c in classes]
    ax.legend(handles, names, fontsize=7, markerscale=0.8, loc='best', ncol=2)
  ax.set_title(title)
  ax.set_xticks([])
  ax.set_yticks([])
  fig.tight_layout()
  canvas.draw()
  img = np.asarray(canvas.buffer_rgba())[..., :3].copy()
  fig.clear()
  return img


def write_png(path: str, img: np.ndarray) -> str:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format='PNG')
  return paths.write_bytes(path, buf.getvalue())


def pair_scores(net: pre_lib.FrozenNet, variables, pre_config, data_cfg, *, mesh,
                num_examples: int, features: str, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
  """Cosine scores of positive pairs (two views of one eval image) [n] and of negative pairs
  (each view-1 with the view-2 of the next 16 images) [n, 16], with the pretraining views."""
  from ssl_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  cfg.views = pre_config.data.views
  cfg.train_split = data_cfg.eval_split
  specs = data_lib.resolve_views(cfg)
  k1, k2 = specs[0].key, specs[1].key
  n_dev = mesh.shape[sharding.DATA]
  n = max(n_dev, (num_examples // n_dev) * n_dev)
  n = min(n, (data_lib.num_examples(cfg, cfg.train_split) // n_dev) * n_dev)
  batch = next(data_lib.make_train_iterator(cfg, global_batch_size=n, seed=seed))
  batch = sharding.global_batch(mesh, {k1: batch[k1], k2: batch[k2]})
  fn = net.feature_fn(features, l2=True)

  @jax.jit
  def scores(v, a, b):
    fa, fb = fn(v, a)['features'], fn(v, b)['features']
    m = min(16, fa.shape[0] - 1)
    sim = fa @ fb.T
    cols = (jnp.arange(sim.shape[0])[:, None] + 1 + jnp.arange(m)[None, :]) % sim.shape[0]
    return jnp.diagonal(sim), jnp.take_along_axis(sim, cols, axis=1)

  pos, neg = jax.device_get(scores(variables, batch[k1], batch[k2]))
  return np.asarray(pos), np.asarray(neg)


def validate(c: ml_collections.ConfigDict) -> None:
  eval_config.validate_common(c)
  req = config_lib.require
  req(c.features in pre_lib.FEATURES, 'features', c.features, ', '.join(pre_lib.FEATURES))
  req(c.embed.method in EMBED_METHODS, 'embed.method', c.embed.method, ', '.join(EMBED_METHODS))
  req(isinstance(c.embed.num_examples, int) and c.embed.num_examples >= 5,
      'embed.num_examples', c.embed.num_examples, 'an integer >= 5')
  req(isinstance(c.embed.score_examples, int) and c.embed.score_examples >= 0,
      'embed.score_examples', c.embed.score_examples, 'an integer >= 0 (0: no score plot)')


def run(config: ml_collections.ConfigDict, workdir: str, **unused) -> dict[str, Any]:
  """``--mode=embed``: writes embedding.png/.npz and scores.png (+ TensorBoard images)."""
  del unused
  validate(config)
  mesh = devices.eval_mesh(config)
  pre, data_cfg, net, pre_step = pre_lib.load_for_eval(config)
  e = config.embed
  t0 = time.time()
  out: dict[str, Any] = {'pretrained': config.pretrained, 'pretrained_step': pre_step,
                         'features': config.features}
  writer = writers.create(workdir, just_logging=jax.process_index() > 0)
  with jax.set_mesh(mesh):
    variables = net.variables(mesh)
    fn = jax.jit(net.feature_fn(config.features, l2=True))
    test = features.extract(fn, variables, data_cfg, split=data_cfg.eval_split, mesh=mesh,
                           batch_size=config.eval_batch_size, max_examples=e.num_examples)
    pos = neg = None
    if e.score_examples > 0:
      pos, neg = pair_scores(net, variables, pre, data_cfg, mesh=mesh,
                             num_examples=e.score_examples, features=config.features,
                             seed=config.seed)
  if jax.process_index() == 0:
    coords, used = embed_2d(test['features'], method=e.method, seed=config.seed,
                            perplexity=e.perplexity,
                            num_threads=utils.optional(e.num_threads))
    title = (f'{pre.method.name} {pre.model.backbone} step {pre_step}: {used.upper()} of '
             f'{len(coords)} {data_cfg.name}/{data_cfg.eval_split} {config.features} features')
    from ssl_jax.data import sources  # pylint: disable=import-outside-toplevel
    names = sources.class_names(data_cfg, data_cfg.eval_split)
    img = render_embedding(coords, test['label'], title, class_names=names)
    out['legend'] = list(names) if names else None
    out['embedding_png'] = write_png(paths.join(workdir, 'embedding.png'), img)
    buf = io.BytesIO()
    np.savez(buf, coords=coords, labels=test['label'])
    paths.write_bytes(paths.join(workdir, 'embedding.npz'), buf.getvalue())
    writer.write_images(pre_step, {f'embedding/{used}': img[None]})
    out['embedding_method'] = used
    if pos is not None:
      title = (f'{pre.method.name} step {pre_step}: {config.features} scores, '
               f'{data_cfg.name}/{data_cfg.eval_split}')
      out['scores_png'] = score_plots.write_score_plot(paths.join(workdir, 'scores.png'),
                                                       pos, neg, title)
      writer.write_images(pre_step, {'scores/distribution':
                                     score_plots.render_score_plot(pos, neg, title)[None]})
      writer.write_histograms(pre_step, {'scores/pos': pos, 'scores/neg': neg.ravel()})
      out.update({'pos_mean': float(pos.mean()), 'neg_mean': float(neg.mean())})
    writer.flush()
  out['time_s'] = time.time() - t0
  report.write_json(workdir, 'results.json', out)
  report.log(f'Embedding ({out.get("embedding_method")}) of {len(test["label"])} '
             f'{config.features} features -> {out.get("embedding_png")}; score plot -> '
             f'{out.get("scores_png")}.')
  return out
