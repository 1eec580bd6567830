r"""Device suite: our steps and searches against PyTorch peers on one accelerator, one table.

On a GPU machine (jax, flax, optax, orbax, torch, torchvision; no TensorFlow, no package
registry), from the repository root, with ``third_party/`` carried beside the checkout::

    bash benchmarks/vendor_deps.sh                 # here, once: ml_collections -> third_party/
    python benchmarks/device_suite.py              # there (run tool: carry=["third_party"])
    python benchmarks/device_suite.py --smoke      # the same code at tiny sizes on CPU (CI)

One process prints one table. Every row is measured in this run on this device: after a warm-up
(compilation), ``--repeats`` repeats each time ``--steps`` steps of every contender of the row
in turn (interleaved, so load changes hit all alike); a contender's number is the median over
repeats, a ratio the median of the per-repeat ratios. Rows (``--rows``):

* ``byol``: ResNet-50 BYOL two-view step, images/s, vs torchvision + the same step in torch
  (the better of eager and ``torch.compile``). Goal: >= 1.2x.
* ``supervised``: ResNet-50 + linear head, both frameworks; derived rows ``ssl_sup_ratio``
  (BYOL / supervised step time against the FLOP ratio 8/3) and ``nvidia_context`` (NVIDIA's
  published A100 rate).
* ``moco``, ``msf``, ``clim``: each method's ImageNet preset step relative to BYOL's (peers for
  MoCo v2 and MSF).
* ``aps``: APS ViT-S/16 step and the full-token step, MFU. Goal: MFU >= 40%.
* ``knn``: top-5 of 256 queries over a 1,048,576 x 256 bank, f32 and bf16, vs
  ``torch.topk(q @ bank.T, 5)``. Goal: ours <= the peer and <= 1.5x the bank-read time.
* ``kmeans``: spherical k-means of 65,536 x 256 into 1,000 clusters vs a torch Lloyd loop.
* ``replicas``: ResNet-18 CIFAR BYOL step of S = 1, 4, 8 seeds in one program
  (``config.replicas``), images/s per replica and the ratio to S = 1 (ours only).

Each row's module in ``benchmarks/device_rows/`` (``byol.py``, ``supervised.py``,
``methods.py``, ``aps.py``, ``knn.py``, ``kmeans.py``, ``replicas.py``) says exactly what it
measures, ours and the peer; ``jax_steps.py`` builds our steps and ``torch_peers.py`` holds what
the peers share.

f32 matmuls may use TF32 in both frameworks (XLA's default precision on GPU; torch
``set_float32_matmul_precision('high')``). Peak bf16 FLOP/s and HBM bandwidth come from a table
of device kinds (H200, H100 SXM: 989 TFLOP/s; 4.8 / 3.35 TB/s; A100: 312 TFLOP/s, 2.0 TB/s
80GB) or ``--peak_tflops`` / ``--hbm_tbps``.

Time: the whole suite is meant to take < 6 minutes on one H200, compilation included: the JAX
steps compile in ``--compile_workers`` threads while torch.compile runs in the main thread, and
``--budget_s`` skips what would not fit, each skipped row printed as ``not run: budget``.

``--smoke``: the same code paths at tiny sizes on the CPU (ResNet-tiny, ViT-test, 32 px, batch
8, bank 4,096; torch.compile with the 'eager' backend, i.e. graph capture without code
generation, because inductor's C++ build takes minutes on a small CPU). A functional check, not
a performance result. ``--block_tf`` makes ``tensorflow``, ``tensorflow_datasets`` and ``clu``
unimportable and ``--vendored_only`` resolves ``ml_collections``, ``absl`` and ``yaml`` only
from ``--third_party``, to reproduce the device image here (``tests/test_device_suite.py``).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import importlib.abc
import importlib.machinery
import json
import os
import shlex
import sys
import time
from typing import Any, Callable

# Standard library only (see device_rows/__init__.py): safe before the import gates.
from device_rows import (aps, byol, jax_steps, kmeans, knn, methods, replicas, supervised,
                         torch_peers)
from device_rows.common import BudgetSkip, Row, log, short

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
BLOCKED_TF = ('tensorflow', 'tensorflow_datasets', 'clu')
VENDORED = ('ml_collections', 'absl', 'yaml')
ROWS = ('byol', 'supervised', 'knn', 'kmeans', 'aps', 'moco', 'msf', 'clim', 'replicas')
# Each row's function (suite -> rows), the JAX steps it compiles up front (key -> prepare(suite)),
# and the torch peers (key -> class).
ROW_FNS: dict[str, Callable[[Any], list[Row]]] = {
    'byol': byol.row, 'supervised': supervised.row, 'knn': knn.row, 'kmeans': kmeans.row,
    'aps': aps.row, 'moco': functools.partial(methods.row, key='moco'),
    'msf': functools.partial(methods.row, key='msf'),
    'clim': functools.partial(methods.row, key='clim'), 'replicas': replicas.row}
TRAIN_ROWS = ('byol', 'supervised', 'aps', 'moco', 'msf', 'clim', 'replicas')   # compile order
PEERS = {'byol': byol.ByolPeer, 'supervised': supervised.SupervisedPeer,
         'moco': methods.MocoPeer, 'msf': methods.MsfPeer}
# Seconds each row needs after compilation (warm-ups, repeats, torch eager), full sizes; guesses
# for the budget guard until a GPU run measures them (the run prints what each row took).
ROW_EST_S = {'byol': 45, 'supervised': 25, 'knn': 25, 'kmeans': 15, 'aps': 15, 'moco': 35,
             'msf': 35, 'clim': 25, 'replicas': 25}


# =============================================================================================
# Bootstrap (before jax / torch / ssl_jax are imported)
# =============================================================================================
class VendoredOnly(importlib.abc.MetaPathFinder):
  """``--vendored_only``: the top-level packages ``names`` are found only in ``third_party``
  (their submodules follow the package's ``__path__``)."""

  def __init__(self, names, third_party):
    self.names, self.third_party = tuple(names), third_party

  def find_spec(self, name, path=None, target=None):
    if name in self.names:
      spec = importlib.machinery.PathFinder.find_spec(name, [self.third_party])
      if spec is None:
        raise ModuleNotFoundError(f'{name} is not in {self.third_party} (--vendored_only); '
                                  'run benchmarks/vendor_deps.sh', name=name)
      return spec
    return None


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--smoke', action='store_true',
                 help='tiny sizes on the CPU: a functional check, not a performance result')
  p.add_argument('--rows', default=','.join(ROWS), help=f'comma list of: {", ".join(ROWS)}')
  p.add_argument('--budget_s', type=float, default=None,
                 help='skip rows that would end after this many seconds (default 345; smoke 1800)')
  p.add_argument('--repeats', type=int, default=None, help='interleaved repeats (5; smoke 2)')
  p.add_argument('--steps', type=int, default=None, help='steps per repeat (3; smoke 1)')
  p.add_argument('--batch', type=int, default=None, help='ResNet batch per device (256; smoke 8)')
  p.add_argument('--aps_batch', type=int, default=None, help='APS batch per device (256; smoke 8)')
  p.add_argument('--torch_compile', default=None, choices=('inductor', 'eager', 'off'),
                 help="torch.compile backend of the peers' compiled variant (inductor; smoke: "
                      "eager = graph capture only)")
  p.add_argument('--torch_compile_rows', default='byol,supervised',
                 help='rows whose peer also runs compiled (the better of eager and compiled)')
  p.add_argument('--compile_workers', type=int, default=4,
                 help='threads compiling the JAX steps up front (1: one after another)')
  p.add_argument('--replicas', default='1,4,8',
                 help='replica counts S of the replicas row (comma list; 1 is always run)')
  p.add_argument('--knn_block_rows', default='',
                 help='extra kNN rows with these ops.knn block_rows values (comma list)')
  p.add_argument('--peak_tflops', type=float, default=None,
                 help='bf16 dense peak per device (default: from the device kind)')
  p.add_argument('--hbm_tbps', type=float, default=None,
                 help='HBM bandwidth per device, TB/s (default: from the device kind)')
  p.add_argument('--jax_mem_fraction', type=float, default=0.55,
                 help='cap on the GPU memory JAX may take (the rest is torch\'s)')
  p.add_argument('--third_party', default=os.path.join(REPO, 'third_party'),
                 help='vendored pure-Python packages (benchmarks/vendor_deps.sh)')
  p.add_argument('--block_tf', action='store_true',
                 help='make tensorflow, tensorflow_datasets and clu unimportable (as on device)')
  p.add_argument('--vendored_only', action='store_true',
                 help='import ml_collections, absl and yaml only from --third_party')
  p.add_argument('--json', default=None, help='also write the results here')
  a = p.parse_args(argv)
  a.rows = [r for r in a.rows.split(',') if r]
  unknown = [r for r in a.rows if r not in ROWS]
  if unknown:
    p.error(f'--rows: unknown {unknown}; accepted: {", ".join(ROWS)}')
  a.budget_s = a.budget_s if a.budget_s is not None else (1800.0 if a.smoke else 345.0)
  a.repeats = a.repeats or (2 if a.smoke else 5)
  a.steps = a.steps or (1 if a.smoke else 3)
  a.batch = a.batch or (8 if a.smoke else 256)
  a.aps_batch = a.aps_batch or (8 if a.smoke else 256)
  a.torch_compile = a.torch_compile or ('eager' if a.smoke else 'inductor')
  a.torch_compile_rows = [] if a.torch_compile == 'off' else [
      r for r in a.torch_compile_rows.split(',') if r]
  a.knn_block_rows = [int(x) for x in a.knn_block_rows.split(',') if x]
  a.replicas = sorted({1} | {int(x) for x in a.replicas.split(',') if x})
  if a.replicas[0] < 1:
    p.error(f'--replicas: counts must be >= 1, got {a.replicas}')
  return a


