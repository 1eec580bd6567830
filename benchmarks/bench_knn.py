"""Benchmark: exact top-k cosine search (ssl_jax.ops.knn.topk_cosine) vs faiss and a bare matmul.

    python benchmarks/bench_knn.py                      # banks 65,536 and 1,048,576; B=256, d=256, k=5
    python benchmarks/bench_knn.py --sizes 65536 --repeats 5

Rows per bank size (median seconds over ``--repeats`` interleaved repeats, after a warm-up):
  matmul        jit(q @ bank.T) -> [B, N] scores, the lower bound we compare to
  lax.top_k     jit(lax.top_k(q @ bank.T, k)), the naive JAX search
  ours          jit(topk_cosine(q, bank, k))
  ours+valid    the same with a valid mask (as MSF / CLIM use it)
  faiss         faiss.IndexFlatIP.search(q, k)
Then, in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4, the same search
on a bank sharded over a 4-device mesh (4 simulated devices share the same CPU cores, so this
measures the overhead of the shard-local top-k + merge, not a speed-up).
Indices are checked against faiss (agreement) and lax.top_k (must be identical).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def _unit(rng, n, d):
  x = rng.standard_normal((n, d), dtype=np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _interleaved(fns: dict, repeats: int) -> dict:
  for f in fns.values():       # warm-up (compilation)
    f()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, f in fns.items():
      t = time.perf_counter()
      f()
      times[name].append(time.perf_counter() - t)
  return {name: float(np.median(v)) for name, v in times.items()}


def run_single(sizes, b, d, k, repeats, faiss_repeats):
  import faiss
  import jax
  import jax.numpy as jnp
  from ssl_jax.ops import knn

  rows = []
  for n in sizes:
    rng = np.random.default_rng(n)
    bank = _unit(rng, n, d)
    q = _unit(rng, b, d)
    jb, jq = jnp.asarray(bank), jnp.asarray(q)
    valid = jnp.asarray(np.arange(n) < n - 7)          # a realistic mask: all but the last rows
    mm = jax.jit(lambda a, bk: a @ bk.T)
    naive = jax.jit(lambda a, bk: jax.lax.top_k(a @ bk.T, k))
    ours = jax.jit(lambda a, bk: knn.topk_cosine(a, bk, k))
    ours_v = jax.jit(lambda a, bk, v: knn.topk_cosine(a, bk, k, valid=v))
    index = faiss.IndexFlatIP(d)
    index.add(bank)

    ref = np.asarray(naive(jq, jb)[1])
    got = np.asarray(ours(jq, jb)[1])
    _, fi = index.search(q, k)
    exact = float((got == ref).mean())
    agree = float((got == fi).mean())

    t = _interleaved({
        'matmul': lambda: mm(jq, jb).block_until_ready(),
        'lax.top_k': lambda: jax.block_until_ready(naive(jq, jb)),
        'ours': lambda: jax.block_until_ready(ours(jq, jb)),
        'ours+valid': lambda: jax.block_until_ready(ours_v(jq, jb, valid)),
    }, repeats)
    t.update(_interleaved({'faiss': lambda: index.search(q, k)}, faiss_repeats))
    rows.append(dict(n=n, agree=agree, exact=exact, **t))
    del index, jb, bank
  return rows


def run_sharded(sizes, b, d, k, repeats):
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from ssl_jax import sharding
  from ssl_jax.ops import knn

  mesh = sharding.make_mesh(4)
  rows = []
  for n in sizes:
    rng = np.random.default_rng(n)
    bank = _unit(rng, n, d)
    q = _unit(rng, b, d)
    jq = jnp.asarray(q)
    jb1 = jax.device_put(bank, jax.devices()[0])
    jb4 = jax.device_put(bank, NamedSharding(mesh, P(sharding.DATA)))
    mm = jax.jit(lambda a, bk: a @ bk.T)
    single = jax.jit(lambda a, bk: knn.topk_cosine(a, bk, k))
    with jax.set_mesh(mesh):
      sharded = jax.jit(lambda a, bk: knn.topk_cosine(a, bk, k, mesh=mesh))
      hlo = sharded.lower(jq, jb4).compile().as_text()
      got = np.asarray(sharded(jq, jb4)[1])
    ref = np.asarray(single(jq, jb1)[1])
    bank_gathered = f'f32[{n},{d}]' in ''.join(
        line for line in hlo.splitlines() if 'all-gather' in line)

    def run_sh():
      with jax.set_mesh(mesh):
        jax.block_until_ready(sharded(jq, jb4))

    t = _interleaved({
        'matmul (1 dev)': lambda: mm(jq, jb1).block_until_ready(),
        'ours (1 dev)': lambda: jax.block_until_ready(single(jq, jb1)),
        'ours (4-dev mesh)': run_sh,
    }, repeats)
    rows.append(dict(n=n, bank_gathered=bank_gathered, same=float((got == ref).mean()), **t))
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', type=int, nargs='+', default=[65536, 1048576])
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--dim', type=int, default=256)
  p.add_argument('--k', type=int, default=5)
  p.add_argument('--repeats', type=int, default=7)
  p.add_argument('--faiss-repeats', type=int, default=3)
  p.add_argument('--sharded-only', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--no-sharded', action='store_true')
  a = p.parse_args()

  if a.sharded_only:
    print(json.dumps(run_sharded(a.sizes, a.batch, a.dim, a.k, a.repeats)))
    return

  print(f'B={a.batch} d={a.dim} k={a.k}; median of {a.repeats} (faiss: {a.faiss_repeats}) '
        'interleaved repeats, seconds')
  rows = run_single(a.sizes, a.batch, a.dim, a.k, a.repeats, a.faiss_repeats)
  print('\n| bank N | matmul | lax.top_k | ours | ours+valid | faiss IndexFlatIP | '
        'ours / matmul | faiss / ours | idx = lax.top_k | idx = faiss |')
  print('|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
  for r in rows:
    print(f"| {r['n']:,} | {r['matmul']:.3f} | {r['lax.top_k']:.3f} | {r['ours']:.3f} | "
          f"{r['ours+valid']:.3f} | {r['faiss']:.3f} | {r['ours'] / r['matmul']:.2f}x | "
          f"{r['faiss'] / r['ours']:.1f}x | {100 * r['exact']:.2f}% | {100 * r['agree']:.2f}% |")
  sys.stdout.flush()

  if a.no_sharded:
    return
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  cmd = [sys.executable, __file__, '--sharded-only', '--sizes', *map(str, a.sizes),
         '--batch', str(a.batch), '--dim', str(a.dim), '--k', str(a.k),
         '--repeats', str(a.repeats)]
  out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
  srows = json.loads(out.strip().splitlines()[-1])
  print('\nSharded bank, 4 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4'
        ', same 2 cores):')
  print('\n| bank N | matmul (1 dev) | ours (1 dev) | ours (4-dev mesh) | mesh / 1 dev | '
        'idx = 1 dev | bank all-gathered? |')
  print('|---:|---:|---:|---:|---:|---:|:---:|')
  for r in srows:
    print(f"| {r['n']:,} | {r['matmul (1 dev)']:.3f} | {r['ours (1 dev)']:.3f} | "
          f"{r['ours (4-dev mesh)']:.3f} | {r['ours (4-dev mesh)'] / r['ours (1 dev)']:.2f}x | "
          f"{100 * r['same']:.2f}% | {'yes' if r['bank_gathered'] else 'no'} |")


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
