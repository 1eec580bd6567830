r"""Learning-curve parity: BYOL and MoCo v2 with ours vs a PyTorch implementation, CIFAR-10, CPU.

Both sides train the same network (ResNet-18, CIFAR stem, ``--width`` x 64 base channels, the
preset's projector/predictor) with the same recipe on exactly the same budget: the first
``--train-examples`` images of CIFAR-10 train, ``--epochs`` epochs of ``n // batch`` steps
(remainder dropped each epoch), batch ``--batch``. After every epoch (and before training:
epoch 0) one shared weighted kNN (``ssl_jax.ops.knn.weighted_knn_predict``, k = 200, T = 0.1,
cosine on L2-normalised backbone features, eval-mode BatchNorm) classifies the first
``--test-examples`` CIFAR-10 test images against the un-augmented training subset. For each
method and seed, ours runs, then torch.

* **ours**: ``configs/<method>.py:cifar10`` loaded with ``config_lib.load_config_file``, shrunk
  only in size and budget (width, subset, epochs, batch, MoCo queue = one epoch of keys,
  warm-up as the same fraction of the run; lr = base_lr x B / 256 by our rule), our tf.data
  pipeline (``data.make_train_iterator``) and our jitted train step (``train.build``).
* **torch**: torch (CPU) + torchvision ``transforms.v2`` per image on uint8 tensors (the same
  view recipe, read from ``data.resolve_views``: crop scale, flip, jitter strengths/probability,
  grayscale, blur, solarize), a small ResNet-18 written here with torchvision's layout and init
  (run channels_last, PyTorch's fast CPU layout), lightly's heads (``BYOLProjectionHead``/
  ``BYOLPredictionHead``, ``MoCoProjectionHead``) and losses (``NegativeCosineSimilarity``;
  ``NTXentLoss`` with a memory bank = MoCo's queue, one per view when symmetric), lightly's
  ``update_momentum`` for the EMA (after the optimizer step, as solo-learn), solo-learn's LARS
  (``solo/utils/lars.py``, transcribed below) or ``torch.optim.SGD``, and the same lr / tau
  schedules (its own formulas, checked against ours at every step).
* ``--init shared`` (default): the torch networks (and MoCo queues) start from our initial
  weights of the same seed, so epoch 0 is the same network on both sides (checked: features
  equal to ~1e-7) and the curves differ only by training — augmentation draws, data order,
  kernels. ``--init own``: torchvision's / torch's default initialisation instead.

Every recipe value both sides use is printed at start-up and stored in the JSON.

Usage::

  TFDS_DATA_DIR=/work/shared/data/tfds python benchmarks/parity.py --out /tmp/parity.json
  python benchmarks/parity.py --smoke                 # 128 images, 2 steps, 1 seed
  python benchmarks/parity.py --full                  # 50,000 images, 1/4 width, batch 256
  python benchmarks/parity.py --set optimizer.trust_coefficient=0.02 ...   # override a preset

The torch side needs ``pip install --no-deps lightly`` (its other dependencies are for
Lightning/the API, and must not replace the CPU torch) and torchvision (the CUDA wheel with
--no-deps; imported as ``tests/test_export.py`` does).
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ssl_jax import config_lib, data, methods, optim, sharding, train  # noqa: E402
from ssl_jax.data import augment, sources, views  # noqa: E402
from ssl_jax.ops import knn  # noqa: E402

import torch  # noqa: E402  (after TF/JAX: keeps their thread pools as they are)

METHODS = ('byol', 'moco')


# ==============================================================================================
# torchvision (CUDA wheel next to a CPU torch) and lightly
# ==============================================================================================
from ssl_jax.export import import_torchvision  # noqa: E402  (CUDA wheel beside a CPU torch)

torchvision = import_torchvision()
import warnings  # noqa: E402

warnings.filterwarnings('ignore', module='torchvision')
warnings.filterwarnings('ignore', module='lightly')
from torchvision.transforms import v2  # noqa: E402

from lightly.loss import NegativeCosineSimilarity, NTXentLoss  # noqa: E402
from lightly.models.modules import heads as lightly_heads  # noqa: E402
from lightly.models.utils import update_momentum  # noqa: E402


# ==============================================================================================
# The recipe: our preset, shrunk in size/budget only
# ==============================================================================================
def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def make_config(method: str, args, seed: int):
  c = config_lib.load_config_file(os.path.join(REPO, 'configs', f'{method}.py'), 'cifar10')
  preset_epochs = float(c.total_epochs)
  c.seed = int(seed)
  c.model.width = float(args.width)
  c.batch_size = int(args.batch)
  c.total_epochs = int(args.epochs)
  c.total_steps = -1
  c.data.train_split = f'train[:{args.train_examples}]'
  c.data.num_workers = 2
  if args.warmup_epochs is not None:
    c.optimizer.warmup_epochs = float(args.warmup_epochs)
  else:  # the preset's warm-up as the same fraction of the (shorter) run
    c.optimizer.warmup_epochs = float(c.optimizer.warmup_epochs) * args.epochs / preset_epochs
  c.optimizer.warmup_steps = -1
  if method == 'moco':
    steps = args.train_examples // args.batch
    c.method.queue_size = int(args.queue_size or min(int(c.method.queue_size),
                                                      steps * args.batch))
  for item in args.set or ():
    key, value = item.split('=', 1)
    node = c
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = _parse_value(value)
  train.validate_config(c, num_devices=1)
  return c


def recipe_of(c, steps_per_epoch: int, total_steps: int) -> dict:
  """Every value the torch side reads from the config (printed and stored)."""
  o = c.optimizer
  r = {
      'method': c.method.name, 'backbone': c.model.backbone, 'stem': c.model.stem,
      'width': c.model.width, 'base_channels': int(round(64 * c.model.width)),
      'projector': c.model.projector.to_dict(),
      'predictor': None if c.model.get('predictor') is None else c.model.predictor.to_dict(),
      'batch_size': c.batch_size, 'train_split': c.data.train_split,
      'steps_per_epoch': steps_per_epoch, 'total_steps': total_steps,
      'optimizer': o.name, 'base_lr': o.base_lr, 'peak_lr': optim.peak_lr(c),
      'weight_decay': o.weight_decay, 'momentum': o.momentum, 'nesterov': o.nesterov,
      'warmup_steps': min(optim.warmup_steps(c, steps_per_epoch), max(total_steps - 1, 0)),
      'end_lr_factor': o.end_lr_factor, 'grad_clip_norm': o.grad_clip_norm,
      'ema_schedule': c.ema.schedule, 'ema_base': c.ema.base,
      'ema_final': float(c.ema.get('final', 1.0)),
  }
  if o.name == 'lars':
    r.update({'lars_eta': o.trust_coefficient, 'lars_clip': bool(o.get('trust_clip', False))})
  if c.method.name == 'byol':
    r['symmetric'] = bool(c.method.get('symmetric', True))
  if c.method.name == 'moco':
    r.update({'queue_size': c.method.queue_size, 'temperature': c.method.temperature,
              'symmetric': bool(c.method.get('symmetric', False))})
  r['views'] = [dataclasses.asdict(s) for s in views.resolve_views(c.data)]
  return r


# ==============================================================================================
# Shared evaluation: the same weighted kNN on both sides' features
# ==============================================================================================
def knn_top1(bank_feats, bank_labels, query_feats, query_labels, k=200, t=0.1) -> float:
  bank = np.array(bank_feats, np.float32)
  query = np.array(query_feats, np.float32)
  bank /= np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
  query /= np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
  scores = knn.weighted_knn_predict(jnp.asarray(query), jnp.asarray(bank),
                                    jnp.asarray(bank_labels, jnp.int32), 10,
                                    k=min(k, len(bank)), temperature=t)
  return float(np.mean(np.asarray(scores).argmax(-1) == np.asarray(query_labels)))


class EvalSet:
  """Un-augmented uint8 images: the training subset (kNN bank) and the test queries."""

  def __init__(self, data_cfg, train_examples: int, test_examples: int):
    tr = sources.build_source(data_cfg, f'train[:{train_examples}]')
    te = sources.build_source(data_cfg, f'test[:{test_examples}]')
    self.train_images, self.train_labels = tr.images, tr.labels
    self.test_images, self.test_labels = te.images, te.labels

  def score(self, features_of) -> float:
    return knn_top1(features_of(self.train_images), self.train_labels,
                    features_of(self.test_images), self.test_labels)


def _batches(images, size):
  for i in range(0, len(images), size):
    yield images[i:i + size]


# ==============================================================================================
# Ours
# ==============================================================================================
class Ours:
  """Our trainer's pieces for one method (built and compiled once, reused over seeds)."""

  def __init__(self, config, mesh):
    self.config = config
    self.mesh = mesh
    self.spe = data.steps_per_epoch(config.data, config.batch_size)
    self.method = methods.get(config.method.name)(config, self.spe)
    self.total = train.total_steps_of(config, self.spe)
    self.parts = train.build(config, mesh, self.method, steps_per_epoch=self.spe,
                             total_steps=self.total)
    self.feature_fn = jax.jit(train.make_feature_fn(self.method, self.parts.probe))
    self.lr_fn = optim.lr_schedule(config, self.spe, self.total)
    self.tau_fn = optim.ema_schedule(config, self.total)

  def features(self, variables, images, eb: int = 500):
    """L2-normalised eval-mode backbone features of uint8 NHWC ``images`` (numpy)."""
    out = []
    for x in _batches(images, eb):
      n = len(x)
      if n < eb:
        x = np.concatenate([x, np.zeros((eb - n,) + x.shape[1:], x.dtype)])
      out.append(np.asarray(self.feature_fn(variables, jnp.asarray(x))['features'])[:n])
    return np.concatenate(out)

  def initial(self, seed: int) -> dict:
    """Our initial variables for ``seed`` as numpy (the torch side starts from them)."""
    with jax.set_mesh(self.mesh):
      state = self.parts.init(jax.random.key(seed))
      out = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats,
                            'method_state': state.method_state})
      out['check_images'] = check = np.asarray(
          sources.build_source(self.config.data, 'test[:64]').images)
      out['check_features'] = self.features(
          {'params': state.params, 'batch_stats': state.batch_stats,
           'probe': state.probe_params}, check)
      return out

  def run(self, seed: int, evalset: EvalSet, log) -> dict:
    c = self.config
    eb = 500
    with jax.set_mesh(self.mesh):
      state = self.parts.init(jax.random.key(seed))
      it = data.make_train_iterator(c.data, global_batch_size=c.batch_size, seed=seed)

      def features_of(images):
        return self.features({'params': state.params, 'batch_stats': state.batch_stats,
                              'probe': state.probe_params}, images)

      res = {'knn': [evalset.score(features_of)], 'epoch_time_s': [], 'loss': []}
      log(f'  ours  epoch 0: kNN {100 * res["knn"][0]:.2f}%')
      for epoch in range(1, c.total_epochs + 1):
        t0 = time.time()
        losses = []
        for _ in range(self.spe):
          batch = sharding.global_batch(self.mesh, next(it))
          state, metrics, _ = self.parts.train_step(state, batch)
          losses.append(metrics['loss'])
        losses = [float(x) for x in jax.device_get(losses)]
        jax.block_until_ready(state)
        res['epoch_time_s'].append(time.time() - t0)
        res['loss'].append(float(np.mean(losses)))
        if not np.all(np.isfinite(losses)):
          raise FloatingPointError(f'ours: non-finite loss in epoch {epoch}')
        res['knn'].append(evalset.score(features_of))
        log(f'  ours  epoch {epoch}: loss {res["loss"][-1]:.4f} | kNN '
            f'{100 * res["knn"][-1]:.2f}% | train {res["epoch_time_s"][-1]:.1f}s')
    return res

  def run_replicas(self, evalset: EvalSet, log) -> list[dict]:
    """All seeds in one program (``config.replicas = S``, seeds ``seed .. seed + S - 1``):
    the trainer's vmapped step and its per-replica batches; one result per seed, as ``run``."""
    c = self.config
    seeds = [c.seed + r for r in range(c.replicas)]
    with jax.set_mesh(self.mesh):
      state = self.parts.init(train.initial_keys(c))
      its = [data.make_train_iterator(c.data, global_batch_size=c.batch_size, seed=s)
             for s in seeds]

      def features_of(r):
        def of(images):
          one = jax.tree.map(lambda x: x[r], (state.params, state.batch_stats,
                                              state.probe_params))
          return self.features(dict(zip(('params', 'batch_stats', 'probe'), one)), images)
        return of

      res = [{'knn': [evalset.score(features_of(r))], 'epoch_time_s': [], 'loss': []}
             for r in range(len(seeds))]
      log('  ours  epoch 0: kNN ' + ' / '.join(f'{100 * x["knn"][0]:.2f}%' for x in res) +
          f' (seeds {seeds})')
      for epoch in range(1, c.total_epochs + 1):
        t0 = time.time()
        losses = []
        for _ in range(self.spe):
          batch = sharding.replica_batch(self.mesh, [next(it) for it in its])
          state, metrics, _ = self.parts.train_step(state, batch)
          losses.append(metrics['loss'])
        losses = np.asarray(jax.device_get(losses), np.float64)   # [steps, replicas]
        jax.block_until_ready(state)
        seconds = time.time() - t0
        if not np.all(np.isfinite(losses)):
          raise FloatingPointError(f'ours: non-finite loss in epoch {epoch}')
        for r, x in enumerate(res):
          x['epoch_time_s'].append(seconds / len(seeds))   # the program's time, per replica
          x['loss'].append(float(np.mean(losses[:, r])))
          x['knn'].append(evalset.score(features_of(r)))
        log(f'  ours  epoch {epoch}: loss ' + ' / '.join(f'{x["loss"][-1]:.4f}' for x in res) +
            ' | kNN ' + ' / '.join(f'{100 * x["knn"][-1]:.2f}%' for x in res) +
            f' | train {seconds:.1f}s for {len(seeds)} replicas')
    return res


