r"""Method overhead: each method's train step vs the BYOL step, same backbone and batch.

    TFDS_DATA_DIR=../shared/data/tfds python benchmarks/bench_methods.py \
        [--methods byol,moco,msf,ft,clim,csml] [--backbone resnet18] [--width 0.25] \
        [--batch 64] [--repeats 5] [--steps 5] [--profile /tmp/method_traces]

Every method runs the full jitted train step (optimizer, EMA, probe included) on real CIFAR-10
batches of its own view recipe; the CIFAR preset of each config otherwise (queue/bank sizes as
in the preset). All methods are compiled first, then each repeat times every method once
(interleaved, so load changes hit all alike). Prints the median step time per method, its ratio
to BYOL's, the compiled step's FLOPs (XLA cost analysis; a bank search inside a loop is
counted once, so MSF / CsMl FLOPs are slight under-counts) and the time per FLOP relative to
BYOL's — the cost of the method machinery (queues, banks, kNN, k-means, mixing) beyond its
network work. Goal of the issue: memory-bank / kNN / k-means methods within 10% of BYOL.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax  # noqa: E402

from ssl_jax import data, methods, sharding, train  # noqa: E402
from _common import load_config  # noqa: E402  (benchmarks/ is the script's directory)

def build_method(name, args):
  """(train_step, state, batches, flops) for one method, compiled."""
  c = load_config(name, 'cifar10')
  c.model.backbone, c.model.width = args.backbone, args.width
  c.batch_size = args.batch
  c.data.train_split = 'train[:2048]'
  c.data.shuffle_buffer = 2048
  if os.environ.get('TFDS_DATA_DIR'):
    c.data.data_dir = os.environ['TFDS_DATA_DIR']
  mesh = sharding.make_mesh()
  method = methods.get(c.method.name)(c, steps_per_epoch=100)
  parts = train.build(c, mesh, method, steps_per_epoch=100, total_steps=10_000)
  it = data.make_train_iterator(c.data, global_batch_size=c.batch_size, seed=0)
  batches = [sharding.global_batch(mesh, next(it)) for _ in range(2)]
  with jax.set_mesh(mesh):
    state = parts.init(jax.random.key(0))
    cost = parts.train_step.lower(state, batches[0]).compile().cost_analysis()
    flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost).get('flops', 0.0))
    state, m, _ = parts.train_step(state, batches[0])  # compile
    jax.block_until_ready(m['loss'])
  return {'step': parts.train_step, 'state': state, 'batches': batches, 'mesh': mesh,
          'flops': flops}


def time_steps(b, steps):
  """Seconds per step over ``steps`` steps (the state advances, as in training)."""
  with jax.set_mesh(b['mesh']):
    t = time.perf_counter()
    for s in range(steps):
      b['state'], m, _ = b['step'](b['state'], b['batches'][s % 2])
    jax.block_until_ready(m['loss'])
  return (time.perf_counter() - t) / steps


def profile(name, b, directory, top=12):
  """Trace 2 steps of one method with jax.profiler; print the most expensive XLA ops."""
  import collections
  import glob
  import gzip
  import json
  out = os.path.join(directory, name)
  with jax.profiler.trace(out):
    time_steps(b, 2)
  newest = max(glob.glob(os.path.join(out, '**', '*.trace.json.gz'), recursive=True),
               key=os.path.getmtime)
  with gzip.open(newest) as f:
    events = json.load(f)['traceEvents']
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    # XLA ops (fusions, convolutions, ...) are the complete events below the thunk executor.
    if e.get('ph') == 'X' and not e['name'].startswith(('$', 'Thunk', 'Pjit', 'Slinky')):
      total[e['name']] += e['dur'] / 2e3     # microseconds over 2 steps -> ms per step
      count[e['name']] += 1
  print(f'\n{name}: top XLA ops, ms per step (trace: {out})')
  for op, ms in total.most_common(top):
    print(f'  {ms:8.1f} ms  x{count[op] // 2:<3d} {op}')


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--methods', default='byol,moco,msf,ft,clim,csml')
  p.add_argument('--backbone', default='resnet18')
  p.add_argument('--width', type=float, default=0.25)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--profile', default=None, metavar='DIR',
                 help='also trace 2 steps of each method into DIR and print the top XLA ops')
  args = p.parse_args()
  names = args.methods.split(',')
  if 'byol' not in names:
    names = ['byol'] + names
  built = {n: build_method(n, args) for n in names}
  times = {n: [] for n in names}
  for _ in range(args.repeats):       # interleaved: each repeat times every method once
    for n in names:
      times[n].append(time_steps(built[n], args.steps))
  results = {n: (statistics.median(times[n]), times[n], built[n]['flops']) for n in names}
  if args.profile:
    for n in names:
      profile(n, built[n], args.profile)
  base_flops = results['byol'][2]
  print(f'\n{args.backbone} x{args.width}, batch {args.batch}, {jax.device_count()} '
        f'{jax.devices()[0].platform} device(s); median of {args.repeats} interleaved repeats of '
        f'{args.steps} steps; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print('| method | step time (ms, median) | all repeats (ms) | time vs BYOL | GFLOP/step | '
        'FLOPs vs BYOL | time per FLOP vs BYOL |')
  print('|---|---:|---|---:|---:|---:|---:|')
  for n, (med, all_t, flops) in results.items():
    # Ratio per repeat (both timed back to back), then the median: robust to load drifts.
    ratio = statistics.median(t / b for t, b in zip(all_t, results['byol'][1]))
    print(f'| {n} | {1e3 * med:.1f} | {", ".join(f"{1e3 * t:.0f}" for t in all_t)} | '
          f'{ratio:.2f}x | {flops / 1e9:.1f} | {flops / base_flops:.2f}x | '
          f'{ratio / (flops / base_flops):.2f}x |')

if __name__ == '__main__':
  main()
