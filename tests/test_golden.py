"""Golden trajectories: our jitted train step against a PyTorch reference (``torch_reference.py``).

Five steps of BYOL (LARS with clip, symmetric loss, EMA with BYOL's cosine tau) and of MoCo v2
(SGD, queue, temperature 0.2) from the real presets, shrunk (batch 8, 16 px, small heads), with a
full-width ResNet-18 with the CIFAR stem on both sides. Both start from the same weights (ours,
loaded into torchvision's resnet18 through ``ssl_jax.export``'s name mapping) and see the same
uint8 batches. After 5 steps every online parameter, every EMA target parameter, every online BN
running statistic, the queue and its pointer, and the lr / tau of each step must agree.

This is what the per-loss tests cannot catch: BN train mode and the order of the BN updates,
weight-decay and LARS masks, the order of loss / optimizer / EMA / enqueue, lr warm-up and decay.

Precision: the reference runs in float64; ours runs as it trains, in float32 (its parameters,
BN statistics and normalisations are float32 by construction, so an x64 run would not change
them). Tolerances below are measured headroom over float32 rounding, not slack for plumbing.

Needs a CPU torch and torchvision (``pip install torch==2.13.0`` and
``pip install --no-deps torchvision==0.28.0``, as .ci/run does); missing ones are an error.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np
import pytest
import torch

import torch_reference as ref
from ssl_jax import config_lib, methods, sharding, train

import flax.linen as _fnn
if os.environ.get('SLOWVAR'):  # DEBUG ONLY
  class _BN(_fnn.BatchNorm):
    use_fast_variance: bool = False
  _fnn.BatchNorm = _BN

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
STEPS = 5
BATCH = 8
IMAGE = 16
TOL = 1e-4


def _config(name: str, dataset: str):
  c = config_lib.load_config_file(os.path.join(REPO, 'configs', f'{name}.py'), dataset)
  c.num_devices = 1
  c.batch_size = BATCH
  c.data.image_size = IMAGE
  c.model.backbone, c.model.stem, c.model.width = 'resnet18', 'cifar', 1.0
  c.model.dtype = 'float32'
  c.model.projector.update({'hidden_dim': 64, 'out_dim': 32})
  if c.model.get('predictor') is not None:
    c.model.predictor.update({'hidden_dim': 64, 'out_dim': 32})
  c.total_steps = 8                       # cosine lr and tau over 8 steps; we run 5 of them
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.warmup_steps = 2            # lr 0, peak/2, peak, then cosine: changes every step
  c.optimizer.grad_clip_norm = 0.0
  return c


def _batches(seed: int = 0):
  rng = np.random.default_rng(seed)
  shape = (BATCH, IMAGE, IMAGE, 3)
  return [{'view1': rng.integers(0, 256, shape, dtype=np.uint8),
           'view2': rng.integers(0, 256, shape, dtype=np.uint8),
           'label': rng.integers(0, 10, (BATCH,), dtype=np.int32)} for _ in range(STEPS)]


def _host(tree):
  return jax.tree.map(lambda x: np.array(np.asarray(x), copy=True), jax.device_get(tree))


def run_ours(config, batches):
  """The real trainer's step (``train.build``) on one device; returns host copies."""
  config_lib.validate(config, num_devices=1)
  mesh = sharding.make_mesh(1)
  method = methods.get(config.method.name)(config)
  parts = train.build(config, mesh, method, steps_per_epoch=100,
                      total_steps=int(config.total_steps))
  keep = lambda s: _host({'params': s.params, 'batch_stats': s.batch_stats,
                          'target_params': s.target_params, 'method_state': s.method_state})
  with jax.set_mesh(mesh):
    state = parts.init(jax.random.key(config.seed))
    init = keep(state)
    metrics = []
    for b in batches:
      state, m, _ = parts.train_step(state, sharding.global_batch(mesh, b))
      metrics.append({k: float(m[k]) for k in ('loss', 'lr', 'tau')})
    final = keep(state)
  return init, final, metrics