# ==============================================================================================
# Torch: network, LARS, views, loop
# ==============================================================================================
class BasicBlock(torch.nn.Module):
  def __init__(self, cin, planes, stride):
    super().__init__()
    nn = torch.nn
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or cin != planes:
      self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(torch.nn.Module):
  """torchvision's ResNet-18 layout and init at ``base`` channels, CIFAR stem (3x3/1, no pool),
  no classifier: returns the global-average-pooled stage-4 features."""

  def __init__(self, base: int):
    super().__init__()
    nn = torch.nn
    self.conv1 = nn.Conv2d(3, base, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(base)
    layers, cin = [], base
    for i in range(4):
      planes = base * 2**i
      blocks = [BasicBlock(cin, planes, 1 if i == 0 else 2), BasicBlock(planes, planes, 1)]
      layers.append(nn.Sequential(*blocks))
      cin = planes
    self.layer1, self.layer2, self.layer3, self.layer4 = layers
    self.out_dim = cin
    for m in self.modules():  # torchvision.models.resnet's init
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)

  def forward(self, x):
    x = torch.relu(self.bn1(self.conv1(x)))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return x.mean(dim=(2, 3))


# solo-learn's LARS, the same transcription the golden-trajectory tests use.
sys.path.insert(0, os.path.join(REPO, 'tests'))
from torch_reference import LARS  # noqa: E402


