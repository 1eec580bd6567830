"""Row ``kmeans``: spherical k-means of 65,536 x 256 into 1,000 clusters, 10 Lloyd iterations
(the same initial centroids), ours (``ops.kmeans.kmeans``) vs a torch Lloyd loop
(:func:`torch_lloyd`).
"""
from __future__ import annotations

import math
import statistics
import time

from device_rows.common import Row, median_ratio, warm_then_time


def row(suite):
  jax, np, torch = suite.jax, suite.np, suite.torch
  import jax.numpy as jnp
  from ssl_jax.ops import kmeans
  n, d, c, iters = (2048, 32, 16, 3) if suite.args.smoke else (65_536, 256, 1000, 10)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((n, d), dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  c0 = x[rng.choice(n, c, replace=False)]
  jx = jax.device_put(jnp.asarray(x), suite.sharding.data_sharding(suite.mesh)
                      if n % suite.n_dev == 0 else None)
  jc = jnp.asarray(c0)
  tx, tc = torch.from_numpy(x).to(suite.tdev), torch.from_numpy(c0).to(suite.tdev)
  res = {}

  def ours(nn):
    with jax.set_mesh(suite.mesh):
      t = time.perf_counter()
      for _ in range(nn):
        out = kmeans.kmeans(jx, c, iters, None, init_centroids=jc, mesh=suite.mesh)
      jax.block_until_ready(out)
    res['ours'] = float(out[2])
    return time.perf_counter() - t

  def peer(nn):
    suite.sync_torch()
    t = time.perf_counter()
    for _ in range(nn):
      obj = torch_lloyd(torch, tx, tc, iters)
    suite.sync_torch()
    res['peer'] = float(obj)
    return time.perf_counter() - t

  times = warm_then_time({'ours': ours, 'peer': peer}, suite.args.repeats, 1)
  if not all(math.isfinite(v) for v in res.values()):
    raise FloatingPointError(f'non-finite k-means objective {res}')
  t_o, t_p = statistics.median(times['ours']), statistics.median(times['peer'])
  return [Row('kmeans', f'k-means {n:,} x {d} -> {c:,}, {iters} iterations', 'ms/run',
              1e3 * t_o, 1e3 * t_p, 'torch Lloyd loop', median_ratio(times['peer'],
                                                                     times['ours']),
              'ours <= peer', 'met' if t_o <= t_p else 'not met', fmt='{:.1f}',
              notes=f'objective (mean cosine) ours {res["ours"]:.4f}, peer {res["peer"]:.4f}; '
                    'same initial centroids; ours re-seeds empty clusters')]


def torch_lloyd(torch, x, c, iters: int):
  """Spherical Lloyd: assign by max cosine, centroid = normalised sum (an empty cluster keeps
  its centroid); then a final assignment. Returns the objective (mean cosine)."""
  for _ in range(iters):
    a = (x @ c.T).argmax(1)
    sums = torch.zeros_like(c).index_add_(0, a, x)
    norm = sums.norm(dim=1, keepdim=True)
    c = torch.where(norm > 0, sums / norm.clamp_min(1e-12), c)
  return (x @ c.T).max(1).values.mean()