def _rel(a, b) -> float:
  """max |a - b| / max |b| (per tensor, scale-aware: near-zero entries don't blow it up)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _torch_sd(module, prefix=''):
  return {prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def compare(config, init, final, metrics, trainer, counts):
  """Per-group max relative errors; also the relative movement from init (non-vacuity)."""
  proj, pred = config.model.projector, config.model.get('predictor')
  net = trainer.net
  ours_online = ref.flax_to_torch(final['params'], final['batch_stats'], proj, pred)
  ours_online0 = ref.flax_to_torch(init['params'], init['batch_stats'], proj, pred)
  ours_target = ref.flax_to_torch(final['target_params'], final['batch_stats'], proj, pred)
  theirs = _torch_sd(net)
  theirs_target = {**_torch_sd(trainer.t_backbone, 'backbone.'),
                   **_torch_sd(trainer.t_projector, 'projector.')}
  param_names = {k for k, _ in net.named_parameters()}
  res: dict[str, dict[str, float]] = {}

  def put(group, key, value):
    res.setdefault(group, {})[key] = value

  for k in param_names:
    put('online', k, _rel(ours_online[k], theirs[k]))
    put('online_delta', k, _rel(ours_online[k] - ours_online0[k], theirs[k] - ours_online0[k]))
    put('online_moved', k, _rel(theirs[k], ours_online0[k]))
    if k in theirs_target:
      put('target', k, _rel(ours_target[k], theirs_target[k]))
      put('target_delta', k, _rel(ours_target[k] - ours_online0[k],
                                  theirs_target[k] - ours_online0[k]))
      put('target_moved', k, _rel(theirs_target[k], ours_online0[k]))
  # Online BN running statistics. The EMA target's BN runs on batch statistics (train mode)
  # and its running statistics are never used, so only the online network's are compared.
  # Running variance: torch averages the unbiased batch variance (x n/(n-1)), Flax the biased
  # one. With running_var_0 = 1 and T updates of momentum 0.1,
  #   torch_T - 0.9^T = n/(n-1) * (flax_T - 0.9^T)     (exactly, n = values per channel),
  # so we map torch's statistic onto Flax's convention before comparing.
  for k in theirs:
    if k.endswith('running_mean'):
      put('bn_mean', k, _rel(ours_online[k], theirs[k]))
    elif k.endswith('running_var'):
      mod = k[:-len('.running_var')]
      n = counts[mod]
      t = int(theirs[f'{mod}.num_batches_tracked'])
      decay = 0.9**t
      mapped = decay + (theirs[k] - decay) * (n - 1) / n
      put('bn_var', k, _rel(ours_online[k], mapped))
      put('bn_var_moved', k, _rel(mapped, ours_online0[k]))
  return res


def _summary(res):
  return {g: (max(v.values()), min(v.values())) for g, v in res.items()}


def test_byol_golden_trajectory():
  t0 = time.time()
  c = _config('byol', 'cifar10')
  c.optimizer.update({'name': 'lars', 'trust_coefficient': 0.02, 'trust_clip': True})
  batches = _batches(0)
  init, final, metrics = run_ours(c, batches)
  t1 = time.time()

  torch.manual_seed(0)
  net = ref.Net(c.model.projector, c.model.predictor).double()
  counts = ref.record_bn_counts(net)
  ref.load_flax(net, init['params'], init['batch_stats'], c.model.projector, c.model.predictor)
  o = c.optimizer
  opt = ref.LARS(net.parameters(), lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay,
                 eta=o.trust_coefficient, clip_lr=True)
  peak = o.base_lr * BATCH / 256
  lr_fn = lambda t: ref.lr_at(t, peak=peak, warmup=o.warmup_steps, total=c.total_steps,
                              end_factor=o.end_lr_factor)
  tau_fn = lambda t: ref.byol_tau(t, base=c.ema.base, total=c.total_steps)
  trainer = ref.Byol(net, opt, lr_fn=lr_fn, tau_fn=tau_fn)
  theirs_metrics = [trainer.step(b['view1'], b['view2']) for b in batches]
  t2 = time.time()
  res = compare(c, init, final, metrics, trainer, counts)
  print('ours', metrics)
  print('torch', theirs_metrics)
  for g, (mx, mn) in _summary(res).items():
    print(f'{g:14s} max {mx:.3e} min {mn:.3e}')
  for g in ('online', 'target', 'bn_mean'):
    for k, v in sorted(res[g].items(), key=lambda kv: -kv[1])[:12]:
      print(g, k, f'{v:.3e}', 'moved', f"{res.get(g + '_moved', {}).get(k, 0):.3e}")
  print(f'times: ours {t1 - t0:.1f}s, torch {t2 - t1:.1f}s')
  assert False