def torch_lr(r: dict, step: int) -> float:
  """Linear warm-up from 0 over ``warmup_steps``, then cosine to ``peak * end_lr_factor``."""
  if 'lr_values' in r:
    return r['lr_values'][step]
  peak, warm, total = r['peak_lr'], r['warmup_steps'], r['total_steps']
  if warm > 0 and step < warm:
    return peak * step / warm
  decay = max(total, warm + 1) - warm
  frac = min(step - warm, decay) / decay
  end = peak * r['end_lr_factor']
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))


def torch_tau(r: dict, step: int) -> float:
  """The target's EMA rate: constant, or cosine from ``ema_base`` to ``ema_final``."""
  if 'tau_values' in r:
    return r['tau_values'][step]
  if r['ema_schedule'] == 'constant':
    return r['ema_base']
  t = min(step / max(r['total_steps'], 1), 1.0)
  final = r['ema_final']
  return final - (final - r['ema_base']) * (math.cos(math.pi * t) + 1) / 2


def torch_view(spec: dict) -> v2.Compose:
  """One view of ``views.resolve_views`` as torchvision v2 ops on uint8 CHW tensors."""
  ops = [v2.RandomResizedCrop(spec['size'], scale=tuple(spec['crop_scale']),
                              ratio=tuple(spec['crop_ratio']), antialias=True),
         v2.RandomHorizontalFlip(p=spec['flip_p'])]
  if spec['jitter_p'] > 0 and any(spec['jitter']):
    ops.append(v2.RandomApply([v2.ColorJitter(*spec['jitter'])], p=spec['jitter_p']))
  if spec['gray_p'] > 0:
    ops.append(v2.RandomGrayscale(p=spec['gray_p']))
  if spec['blur_p'] > 0:
    ks = augment.gaussian_kernel_size(spec['size'])
    ops.append(v2.RandomApply([v2.GaussianBlur(ks, sigma=(0.1, 2.0))], p=spec['blur_p']))
  if spec['solarize_p'] > 0:
    ops.append(v2.RandomSolarize(128, p=spec['solarize_p']))
  return v2.Compose(ops)


