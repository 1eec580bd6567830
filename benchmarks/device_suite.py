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

* ``byol``: ResNet-50 BYOL two-view step (online forward+backward of both views, predictor,
  two EMA-target forwards, LARS, EMA update, online linear probe), bf16 compute, batch 256 per
  device, images/s. Ours: the trainer's jitted step (``train.build``) on a batch sharded over
  the 'data' mesh (NamedSharding). Peer: torchvision ``resnet50`` with the same heads, the same
  step (LARS written with ``torch._foreach`` ops, EMA target, probe), AMP bf16 autocast,
  channels-last, cudnn.benchmark; the better of eager and ``torch.compile``. Goal: >= 1.2x.
* ``supervised``: ResNet-50 + linear head, SGD momentum 0.9, weight decay 1e-4, cross-entropy,
  bf16 compute, batch 256 per device, both frameworks. Derived rows: the SSL/supervised
  step-cost ratio (BYOL step time / supervised step time for the same batch; goal within 10%
  of the FLOP ratio 8/3: two online forward+backward passes and two target forwards per image
  against one forward+backward; XLA's counted ratio is printed beside it) and the context row,
  NVIDIA's published PyTorch ResNet-50 AMP training rate, 2,470 img/s on one A100-80GB
  (DeepLearningExamples, 21.03), against our supervised rate on this device.
* ``moco``, ``msf``, ``clim``: each method's ImageNet preset step (ResNet-50, batch 256 per
  device, bf16; banks pre-filled with random unit rows, the steady state) relative to BYOL's,
  each timed interleaved with BYOL again. Peers (the same step written in torch, eager) for MoCo
  v2 and MSF; CLIM has none (not written: k-means bank, mixing and multi-resolution views).
* ``aps``: APS ViT-S/16 step (224 px, 49 of 196 tokens per view) and the full-token two-view
  step of the same network, with MFU = XLA cost-analysis FLOPs / step time / the device's bf16
  peak. Ours only (the comparison is kept vs all tokens). Goal: MFU >= 40%.
* ``knn``: top-5 of 256 queries over a 1,048,576 x 256 bank (f32 and bf16), ours
  (``ops.knn.topk_cosine``; with its approximate ``recall_target`` variant when the library has
  it) vs ``torch.topk(q @ bank.T, 5)``. Goal: ours <= the peer and <= 1.5x the bank-read time
  (bank bytes / HBM bandwidth).
* ``kmeans``: spherical k-means of 65,536 x 256 into 1,000 clusters, 10 Lloyd iterations (the
  same initial centroids), ours (``ops.kmeans.kmeans``) vs a torch Lloyd loop.

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
import copy
import dataclasses
import importlib.abc
import importlib.machinery
import inspect
import json
import math
import os
import shlex
import statistics
import sys
import time
from typing import Any, Callable

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
BLOCKED_TF = ('tensorflow', 'tensorflow_datasets', 'clu')
VENDORED = ('ml_collections', 'absl', 'yaml')
ROWS = ('byol', 'supervised', 'knn', 'kmeans', 'aps', 'moco', 'msf', 'clim')
NVIDIA_A100_IMG_S = 2470.0   # DeepLearningExamples RN50 v1.5, PyTorch AMP, 1x A100-80GB, 21.03
BYOL_FLOP_RATIO = 8.0 / 3.0  # (2 x fwd+bwd + 2 x fwd) / (1 x fwd+bwd), fwd+bwd = 3 fwd
# Seconds each row needs after compilation (warm-ups, repeats, torch eager), full sizes; guesses
# for the budget guard until a GPU run measures them (the run prints what each row took).
ROW_EST_S = {'byol': 45, 'supervised': 25, 'knn': 25, 'kmeans': 15, 'aps': 15, 'moco': 35,
             'msf': 35, 'clim': 25}


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
# Results and timing
# =============================================================================================
@dataclasses.dataclass
class Row:
  key: str
  label: str
  metric: str
  ours: float | None = None
  peer: float | None = None
  peer_label: str = ''          # which peer variant, or why there is none
  vs: float | None = None       # ours vs peer (> 1: ours better), as the metric says
  goal: str = ''
  result: str = ''              # 'met' / 'not met' / '' (context)
  seconds: float = 0.0
  notes: str = ''
  status: str = 'ok'            # 'ok', 'skipped', 'error'
  fmt: str = '{:,.0f}'


def median_ratio(a: list[float], b: list[float]) -> float:
  return statistics.median(x / y for x, y in zip(a, b))


def interleave(contenders: dict[str, Callable[[int], float]], repeats: int, steps: int
               ) -> dict[str, list[float]]:
  """Seconds per step of every contender, one value per repeat; the contenders of one repeat
  run back to back. Each ``run(n)`` runs ``n`` steps and waits for the device."""
  times = {k: [] for k in contenders}
  for _ in range(repeats):
    for k, run in contenders.items():
      times[k].append(run(steps) / steps)
  return times


def log(msg: str) -> None:
  print(f'# {msg}', flush=True)


