r"""Scaling on paper: step time and efficiency on 8, 64 and 256 chips, from the compiled step.

    python benchmarks/scaling.py [--methods byol,moco,msf,csml] [--chips 8 64 256] \
        [--global-batch 4096] [--mfu-h100 0.20] [--mfu-tpu 0.30]

For every (method, chip count) the ImageNet preset's full train step (ResNet-50, 224 px, bf16,
optimizer, EMA target, online probe; the method's queue / memory bank sharded along 'data') is
lowered and compiled for that many simulated CPU devices (a subprocess with
``--xla_force_host_platform_device_count=n``; nothing is executed). From the SPMD-partitioned
program we read, per chip:

* the FLOPs (``compiled.cost_analysis()``; the blocked bank search runs in a ``fori_loop``
  whose body XLA counts once, so its ``2 B N/n d`` FLOPs are added from the formula);
* every collective (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute)
  with its bytes, and the number of them (each pays a latency);
* the method state (queue / bank) bytes held by one chip.

(XLA:CPU carries bfloat16 collectives as float32, so any bf16 collective is counted at twice its
GPU/TPU size: an upper bound. Gradients, BatchNorm statistics and gathered keys are float32
anyway. XLA:GPU/TPU also combine small all-reduces more aggressively than XLA:CPU, so the counts
are an upper bound on the latency terms too.)

The time model per chip is

    t_step = FLOPs / (peak * MFU)
             + sum over collectives [ alpha + ring(n) * bytes / bandwidth ]

with ``ring(n) = 2 (n-1)/n`` for an all-reduce (reduce-scatter + all-gather), ``(n-1)/n`` for an
all-gather / reduce-scatter (bytes = the full result), and the platform constants printed with
the table (defaults: H100 SXM 989 TFLOP/s bf16 dense, NVLink 450 GB/s per direction inside a
node of 8, 50 GB/s per GPU (400 Gb/s NIC) between nodes with a hierarchical all-reduce;
TPU v4 275 TFLOP/s, all-reduce bandwidth 1.1 PB/s per 4096-chip pod = 268 GB/s per chip).
Communication is assumed NOT overlapped with compute (an upper bound on the step time).
Efficiency = t_compute(global batch on 1 chip) / (n * t_step(n)). The MFU is an assumption until
the GPU benchmark of the issue measures it; pass the measured one with ``--mfu-*``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')

_DTYPE_BYTES = {'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'pred': 1, 's8': 1, 'u8': 1,
                'f64': 8, 's64': 8, 'u64': 8}
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
# `%name = f32[a,b]{...} all-reduce(` or a tuple result `(f32[..], bf16[..]) all-reduce(`.
_OP_RE = re.compile(r'=\s*(\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+(' +
                    '|'.join(_COLLECTIVES) + r')(?:-start)?\(')
_SHAPE_RE = re.compile(r'([a-z0-9]+)\[([0-9,]*)\]')


def shape_bytes(text: str) -> int:
  """Bytes of an HLO result shape (``f32[4,8]`` or a tuple of them)."""
  total = 0
  for dt, dims in _SHAPE_RE.findall(text):
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    total += n * _DTYPE_BYTES.get(dt, 4)
  return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """``{kind: {'count': c, 'bytes': b}}`` of the collectives in an optimised HLO module."""
  out = {k: {'count': 0, 'bytes': 0} for k in _COLLECTIVES}
  for shape, kind in _OP_RE.findall(hlo_text):
    out[kind]['count'] += 1
    out[kind]['bytes'] += shape_bytes(shape)
  return out


# ---------------------------------------------------------------------------------------------
# Worker: compile one method for the simulated chips of this process.
# ---------------------------------------------------------------------------------------------
def _search_flops(method, global_batch: int, n: int) -> float:
  """FLOPs per chip of the bank searches inside fori_loops (counted once by cost_analysis)."""
  if method.name == 'msf':   # one search of the global batch's targets over bank_size x d
    return 2.0 * global_batch * method.bank_size / n * method.embed_dim
  if method.name == 'csml':  # one search of the keys over the selection level's queue
    return 2.0 * global_batch * method.queue_size / n * method.embed_dim
  return 0.0


def worker(args):
  sys.path.insert(0, REPO)
  from _common import load_config   # benchmarks/ is the script's directory
  import jax
  import jax.numpy as jnp
  from ssl_jax import data, methods, sharding, train

  n = jax.device_count()
  results = []
  for name in args.methods.split(','):
    c = load_config(name, 'imagenet')
    c.batch_size = args.global_batch
    c.model.dtype = 'bfloat16'
    mesh = sharding.make_mesh()
    method = methods.get(c.method.name)(c, steps_per_epoch=1000)
    parts = train.build(c, mesh, method, steps_per_epoch=1000, total_steps=100_000)
    dsh = sharding.data_sharding(mesh)
    batch = {s.key: jax.ShapeDtypeStruct((c.batch_size, s.size, s.size, 3), jnp.uint8,
                                         sharding=dsh)
             for s in data.resolve_views(c.data)}
    batch['label'] = jax.ShapeDtypeStruct((c.batch_size,), jnp.int32, sharding=dsh)
    with jax.set_mesh(mesh):
      compiled = parts.train_step.lower(parts.abstract, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get('flops', 0.0)) + _search_flops(method, c.batch_size, n)
    state_bytes = 0
    for a in jax.tree.leaves(parts.abstract.method_state):
      shard = a.sharding.shard_shape(a.shape)
      size = 1
      for d in shard:
        size *= d
      state_bytes += size * jnp.dtype(a.dtype).itemsize
    param_bytes = sum(x.size * 4 for x in jax.tree.leaves(parts.abstract.params))
    results.append({'method': name, 'chips': n, 'global_batch': c.batch_size, 'flops': flops,
                    'collectives': collectives(compiled.as_text()),
                    'state_bytes_per_chip': state_bytes, 'param_bytes': param_bytes})
    print(f'compiled {name} for {n} chips', file=sys.stderr, flush=True)
  print(json.dumps(results))


# ---------------------------------------------------------------------------------------------
# Model and table
# ---------------------------------------------------------------------------------------------
PLATFORMS = {
    # peak bf16 FLOP/s; (bandwidth B/s, latency s) inside a node / between nodes; node size.
    'H100': dict(peak=989e12, intra=(450e9, 10e-6), inter=(50e9, 25e-6), node=8),
    'TPU v4': dict(peak=275e12, intra=(268e9, 10e-6), inter=(268e9, 10e-6), node=4096),
}


def comm_time(kind: str, nbytes: float, n: int, p: dict) -> float:
  """Seconds for one collective whose result is ``nbytes`` per chip, among ``n`` chips."""
  if n == 1 or nbytes == 0:
    return 0.0
  factor = 2.0 if kind == 'all-reduce' else 1.0
  if kind == 'collective-permute':
    return p['intra'][1] + nbytes / p['intra'][0]
  node = min(n, p['node'])
  bw, lat = p['intra']
  t = lat + factor * (node - 1) / node * nbytes / bw
  if n > node:    # hierarchical: each GPU moves 1/node of the data over its own NIC
    m = n // node
    bw2, lat2 = p['inter']
    t += lat2 + factor * (m - 1) / m * (nbytes / node) / bw2
  return t


def table(results, platform: str, mfu: float) -> str:
  p = PLATFORMS[platform]
  rows = [f'\n### {platform}: peak {p["peak"] / 1e12:.0f} TFLOP/s bf16, assumed MFU {mfu:.0%}, '
          f'intra-node {p["intra"][0] / 1e9:.0f} GB/s + {p["intra"][1] * 1e6:.0f} us'
          + (f', inter-node {p["inter"][0] / 1e9:.0f} GB/s per chip + '
             f'{p["inter"][1] * 1e6:.0f} us, {p["node"]} chips/node' if p['node'] < 4096 else '')
          + '\n',
          '| method | chips | batch/chip | TFLOP/chip | compute (ms) | all-reduce (MB, #) | '
          'all-gather (MB, #) | other coll. (MB, #) | comm (ms) | step (ms) | efficiency | '
          'bank/queue per chip (MB) |',
          '|---|---:|---:|---:|---:|---|---|---|---:|---:|---:|---:|']
  by_method = {}
  for r in results:
    by_method.setdefault(r['method'], []).append(r)
  for name, rs in by_method.items():
    rs.sort(key=lambda r: r['chips'])
    for r in rs:
      n = r['chips']
      t_comp = r['flops'] / (p['peak'] * mfu)
      comm = 0.0
      for kind, v in r['collectives'].items():
        if v['count']:
          per_op = v['bytes'] / v['count']
          comm += v['count'] * comm_time(kind, per_op, n, p)
      step = t_comp + comm
      eff = t_comp / step
      c = r['collectives']
      other = {k: v for k, v in c.items() if k not in ('all-reduce', 'all-gather')}
      o_bytes = sum(v['bytes'] for v in other.values())
      o_count = sum(v['count'] for v in other.values())
      rows.append(
          f'| {name} | {n} | {r["global_batch"] // n} | {r["flops"] / 1e12:.2f} | '
          f'{1e3 * t_comp:.1f} | {c["all-reduce"]["bytes"] / 1e6:.1f}, {c["all-reduce"]["count"]} | '
          f'{c["all-gather"]["bytes"] / 1e6:.1f}, {c["all-gather"]["count"]} | '
          f'{o_bytes / 1e6:.1f}, {o_count} | {1e3 * comm:.1f} | {1e3 * step:.1f} | '
          f'{eff:.0%} | {r["state_bytes_per_chip"] / 1e6:.1f} |')
  return '\n'.join(rows)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--methods', default='byol,moco,msf,csml')
  ap.add_argument('--chips', type=int, nargs='+', default=[8, 64, 256])
  ap.add_argument('--global-batch', type=int, default=4096)
  ap.add_argument('--mfu-h100', type=float, default=0.20)
  ap.add_argument('--mfu-tpu', type=float, default=0.30)
  ap.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  ap.add_argument('--json', default=None, help='write the compiled measurements here')
  args = ap.parse_args()
  if args.worker:
    return worker(args)
  results = []
  for n in args.chips:
    # Only the HLO matters (partitioning, collectives, FLOPs): a cheap LLVM pipeline is enough.
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={n} '
                         '--xla_backend_optimization_level=0 '
                         '--xla_llvm_disable_expensive_passes=true')
    out = subprocess.run([sys.executable, os.path.abspath(__file__), '--worker',
                          '--methods', args.methods, '--global-batch', str(args.global_batch)],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode:
      sys.exit(f'worker for {n} chips failed:\n{out.stderr[-4000:]}')
    results += json.loads(out.stdout.strip().splitlines()[-1])
    print(f'compiled {args.methods} for {n} chips', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)
  print(f'\nImageNet presets, ResNet-50 224 px bf16, global batch {args.global_batch} '
        f'(strong scaling); per chip, from the compiled SPMD step.')
  print(table(results, 'H100', args.mfu_h100))
  print(table(results, 'TPU v4', args.mfu_tpu))


if __name__ == '__main__':
  main()