class TwoViews(torch.utils.data.Dataset):
  def __init__(self, images_nchw, labels, specs):
    self.images, self.labels = images_nchw, labels
    self.t = [torch_view(s) for s in specs]

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    x = self.images[i]
    return self.t[0](x), self.t[1](x), self.labels[i]


MEAN = torch.tensor(data.MEAN_RGB).view(1, 3, 1, 1)
STD = torch.tensor(data.STDDEV_RGB).view(1, 3, 1, 1)


def to_input(x_uint8_nchw):
  """Our ``data.normalize``: x / 255, ImageNet mean/std (channels_last memory layout)."""
  x = (x_uint8_nchw.float() / 255.0 - MEAN) / STD
  return x.contiguous(memory_format=torch.channels_last)


class TorchNet(torch.nn.Module):
  def __init__(self, r: dict):
    super().__init__()
    self.backbone = ResNet18(r['base_channels'])
    p = r['projector']
    d = self.backbone.out_dim
    if r['method'] == 'byol':
      assert p['use_bn'] and p['num_layers'] == 2
      self.projector = lightly_heads.BYOLProjectionHead(d, p['hidden_dim'], p['out_dim'])
    else:
      assert not p['use_bn'] and p['num_layers'] == 2
      self.projector = lightly_heads.MoCoProjectionHead(d, p['hidden_dim'], p['out_dim'])

  def forward(self, x):
    return self.projector(self.backbone(x))


