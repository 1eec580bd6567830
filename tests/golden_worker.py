"""One golden trajectory in float64: ``python tests/golden_worker.py {byol,moco} OUT.json``.

Runs our real jitted train step (``ssl_jax.train.build``) and the PyTorch reference
(``torch_reference.py``) for ``STEPS`` steps from the same weights on the same uint8 batches, and
writes the comparison to ``OUT.json``; ``test_golden.py`` starts it and asserts on it.

Why a subprocess in float64: in float32 the two sides part ways within two steps for a reason
that has nothing to do with plumbing. A ReLU input within float32 rounding of 0 (one in a few
million activations; measured: 3 of them in one batch of 8) takes a different branch on each
side, and with 8 images of 16 px one such element moves a deep layer's gradient by ~1%. So
both sides run in float64. ssl_jax pins float32 by name (``param_dtype=jnp.float32``,
``.astype(jnp.float32)`` in the losses and the input normalisation), so this process, with
``JAX_ENABLE_X64=1``, makes the name ``jax.numpy.float32`` mean float64 *before* flax, optax or
ssl_jax are imported; every such pin then reads float64, and nothing else about the step
changes. ``check_float64`` asserts that every array of the state and the loss really are float64.
"""
from __future__ import annotations

import json
import os
import sys
import time

if os.environ.get('JAX_ENABLE_X64') not in ('1', 'true', 'True'):
  raise SystemExit('golden_worker.py must run with JAX_ENABLE_X64=1 (test_golden.py sets it)')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jnp.float32 = jnp.float64  # see the module docstring: must precede flax / optax / ssl_jax

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import torch_reference as ref  # noqa: E402
from ssl_jax import config_lib, methods, sharding, train  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
STEPS = 5
BATCH = 8
IMAGE = 16           # the CIFAR stem has no down-sampling: stage maps 16/8/4/2 px
TOTAL_STEPS = 8      # lr and tau schedules run over 8 steps; we take the first 5
WARMUP = 2           # lr 0, peak/2, peak, then cosine: a different lr at every step
SEED = 0


# ------------------------------------------------------------------------------------------------
# Configs: the real presets, shrunk
# ------------------------------------------------------------------------------------------------

def make_config(name: str):
  """``byol``: configs/byol.py:cifar10 (solo-learn: LARS eta 0.02 + clip, symmetric, tau
  0.99 -> 1). ``moco``: configs/moco.py:imagenet (MoCo v2 as facebookresearch/moco: SGD,
  asymmetric, constant m 0.999, temperature 0.2, projector without BN). Shrunk to batch 8,
  16 px, heads 64/32, queue 24 (5 x 8 keys wrap around it), on a full-width ResNet-18 with the
  CIFAR stem (torchvision's resnet18 is full width).

  ``base_lr`` is the preset's x 256 / 8, so the per-step lr is the preset's at its own batch of
  256 (linear scaling would cut it 32x at batch 8 and the parameters would barely move)."""
  dataset = {'byol': 'cifar10', 'moco': 'imagenet'}[name]
  c = config_lib.load_config_file(os.path.join(REPO, 'configs', f'{name}.py'), dataset)
  c.num_devices = 1
  c.seed = SEED
  c.data.image_size = IMAGE
  c.model.update({'backbone': 'resnet18', 'stem': 'cifar', 'width': 1.0, 'dtype': 'float32'})
  c.model.projector.update({'hidden_dim': 64, 'out_dim': 32})
  if c.model.get('predictor') is not None:
    c.model.predictor.update({'hidden_dim': 64, 'out_dim': 32})
  c.optimizer.base_lr = c.optimizer.base_lr * c.batch_size / BATCH
  c.batch_size = BATCH
  c.total_steps = TOTAL_STEPS
  c.optimizer.update({'warmup_epochs': 0.0, 'warmup_steps': WARMUP, 'grad_clip_norm': 0.0})
  if name == 'byol':
    # Set explicitly, so the test does not depend on the preset's values for these.
    c.optimizer.update({'name': 'lars', 'trust_coefficient': 0.02, 'trust_clip': True})
    c.ema.update({'schedule': 'cosine', 'base': 0.99, 'final': 1.0})
    c.method.symmetric = True
  else:
    c.optimizer.name = 'sgd'
    c.method.update({'symmetric': False, 'temperature': 0.2, 'queue_size': 24})
    c.ema.update({'schedule': 'constant', 'base': 0.999})
    assert not c.model.projector.use_bn
  train.validate_config(c, num_devices=1)
  return c


def make_batches(seed: int = SEED):
  rng = np.random.default_rng(seed)
  shape = (BATCH, IMAGE, IMAGE, 3)
  return [{'view1': rng.integers(0, 256, shape, dtype=np.uint8),
           'view2': rng.integers(0, 256, shape, dtype=np.uint8),
           'label': rng.integers(0, 10, (BATCH,), dtype=np.int32)} for _ in range(STEPS)]