# =============================================================================================
# The suite
# =============================================================================================
class Suite:

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

  # ------------------------------------------------------------------ sizes and configs
  def method_config(self, name: str):
    """The method's ImageNet preset (smoke: its runlocal CIFAR preset) on synthetic data, bf16,
    ``--batch`` (APS: ``--aps_batch``) per device."""
    from _common import load_config  # noqa: E402  (benchmarks/ is the script's directory)
    a = self.args
    if a.smoke:
      c = load_config(name, 'cifar10,runlocal' if name != 'aps' else 'cifar10,vit_test,runlocal')
    else:
      c = load_config(name, 'imagenet' if name != 'aps' else 'imagenet,vit_small')
    c.data.name = 'synthetic'
    c.model.dtype = 'bfloat16'
    c.batch_size = (a.aps_batch if name == 'aps' else a.batch) * self.n_dev
    c.data.synthetic_examples = 50_000 if a.smoke else 1_281_167
    if a.smoke and name == 'moco':   # as the ImageNet preset: asymmetric, one queue
      c.method.update({'queue_size': 256, 'symmetric': False})
    if a.smoke and name == 'msf':
      c.method.bank_size = 512
    return c

  def steps_per_epoch(self, c) -> int:
    return max(1, int(c.data.synthetic_examples) // int(c.batch_size))

  # ------------------------------------------------------------------ phase A: compile
  def submit_jobs(self, pool):
    rows = self.args.rows
    order = [r for r in ('byol', 'supervised', 'aps', 'moco', 'msf', 'clim') if r in rows]
    if any(r in rows for r in ('moco', 'msf', 'clim')) and 'byol' not in order:
      order.insert(0, 'byol')    # the methods rows are relative to BYOL
    for r in order:
      if r == 'supervised':
        self.jobs[r] = pool.submit(self.prepare_supervised)
      elif r == 'aps':
        self.jobs['aps'] = pool.submit(self.prepare_train, 'aps')
        self.jobs['aps_full'] = pool.submit(self.prepare_train, 'aps', full_tokens=True)
      else:
        self.jobs[r] = pool.submit(self.prepare_train, r)

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

  def prepare_train(self, name: str, full_tokens: bool = False):
    """Build, lower, compile and initialise a method's train step (runs in a worker thread)."""
    jax = self.jax
    from ssl_jax import data, methods, train
    t = time.perf_counter()
    c = self.method_config(name)
    spe = self.steps_per_epoch(c)
    method = methods.get(c.method.name)(c, steps_per_epoch=spe)
    if full_tokens:
      method = full_token_method(method, c, spe)
    parts = train.build(c, self.mesh, method, steps_per_epoch=spe, total_steps=100 * spe)
    batch_np = next(data.make_train_iterator(c.data, global_batch_size=c.batch_size, seed=0))
    batch = self.sharding.global_batch(self.mesh, batch_np)
    with jax.set_mesh(self.mesh):
      lowered = parts.train_step.lower(parts.abstract, batch)
      compiled = lowered.compile()
      state = parts.init(jax.random.key(0))
      state = steady_state(jax, state)
    return OursTrain(self, name, compiled, state, batch, batch_np, c, method,
                     xla_flops(lowered, compiled), time.perf_counter() - t)

  def prepare_supervised(self):
    """Our supervised ResNet step: uint8 images -> normalise -> backbone (the SSL presets')
    ResNet, bf16 compute) -> pooled -> Dense; SGD momentum 0.9 + weight decay 1e-4, softmax
    cross-entropy; jitted with the batch sharded over 'data' (BN statistics over the global
    batch)."""
    jax = self.jax
    import flax.linen as nn
    import jax.numpy as jnp
    import ml_collections
    import optax
    from ssl_jax.models import normalize, ssl_model
    t = time.perf_counter()
    c = self.method_config('byol')
    model_cfg = ml_collections.ConfigDict({'backbone': c.model.backbone, 'stem': c.model.stem,
                                           'width': c.model.width, 'dtype': 'bfloat16'})

    class SupervisedNet(nn.Module):
      backbone: nn.Module
      num_classes: int

      @nn.compact
      def __call__(self, images, train: bool = True):
        f = self.backbone(normalize.normalize(images), train=train)['pooled']
        return nn.Dense(self.num_classes, name='head')(f.astype(jnp.float32))

    net = SupervisedNet(ssl_model.build_backbone(model_cfg), int(c.data.num_classes))
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    from ssl_jax import data
    views = next(data.make_train_iterator(c.data, global_batch_size=c.batch_size, seed=0))
    batch_np = {'image': views['view1'], 'label': views['label']}
    repl, dsh = self.sharding.replicated(self.mesh), self.sharding.data_sharding(self.mesh)

    def init(rng):
      v = net.init(rng, jnp.zeros((2,) + batch_np['image'].shape[1:], jnp.uint8), train=True)
      return {'params': v['params'], 'batch_stats': v['batch_stats'],
              'opt': tx.init(v['params'])}

    def step(state, batch):
      def loss_fn(p):
        logits, mut = net.apply({'params': p, 'batch_stats': state['batch_stats']},
                                batch['image'], train=True, mutable=['batch_stats'])
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch['label']).mean()
        return loss, mut['batch_stats']
      (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
      upd, opt = tx.update(g, state['opt'], state['params'])
      return ({'params': optax.apply_updates(state['params'], upd), 'batch_stats': stats,
               'opt': opt}, {'loss': loss})

    batch = self.sharding.global_batch(self.mesh, batch_np)
    with jax.set_mesh(self.mesh):
      state = jax.jit(init, out_shardings=repl)(jax.random.key(0))
      lowered = jax.jit(step, in_shardings=(repl, dsh), out_shardings=(repl, repl),
                        donate_argnums=(0,)).lower(state, batch)
      compiled = lowered.compile()
    return OursTrain(self, 'supervised', compiled, state, batch, batch_np, c, None,
                     xla_flops(lowered, compiled), time.perf_counter() - t)

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
        self.compile_notes[key] = f'torch.compile failed, eager only ({_short(e)})'
      log(f'{key} peer: {self.compile_notes[key]}')

  # ------------------------------------------------------------------ torch peers
  def peer_batch(self, key):
    """The numpy batch our step of ``key`` uses (identical images for the peer)."""
    from ssl_jax import data
    c = self.method_config('byol' if key == 'supervised' else key)
    b = next(data.make_train_iterator(c.data, global_batch_size=c.batch_size, seed=0))
    if key == 'supervised':
      b = {'image': b['view1'], 'label': b['label']}
    return c, b

  def make_peer(self, key):
    if key not in self.peers:
      c, b = self.peer_batch(key)
      cls = {'byol': ByolPeer, 'supervised': SupervisedPeer, 'moco': MocoPeer,
             'msf': MsfPeer}[key]
      self.peers[key] = cls(self, c, b)
    return self.peers[key]

  # ------------------------------------------------------------------ phase B: rows
  def run_row(self, key: str, fn: Callable[[], list[Row]]):
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
      rows = fn()
    except BudgetSkip as e:
      rows = [Row(key, key, '', status='skipped', notes=f'not run: budget ({e})')]
    except Exception as e:  # pylint: disable=broad-except
      import traceback
      traceback.print_exc()
      rows = [Row(key, key, '', status='error', notes=f'error: {_short(e)}')]
    dt = time.perf_counter() - t
    for r in rows:
      r.seconds = dt
    if self.tdev.type == 'cuda':
      self.torch.cuda.empty_cache()
    self.rows.extend(rows)
    log(f'{key}: done in {dt:.1f} s (total {self.elapsed():.0f} s)')

  def row_byol(self):
    ours = self.job('byol')
    peer = self.make_peer('byol')
    cont = {'ours': ours.run}
    cont.update(peer.contenders())
    for f in cont.values():
      f(1)                          # warm-up (eager: cudnn autotuning; compiled: already built)
    times = interleave(cont, self.args.repeats, self.args.steps)
    ours.check_finite()
    peer.check_finite()
    self.byol_times = times
    img = ours.images
    best, best_t, notes = best_peer(times)
    r_ours = img / statistics.median(times['ours'])
    vs = median_ratio(times[best], times['ours'])
    row = Row('byol', 'BYOL R50 two-view step' if not self.args.smoke else 'BYOL two-view step',
              'img/s', r_ours, img / best_t, f'torch {best}', vs, 'ours/peer >= 1.2x',
              'met' if vs >= 1.2 else 'not met',
              notes=f'{notes}; {self.compile_notes.get("byol", "")}; ours '
                    f'{1e3 * statistics.median(times["ours"]):.0f} ms/step, '
                    f'{flop_str(ours.flops)}/step (XLA){self.mfu_note(ours, times["ours"])}; '
                    f'compile {ours.build_s:.0f} s (in a thread)')
    return [row]

  def row_supervised(self):
    ours = self.job('supervised')
    peer = self.make_peer('supervised')
    cont = {'ours': ours.run}
    cont.update(peer.contenders())
    for f in cont.values():
      f(1)
    times = interleave(cont, self.args.repeats, self.args.steps)
    ours.check_finite()
    peer.check_finite()
    img = ours.images
    best, best_t, notes = best_peer(times)
    vs = median_ratio(times[best], times['ours'])
    sup_rate = img / statistics.median(times['ours'])
    rows = [Row('supervised', 'supervised R50 step' if not self.args.smoke else
                'supervised step', 'img/s', sup_rate, img / best_t, f'torch {best}', vs,
                '(context)', '',
                notes=f'{notes}; {self.compile_notes.get("supervised", "")}; ours '
                      f'{flop_str(ours.flops)}/step (XLA)'
                      f'{self.mfu_note(ours, times["ours"])}; compile {ours.build_s:.0f} s')]
    if hasattr(self, 'byol_times'):
      b = self.byol_times
      r_ours = median_ratio(b['ours'], times['ours'])
      r_peer = median_ratio(b['eager'], times['eager'])
      xla_ratio = self.job('byol').flops / ours.flops
      dev = abs(r_ours / BYOL_FLOP_RATIO - 1.0)
      rows.append(Row('ssl_sup_ratio', 'SSL/supervised step-cost ratio', 'x (BYOL/sup time)',
                      r_ours, r_peer, 'torch eager / eager', None,
                      f'within 10% of {BYOL_FLOP_RATIO:.2f} (FLOP ratio)',
                      'met' if dev <= 0.10 else 'not met', fmt='{:.2f}',
                      notes=f'ours deviates {100 * dev:.0f}% from 8/3; XLA-counted FLOP ratio '
                            f'{xla_ratio:.2f}; the same images per step (BYOL: 2 views of each);'
                            ' BYOL times from the byol row'))
    rows.append(Row('nvidia_context', 'NVIDIA PyTorch R50 AMP, 1x A100-80GB (21.03)', 'img/s',
                    sup_rate, NVIDIA_A100_IMG_S, 'published, not measured here',
                    sup_rate / NVIDIA_A100_IMG_S, '(context)', '',
                    notes='DeepLearningExamples RN50 v1.5 training rate; a different GPU: '
                          'context only'))
    return rows

  def row_method(self, key):
    ours = self.job(key)
    byol = self.job('byol')
    cont = {'ours': ours.run, 'ours byol': byol.run}
    label = {'moco': 'MoCo v2 step vs BYOL', 'msf': 'MSF step vs BYOL',
             'clim': 'CLIM step vs BYOL'}[key]
    peer = None
    if key in ('moco', 'msf'):
      peer = self.make_peer(key)
      cont['peer'] = lambda n: peer.run(n, compiled=False)
      bp = self.make_peer('byol')
      cont['peer byol'] = lambda n: bp.run(n, compiled=False)
    for f in cont.values():
      f(1)
    times = interleave(cont, self.args.repeats, self.args.steps)
    ours.check_finite()
    r_ours = median_ratio(times['ours'], times['ours byol'])
    flop_ratio = ours.flops / byol.flops
    notes = (f'ours {1e3 * statistics.median(times["ours"]):.0f} ms/step; FLOPs vs BYOL '
             f'{flop_ratio:.2f}x (XLA; a search in a loop counts once); time per FLOP vs BYOL '
             f'{r_ours / flop_ratio:.2f}x')
    if key == 'clim':
      notes += '; bank full, so the step at warm-up ran k-means (not in the timed steps)'
    if peer is None:
      return [Row(key, label, 'x BYOL step time', r_ours, None, 'none written', None,
                  '(context)', '', fmt='{:.2f}', notes=notes)]
    peer.check_finite()
    r_peer = median_ratio(times['peer'], times['peer byol'])
    vs = median_ratio(times['peer'], times['ours'])
    return [Row(key, label, 'x BYOL step time', r_ours, r_peer, 'torch eager', vs,
                '(context)', '', fmt='{:.2f}',
                notes=notes + f'; ours/peer speed {vs:.2f}x (peer eager)')]

  def row_aps(self):
    aps, full = self.job('aps'), self.job('aps_full')
    cont = {'aps': aps.run, 'full': full.run}
    for f in cont.values():
      f(1)
    times = interleave(cont, self.args.repeats, self.args.steps)
    aps.check_finite()
    full.check_finite()
    out = []
    for key, obj, label in (('aps', aps, 'APS ViT step (kept tokens), MFU'),
                            ('vit_full', full, 'ViT full-token two-view step, MFU')):
      t = statistics.median(times[key if key == 'aps' else 'full'])
      mfu = obj.flops / t / (self.peak * self.n_dev) if self.peak else None
      out.append(Row(key, label if not self.args.smoke else label.replace('ViT', 'ViT-test'),
                     '% MFU', None if mfu is None else 100 * mfu, None, 'none (ours vs ours)',
                     None, 'MFU >= 40%' if key == 'aps' else '(context)',
                     ('' if key != 'aps' or mfu is None else
                      ('met' if mfu >= 0.40 else 'not met')), fmt='{:.1f}',
                     notes=f'{1e3 * t:.1f} ms/step, {flop_str(obj.flops)}/step (XLA), '
                           f'{obj.images / t:,.0f} img/s'
                           + ('' if mfu is not None else '; MFU n/a: give --peak_tflops')))
    speed = median_ratio(times['full'], times['aps'])
    out[0].notes += f'; {speed:.2f}x the full-token step\'s speed'
    return out

  def mfu_note(self, ours, t):
    if not self.peak:
      return ''
    return f', MFU {100 * ours.flops / statistics.median(t) / (self.peak * self.n_dev):.0f}%'

  # ---------------------------------------------------------------- kNN and k-means
  def row_knn(self):
    jax, np, torch = self.jax, self.np, self.torch
    import jax.numpy as jnp
    from ssl_jax.ops import knn
    a = self.args
    n, d, b, k = (4096, 32, 16, 5) if a.smoke else (1 << 20, 256, 256, 5)
    iters = 2 if a.smoke else 20
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((n, d), dtype=np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    q = bank[rng.choice(n, b, replace=False)] + 0.1 * rng.standard_normal((b, d), np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    approx = 'recall_target' in inspect.signature(knn.topk_cosine).parameters
    variants = [('float32', None, None), ('bfloat16', None, None)]
    variants += [('float32', None, br) for br in a.knn_block_rows]
    if approx:
      variants.append(('float32', 0.95, None))
    rows = []
    for dtype, recall, block_rows in variants:
      jdt = jnp.float32 if dtype == 'float32' else jnp.bfloat16
      tdt = torch.float32 if dtype == 'float32' else torch.bfloat16
      jb = jax.device_put(jnp.asarray(bank, jdt), self.sharding.data_sharding(self.mesh)
                          if n % self.n_dev == 0 else None)
      jq = jnp.asarray(q, jdt)
      kw = {} if recall is None else {'recall_target': recall}
      if block_rows:
        kw['block_rows'] = block_rows
      fn = jax.jit(lambda qq, bb, kw=kw: knn.topk_cosine(qq, bb, k, **kw))
      tb = torch.from_numpy(bank).to(self.tdev, tdt)
      tq = torch.from_numpy(q).to(self.tdev, tdt)

      def ours(nn, fn=fn, jq=jq, jb=jb):
        with jax.set_mesh(self.mesh):
          t = time.perf_counter()
          for _ in range(nn * iters):
            out = fn(jq, jb)
          jax.block_until_ready(out)
        return (time.perf_counter() - t) / iters

      def peer(nn, tq=tq, tb=tb):
        self.sync_torch()
        t = time.perf_counter()
        for _ in range(nn * iters):
          out = torch.topk(tq @ tb.T, k, dim=1)
        self.sync_torch()
        self._knn_peer_out = out
        return (time.perf_counter() - t) / iters

      cont = {'ours': ours, 'peer': peer}
      for f in cont.values():
        f(1)
      times = interleave(cont, a.repeats, 1)
      with jax.set_mesh(self.mesh):
        s_ours, i_ours = (np.asarray(x) for x in fn(jq, jb))
      i_peer = self._knn_peer_out.indices.cpu().numpy()
      if not np.all(np.isfinite(s_ours)):
        raise FloatingPointError('non-finite kNN scores')
      agree = float(np.mean(np.sort(i_ours, 1) == np.sort(i_peer, 1)))
      t_o, t_p = statistics.median(times['ours']), statistics.median(times['peer'])
      read = n * d * (4 if dtype == 'float32' else 2) / self.hbm if self.hbm else None
      met = t_o <= t_p and (read is None or t_o <= 1.5 * read)
      goal = 'ours <= peer' + (f', <= 1.5x bank read ({1e3 * read:.3f} ms)' if read else
                               ' (bank read n/a: give --hbm_tbps)')
      label = f'kNN top-{k}, {b} x {n:,} x {d} {dtype}'
      if recall is not None:
        label += f', approx recall {recall}'
      if block_rows:
        label += f', block_rows {block_rows}'
      rows.append(Row('knn' + ('_bf16' if dtype == 'bfloat16' else '') +
                      ('_approx' if recall else '') + (f'_b{block_rows}' if block_rows else ''),
                      label, 'ms/search', 1e3 * t_o, 1e3 * t_p, 'torch.topk(q @ bank.T)',
                      median_ratio(times['peer'], times['ours']), goal,
                      'met' if met else 'not met', fmt='{:.3f}',
                      notes=(f'{"" if read is None else f"ours = {t_o / read:.2f}x bank read; "}'
                             f'same top-{k} sets: {100 * agree:.1f}%'
                             + ('; approx_max_k is exact on CPU/GPU' if recall else ''))))
      del jb, tb
    return rows

  def row_kmeans(self):
    jax, np, torch = self.jax, self.np, self.torch
    import jax.numpy as jnp
    from ssl_jax.ops import kmeans
    a = self.args
    n, d, c, iters = (2048, 32, 16, 3) if a.smoke else (65_536, 256, 1000, 10)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c0 = x[rng.choice(n, c, replace=False)]
    jx = jax.device_put(jnp.asarray(x), self.sharding.data_sharding(self.mesh)
                        if n % self.n_dev == 0 else None)
    jc = jnp.asarray(c0)
    tx, tc = torch.from_numpy(x).to(self.tdev), torch.from_numpy(c0).to(self.tdev)
    res = {}

    def ours(nn):
      with jax.set_mesh(self.mesh):
        t = time.perf_counter()
        for _ in range(nn):
          out = kmeans.kmeans(jx, c, iters, None, init_centroids=jc)
        jax.block_until_ready(out)
      res['ours'] = float(out[2])
      return time.perf_counter() - t

    def peer(nn):
      self.sync_torch()
      t = time.perf_counter()
      for _ in range(nn):
        obj = torch_lloyd(torch, tx, tc, iters)
      self.sync_torch()
      res['peer'] = float(obj)
      return time.perf_counter() - t

    cont = {'ours': ours, 'peer': peer}
    for f in cont.values():
      f(1)
    times = interleave(cont, a.repeats, 1)
    if not all(math.isfinite(v) for v in res.values()):
      raise FloatingPointError(f'non-finite k-means objective {res}')
    t_o, t_p = statistics.median(times['ours']), statistics.median(times['peer'])
    return [Row('kmeans', f'k-means {n:,} x {d} -> {c:,}, {iters} iterations', 'ms/run',
                1e3 * t_o, 1e3 * t_p, 'torch Lloyd loop', median_ratio(times['peer'],
                                                                       times['ours']),
                'ours <= peer', 'met' if t_o <= t_p else 'not met', fmt='{:.1f}',
                notes=f'objective (mean cosine) ours {res["ours"]:.4f}, peer {res["peer"]:.4f}; '
                      'same initial centroids; ours re-seeds empty clusters')]

  # ------------------------------------------------------------------ the run
  def run(self):
    a = self.args
    self.header()
    heavy = [r for r in a.rows if r in ('byol', 'supervised', 'aps', 'moco', 'msf', 'clim')]
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
          log(f'compile of {key} failed: {_short(f.exception())}')
      log(f'compile phase: {time.perf_counter() - t:.0f} s ({workers} JAX compile threads; '
          f'total {self.elapsed():.0f} s)')
    self.torch.backends.cudnn.benchmark = True
    plan = {'byol': self.row_byol, 'supervised': self.row_supervised, 'knn': self.row_knn,
            'kmeans': self.row_kmeans, 'aps': self.row_aps,
            'moco': lambda: self.row_method('moco'), 'msf': lambda: self.row_method('msf'),
            'clim': lambda: self.row_method('clim')}
    for key in ROWS:
      if key in a.rows:
        self.run_row(key, plan[key])
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


class BudgetSkip(Exception):
  """A row that the budget guard did not run."""


def _short(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  return f'{type(e).__name__}: {msg[0][:200] if msg else ""}'


def best_peer(times: dict[str, list[float]]) -> tuple[str, float, str]:
  """The faster peer variant (median), and a note with every variant's median."""
  peers = {k: statistics.median(v) for k, v in times.items() if k in ('eager', 'compiled')}
  best = min(peers, key=peers.get)
  note = 'peer ' + ', '.join(f'{k} {1e3 * v:.0f} ms/step' for k, v in peers.items())
  return best, peers[best], note


def flop_str(f: float) -> str:
  for unit, scale in (('TFLOP', 1e12), ('GFLOP', 1e9), ('MFLOP', 1e6)):
    if f >= scale:
      return f'{f / scale:.3g} {unit}'
  return f'{f:.3g} FLOP'


def xla_flops(lowered, compiled) -> float:
  """FLOPs of one step from XLA's cost analysis (the lowered HLO, else the compiled one)."""
  for obj in (lowered, compiled):
    try:
      ca = obj.cost_analysis()
    except Exception:  # pylint: disable=broad-except
      continue
    if isinstance(ca, (list, tuple)):
      ca = ca[0] if ca else None
    if ca and float(ca.get('flops', 0.0)) > 0:
      return float(ca['flops'])
  return float('nan')


def steady_state(jax, state):
  """Banks full of random unit rows (``bank_count`` = size): the steady state of MSF / CLIM,
  whose searches and k-means otherwise see an almost empty bank in the first steps."""
  ms = dict(state.method_state)
  if 'bank' not in ms or 'bank_count' not in ms:
    return state
  import jax.numpy as jnp
  bank = ms['bank']

  def fill(key):
    x = jax.random.normal(key, bank.shape, jnp.float32)
    return (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(bank.dtype)

  ms['bank'] = jax.jit(fill, out_shardings=bank.sharding)(jax.random.key(7))
  ms['bank_count'] = jax.device_put(jnp.full_like(ms['bank_count'], bank.shape[0]),
                                    ms['bank_count'].sharding)
  return state.replace(method_state=ms)


def full_token_method(aps_method, config, spe):
  """APS's network and loss with every patch token in both views (no sampling)."""
  from ssl_jax.methods import aps, base

  class FullTokens(aps.Method):
    def loss(self, params, target_params, method_state, batch_stats, batch, rng, step):
      del rng, step
      loss, metrics, batch_stats, feats, scores = self.pair_loss(
          params, target_params, batch_stats, batch['view1'], batch['view2'], None, None)
      return loss, base.LossAux({'loss': loss, **metrics}, method_state, batch_stats, feats,
                                scores)

  del aps_method
  return FullTokens(config, spe)


class OursTrain:
  """A compiled step of ours with its state and device batch."""

  def __init__(self, suite, name, compiled, state, batch, batch_np, config, method, flops,
               build_s):
    self.suite, self.name, self.compiled, self.state = suite, name, compiled, state
    self.batch, self.batch_np, self.config, self.method = batch, batch_np, config, method
    self.flops, self.build_s = flops, build_s
    self.images = int(config.batch_size)
    self.metrics = None

  def run(self, n: int) -> float:
    jax = self.suite.jax
    with jax.set_mesh(self.suite.mesh):
      t = time.perf_counter()
      for _ in range(n):
        out = self.compiled(self.state, self.batch)
        self.state, self.metrics = out[0], out[1]
      jax.block_until_ready((self.state, self.metrics))
    return time.perf_counter() - t

  def check_finite(self):
    loss = float(self.metrics['loss'])
    if not math.isfinite(loss):
      raise FloatingPointError(f'ours {self.name}: loss {loss}')


# =============================================================================================
# PyTorch peers (written here; torchvision ResNets, AMP bf16, channels-last)
# =============================================================================================
def torch_resnet(tv, torch, name: str, width: float, stem: str, num_classes: int | None = None):
  """torchvision's ResNet of our ``name`` / ``width`` / ``stem`` (``resnet50`` at width 1 with
  the ImageNet stem is exactly ``torchvision.models.resnet50()``); ``fc`` = Identity or a Linear
  to ``num_classes``. Returns (model, feature dim)."""
  from ssl_jax.models import resnet as ours
  R = tv.models.resnet
  block, layers = {'resnet18': (R.BasicBlock, [2, 2, 2, 2]), 'resnet34': (R.BasicBlock,
                                                                          [3, 4, 6, 3]),
                   'resnet50': (R.Bottleneck, [3, 4, 6, 3]),
                   'resnet_tiny': (R.BasicBlock, [1, 1, 1, 1])}[name]
  base = ours.resolve_base_width(name, width)
  m = R.ResNet(block, layers)
  if base != 64 or name == 'resnet_tiny':
    m.inplanes = base
    m.bn1 = torch.nn.BatchNorm2d(base)
    m.layer1 = m._make_layer(block, base, layers[0])  # pylint: disable=protected-access
    for i, mult in ((2, 2), (3, 4), (4, 8)):
      layer = m._make_layer(block, base * mult, layers[i - 1], stride=2)  # pylint: disable=protected-access
      setattr(m, f'layer{i}', layer)
  if stem == 'cifar':
    m.conv1 = torch.nn.Conv2d(3, base, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = torch.nn.Identity()
  else:
    m.conv1 = torch.nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
  feat = base * 8 * block.expansion
  m.fc = torch.nn.Identity() if num_classes is None else torch.nn.Linear(feat, num_classes)
  return m, feat


def torch_mlp(torch, cfg, in_dim: int):
  """``Linear - [BN] - ReLU - Linear`` of a 2-layer ``config.model.projector``/``predictor``."""
  nn = torch.nn
  layers = [nn.Linear(in_dim, cfg.hidden_dim)]
  if cfg.use_bn:
    layers.append(nn.BatchNorm1d(cfg.hidden_dim))
  layers += [nn.ReLU(inplace=True), nn.Linear(cfg.hidden_dim, cfg.out_dim)]
  return nn.Sequential(*layers)


def torch_net_class(torch):
  nn = torch.nn

  class Net(nn.Module):
    """uint8 NHWC -> ImageNet normalisation (channels-last NCHW) -> backbone -> heads."""

    def __init__(self, backbone, projector=None, predictor=None):
      super().__init__()
      self.backbone, self.projector, self.predictor = backbone, projector, predictor
      self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255,
                           persistent=False)
      self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255,
                           persistent=False)

    def forward(self, x):
      x = (x.permute(0, 3, 1, 2).float() - self.mean) / self.std   # NHWC memory = channels-last
      f = self.backbone(x)
      z = self.projector(f) if self.projector is not None else None
      p = self.predictor(z) if self.predictor is not None else None
      return f, z, p

  return Net


class TorchPeer:
  """Shared pieces: the device batch, eager / compiled call paths, the probe, EMA."""

  def __init__(self, suite, config, batch_np):
    self.s, self.torch, self.c = suite, suite.torch, config
    torch = self.torch
    self.Net = torch_net_class(torch)
    self.x = {k: torch.from_numpy(v).to(suite.tdev) for k, v in batch_np.items()
              if v.dtype.name == 'uint8'}
    self.y = torch.from_numpy(batch_np['label'].astype('int64')).to(suite.tdev)
    self.compiled = None
    self.last = None

  def to_dev(self, m):
    return m.to(self.s.tdev).to(memory_format=self.torch.channels_last)

  def backbone(self, num_classes=None):
    m = self.c.model
    return torch_resnet(self.s.tv, self.torch, m.backbone, m.width, m.stem, num_classes)

  def make_target(self, online):
    target = copy.deepcopy(self.Net(online.backbone, online.projector))
    for p in target.parameters():
      p.requires_grad_(False)
    self.t_params = list(target.parameters())
    self.o_params = list(online.backbone.parameters()) + list(online.projector.parameters())
    return target

  @staticmethod
  def ema(torch, t_params, o_params, tau):
    with torch.no_grad():
      torch._foreach_mul_(t_params, tau)
      torch._foreach_add_(t_params, o_params, alpha=1.0 - tau)

  def make_probe(self, feat):
    torch = self.torch
    self.probe = torch.nn.Linear(feat, int(self.c.data.num_classes)).to(self.s.tdev)
    self.probe_opt = torch.optim.SGD(self.probe.parameters(), lr=0.1, momentum=0.9)

  def probe_loss(self, f):
    return self.torch.nn.functional.cross_entropy(self.probe(f.detach().float()), self.y)

  def enable_compile(self, backend):
    self.compiled = {name: self.torch.compile(m, backend=backend)
                     for name, m in self.modules().items()}

  def run(self, n: int, compiled: bool = False) -> float:
    mods = self.compiled if compiled else self.modules()
    self.s.sync_torch()
    t = time.perf_counter()
    for _ in range(n):
      self.last = self.step(mods)
    self.s.sync_torch()
    return time.perf_counter() - t

  def contenders(self):
    out = {'eager': lambda n: self.run(n, compiled=False)}
    if self.compiled is not None:
      out['compiled'] = lambda n: self.run(n, compiled=True)
    return out

  def check_finite(self):
    v = float(self.last)
    if not math.isfinite(v):
      raise FloatingPointError(f'peer {type(self).__name__}: loss {v}')


class ByolPeer(TorchPeer):
  """BYOL: online(x1), target(x2), online(x2), target(x1) in train mode; symmetric loss; LARS
  (solo-learn's rule without the trust-ratio clip, as the ImageNet preset: weight decay and
  trust ratio on weights with ndim > 1 only) with ``torch._foreach`` ops and no host sync
  (solo-learn's and timm's LARS loop over the parameters); probe; EMA of backbone + projector."""

  def __init__(self, suite, config, batch_np):
    super().__init__(suite, config, batch_np)
    torch = self.torch
    bb, feat = self.backbone()
    pc, qc = self.c.model.projector, self.c.model.predictor
    self.online = self.to_dev(self.Net(bb, torch_mlp(torch, pc, feat),
                                       torch_mlp(torch, qc, pc.out_dim)))
    self.target = self.make_target(self.online)
    self.make_probe(feat)
    o = self.c.optimizer
    self.lr = o.base_lr * self.c.batch_size / 256
    self.wd, self.eta, self.mom = o.weight_decay, o.trust_coefficient, o.momentum
    params = list(self.online.parameters())
    self.adapt = [p for p in params if p.ndim > 1]
    self.plain = [p for p in params if p.ndim <= 1]
    self.buf_a = [torch.zeros_like(p) for p in self.adapt]
    self.buf_p = [torch.zeros_like(p) for p in self.plain]
    self.tau = float(self.c.ema.base)

  def modules(self):
    return {'online': self.online, 'target': self.target}

  def lars(self):
    torch = self.torch
    with torch.no_grad():
      ga = [p.grad for p in self.adapt]
      pn = torch.stack(torch._foreach_norm(self.adapt))
      gn = torch.stack(torch._foreach_norm(ga))
      use = (pn > 0) & (gn > 0)
      r = torch.where(use, self.eta * pn / (gn + self.wd * pn + 1e-8), torch.ones_like(pn))
      d = torch._foreach_mul(ga, list(r.unbind()))
      torch._foreach_add_(d, torch._foreach_mul(self.adapt, list((r * use * self.wd).unbind())))
      for bufs, upd, ps in ((self.buf_a, d, self.adapt),
                            (self.buf_p, [p.grad for p in self.plain], self.plain)):
        torch._foreach_mul_(bufs, self.mom)
        torch._foreach_add_(bufs, upd)
        torch._foreach_add_(ps, bufs, alpha=-self.lr)
      for p in self.adapt + self.plain:
        p.grad = None

  def step(self, mods):
    torch, F = self.torch, self.torch.nn.functional
    x1, x2 = self.x['view1'], self.x['view2']
    with self.s.autocast():
      f1, _, p1 = mods['online'](x1)
      with torch.no_grad():
        _, z2, _ = mods['target'](x2)
      _, _, p2 = mods['online'](x2)
      with torch.no_grad():
        _, z1, _ = mods['target'](x1)
    loss = ((2 - 2 * F.cosine_similarity(p1.float(), z2.float(), dim=-1)).mean()
            + (2 - 2 * F.cosine_similarity(p2.float(), z1.float(), dim=-1)).mean())
    (loss + self.probe_loss(f1)).backward()
    self.lars()
    self.probe_opt.step()
    self.probe_opt.zero_grad(set_to_none=True)
    self.ema(torch, self.t_params, self.o_params, self.tau)
    return loss.detach()


class SupervisedPeer(TorchPeer):
  """torchvision ResNet + fc, SGD(momentum 0.9, weight decay 1e-4, foreach), cross-entropy."""

  def __init__(self, suite, config, batch_np):
    super().__init__(suite, config, batch_np)
    bb, _ = self.backbone(int(self.c.data.num_classes))
    self.net = self.to_dev(self.Net(bb))
    self.opt = self.torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9,
                                    weight_decay=1e-4, foreach=True)

  def modules(self):
    return {'net': self.net}

  def step(self, mods):
    with self.s.autocast():
      logits, _, _ = mods['net'](self.x['image'])
    loss = self.torch.nn.functional.cross_entropy(logits.float(), self.y)
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return loss.detach()


class MocoPeer(TorchPeer):
  """MoCo v2: q = n(online(x1)), k = n(target(x2)); CE over [q.k, q.queue^T] / T; SGD (weight
  decay on every parameter); EMA m; enqueue k (FIFO); probe."""

  def __init__(self, suite, config, batch_np):
    super().__init__(suite, config, batch_np)
    torch = self.torch
    bb, feat = self.backbone()
    pc = self.c.model.projector
    self.online = self.to_dev(self.Net(bb, torch_mlp(torch, pc, feat)))
    self.target = self.make_target(self.online)
    self.make_probe(feat)
    o = self.c.optimizer
    self.opt = torch.optim.SGD(self.online.parameters(), lr=o.base_lr * self.c.batch_size / 256,
                               momentum=o.momentum, weight_decay=o.weight_decay, foreach=True)
    kq = int(self.c.method.queue_size)
    self.queue = torch.nn.functional.normalize(torch.randn(kq, pc.out_dim, device=suite.tdev),
                                               dim=1)
    self.ptr, self.temp, self.tau = 0, float(self.c.method.temperature), float(self.c.ema.base)

  def modules(self):
    return {'online': self.online, 'target': self.target}

  def step(self, mods):
    torch, F = self.torch, self.torch.nn.functional
    with self.s.autocast():
      f1, z1, _ = mods['online'](self.x['view1'])
      with torch.no_grad():
        _, zk, _ = mods['target'](self.x['view2'])
    q, k = F.normalize(z1.float(), dim=1), F.normalize(zk.float(), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.T], 1) / self.temp
    loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
    (loss + self.probe_loss(f1)).backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    self.probe_opt.step()
    self.probe_opt.zero_grad(set_to_none=True)
    self.ema(torch, self.t_params, self.o_params, self.tau)
    b = k.shape[0]
    self.queue[self.ptr:self.ptr + b] = k
    self.ptr = (self.ptr + b) % self.queue.shape[0]
    return loss.detach()


class MsfPeer(TorchPeer):
  """MSF: t = n(target(x_weak)) enqueued into the (full) bank first, its top-k by cosine over the
  bank, q = n(predictor(online(x_strong))), L = mean (2 - 2 q . bank_nn); SGD; EMA; probe."""

  def __init__(self, suite, config, batch_np):
    super().__init__(suite, config, batch_np)
    torch = self.torch
    bb, feat = self.backbone()
    pc, qc = self.c.model.projector, self.c.model.predictor
    self.online = self.to_dev(self.Net(bb, torch_mlp(torch, pc, feat),
                                       torch_mlp(torch, qc, pc.out_dim)))
    self.target = self.make_target(self.online)
    self.make_probe(feat)
    o, m = self.c.optimizer, self.c.method
    self.opt = torch.optim.SGD(self.online.parameters(), lr=o.base_lr * self.c.batch_size / 256,
                               momentum=o.momentum, weight_decay=o.weight_decay, foreach=True)
    self.bank = torch.nn.functional.normalize(
        torch.randn(int(m.bank_size), pc.out_dim, device=suite.tdev), dim=1)
    self.ptr, self.k, self.tau = 0, int(m.k), float(self.c.ema.base)
    self.on_key, self.t_key = str(m.online_view), str(m.target_view)

  def modules(self):
    return {'online': self.online, 'target': self.target}

  def step(self, mods):
    torch, F = self.torch, self.torch.nn.functional
    with self.s.autocast():
      with torch.no_grad():
        _, zt, _ = mods['target'](self.x[self.t_key])
      f, _, p = mods['online'](self.x[self.on_key])
    t = F.normalize(zt.float(), dim=1)
    b = t.shape[0]
    self.bank[self.ptr:self.ptr + b] = t
    self.ptr = (self.ptr + b) % self.bank.shape[0]
    with torch.no_grad():
      idx = torch.topk(t @ self.bank.T, self.k, dim=1).indices
    nn_rows = self.bank[idx]                                      # [B, k, d]
    q = F.normalize(p.float(), dim=1)
    loss = (2 - 2 * torch.einsum('bd,bkd->bk', q, nn_rows)).mean()
    (loss + self.probe_loss(f)).backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    self.probe_opt.step()
    self.probe_opt.zero_grad(set_to_none=True)
    self.ema(self.torch, self.t_params, self.o_params, self.tau)
    return loss.detach()


def torch_lloyd(torch, x, c, iters: int):
  """Spherical Lloyd: assign by max cosine, centroid = normalised sum (an empty cluster keeps
  its centroid); then a final assignment. Returns the objective (mean cosine)."""
  for _ in range(iters):
    a = (x @ c.T).argmax(1)
    sums = torch.zeros_like(c).index_add_(0, a, x)
    norm = sums.norm(dim=1, keepdim=True)
    c = torch.where(norm > 0, sums / norm.clamp_min(1e-12), c)
  return (x @ c.T).max(1).values.mean()


def main(argv=None) -> int:
  args = parse_args(argv)
  bootstrap(args)
  return Suite(args).run()


if __name__ == '__main__':
  sys.exit(main())