def _load_mlp(head: torch.nn.Module, p: dict, s: dict) -> None:
  """Our ``heads.MLP`` variables (dense_i, bn_i) into a lightly head, layer by layer. A Linear
  without bias (lightly's before a BN) takes no bias: ours is 0 at init and has no effect in
  train-mode BN."""
  linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
  norms = [m for m in head.modules() if isinstance(m, torch.nn.BatchNorm1d)]
  assert len(linears) == len([k for k in p if k.startswith('dense_')]), (linears, list(p))
  assert len(norms) == len([k for k in p if k.startswith('bn_')]), (norms, list(p))
  with torch.no_grad():
    for i, lin in enumerate(linears):
      d = p[f'dense_{i}']
      lin.weight.copy_(torch.from_numpy(np.asarray(d['kernel']).T.copy()))
      if lin.bias is not None:
        lin.bias.copy_(torch.from_numpy(np.array(d['bias'], np.float32)))
      else:
        assert not np.any(np.asarray(d['bias'])), 'a non-zero bias has no torch counterpart'
    for i, bn in enumerate(norms):
      bn.weight.copy_(torch.from_numpy(np.array(p[f'bn_{i}']['scale'], np.float32)))
      bn.bias.copy_(torch.from_numpy(np.array(p[f'bn_{i}']['bias'], np.float32)))
      bn.running_mean.copy_(torch.from_numpy(np.array(s[f'bn_{i}']['mean'], np.float32)))
      bn.running_var.copy_(torch.from_numpy(np.array(s[f'bn_{i}']['var'], np.float32)))


def load_ours(online: 'TorchNet', predictor, init: dict) -> None:
  """Our initial backbone (``ssl_jax.export``'s torchvision mapping) and heads."""
  from ssl_jax import export  # noqa: PLC0415
  p, s = init['params'], init['batch_stats']
  sd = export.to_torchvision_state_dict(p['backbone'], s['backbone'])
  sd = {k: torch.from_numpy(np.asarray(v).copy()) for k, v in sd.items()}
  online.backbone.load_state_dict(sd, strict=True)
  _load_mlp(online.projector, p['projector'], s.get('projector', {}))
  if predictor is not None:
    _load_mlp(predictor, p['predictor'], s.get('predictor', {}))


def _load_queue(loss: 'NTXentLoss', queue) -> None:
  bank = loss.memory_bank.bank
  q = torch.from_numpy(np.array(queue, np.float32))
  with torch.no_grad():
    bank.copy_(q if tuple(bank.shape) == tuple(q.shape) else q.T)