def bootstrap(args) -> None:
  """Import gates, sys.path (repo first, third_party last: the image's own packages win) and
  the memory settings that must precede ``import jax``.

  ``--block_tf`` puts ``None`` in ``sys.modules`` for tensorflow / tensorflow_datasets / clu:
  ``import tensorflow`` then raises ModuleNotFoundError and ``importlib.util.find_spec``
  returns None, exactly as when they are not installed (torch._dynamo probes with find_spec).
  """
  gated = (BLOCKED_TF if args.block_tf else ()) + (VENDORED if args.vendored_only else ())
  loaded = [m for m in sys.modules if m.split('.')[0] in gated]
  if loaded:
    sys.exit(f'device_suite: {loaded[:3]} already imported before the import gates')
  if args.block_tf:
    for name in BLOCKED_TF:
      sys.modules[name] = None
  if args.vendored_only:
    if not os.path.isdir(args.third_party):
      sys.exit(f'device_suite: --vendored_only but {args.third_party} does not exist; run '
               'benchmarks/vendor_deps.sh')
    sys.meta_path.insert(0, VendoredOnly(VENDORED, args.third_party))
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  if os.path.isdir(args.third_party) and args.third_party not in sys.path:
    sys.path.append(args.third_party)
  if args.smoke:
    os.environ['JAX_PLATFORMS'] = 'cpu'
    # The tests' cheap XLA:CPU pipeline: compiles 2x faster (only the CPU backend reads these).
    flags = os.environ.get('XLA_FLAGS', '')
    for f in ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true'):
      if f.split('=')[0] not in flags:
        flags += ' ' + f
    os.environ['XLA_FLAGS'] = flags.strip()
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', str(args.jax_mem_fraction))


