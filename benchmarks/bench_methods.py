r"""Method overhead: each method's train step vs the BYOL step, same backbone and batch.

    TFDS_DATA_DIR=../shared/data/tfds python benchmarks/bench_methods.py \
        [--methods byol,moco,msf,ft,clim,csml] [--backbone resnet18] [--width 0.25] \
        [--batch 64] [--repeats 5] [--steps 5]

Every method runs the full jitted train step (optimizer, EMA, probe included) on real CIFAR-10
batches of its own view recipe; the CIFAR preset of each config otherwise (queue/bank sizes as
in the preset). Prints the median step time per method and its ratio to BYOL's. Goal of the
issue: memory-bank / kNN / k-means methods within 10% of BYOL's step time.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax  # noqa: E402

from ssl_jax import data, methods, sharding, train  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')


def load_config(name, arg):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def time_method(name, args):
  c = load_config(name, 'cifar10')
  c.model.backbone, c.model.width = args.backbone, args.width
  c.batch_size = args.batch
  c.data.train_split = 'train[:2048]'
  c.data.shuffle_buffer = 2048
  if os.environ.get('TFDS_DATA_DIR'):
    c.data.data_dir = os.environ['TFDS_DATA_DIR']
  mesh = sharding.make_mesh()
  method = methods.get(c.method.name)(c)
  parts = train.build(c, mesh, method, steps_per_epoch=100, total_steps=10_000)
  it = data.make_train_iterator(c.data, global_batch_size=c.batch_size, seed=0)
  batches = [sharding.global_batch(mesh, next(it)) for _ in range(2)]
  with jax.set_mesh(mesh):
    state = parts.init(jax.random.key(0))
    cost = parts.train_step.lower(state, batches[0]).compile().cost_analysis()
    flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost).get('flops', 0.0))
    state, m, _ = parts.train_step(state, batches[0])  # compile
    jax.block_until_ready(m['loss'])
    times = []
    for r in range(args.repeats):
      t = time.perf_counter()
      for s in range(args.steps):
        state, m, _ = parts.train_step(state, batches[s % 2])
      jax.block_until_ready(m['loss'])
      times.append((time.perf_counter() - t) / args.steps)
  return statistics.median(times), times, flops


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--methods', default='byol,moco,msf,ft,clim,csml')
  p.add_argument('--backbone', default='resnet18')
  p.add_argument('--width', type=float, default=0.25)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--steps', type=int, default=5)
  args = p.parse_args()
  names = args.methods.split(',')
  if 'byol' not in names:
    names = ['byol'] + names
  results = {n: time_method(n, args) for n in names}
  base, base_flops = results['byol'][0], results['byol'][2]
  print(f'\n{args.backbone} x{args.width}, batch {args.batch}, {jax.device_count()} '
        f'{jax.devices()[0].platform} device(s); median of {args.repeats} x {args.steps} steps')
  print('| method | step time (ms, median) | all repeats (ms) | time vs BYOL | GFLOP/step | '
        'FLOPs vs BYOL | time per FLOP vs BYOL |')
  print('|---|---:|---|---:|---:|---:|---:|')
  for n, (med, all_t, flops) in results.items():
    print(f'| {n} | {1e3 * med:.1f} | {", ".join(f"{1e3 * t:.0f}" for t in all_t)} | '
          f'{med / base:.2f}x | {flops / 1e9:.1f} | {flops / base_flops:.2f}x | '
          f'{(med / flops) / (base / base_flops):.2f}x |')


if __name__ == '__main__':
  main()