def run_torch(r: dict, seed: int, train_images, train_labels, evalset: EvalSet, log,
              init: dict | None = None) -> dict:
  """``init``: our initial variables for this seed (``Ours.initial``), or None for torch's
  own initialisation (torchvision's for the backbone, torch defaults for lightly's heads)."""
  torch.manual_seed(seed)
  np.random.seed(seed)
  online = TorchNet(r)
  target = copy.deepcopy(online)
  for p in target.parameters():
    p.requires_grad_(False)
  params = list(online.parameters())
  predictor = None
  if r['method'] == 'byol':
    q = r['predictor']
    assert q['use_bn'] and q['num_layers'] == 2
    predictor = lightly_heads.BYOLPredictionHead(r['projector']['out_dim'], q['hidden_dim'],
                                                 q['out_dim'])
    params += list(predictor.parameters())
  if init is not None:
    load_ours(online, predictor, init)
    target = copy.deepcopy(online)
    for p in target.parameters():
      p.requires_grad_(False)
  # channels_last: PyTorch's fast CPU convolution layout (5x faster here); same arithmetic.
  online.backbone.to(memory_format=torch.channels_last)
  target.backbone.to(memory_format=torch.channels_last)
  if r['optimizer'] == 'lars':
    opt = LARS(params, lr=0.0, momentum=r['momentum'], weight_decay=r['weight_decay'],
               nesterov=r['nesterov'], eta=r['lars_eta'], clip_lars_lr=r['lars_clip'],
               exclude_bias_n_norm_lars=True)
  elif r['optimizer'] == 'sgd':
    opt = torch.optim.SGD(params, lr=0.0, momentum=r['momentum'],
                          weight_decay=r['weight_decay'], nesterov=r['nesterov'])
  else:
    raise ValueError(f'optimizer {r["optimizer"]} not mirrored on the torch side')
  assert r['grad_clip_norm'] == 0, 'grad clipping is not mirrored on the torch side'

  if r['method'] == 'byol':
    neg_cos = NegativeCosineSimilarity()

    def loss_fn(x1, x2):
      p1 = predictor(online(x1))
      with torch.no_grad():
        z2 = target(x2)
      loss = 2 + 2 * neg_cos(p1, z2)  # 2 - 2 cos, mean over the batch
      if r['symmetric']:
        p2 = predictor(online(x2))
        with torch.no_grad():
          z1 = target(x1)
        loss = loss + 2 + 2 * neg_cos(p2, z1)
      return loss
  else:
    dim = r['projector']['out_dim']
    ce_1 = NTXentLoss(r['temperature'], memory_bank_size=(r['queue_size'], dim))  # k2 queue
    ce_2 = NTXentLoss(r['temperature'], memory_bank_size=(r['queue_size'], dim))  # k1 queue
    if init is not None:
      _load_queue(ce_1, init['method_state']['queue'])
      if r['symmetric']:
        _load_queue(ce_2, init['method_state']['queue_view1'])

    def loss_fn(x1, x2):
      q1 = online(x1)
      with torch.no_grad():
        k2 = target(x2)
      loss = ce_1(q1, k2)
      if r['symmetric']:
        q2 = online(x2)
        with torch.no_grad():
          k1 = target(x1)
        loss = (loss + ce_2(q2, k1)) / 2
      return loss

  images = torch.from_numpy(train_images).permute(0, 3, 1, 2).contiguous()
  loader = torch.utils.data.DataLoader(
      TwoViews(images, torch.from_numpy(train_labels), r['views']),
      batch_size=r['batch_size'], shuffle=True, drop_last=True, num_workers=0,
      generator=torch.Generator().manual_seed(seed))  # no fork: JAX is multithreaded

  @torch.no_grad()
  def features_of(x_nhwc):
    online.eval()
    out = [online.backbone(to_input(torch.from_numpy(x).permute(0, 3, 1, 2))).numpy()
           for x in _batches(x_nhwc, 500)]
    online.train()
    return np.concatenate(out)

  res = {'knn': [evalset.score(features_of)], 'epoch_time_s': [], 'loss': []}
  if init is not None:  # the same network: our features at init, up to float error
    f = features_of(init['check_images'])
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    res['init_feature_max_abs_diff'] = err = float(np.max(np.abs(f - init['check_features'])))
    assert err < 1e-3, f'torch and ours differ at init: max |diff| of features {err:.3g}'
  log(f'  torch epoch 0: kNN {100 * res["knn"][0]:.2f}%'
      + (f' (features at init match ours: max |diff| {err:.1e})' if init is not None else ''))
  step = 0
  online.train()
  target.train()  # BN on the batch's own statistics, as our target forward
  if predictor is not None:
    predictor.train()
  for epoch in range(1, r['total_steps'] // r['steps_per_epoch'] + 1):
    t0 = time.time()
    losses = []
    for x1, x2, _ in loader:
      lr = torch_lr(r, step)
      for g in opt.param_groups:
        g['lr'] = lr
      loss = loss_fn(to_input(x1), to_input(x2))
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      update_momentum(online, target, torch_tau(r, step))
      losses.append(float(loss.detach()))
      step += 1
    res['epoch_time_s'].append(time.time() - t0)
    res['loss'].append(float(np.mean(losses)))
    if not np.all(np.isfinite(losses)):
      raise FloatingPointError(f'torch: non-finite loss in epoch {epoch}')
    res['knn'].append(evalset.score(features_of))
    log(f'  torch epoch {epoch}: loss {res["loss"][-1]:.4f} | kNN '
        f'{100 * res["knn"][-1]:.2f}% | train {res["epoch_time_s"][-1]:.1f}s')
  assert step == r['total_steps'], (step, r['total_steps'])
  return res


# ==============================================================================================
# Report
# ==============================================================================================
def summarize(results: dict, tolerance: float) -> tuple[str, dict]:
  lines, verdict = [], {}
  for method, per in results['runs'].items():
    ours = 100 * np.array([s['knn'] for s in per['ours']])
    peer = 100 * np.array([s['knn'] for s in per['torch']])
    diff = ours.mean(0) - peer.mean(0)
    ok = bool(np.all(diff >= -tolerance))
    verdict[method] = {'ours_mean': ours.mean(0).tolist(), 'ours_std': ours.std(0).tolist(),
                       'torch_mean': peer.mean(0).tolist(), 'torch_std': peer.std(0).tolist(),
                       'diff': diff.tolist(), 'goal_met': ok}
    lines.append(f'\n{method}: kNN top-1 (%) per epoch, mean ± std (ddof 0) over {len(ours)} '
                 'seeds')
    lines.append('| epoch | ours | torch | ours − torch | per-seed ours − torch | '
                 'paired mean ± s.e. |')
    lines.append('|---|---|---|---|---|---|')
    paired = ours - peer  # the same seed (and, with --init shared, the same initial network)
    se = (paired.std(0, ddof=1) / np.sqrt(len(paired)) if len(paired) > 1
          else np.zeros(paired.shape[1]))
    for e in range(ours.shape[1]):
      lines.append(f'| {e} | {ours[:, e].mean():.2f} ± {ours[:, e].std():.2f} | '
                   f'{peer[:, e].mean():.2f} ± {peer[:, e].std():.2f} | {diff[e]:+.2f} | '
                   f'{", ".join(f"{d:+.2f}" for d in paired[:, e])} | '
                   f'{paired[:, e].mean():+.2f} ± {se[e]:.2f} |')
    t_o = np.array([s['epoch_time_s'] for s in per['ours']])
    t_t = np.array([s['epoch_time_s'] for s in per['torch']])
    steady = slice(1, None) if t_o.shape[1] > 1 else slice(None)
    lines.append(f'train wall time per epoch (s, mean over seeds; epoch 1 incl. compile | '
                 f'later epochs): ours {t_o[:, 0].mean():.1f} | {t_o[:, steady].mean():.1f}; '
                 f'torch {t_t[:, 0].mean():.1f} | {t_t[:, steady].mean():.1f}')
    lines.append(f'goal (ours ≥ torch − {tolerance:g} point at every epoch): '
                 f'{"MET" if ok else "NOT met"} (worst epoch: {diff.min():+.2f})')
  return '\n'.join(lines), verdict


def plot(results: dict, path: str) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415
  runs = results['runs']
  fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 4), squeeze=False)
  for ax, (method, per) in zip(axes[0], runs.items()):
    for side, color, label in (('ours', 'C0', 'ours (JAX)'), ('torch', 'C3', 'PyTorch peer')):
      acc = 100 * np.array([s['knn'] for s in per[side]])
      ep = np.arange(acc.shape[1])
      m, s = acc.mean(0), acc.std(0)
      ax.plot(ep, m, '-o', color=color,
              label=f'{label}: mean of {len(acc)} seeds (band: min-max)')
      ax.fill_between(ep, acc.min(0), acc.max(0), color=color, alpha=0.15)
      del s
    a = results['args']
    name = {'byol': 'BYOL', 'moco': 'MoCo v2'}.get(method, method)
    ax.set_title(f'{name}: ResNet-18 x{a["width"]:g}, first {a["train_examples"]} '
                 f'CIFAR-10 train images, batch {a["batch"]}', fontsize=9)
    ax.set_xlabel('epoch')
    ax.set_ylabel(f'kNN top-1 (%), k=200, T=0.1, {a["test_examples"]} test images')
    ax.set_xticks(ep)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
  ap.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
  ap.add_argument('--epochs', type=int, default=3)
  ap.add_argument('--train-examples', type=int, default=2048,
                  help='the first N CIFAR-10 train images (the training set and kNN bank)')
  ap.add_argument('--test-examples', type=int, default=2000,
                  help='the first N CIFAR-10 test images (kNN queries)')
  ap.add_argument('--width', type=float, default=0.125, help='ResNet-18 channel multiplier')
  ap.add_argument('--batch', type=int, default=128)
  ap.add_argument('--warmup-epochs', type=float, default=None,
                  help='default: the preset warm-up x epochs / preset epochs')
  ap.add_argument('--queue-size', type=int, default=None,
                  help='MoCo; default min(preset, examples per epoch)')
  ap.add_argument('--set', action='append', metavar='KEY=VALUE',
                  help='override a config field on both sides, e.g. optimizer.base_lr=0.5')
  ap.add_argument('--init', choices=['shared', 'own'], default='shared',
                  help='shared: torch starts from our initial weights (and MoCo queues) of '
                  'the same seed; own: torchvision/torch-default initialisation')
  ap.add_argument('--sides', nargs='+', default=['ours', 'torch'], choices=['ours', 'torch'])
  ap.add_argument('--replicas', action='store_true',
                  help='ours trains all --seeds (consecutive) in one program, '
                       '--config.replicas=len(seeds), instead of one run per seed')
  ap.add_argument('--full', action='store_true',
                  help='all 50,000 train and 10,000 test images, width 1/4, batch 256')
  ap.add_argument('--smoke', action='store_true',
                  help='128 images, batch 64, 1 epoch (2 steps), 1 seed, width 1/8')
  ap.add_argument('--tolerance', type=float, default=1.0)
  ap.add_argument('--out', default='/tmp/parity_cifar10.json')
  ap.add_argument('--png', default=None,
                  help='default: docs/parity_cifar10.png (the smoke run: next to --out)')
  ap.add_argument('--report', metavar='JSON', default=None,
                  help='no training: print the tables and write the PNG of a results file')
  args = ap.parse_args(argv)
  if args.report:
    with open(args.report) as f:
      results = json.load(f)
    text, _ = summarize(results, args.tolerance)
    print(text)
    plot(results, args.png or os.path.join(REPO, 'docs', 'parity_cifar10.png'))
    return
  if args.full:
    args.train_examples, args.test_examples, args.width, args.batch = 50_000, 10_000, 0.25, 256
  if args.smoke:
    args.train_examples, args.test_examples, args.batch, args.epochs = 128, 256, 64, 1
    args.seeds, args.width = args.seeds[:2 if args.replicas else 1], 0.125
  if args.replicas and args.seeds != list(range(args.seeds[0], args.seeds[0] + len(args.seeds))):
    ap.error(f'--replicas trains seeds seed .. seed + S - 1: --seeds must be consecutive, '
             f'got {args.seeds}')
  if args.png is None:
    args.png = (os.path.splitext(args.out)[0] + '.png' if args.smoke
                else os.path.join(REPO, 'docs', 'parity_cifar10.png'))
  torch.set_num_threads(os.cpu_count() or 1)

  def log(msg):
    print(msg, flush=True)

  t_start = time.time()
  mesh = sharding.make_mesh(None)
  results = {'args': vars(args), 'recipes': {}, 'runs': {},
             'versions': {'jax': jax.__version__, 'torch': torch.__version__,
                          'torchvision': torchvision.__version__,
                          'lightly': __import__('lightly').__version__},
             'cpu_count': os.cpu_count()}
  evalset = None
  for method in args.methods:
    config = make_config(method, args, args.seeds[0])
    if evalset is None:
      evalset = EvalSet(config.data, args.train_examples, args.test_examples)
    ours = Ours(config, mesh)
    r = recipe_of(config, ours.spe, ours.total)
    results['recipes'][method] = r
    log(f'\n=== {method}: recipe (both sides) ===\n' + json.dumps(r, indent=None, default=str))
    # The torch side's schedules are its own formulas; they must equal ours at every step.
    steps = np.arange(ours.total + 1)
    for name, mine, theirs in (
        ('lr', [torch_lr(r, int(s)) for s in steps], [float(ours.lr_fn(s)) for s in steps]),
        ('tau', [torch_tau(r, int(s)) for s in steps],
         [float(ours.tau_fn(jnp.asarray(s))) for s in steps])):
      if not np.allclose(mine, theirs, rtol=1e-5, atol=1e-6):
        # Ours does not follow its own config (or the torch formula is wrong): say so loudly,
        # and give the torch side our values so both still train the same algorithm.
        log(f'WARNING: {method}: the torch {name} schedule from the config differs from ours '
            f'(max |diff| {np.max(np.abs(np.subtract(mine, theirs))):.3g}); the torch side '
            f'uses ours. torch: {np.round(mine[:3], 6)}..{mine[-1]:.6g}, ours: '
            f'{np.round(theirs[:3], 6)}..{theirs[-1]:.6g}')
        r.setdefault('schedule_mismatch', []).append(name)
        r[f'{name}_values'] = [float(v) for v in theirs]
    per = results['runs'][method] = {'ours': [], 'torch': []}
    if args.replicas and 'ours' in args.sides:
      log(f'--- {method} seeds {args.seeds} ours, one program of {len(args.seeds)} replicas ---')
      rc = make_config(method, args, args.seeds[0])
      rc.replicas = len(args.seeds)
      per['ours'] = Ours(rc, mesh).run_replicas(evalset, log)
    for seed in args.seeds:
      for side in args.sides:
        if side == 'ours' and args.replicas:
          continue
        log(f'--- {method} seed {seed} {side} ---')
        if side == 'ours':
          per['ours'].append(ours.run(seed, evalset, log))
        else:
          init = ours.initial(seed) if args.init == 'shared' else None
          per['torch'].append(run_torch(r, seed, evalset.train_images, evalset.train_labels,
                                        evalset, log, init=init))
        with open(args.out, 'w') as f:
          json.dump(results, f, indent=1, default=str)
  results['total_time_s'] = time.time() - t_start
  if set(args.sides) == {'ours', 'torch'}:
    text, verdict = summarize(results, args.tolerance)
    results['summary'] = verdict
    log(text)
    plot(results, args.png)
    log(f'plot: {args.png}')
  with open(args.out, 'w') as f:
    json.dump(results, f, indent=1, default=str)
  log(f'results: {args.out} | total {results["total_time_s"] / 60:.1f} min')


if __name__ == '__main__':
  main()