def host(tree):
  return jax.tree.map(lambda x: np.array(np.asarray(x), copy=True), jax.device_get(tree))


def check_float64(state, metrics) -> dict[str, str]:
  """``{dtype: first array of that dtype}`` over the state's floating arrays, plus the loss's
  dtype; the test requires exactly ``{'float64', 'loss:float64'}``."""
  found = {}
  for group in ('params', 'batch_stats', 'target_params', 'opt_state', 'method_state'):
    for path, leaf in jax.tree_util.tree_leaves_with_path(getattr(state, group)):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        found.setdefault(str(leaf.dtype), f'{group}{jax.tree_util.keystr(path)}')
  found.setdefault(f'loss:{metrics["loss"].dtype}', 'loss')
  return found


# ------------------------------------------------------------------------------------------------
# Ours
# ------------------------------------------------------------------------------------------------

def run_ours(c, batches):
  mesh = sharding.make_mesh(1)
  method = methods.get(c.method.name)(c)
  parts = train.build(c, mesh, method, steps_per_epoch=100, total_steps=int(c.total_steps))
  keep = lambda s: host({'params': s.params, 'batch_stats': s.batch_stats,
                         'target_params': s.target_params, 'method_state': s.method_state})
  with jax.set_mesh(mesh):
    state = parts.init(jax.random.key(c.seed))
    # The torch side is loaded through export's mapping, which writes float32: start both from
    # float32-representable weights so that the copy is exact (the target is a copy, as init).
    rounded = jax.tree.map(lambda x: x.astype(np.float32).astype(x.dtype), state.params)
    state = jax.device_put(state.replace(params=rounded,
                                         target_params=jax.tree.map(jnp.copy, rounded)),
                           parts.shardings)
    init = keep(state)
    metrics, t0, compile_s = [], time.time(), None
    for b in batches:
      state, m, _ = parts.train_step(state, sharding.global_batch(mesh, b))
      m = jax.device_get(m)
      if compile_s is None:
        compile_s = time.time() - t0
        dtypes = check_float64(state, m)
      metrics.append({k: float(m[k]) for k in ('loss', 'lr', 'tau')})
    final = keep(state)
  return init, final, metrics, dtypes, compile_s


# ------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------

def run_torch(name, c, init, batches):
  torch.manual_seed(0)
  proj, pred = c.model.projector, c.model.get('predictor')
  net = ref.Net(proj, pred).double()
  counts = ref.record_bn_counts(net)
  ref.load_flax(net, init['params'], init['batch_stats'], proj, pred)
  o = c.optimizer
  peak = o.base_lr * c.batch_size / 256
  lr_fn = lambda t: ref.lr_at(t, peak=peak, warmup=o.warmup_steps, total=c.total_steps,
                              end_factor=o.end_lr_factor)
  if name == 'byol':
    opt = ref.LARS(net.parameters(), lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay,
                   nesterov=o.nesterov, eta=o.trust_coefficient, clip_lars_lr=o.trust_clip,
                   exclude_bias_n_norm_lars=True)
    tau_fn = lambda t: ref.cosine_tau(t, base=c.ema.base, total=c.total_steps,
                                      final=c.ema.final)
    trainer = ref.Byol(net, opt, lr_fn=lr_fn, tau_fn=tau_fn)
  else:
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=o.momentum,
                          weight_decay=o.weight_decay, nesterov=o.nesterov)
    trainer = ref.MocoV2(net, opt, init['method_state']['queue'], lr_fn=lr_fn, m=c.ema.base,
                         temperature=c.method.temperature)
  metrics = [trainer.step(b['view1'], b['view2']) for b in batches]
  return trainer, counts, metrics


# ------------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------------

