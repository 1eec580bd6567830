"""Benchmark: the APS train step (sparse + selective tokens) vs the full-token two-view step.

    python benchmarks/bench_aps.py                                  # vit_tiny, 32 px, patch 2, B=64
    python benchmarks/bench_aps.py --backbone vit_small --batch 512 --flops-only   # no run

Both rows are the trainer's whole jitted step (``train.build``: loss, grads, AdamW, EMA, online
probe) on one device, for the same ViT, heads, batch and contrastive loss; they differ only in
the tokens that enter the ViT:

  aps    view 1: ``N·ratio`` sparse patches, view 2: ``N·ratio`` selective patches (index
         sampling on device inside the step), ``method.chunk_mode='one'``
  full   both views with all ``N`` patches (``token_indices=None``), no sampling

Reported per row: compiled ``memory_analysis()`` temp (activations + workspace) and argument
(state + batch) sizes, ``cost_analysis()`` FLOPs per step, and the median wall time per step
over ``--repeats`` interleaved repeats after one warm-up step. The last column divides
full by aps. ``--flops-only`` compiles and prints without running (big configs on a small
machine, for runtime estimates).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from _common import aps_full_tokens, load_config  # noqa: E402  (benchmarks/: the script's dir)


def _config(backbone: str, batch: int, patch: int, ratio: float, dtype: str):
  c = load_config('aps', f'cifar10,{backbone}')
  c.batch_size = batch
  c.model.patch_size = patch
  c.model.dtype = dtype
  c.method.ratio = ratio
  c.total_steps = 1000
  return c


def _methods(config):
  from ssl_jax.methods import aps
  return {'aps': aps.Method(config), 'full': aps_full_tokens(config)}


def _batch(b: int, size: int):
  import jax.numpy as jnp
  rs = np.random.RandomState(0)
  hw = rs.uniform(0.4, 1.0, (2, b, 2))
  y0x0 = rs.uniform(0.0, 1.0, (2, b, 2)) * (1.0 - hw)
  boxes = np.concatenate([y0x0, hw], -1).astype(np.float32)
  return {'view1': jnp.asarray(rs.randint(0, 256, (b, size, size, 3)), jnp.uint8),
          'view2': jnp.asarray(rs.randint(0, 256, (b, size, size, 3)), jnp.uint8),
          'box1': jnp.asarray(boxes[0]), 'box2': jnp.asarray(boxes[1]),
          'flip1': jnp.asarray(rs.rand(b) < 0.5), 'flip2': jnp.asarray(rs.rand(b) < 0.5),
          'label': jnp.asarray(rs.randint(0, 10, b), jnp.int32)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--backbone', default='vit_tiny')
  ap.add_argument('--batch', type=int, default=64)
  ap.add_argument('--patch', type=int, default=2)
  ap.add_argument('--ratio', type=float, default=0.25)
  ap.add_argument('--dtype', default='float32')
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--flops-only', action='store_true')
  args = ap.parse_args()

  import jax
  from ssl_jax import sharding, train

  config = _config(args.backbone, args.batch, args.patch, args.ratio, args.dtype)
  mesh = sharding.make_mesh(1)
  batch = _batch(args.batch, int(config.data.image_size))
  rows, steps = {}, {}
  for name, method in _methods(config).items():
    parts = train.build(config, mesh, method, steps_per_epoch=97, total_steps=config.total_steps)
    with jax.set_mesh(mesh):
      t0 = time.perf_counter()
      compiled = parts.train_step.lower(parts.abstract, batch).compile()
      t_compile = time.perf_counter() - t0
      mem = compiled.memory_analysis()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      rows[name] = {'temp_MiB': mem.temp_size_in_bytes / 2**20,
                    'arg_MiB': mem.argument_size_in_bytes / 2**20,
                    'GFLOP': float(cost.get('flops', float('nan'))) / 1e9,
                    'compile_s': t_compile}
      if not args.flops_only:
        state = parts.init(jax.random.key(0))
        state, m, _ = compiled(state, batch)          # warm-up
        jax.block_until_ready(m['loss'])
        steps[name] = [compiled, state, []]
  if not args.flops_only:
    with jax.set_mesh(mesh):
      for _ in range(args.repeats):                   # interleaved repeats
        for name, entry in steps.items():
          fn, state, times = entry
          t0 = time.perf_counter()
          state, m, _ = fn(state, batch)
          jax.block_until_ready(m['loss'])
          times.append(time.perf_counter() - t0)
          entry[1] = state
    for name, (_, _, times) in steps.items():
      rows[name]['step_s'] = float(np.median(times))

  n = (int(config.data.image_size) // args.patch) ** 2
  keep = int(round(n * args.ratio))
  print(f'{args.backbone}, {config.data.image_size} px, patch {args.patch} ({n} patches), '
        f'batch {args.batch}, {args.dtype}, {jax.devices()[0].platform}: aps keeps {keep}+{keep} '
        f'tokens (ratio {args.ratio}), full {n}+{n}')
  cols = ['temp_MiB', 'arg_MiB', 'GFLOP'] + ([] if args.flops_only else ['step_s'])
  print('| metric | aps | full | full / aps |')
  print('|---|---:|---:|---:|')
  for col in cols:
    a, f = rows['aps'][col], rows['full'][col]
    print(f'| {col} | {a:.4g} | {f:.4g} | {f / a:.2f}x |')
  print(f'(compile: aps {rows["aps"]["compile_s"]:.0f} s, full {rows["full"]["compile_s"]:.0f} s)')


if __name__ == '__main__':
  main()
