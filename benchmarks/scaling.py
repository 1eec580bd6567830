r"""Scaling on paper: what each step moves between chips, and step time on 8, 64 and 256 chips.

    python benchmarks/scaling.py [--methods byol,moco,ft,msf,clim,csml,aps] [--chips 8 64 256] \
        [--global-batch 4096] [--backbone resnet18] [--bn-group-sizes -1 8 32] \
        [--mfu-h100 0.20] [--mfu-tpu 0.30] [--check] [--json out.json]

For every (method, chip count, BatchNorm group size) the ImageNet preset's full train step
(ResNet-50 unless ``--backbone``, 224 px, bf16, optimizer, EMA target, online probe; the method's
queue / memory bank placed by its declared ``state_specs``) is lowered and compiled for that many
simulated CPU devices (a subprocess with ``--xla_force_host_platform_device_count=n``; nothing is
executed). From the SPMD-partitioned program we read, per chip:

* the FLOPs (``compiled.cost_analysis()``; the blocked bank search runs in a ``fori_loop``
  whose body XLA counts once, so its ``2 B N/n d`` FLOPs are added from the formula);
* every collective (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute)
  with its bytes, the number of devices it spans (its replica group: BatchNorm groups make
  smaller ones) and the number of them (each pays a latency);
* the method state (queue / bank) bytes held by one chip.

(XLA:CPU carries bfloat16 collectives as float32, so any bf16 collective is counted at twice its
GPU/TPU size: an upper bound. Gradients, BatchNorm statistics and gathered keys are float32
anyway. XLA:GPU/TPU also combine small all-reduces more aggressively than XLA:CPU, so the counts
are an upper bound on the latency terms too.)

The time model per chip is

    t_step = FLOPs / (peak * MFU)
             + sum over collectives [ alpha + ring(g) * bytes / bandwidth ]

over each collective's group of ``g`` chips, with ``ring(g) = 2 (g-1)/g`` for an all-reduce
(reduce-scatter + all-gather), ``(g-1)/g`` for an all-gather / reduce-scatter (bytes = the full
result), and the platform constants printed with the table (defaults: H100 SXM 989 TFLOP/s bf16
dense, NVLink 450 GB/s per direction inside a node of 8, 50 GB/s per GPU (400 Gb/s NIC) between
nodes with a hierarchical all-reduce; TPU v4 275 TFLOP/s, all-reduce bandwidth 1.1 PB/s per
4096-chip pod = 268 GB/s per chip). A group of ``g <= 8`` GPUs stays inside a node (NVLink
latency only). Communication is assumed NOT overlapped with compute (an upper bound on the step
time). Efficiency = compute / step time. The MFU is an assumption until measured; pass the
measured one with ``--mfu-*``.

``--check`` (a regression check; CI runs ``tests/test_scaling_check.py``) fails when a method
moves more per chip and step than its gradients + BatchNorm statistics + O(batch x dim). Every
collective (each element of a combined all-reduce) is classified:

* gradients: all-reduce elements shaped like a parameter (network + probe; up to transposition
  and unit dimensions), each parameter at most once;
* BatchNorm statistics: f32 ``[2, C]`` all-reduce elements (mean and mean of squares) and the
  running statistics' mean over groups;
* exchanges: everything else (keys, queries, top-k candidates, neighbour rows, ...),

and the step fails the check if (1) parameter-shaped all-reduces exceed one copy of the
gradients (by 5%), (2) the BatchNorm statistics exceed BN_PASSES passes, (3) one exchange moves
more than PER_OP x B x d x 4 bytes, or (4) all exchanges together more than
SLACK x B x d x 4 bytes (B the global batch, d the embedding dimension). An image batch, a
65,536-key queue or a second copy of the gradients fails it.
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

# The --check limits (see the module docstring). BN_PASSES: BatchNorm statistics are
# all-reduced once per BN layer per forward pass and once per backward pass; 16 passes cover
# the most (CLIM's ImageNet step: the target, [x1; x~] and three low-resolution queries,
# forward and backward = 9). PER_OP: the largest legitimate exchange is a [B, d] array
# (queries or keys) or the top-k candidates of a bank search, [B, k x chips] (5 B d floats at
# 64 chips, d = 128); a FIFO queue of 65,536 keys is 16 B d at B = 4096, d = 128, an image
# batch ~300 B d. SLACK: all exchanges together, a few [B, d] per query view and level.
BN_PASSES = 16
PER_OP = 8
SLACK = 32
GRAD_TOLERANCE = 0.05


def shape_bytes(text: str) -> int:
  """Bytes of an HLO result shape (``f32[4,8]`` or a tuple of them)."""
  total = 0
  for dt, dims in _SHAPE_RE.findall(text):
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    total += n * _DTYPE_BYTES.get(dt, 4)
  return total


def group_size(line: str, num_devices: int) -> int:
  """Devices spanned by one collective's replica group, from its HLO line.

  Formats: ``replica_groups={{0,1,2,3},{4,5,6,7}}`` (explicit), ``replica_groups=[2,4]<=[8]``
  (iota: groups of the last dim), ``replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}``
  (the named axes), ``replica_groups={}`` (all devices). Collective-permutes: 2.
  """
  if 'collective-permute' in line.split('(')[0] or 'source_target_pairs' in line:
    return 2
  m = re.search(r'replica_groups=\{\{([0-9,]*)\}', line)
  if m:
    return len(m.group(1).split(','))
  m = re.search(r'replica_groups=\[([0-9,]+)\]<=', line)
  if m:
    return int(m.group(1).split(',')[-1])
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:
    sizes = dict((k.strip("'"), int(v)) for k, v in re.findall(r"('[^']*')=(\d+)", m.group(1)))
    size = 1
    for name in re.findall(r"'([^']*)'", m.group(2)):
      size *= sizes.get(name, 1)
    return size
  return num_devices


def collective_ops(hlo_text: str, num_devices: int) -> list[tuple[str, int, int, str]]:
  """``[(kind, bytes, group size, result shape)]``, one per collective of an optimised HLO
  module."""
  ops = []
  for line in hlo_text.splitlines():
    m = _OP_RE.search(line)
    if m:
      ops.append((m.group(2), shape_bytes(m.group(1)), group_size(line, num_devices),
                  m.group(1)))
  return ops


def classify(r: dict) -> dict:
  """Bytes of gradients, surplus parameter-shaped all-reduces, BatchNorm statistics and
  exchanges, and the largest exchange, of one result (see the module docstring)."""
  def key_of(dims):   # XLA may reduce a gradient transposed or with unit dims: compare sorted
    return tuple(sorted(d for d in dims if d != 1))

  params = {}
  for dims in r['param_shapes']:
    key = key_of(dims)
    params[key] = params.get(key, 0) + 1
  out = {'grad': 0, 'surplus': 0, 'bn': 0, 'exchange': 0, 'largest_exchange': 0}
  for kind, nbytes, _, shape in r['ops']:
    if kind != 'all-reduce':
      out['exchange'] += nbytes
      out['largest_exchange'] = max(out['largest_exchange'], nbytes)
      continue
    exchange = 0
    for dt, dims in _SHAPE_RE.findall(shape):
      dims = tuple(int(d) for d in filter(None, dims.split(',')))
      b = shape_bytes(f'{dt}[{",".join(map(str, dims))}]')
      key = key_of(dims)
      if dt == 'f32' and params.get(key, 0) > 0:
        params[key] -= 1
        out['grad'] += b
      elif dt == 'f32' and key in {k for k in params} and len(key) > 0 and b > 4096:
        out['surplus'] += b
      elif dt == 'f32' and len(dims) == 2 and dims[0] == 2:
        out['bn'] += b
      else:
        exchange += b
    out['exchange'] += exchange
    out['largest_exchange'] = max(out['largest_exchange'], exchange)
  return out


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """``{kind: {'count': c, 'bytes': b}}`` of the collectives in an optimised HLO module."""
  out = {k: {'count': 0, 'bytes': 0} for k in _COLLECTIVES}
  for shape, kind in _OP_RE.findall(hlo_text):
    out[kind]['count'] += 1
    out[kind]['bytes'] += shape_bytes(shape)
  return out


def unit(r: dict) -> float:
  """``B x d x 4`` bytes: one float32 [global batch, embedding dim] array."""
  return r['global_batch'] * r['embed_dim'] * 4.0


def budget(r: dict) -> float:
  """Gradients + BN_PASSES passes of BatchNorm statistics + SLACK x B x d x 4 bytes."""
  return r['grad_bytes'] + BN_PASSES * r['bn_pass_bytes'] + SLACK * unit(r)


def moved(r: dict) -> int:
  return sum(v['bytes'] for v in r['collectives'].values())


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


def _set(config, item: str) -> None:
  """``KEY=VALUE`` (``--set method.partner_pool=-1``): a config override, VALUE a Python literal
  or a string."""
  import ast
  key, value = item.split('=', 1)
  try:
    value = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    pass
  *path, last = key.split('.')
  node = config
  for part in path:
    node = node[part]
  node[last] = value


def worker(args):
  sys.path.insert(0, REPO)
  import warnings
  from _common import load_config   # benchmarks/ is the script's directory
  import jax
  import jax.numpy as jnp
  from ssl_jax import data, methods, sharding, train

  n = jax.device_count()
  for name in args.methods.split(','):
    for g in args.bn_group_sizes:
      c = load_config(name, 'imagenet')
      c.batch_size = args.global_batch
      c.model.dtype = 'bfloat16'
      if args.backbone and not c.model.backbone.startswith('vit'):
        c.model.backbone = args.backbone
      c.model.bn_group_size = g
      for item in args.set:
        _set(c, item)
      train.validate_config(c, num_devices=n)
      mesh = sharding.make_mesh()
      method = methods.get(c.method.name)(c, steps_per_epoch=1000)
      parts = train.build(c, mesh, method, steps_per_epoch=1000, total_steps=100_000)
      dsh = sharding.data_sharding(mesh)
      b = c.batch_size
      batch = {s.key: jax.ShapeDtypeStruct((b, s.size, s.size, 3), jnp.uint8, sharding=dsh)
               for s in data.resolve_views(c.data)}
      batch['label'] = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=dsh)
      if c.data.views == 'aps':   # the crop geometry of both views
        for i in (1, 2):
          batch[f'box{i}'] = jax.ShapeDtypeStruct((b, 4), jnp.float32, sharding=dsh)
          batch[f'flip{i}'] = jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=dsh)
      with jax.set_mesh(mesh), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        compiled = parts.train_step.lower(parts.abstract, batch).compile()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      flops = float(cost.get('flops', 0.0)) + _search_flops(method, b, n)
      state_bytes = 0
      for a in jax.tree.leaves(parts.abstract.method_state):
        size = 1
        for d in a.sharding.shard_shape(a.shape):
          size *= d
        state_bytes += size * jnp.dtype(a.dtype).itemsize
      n_params = sum(x.size for x in jax.tree.leaves(parts.abstract.params))
      n_probe = sum(x.size for x in jax.tree.leaves(parts.abstract.probe_params))
      shapes = [list(x.shape) for x in jax.tree.leaves((parts.abstract.params,
                                                         parts.abstract.probe_params))]
      bn_channels = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(
          parts.abstract.batch_stats) if str(getattr(p[-1], 'key', '')) == 'mean')
      text = compiled.as_text()
      r = {'method': name, 'chips': n, 'bn_group_size': g, 'global_batch': b,
           'backbone': c.model.backbone, 'flops': flops,
           'collectives': collectives(text), 'ops': collective_ops(text, n),
           'state_bytes_per_chip': state_bytes, 'param_bytes': 4 * n_params,
           'grad_bytes': 4 * (n_params + n_probe), 'bn_pass_bytes': 8 * bn_channels,
           'param_shapes': shapes, 'overrides': args.set,
           'embed_dim': int(c.model.projector.out_dim),
           'warnings': sorted({str(w.message) for w in caught
                               if 'CrossDeviceTraffic' in type(w.message).__name__})}
      print('RESULT ' + json.dumps(r), flush=True)
      print(f'compiled {name} for {n} chips (bn group {g})', file=sys.stderr, flush=True)


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


def step_time(r: dict, p: dict, mfu: float) -> tuple[float, float]:
  """(compute, communication) seconds per step for one result under platform ``p``."""
  t_comp = r['flops'] / (p['peak'] * mfu)
  if 'ops' in r:
    comm = sum(comm_time(op[0], op[1], op[2], p) for op in r['ops'])
  else:   # results written before per-op groups were recorded: every op spans all chips
    comm = 0.0
    for kind, v in r['collectives'].items():
      if v['count']:
        comm += v['count'] * comm_time(kind, v['bytes'] / v['count'], r['chips'], p)
  return t_comp, comm


def _group(r: dict) -> str:
  g = r.get('bn_group_size', -1)
  return 'all' if g in (-1, None) or g >= r['chips'] else str(g)


def table(results, platform: str, mfu: float) -> str:
  p = PLATFORMS[platform]
  rows = [f'\n### {platform}: peak {p["peak"] / 1e12:.0f} TFLOP/s bf16, assumed MFU {mfu:.0%}, '
          f'intra-node {p["intra"][0] / 1e9:.0f} GB/s + {p["intra"][1] * 1e6:.0f} us'
          + (f', inter-node {p["inter"][0] / 1e9:.0f} GB/s per chip + '
             f'{p["inter"][1] * 1e6:.0f} us, {p["node"]} chips/node' if p['node'] < 4096 else '')
          + '\n',
          '| method | chips | BN group | batch/chip | TFLOP/chip | compute (ms) | '
          'all-reduce (MB, #) | all-gather (MB, #) | other coll. (MB, #) | moved (MB) | '
          'gradients (MB) | comm (ms) | step (ms) | efficiency | bank/queue per chip (MB) |',
          '|---|---:|---:|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|']
  by_method = {}
  for r in results:
    by_method.setdefault(r['method'], []).append(r)
  for name, rs in by_method.items():
    rs.sort(key=lambda r: (r['chips'], -1 if _group(r) == 'all' else -int(_group(r))))
    for r in rs:
      n = r['chips']
      t_comp, comm = step_time(r, p, mfu)
      step = t_comp + comm
      c = r['collectives']
      other = {k: v for k, v in c.items() if k not in ('all-reduce', 'all-gather')}
      o_bytes = sum(v['bytes'] for v in other.values())
      o_count = sum(v['count'] for v in other.values())
      grads = r.get('grad_bytes', r.get('param_bytes', 0))
      rows.append(
          f'| {name} | {n} | {_group(r)} | {r["global_batch"] // n} | {r["flops"] / 1e12:.2f} | '
          f'{1e3 * t_comp:.1f} | {c["all-reduce"]["bytes"] / 1e6:.1f}, {c["all-reduce"]["count"]} '
          f'| {c["all-gather"]["bytes"] / 1e6:.1f}, {c["all-gather"]["count"]} | '
          f'{o_bytes / 1e6:.1f}, {o_count} | {moved(r) / 1e6:.1f} | {grads / 1e6:.1f} | '
          f'{1e3 * comm:.1f} | {1e3 * step:.1f} | {t_comp / step:.0%} | '
          f'{r["state_bytes_per_chip"] / 1e6:.1f} |')
  return '\n'.join(rows)


def check(results) -> list[str]:
  """One line per violated limit (empty: every result within; module docstring)."""
  bad = []
  for r in results:
    c = classify(r)
    u = unit(r)
    name = f'{r["method"]} at {r["chips"]} chips (BN group {_group(r)})'
    if c['surplus'] > GRAD_TOLERANCE * r['grad_bytes']:
      bad.append(f'{name}: gradients all-reduced more than once ({c["surplus"] / 1e6:.1f} MB of '
                 f'parameter-shaped all-reduces beyond one copy of {r["grad_bytes"] / 1e6:.1f} MB)')
    if c['bn'] > BN_PASSES * r['bn_pass_bytes']:
      bad.append(f'{name}: BatchNorm statistics {c["bn"] / 1e6:.2f} MB > {BN_PASSES} passes of '
                 f'{r["bn_pass_bytes"] / 1e6:.3f} MB')
    if c['largest_exchange'] > PER_OP * u:
      bad.append(f'{name}: one collective moves {c["largest_exchange"] / 1e6:.1f} MB > {PER_OP} '
                 f'x B x d x 4 B = {PER_OP * u / 1e6:.1f} MB (images or a queue crossing chips?)')
    if c['exchange'] > SLACK * u:
      bad.append(f'{name}: exchanges move {c["exchange"] / 1e6:.1f} MB > {SLACK} x B x d x 4 B '
                 f'= {SLACK * u / 1e6:.1f} MB')
  return bad


def check_table(results) -> str:
  rows = ['| method | chips | BN group | moved (MB) | gradients (MB, of) | BN (MB, limit) | '
          'exchanges (MB, limit) | largest exchange (MB, limit) | within |',
          '|---|---:|---:|---:|---|---|---|---|---|']
  for r in results:
    c = classify(r)
    u = unit(r)
    ok = not check([r])
    rows.append(
        f'| {r["method"]} | {r["chips"]} | {_group(r)} | {moved(r) / 1e6:.1f} | '
        f'{(c["grad"] + c["surplus"]) / 1e6:.1f} of {r["grad_bytes"] / 1e6:.1f} | '
        f'{c["bn"] / 1e6:.2f}, {BN_PASSES * r["bn_pass_bytes"] / 1e6:.2f} | '
        f'{c["exchange"] / 1e6:.1f}, {SLACK * u / 1e6:.1f} | '
        f'{c["largest_exchange"] / 1e6:.1f}, {PER_OP * u / 1e6:.1f} | {"yes" if ok else "NO"} |')
  return '\n'.join(rows)


def run_workers(methods: str, chips: list[int], global_batch: int, backbone: str,
                bn_group_sizes: list[int], overrides: list[str] = ()) -> list[dict]:
  """Compile every method for every chip count (one subprocess per count); the results."""
  results = []
  for n in chips:
    # Only the HLO matters (partitioning, collectives, FLOPs): a cheap LLVM pipeline is enough.
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={n} '
                         '--xla_backend_optimization_level=0 '
                         '--xla_llvm_disable_expensive_passes=true')
    groups = [g for g in bn_group_sizes if g == -1 or g < n] or [-1]
    out = subprocess.run([sys.executable, os.path.abspath(__file__), '--worker',
                          '--methods', methods, '--global-batch', str(global_batch),
                          '--backbone', backbone, '--bn-group-sizes', *map(str, groups),
                          *[a for o in overrides for a in ('--set', o)]],
                         env=env, capture_output=True, text=True, check=False)
    got = [json.loads(line[len('RESULT '):]) for line in out.stdout.splitlines()
           if line.startswith('RESULT ')]
    results += got
    if out.returncode:
      sys.exit(f'worker for {n} chips failed after {len(got)} result(s):\n{out.stderr[-4000:]}')
    print(f'compiled {methods} for {n} chips', flush=True)
  return results


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--methods', default='byol,moco,ft,msf,clim,csml,aps')
  ap.add_argument('--chips', type=int, nargs='+', default=None,
                  help='default: 8 64 256 (--check: 64)')
  ap.add_argument('--global-batch', type=int, default=4096)
  ap.add_argument('--backbone', default='',
                  help='ResNet for the ResNet methods (default: the preset\'s resnet50)')
  ap.add_argument('--bn-group-sizes', type=int, nargs='+', default=[-1],
                  help='config.model.bn_group_size values (-1: all devices)')
  ap.add_argument('--mfu-h100', type=float, default=0.20)
  ap.add_argument('--mfu-tpu', type=float, default=0.30)
  ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                  help='config override for every method (repeatable), e.g. '
                       'method.partner_pool=-1')
  ap.add_argument('--check', action='store_true',
                  help='exit 1 if a method moves more than its budget (module docstring)')
  ap.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  ap.add_argument('--json', default=None, help='write the compiled measurements here')
  args = ap.parse_args()
  if args.worker:
    return worker(args)
  chips = args.chips or ([64] if args.check else [8, 64, 256])
  results = run_workers(args.methods, chips, args.global_batch, args.backbone,
                        args.bn_group_sizes, args.set)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)
  backbone = args.backbone or 'ResNet-50'
  print(f'\nImageNet presets, {backbone} (ResNet methods) 224 px bf16, global batch '
        f'{args.global_batch} (strong scaling); per chip, from the compiled SPMD step.')
  for r in results:
    for w in r.get('warnings', []):
      print(f'warning ({r["method"]}, {r["chips"]} chips): {w}')
  print(table(results, 'H100', args.mfu_h100))
  print(table(results, 'TPU v4', args.mfu_tpu))
  if args.check:
    print('\n### Check: bytes moved per chip and step vs budget\n')
    print(check_table(results))
    bad = check(results)
    if bad:
      print('\nFAILED:\n' + '\n'.join(bad))
      sys.exit(1)
    print('\nOK: every method within its budget.')


if __name__ == '__main__':
  main()
