"""Benchmark: spherical k-means (ssl_jax.ops.kmeans.kmeans) vs faiss.Kmeans.

    python benchmarks/bench_kmeans.py          # N=65,536, d=256, C=1000, 10 iterations
    python benchmarks/bench_kmeans.py --repeats 1 --data uniform

Same data, same settings: ``faiss.Kmeans(d, C, niter=10, spherical=True, seed=s)`` and
``kmeans(x, C, 10, jax.random.key(s), init=...)`` for seeds s = 0..repeats-1. Reported: median
wall time (ours after a compile warm-up; compilation time printed separately) and the mean over
seeds of the objective ``J = mean_i max_j x_i . c_j`` (mean cosine to the nearest final
centroid), computed the same way for both from their final centroids.

Data sets: ``uniform`` — points uniform on the unit sphere (no cluster structure);
``mixture`` — ``x = n(m_z + 0.35 g)``, ``m_z`` one of 2,000 random unit means, ``g ~ N(0, I/d)``
(clustered, closer to real embeddings).

Also timed: the two ways of forming per-cluster sums (``segment_sum`` vs one-hot matmul), and
the machine's matrix-multiply ceiling: the best float32 GEMM rate of numpy's BLAS (4096^3 and
the k-means shape [N, d] x [d, C]) and of XLA on the k-means shape, beside faiss's
assignment-pass rate — k-means is one such GEMM per pass, so ``faiss time / ours`` cannot exceed
(best GEMM rate / faiss's rate) x (faiss passes / our passes) without skipping work.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def run_times(f, repeats=5):
  """Seconds of ``repeats`` calls of ``f`` after one warm-up call."""
  f()
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    f()
    ts.append(time.perf_counter() - t)
  return ts


def make_data(kind, n, d, seed=0):
  rng = np.random.default_rng(seed)
  if kind == 'uniform':
    x = rng.standard_normal((n, d), dtype=np.float32)
  else:
    means = rng.standard_normal((2000, d), dtype=np.float32)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    z = rng.integers(0, 2000, n)
    x = means[z] + 0.35 * rng.standard_normal((n, d), dtype=np.float32) / np.sqrt(d)
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--n', type=int, default=65536)
  p.add_argument('--dim', type=int, default=256)
  p.add_argument('--clusters', type=int, default=1000)
  p.add_argument('--iters', type=int, default=10)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--data', nargs='+', default=['uniform', 'mixture'])
  a = p.parse_args()

  import faiss
  import jax
  import jax.numpy as jnp
  from ssl_jax.ops import kmeans as km

  def objective(x, cent):
    _, s = km.assign(x, jnp.asarray(cent))
    return float(jnp.mean(s))

  print(f'N={a.n} d={a.dim} C={a.clusters} iters={a.iters}; median time over {a.repeats} seeds '
        '(interleaved), objective = mean over seeds of mean_i max_j x_i.c_j')
  print('\n| data | method | time (s) | objective | faiss time / ours | objective vs faiss |')
  print('|---|---|---:|---:|---:|---:|')
  for kind in a.data:
    x = make_data(kind, a.n, a.dim)
    jx = jnp.asarray(x)
    fns = {}
    for init in ('random', 'kmeans++'):
      f = jax.jit(lambda x, r, init=init: km.kmeans(x, a.clusters, a.iters, r, init=init))
      t0 = time.perf_counter()
      jax.block_until_ready(f(jx, jax.random.key(123)))
      compile_s = time.perf_counter() - t0
      fns[f'ours ({init} init)'] = (f, compile_s)

    def run_faiss(seed):
      k = faiss.Kmeans(a.dim, a.clusters, niter=a.iters, spherical=True, seed=seed,
                       verbose=False)
      k.train(x)
      return k.centroids

    times = {name: [] for name in ['faiss.Kmeans', *fns]}
    objs = {name: [] for name in times}
    for seed in range(a.repeats):
      t = time.perf_counter()
      cent = run_faiss(seed)
      times['faiss.Kmeans'].append(time.perf_counter() - t)
      objs['faiss.Kmeans'].append(objective(jx, cent))
      for name, (f, _) in fns.items():
        t = time.perf_counter()
        cent, _, obj = jax.block_until_ready(f(jx, jax.random.key(seed)))
        times[name].append(time.perf_counter() - t)
        objs[name].append(objective(jx, cent))
        assert abs(objs[name][-1] - float(obj)) < 1e-5
    tf, of = np.median(times['faiss.Kmeans']), np.mean(objs['faiss.Kmeans'])
    for name in times:
      tm, om = np.median(times[name]), np.mean(objs[name])
      extra = '' if name == 'faiss.Kmeans' else f' (+{fns[name][1]:.1f}s compile once)'
      print(f'| {kind} | {name}{extra} | {tm:.2f} | {om:.4f} | {tf / tm:.2f}x | '
            f'{100 * (om - of) / of:+.2f}% |')
    sys.stdout.flush()

  # Per-cluster sums: segment_sum vs one-hot matmul (one pass, [N, d] points, C clusters).
  x = jnp.asarray(make_data('uniform', a.n, a.dim))
  assign = jnp.asarray(np.random.default_rng(1).integers(0, a.clusters, a.n), jnp.int32)
  seg = jax.jit(lambda x, a_: jax.ops.segment_sum(x, a_, num_segments=a.clusters))
  onehot = jax.jit(lambda x, a_: jax.nn.one_hot(a_, a.clusters, dtype=x.dtype).T @ x)
  res = {}
  for name, f in (('segment_sum', seg), ('one-hot matmul', onehot)):
    res[name] = float(np.median(run_times(lambda f=f: f(x, assign).block_until_ready())))
  print(f"\nPer-cluster sums of {a.n}x{a.dim} into {a.clusters} clusters: segment_sum "
        f"{1e3 * res['segment_sum']:.1f} ms, one-hot matmul {1e3 * res['one-hot matmul']:.1f} ms")
  gemm_ceiling(a.n, a.dim, a.clusters, a.iters, faiss)


def gemm_ceiling(n, d, c, iters, faiss):
  """GFLOP/s of the best float32 GEMMs on this machine vs faiss's assignment pass."""
  import jax
  import jax.numpy as jnp

  def best(f, r=5):
    return min(run_times(f, r))

  rng = np.random.default_rng(0)
  rows = []
  for m, k, nn in ((4096, 4096, 4096), (n, d, c)):
    a = rng.random((m, k), dtype=np.float32)
    b = rng.random((k, nn), dtype=np.float32)
    rows.append((f'numpy BLAS {m}x{k}x{nn}', 2 * m * k * nn / best(lambda: a @ b) / 1e9))
  x = make_data('uniform', n, d)
  ja, jb = jnp.asarray(x), jnp.asarray(x[:c].T.copy())
  mm = jax.jit(jnp.matmul)
  rows.append((f'XLA jnp.matmul {n}x{d}x{c}',
               2 * n * d * c / best(lambda: mm(ja, jb).block_until_ready()) / 1e9))
  index = faiss.IndexFlatIP(d)
  index.add(x[:c])
  rows.append((f'faiss IndexFlatIP.search(x, 1), {c} centroids (one assignment pass)',
               2 * n * d * c / best(lambda: index.search(x, 1), 3) / 1e9))
  print('\n| GEMM (float32) | GFLOP/s (best of 5) |\n|---|---:|')
  for name, rate in rows:
    print(f'| {name} | {rate:.0f} |')
  peak = max(r for _, r in rows[:3])
  ratio = iters / (iters + 1)   # faiss: `iters` passes; ours: `iters` + the final assignment
  print(f'\nCeiling of faiss time / ours with dense exact Lloyd steps ({iters + 1} passes vs '
        f'faiss {iters}): {peak / rows[3][1] * ratio:.2f}x (best GEMM {peak:.0f} / faiss '
        f'{rows[3][1]:.0f} GFLOP/s x {iters}/{iters + 1})')


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
