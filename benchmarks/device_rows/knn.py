"""Row ``knn`` (``knn_bf16``, ``knn_approx``, ``knn_b<N>``): top-5 of 256 queries over a
1,048,576 x 256 bank (f32 and bf16), ours (``ops.knn.topk_cosine``; with its approximate
``recall_target`` variant when the library has it; ``--knn_block_rows`` adds block sizes) vs
``torch.topk(q @ bank.T, 5)``. Goal: ours <= the peer and <= 1.5x the bank-read time (bank
bytes / HBM bandwidth).
"""
from __future__ import annotations

import inspect
import statistics
import time

from device_rows.common import Row, median_ratio, warm_then_time


def row(suite):
  np = suite.np
  from ssl_jax.ops import knn
  n, d, b, k = (4096, 32, 16, 5) if suite.args.smoke else (1 << 20, 256, 256, 5)
  rng = np.random.default_rng(0)
  bank = rng.standard_normal((n, d), dtype=np.float32)
  bank /= np.linalg.norm(bank, axis=1, keepdims=True)
  q = bank[rng.choice(n, b, replace=False)] + 0.1 * rng.standard_normal((b, d), np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  approx = 'recall_target' in inspect.signature(knn.topk_cosine).parameters
  variants = [('float32', None, None), ('bfloat16', None, None)]
  variants += [('float32', None, br) for br in suite.args.knn_block_rows]
  if approx:
    variants.append(('float32', 0.95, None))
  return [_variant(suite, bank, q, k, *v) for v in variants]


def _variant(suite, bank, q, k, dtype, recall, block_rows) -> Row:
  """One search setting: ours and the peer timed interleaved, their top-k sets compared."""
  jax, np, torch = suite.jax, suite.np, suite.torch
  import jax.numpy as jnp
  from ssl_jax.ops import knn
  (n, d), b = bank.shape, q.shape[0]
  iters = 2 if suite.args.smoke else 20
  jdt = jnp.float32 if dtype == 'float32' else jnp.bfloat16
  tdt = torch.float32 if dtype == 'float32' else torch.bfloat16
  jb = jax.device_put(jnp.asarray(bank, jdt), suite.sharding.data_sharding(suite.mesh)
                      if n % suite.n_dev == 0 else None)
  jq = jnp.asarray(q, jdt)
  kw = {} if recall is None else {'recall_target': recall}
  if block_rows:
    kw['block_rows'] = block_rows
  fn = jax.jit(lambda qq, bb: knn.topk_cosine(qq, bb, k, mesh=suite.mesh, **kw))
  tb = torch.from_numpy(bank).to(suite.tdev, tdt)
  tq = torch.from_numpy(q).to(suite.tdev, tdt)
  peer_out = {}

  def ours(nn):
    with jax.set_mesh(suite.mesh):
      t = time.perf_counter()
      for _ in range(nn * iters):
        out = fn(jq, jb)
      jax.block_until_ready(out)
    return (time.perf_counter() - t) / iters

  def peer(nn):
    suite.sync_torch()
    t = time.perf_counter()
    for _ in range(nn * iters):
      out = torch.topk(tq @ tb.T, k, dim=1)
    suite.sync_torch()
    peer_out['last'] = out
    return (time.perf_counter() - t) / iters

  times = warm_then_time({'ours': ours, 'peer': peer}, suite.args.repeats, 1)
  with jax.set_mesh(suite.mesh):
    s_ours, i_ours = (np.asarray(x) for x in fn(jq, jb))
  i_peer = peer_out['last'].indices.cpu().numpy()
  if not np.all(np.isfinite(s_ours)):
    raise FloatingPointError('non-finite kNN scores')
  agree = float(np.mean(np.sort(i_ours, 1) == np.sort(i_peer, 1)))
  t_o, t_p = statistics.median(times['ours']), statistics.median(times['peer'])
  read = n * d * (4 if dtype == 'float32' else 2) / suite.hbm if suite.hbm else None
  met = t_o <= t_p and (read is None or t_o <= 1.5 * read)
  goal = 'ours <= peer' + (f', <= 1.5x bank read ({1e3 * read:.3f} ms)' if read else
                           ' (bank read n/a: give --hbm_tbps)')
  label = f'kNN top-{k}, {b} x {n:,} x {d} {dtype}'
  if recall is not None:
    label += f', approx recall {recall}'
  if block_rows:
    label += f', block_rows {block_rows}'
  return Row('knn' + ('_bf16' if dtype == 'bfloat16' else '') +
             ('_approx' if recall else '') + (f'_b{block_rows}' if block_rows else ''),
             label, 'ms/search', 1e3 * t_o, 1e3 * t_p, 'torch.topk(q @ bank.T)',
             median_ratio(times['peer'], times['ours']), goal,
             'met' if met else 'not met', fmt='{:.3f}',
             notes=(f'{"" if read is None else f"ours = {t_o / read:.2f}x bank read; "}'
                    f'same top-{k} sets: {100 * agree:.1f}%'
                    + ('; approx_max_k is exact on CPU/GPU' if recall else '')))