def _flat(tree, prefix=''):
  return {prefix + jax.tree_util.keystr(p): np.asarray(v, np.float64)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def rel(a, b) -> float:
  """``max |a - b| / max |b|``: per tensor and scale-aware (entries near 0 don't blow it up)."""
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def moved(x, x0) -> float:
  """``max |x - x0| / max(max |x0|, max |x|)`` (1 for a tensor that starts at 0)."""
  return float(np.max(np.abs(x - x0)) / max(float(np.max(np.abs(x0))), float(np.max(np.abs(x))),
                                             1e-300))


def compare(c, init, final, trainer, counts):
  """Per-tensor entries ``{err, delta_err, moved}``, by group (online, target, bn_mean, bn_var).

  ``err`` compares the values; ``delta_err`` the change from the common initial value (the
  update itself, so a tensor that barely moved is still checked at full strength); ``moved`` is
  the reference's ``max |x_T - x_0| / max |x_0|``."""
  proj, pred = c.model.projector, c.model.get('predictor')
  sd = {k: v.detach().numpy().copy() for k, v in trainer.net.state_dict().items()}
  # BN running variance: torch averages the unbiased batch variance (var * n / (n - 1)), Flax
  # the biased one. Starting from 1 with momentum 0.1, after T updates exactly
  #   torch_T - 0.9^T = n / (n - 1) * (flax_T - 0.9^T)   (n: values per channel of that BN),
  # so torch's statistic is mapped onto Flax's convention before the comparison.
  for k in list(sd):
    if k.endswith('running_var'):
      mod = k[:-len('.running_var')]
      n, t = counts[mod], int(sd[f'{mod}.num_batches_tracked'])
      decay = 0.9**t
      sd[k] = decay + (sd[k] - decay) * (n - 1) / n
  t_params, t_stats = ref.torch_to_flax(sd, proj, pred)
  target_sd = {**{f'backbone.{k}': v.detach().numpy().copy()
                  for k, v in trainer.t_backbone.state_dict().items()},
               **{f'projector.{k}': v.detach().numpy().copy()
                  for k, v in trainer.t_projector.state_dict().items()}}
  t_target, _ = ref.torch_to_flax(target_sd, proj, None)

  out: dict[str, dict[str, dict[str, float]]] = {}

  def group(name, ours, ours0, theirs, theirs0=None):
    ours, ours0, theirs = _flat(ours), _flat(ours0), _flat(theirs)
    theirs0 = ours0 if theirs0 is None else _flat(theirs0)
    assert set(ours) == set(theirs), (name, set(ours) ^ set(theirs))
    out[name] = {k: {'err': rel(ours[k], theirs[k]),
                     'delta_err': rel(ours[k] - ours0[k], theirs[k] - theirs0[k]),
                     'moved': moved(theirs[k], theirs0[k]),
                     'abs_change_ours': float(np.max(np.abs(ours[k] - ours0[k]))),
                     'abs_change_torch': float(np.max(np.abs(theirs[k] - theirs0[k])))}
                 for k in theirs}

  group('online', final['params'], init['params'], t_params)
  # The EMA target of the backbone and projector. Ours also keeps an EMA of the predictor,
  # which nothing reads (BYOL's target has no predictor); the reference has none to compare.
  group('target', {k: final['target_params'][k] for k in ('backbone', 'projector')},
        {k: init['params'][k] for k in ('backbone', 'projector')}, t_target)
  # BN running statistics of the online network. The EMA target's BN runs on batch statistics
  # (train mode) and its running statistics are never read (ours does not even keep them), so
  # only the online network's are compared.
  group('bn_mean', _pick(final['batch_stats'], 'mean'), _pick(init['batch_stats'], 'mean'),
        _pick(t_stats, 'mean'))
  group('bn_var', _pick(final['batch_stats'], 'var'), _pick(init['batch_stats'], 'var'),
        _pick(t_stats, 'var'))
  if 'queue' in final['method_state']:
    q0 = init['method_state']['queue']
    tq = trainer.queue.numpy()
    out['queue'] = {'queue': {'err': rel(final['method_state']['queue'], tq),
                              'delta_err': rel(final['method_state']['queue'] - q0, tq - q0),
                              'moved': moved(tq, q0),
                              'abs_change_ours': float(np.max(np.abs(
                                  final['method_state']['queue'] - q0))),
                              'abs_change_torch': float(np.max(np.abs(tq - q0)))}}
    out['queue_ptr'] = {'ptr': {'ours': int(final['method_state']['queue_ptr']),
                                'torch': int(trainer.ptr)}}
  return out


def _pick(tree, leaf):
  """The ``leaf`` entries ('mean' or 'var') of a batch_stats tree, same nesting."""
  if isinstance(tree, dict) and leaf in tree and not isinstance(tree[leaf], dict):
    return tree[leaf]
  return {k: _pick(v, leaf) for k, v in tree.items()}


def main(name: str, out_path: str) -> None:
  torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
  t0 = time.time()
  c = make_config(name)
  batches = make_batches()
  init, final, ours_metrics, dtypes, compile_s = run_ours(c, batches)
  t1 = time.time()
  trainer, counts, torch_metrics = run_torch(name, c, init, batches)
  t2 = time.time()
  res = {'method': name, 'groups': compare(c, init, final, trainer, counts),
         'metrics': {'ours': ours_metrics, 'torch': torch_metrics}, 'dtypes': dtypes,
         'seconds': {'ours': t1 - t0, 'ours_first_step': compile_s, 'torch': t2 - t1}}
  with open(out_path, 'w') as f:
    json.dump(res, f, indent=1)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