# =============================================================================================
# The suite: device facts, the compile phase, the row loop, the report
# =============================================================================================
class Suite:
  """The run's state, passed to every row: ``args``, the imported ``jax`` / ``np`` / ``torch``
  / ``tv`` (torchvision) / ``sharding``, the device facts and ``mesh``, and the compiled jobs."""

  def __init__(self, args):
    self.args = args
    self.t0 = time.perf_counter()
    import jax
    import numpy as np
    jax.devices()        # JAX's GPU backend first, then torch (each finds its CUDA libraries)
    import torch
    self.jax, self.np, self.torch = jax, np, torch
    from ssl_jax import export
    self.tv = export.import_torchvision()
    from ssl_jax import sharding
    self.sharding = sharding
    self.platform = jax.devices()[0].platform
    self.n_dev = jax.device_count()
    self.kind = jax.devices()[0].device_kind
    if not args.smoke and self.platform == 'cpu':
      sys.exit('device_suite: JAX sees no accelerator; use --smoke for the CPU functional check')
    self.tdev = torch.device('cuda' if (self.platform == 'gpu' and torch.cuda.is_available())
                             else 'cpu')
    if self.platform == 'gpu' and self.tdev.type != 'cuda':
      sys.exit('device_suite: JAX runs on the GPU but torch sees no CUDA device')
    # cudnn.benchmark is switched on after the compile phase, so torch's convolution autotuning
    # runs alone on the device (phase B's warm-up), not beside the JAX compile threads.
    torch.backends.cudnn.benchmark = False
    torch.set_float32_matmul_precision('high')
    self.peak, self.hbm, self.spec_source = self._specs()
    self.mesh = sharding.make_mesh()
    self.rows: list[Row] = []
    self.jobs: dict[str, concurrent.futures.Future] = {}
    self.peers: dict[str, Any] = {}
    self.compile_notes: dict[str, str] = {}
    self.skipped_compile: set[str] = set()

  # ------------------------------------------------------------------ device facts
  def _specs(self):
    a, k = self.args, self.kind.upper()
    peak = hbm = None
    if 'GH200' in k:
      peak = 989e12
    elif 'H200' in k:
      peak, hbm = 989e12, 4.8e12
    elif 'H100' in k and 'PCIE' not in k:
      peak, hbm = 989e12, 3.35e12
    elif 'A100' in k:
      peak, hbm = 312e12, (2.0e12 if '80GB' in k else 1.555e12)
    src = f'table ({self.kind})' if peak else 'unknown device kind'
    if a.peak_tflops:
      peak, src = a.peak_tflops * 1e12, '--peak_tflops'
    if a.hbm_tbps:
      hbm = a.hbm_tbps * 1e12
      src += ', --hbm_tbps'
    return peak, hbm, src

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def sync_torch(self):
    if self.tdev.type == 'cuda':
      self.torch.cuda.synchronize()

  def autocast(self):
    return self.torch.autocast(device_type=self.tdev.type, dtype=self.torch.bfloat16)

  # ------------------------------------------------------------------ header
  def header(self):
    import jax
    import torch
    a = self.args
    cmd = 'python ' + ' '.join(shlex.quote(x) for x in
                               [os.path.relpath(os.path.abspath(sys.argv[0]), REPO)] + sys.argv[1:])
    print(f'device suite: {self.n_dev} x {self.kind} ({self.platform}); jax {jax.__version__}, '
          f'torch {torch.__version__} ({self.tdev.type}), torchvision {self.tv.__version__}, '
          f'python {sys.version.split()[0]}')
    print(f'command (from the repository root): {cmd}')
    tp = a.third_party
    if os.path.isdir(tp):
      size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tp) for f in fs)
      pkgs = sorted(x for x in os.listdir(tp) if not x.startswith('.'))
      print(f'extra files beside the checkout: {os.path.relpath(tp, REPO)}/ ({", ".join(pkgs)}; '
            f'{size / 2**20:.2f} MiB; made by `bash benchmarks/vendor_deps.sh`), appended to '
            'sys.path; run tool: carry=["third_party"]')
    else:
      print(f'extra files beside the checkout: none found at {tp} (on a device image without '
            'ml_collections: `bash benchmarks/vendor_deps.sh` here, carry=["third_party"])')
    import ml_collections
    print(f'ml_collections {getattr(ml_collections, "__version__", "?")} from '
          f'{os.path.dirname(ml_collections.__file__)}')
    blocked = 'blocked (--block_tf)' if a.block_tf else 'not blocked'
    print(f'tensorflow / tensorflow_datasets / clu: {blocked}')
    peak = f'{self.peak / 1e12:.0f} TFLOP/s bf16' if self.peak else 'peak unknown (MFU n/a)'
    hbm = f'{self.hbm / 1e12:.2f} TB/s HBM' if self.hbm else 'HBM bandwidth unknown'
    print(f'device constants: {peak}, {hbm} [{self.spec_source}]')
    need = ('about 2 CPU-minutes (2-5 min wall on a loaded 2-core machine)' if a.smoke else
            'about 5-6 min on one H200, compilation included')
    print(f'time: {need} (budget guard --budget_s '
          f'{a.budget_s:.0f}); rows {",".join(a.rows)}; {a.repeats} interleaved repeats x '
          f'{a.steps} steps; torch.compile: {a.torch_compile} for {a.torch_compile_rows or "-"}')
    if a.smoke:
      print('SMOKE MODE: tiny sizes on the CPU; a functional check, NOT a performance result')
    sys.stdout.flush()

  # ------------------------------------------------------------------ phase A: compile
  def submit_jobs(self, pool):
    rows = self.args.rows
    order = [r for r in TRAIN_ROWS if r in rows]
    if any(r in rows for r in ('moco', 'msf', 'clim')) and 'byol' not in order:
      order.insert(0, 'byol')    # the methods rows are relative to BYOL
    for r in order:
      if r == 'supervised':
        self.jobs[r] = pool.submit(supervised.prepare, self)
      elif r == 'aps':
        self.jobs['aps'] = pool.submit(aps.prepare, self)
        self.jobs['aps_full'] = pool.submit(aps.prepare_full, self)
      elif r == 'replicas':
        for n in self.args.replicas:
          self.jobs[replicas.job_key(n)] = pool.submit(replicas.prepare, self, n)
      else:
        self.jobs[r] = pool.submit(jax_steps.prepare_train, self, r)

  def wait_jobs(self, deadline: float):
    pending = list(self.jobs.values())
    done, not_done = concurrent.futures.wait(pending, timeout=max(0.0, deadline - self.elapsed()))
    if not_done:
      for key, f in self.jobs.items():
        if f in not_done and f.cancel():
          self.skipped_compile.add(key)
          log(f'compile of {key} not started by the compile deadline ({deadline:.0f} s): '
              'cancelled')
      still = [k for k, f in self.jobs.items() if not f.done() and k not in self.skipped_compile]
      if still:
        log(f'compiles still running past the compile deadline (cannot be interrupted): {still}')
      concurrent.futures.wait([f for f in self.jobs.values() if not f.cancelled()])

  def job(self, key):
    """The prepared object of ``key``, or raise the job's exception."""
    if key in self.skipped_compile:
      raise BudgetSkip(f'compile of {key} cancelled by the budget')
    return self.jobs[key].result()

  def prepare_torch_compiled(self):
    """Phase A, main thread: the peers whose compiled variant is timed, compiled now (their
    first call) while the JAX steps compile in the worker threads."""
    for key in self.args.torch_compile_rows:
      if key not in self.args.rows or key not in ('byol', 'supervised'):
        continue
      t = time.perf_counter()
      try:
        peer = self.make_peer(key)
        peer.enable_compile(self.args.torch_compile)
        peer.run(1, compiled=True)
        self.compile_notes[key] = (f'torch.compile({self.args.torch_compile}) '
                                   f'{time.perf_counter() - t:.0f} s')
      except Exception as e:  # pylint: disable=broad-except
        if key in self.peers:
          self.peers[key].compiled = None
        self.compile_notes[key] = f'torch.compile failed, eager only ({short(e)})'
      log(f'{key} peer: {self.compile_notes[key]}')

  def make_peer(self, key):
    """The torch peer of ``key`` (built once), on the same images as our step."""
    if key not in self.peers:
      c, b = torch_peers.peer_batch(self, key)
      self.peers[key] = PEERS[key](self, c, b)
    return self.peers[key]

  # ------------------------------------------------------------------ phase B: rows
  def run_row(self, key: str, fn: Callable[[Any], list[Row]]):
    left = self.args.budget_s - self.elapsed()
    need = 0 if self.args.smoke else ROW_EST_S.get(key, 20)
    if left < need:
      self.rows.append(Row(key, key, '', status='skipped',
                           notes=f'not run: budget ({max(left, 0):.0f} s left of --budget_s '
                                 f'{self.args.budget_s:.0f}, the row needs ~{need} s)'))
      log(f'{key}: not run: budget')
      return
    t = time.perf_counter()
    try:
      rows = fn(self)
    except BudgetSkip as e:
      rows = [Row(key, key, '', status='skipped', notes=f'not run: budget ({e})')]
    except Exception as e:  # pylint: disable=broad-except
      import traceback
      traceback.print_exc()
      rows = [Row(key, key, '', status='error', notes=f'error: {short(e)}')]
    dt = time.perf_counter() - t
    for r in rows:
      r.seconds = dt
    if self.tdev.type == 'cuda':
      self.torch.cuda.empty_cache()
    self.rows.extend(rows)
    log(f'{key}: done in {dt:.1f} s (total {self.elapsed():.0f} s)')

  # ------------------------------------------------------------------ the run
  def run(self):
    a = self.args
    self.header()
    heavy = [r for r in a.rows if r in TRAIN_ROWS]
    reserve = 0 if a.smoke else sum(ROW_EST_S[r] for r in a.rows)
    deadline = max(a.budget_s - reserve, 0.4 * a.budget_s)
    t = time.perf_counter()
    if heavy:
      workers = max(1, a.compile_workers)
      with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        self.submit_jobs(pool)
        self.prepare_torch_compiled()
        self.wait_jobs(deadline)
      for key, f in self.jobs.items():
        if f.done() and not f.cancelled() and f.exception() is None:
          log(f'compiled {key}: {f.result().build_s:.0f} s in its thread')
        elif f.done() and not f.cancelled():
          log(f'compile of {key} failed: {short(f.exception())}')
      log(f'compile phase: {time.perf_counter() - t:.0f} s ({workers} JAX compile threads; '
          f'total {self.elapsed():.0f} s)')
    self.torch.backends.cudnn.benchmark = True
    for key in ROWS:
      if key in a.rows:
        self.run_row(key, ROW_FNS[key])
    self.table()
    return self.finish()

  def table(self):
    a = self.args
    smoke = 'SMOKE (CPU, tiny sizes; functional check, not a performance result): '
    print(f'\n{smoke if a.smoke else ""}{self.n_dev} x {self.kind}; median of {a.repeats} '
          f'interleaved repeats x {a.steps} steps; batch {a.batch}/device '
          f'(APS {a.aps_batch}); bf16 compute')
    print('| row | metric | ours | PyTorch peer | peer variant | ours vs peer | goal | result | '
          'row time (s) | notes |')
    print('|---|---|---:|---:|---|---:|---|---|---:|---|')
    for r in self.rows:
      if r.status != 'ok':
        print(f'| {r.label} | | | | | | | {r.notes} | {r.seconds:.0f} | |')
        continue
      fmt = lambda v, f=r.fmt: '—' if v is None else f.format(v)  # noqa: E731
      print(f'| {r.label} | {r.metric} | {fmt(r.ours)} | {fmt(r.peer)} | {r.peer_label} | '
            f'{"—" if r.vs is None else f"{r.vs:.2f}x"} | {r.goal} | {r.result} | '
            f'{r.seconds:.0f} | {r.notes.strip("; ")} |')
    print(f'total wall time: {self.elapsed():.0f} s (budget {a.budget_s:.0f} s)')

  def finish(self) -> int:
    blocked_loaded = sorted(m for m, mod in sys.modules.items()
                            if m.split('.')[0] in BLOCKED_TF and mod is not None)
    prov = {m: getattr(sys.modules.get(m), '__file__', None) for m in VENDORED}
    print('imported from: ' + ', '.join(f'{m} {os.path.dirname(f) if f else "(not imported)"}'
                                        for m, f in prov.items()))
    print(f'tensorflow / tensorflow_datasets / clu modules loaded: {blocked_loaded or "none"}'
          f'{" (imports blocked by --block_tf)" if self.args.block_tf else ""}')
    if self.args.json:
      with open(self.args.json, 'w') as f:
        json.dump({'rows': [dataclasses.asdict(r) for r in self.rows], 'device': self.kind,
                   'platform': self.platform, 'n_devices': self.n_dev,
                   'seconds': self.elapsed(), 'smoke': self.args.smoke,
                   'imports': prov, 'blocked_loaded': blocked_loaded,
                   'block_tf': self.args.block_tf, 'vendored_only': self.args.vendored_only,
                   'argv': sys.argv}, f, indent=1)
    errors = [r.key for r in self.rows if r.status == 'error']
    if errors:
      print(f'rows with errors: {errors}')
    return 1 if errors else 0


def main(argv=None) -> int:
  args = parse_args(argv)
  bootstrap(args)
  return Suite(args).run()


if __name__ == '__main__':
  sys.exit(main())
