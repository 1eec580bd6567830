"""Distributions of positive- and negative-pair cosine scores (the FT paper's visualisation).

``write_score_plot(path_png, pos, neg, title)`` draws the two histograms (density, shared bins
on [-1, 1], with each distribution's mean and standard deviation in the legend) and writes a
PNG; ``render_score_plot`` returns the same image as a uint8 array for TensorBoard
(``writer.write_images(step, {'scores/distribution': img[None]})``).

Drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display needed, safe
to call from the training loop). ``pos`` is typically the method's ``scores['pos']`` [B] and
``neg`` its ``scores['neg']`` [B, m] (any shape: flattened); non-finite values are dropped.
"""
from __future__ import annotations

import io

import numpy as np

from ssl_jax import paths


def _clean(x) -> np.ndarray:
  x = np.asarray(x, np.float64).ravel()
  return x[np.isfinite(x)]


def _figure(pos, neg, title: str, *, bins: int = 100, figsize=(6.0, 4.0), dpi: int = 100):
  from matplotlib.backends import backend_agg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  pos, neg = _clean(pos), _clean(neg)
  fig = Figure(figsize=figsize, dpi=dpi)
  canvas = backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  lo = min(-1.0, float(np.min(pos)) if pos.size else -1.0, float(np.min(neg)) if neg.size else -1.0)
  hi = max(1.0, float(np.max(pos)) if pos.size else 1.0, float(np.max(neg)) if neg.size else 1.0)
  edges = np.linspace(lo, hi, bins + 1)
  for x, name, color in ((neg, 'negative pairs', 'tab:red'), (pos, 'positive pairs', 'tab:blue')):
    if x.size:
      ax.hist(x, bins=edges, density=True, alpha=0.55, color=color,
              label=f'{name} (n={x.size}, mean {x.mean():.3f}, std {x.std():.3f})')
  ax.set_xlabel('cosine score')
  ax.set_ylabel('density')
  ax.set_title(title)
  if pos.size or neg.size:
    ax.legend(loc='upper left', fontsize=8)
  fig.tight_layout()
  return fig, canvas


def render_score_plot(pos, neg, title: str, **kw) -> np.ndarray:
  """The plot as a uint8 RGB array [H, W, 3]."""
  fig, canvas = _figure(pos, neg, title, **kw)
  canvas.draw()
  img = np.asarray(canvas.buffer_rgba())[..., :3].copy()
  fig.clear()
  return img


def write_score_plot(path_png: str, pos, neg, title: str, **kw) -> str:
  """Histograms of positive (``pos``) and negative (``neg``) pair scores -> ``path_png``.

  A local path or gs:// URL, written whole (``paths.write_bytes``). Returns the path.
  """
  fig, canvas = _figure(pos, neg, title, **kw)
  buf = io.BytesIO()
  canvas.print_png(buf)
  paths.write_bytes(path_png, buf.getvalue())
  fig.clear()
  return path_png
