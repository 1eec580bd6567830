"""A PyTorch reference of BYOL and MoCo v2 training steps, for the golden-trajectory tests.

Written from the papers' and solo-learn's algorithms, independently of ``ssl_jax`` (only the
export's name mapping is shared, to load the same initial weights):

* backbone: ``torchvision.models.resnet18`` with the CIFAR stem (``conv1`` 3x3/1 pad 1,
  ``maxpool = Identity``) and ``fc = Identity``;
* heads: ``Linear - BN1d - ReLU - Linear`` (or ``Linear - ReLU - Linear`` without BN);
* LARS: a transcription of solo-learn's ``solo/utils/lars.py`` (used with
  ``exclude_bias_n_norm_lars=True, clip_lars_lr=True``); SGD: ``torch.optim.SGD(momentum,
  weight_decay)``, weight decay on every parameter (facebookresearch/moco);
* lr: linear warm-up from 0 to ``base_lr * B / 256``, then cosine to ``peak * end_factor``,
  set on the optimizer before every step;
* BatchNorm: torch's, in train mode (batch statistics; running statistics updated per forward
  with the unbiased variance);
* EMA: ``target = tau * target + (1 - tau) * online`` over the parameters (not the BN buffers)
  after the optimizer step (solo-learn's ``on_train_batch_end``);
* MoCo: ``logits = [q.k, q.queue^T] / T``, CE with the positive at 0, then enqueue ``k`` FIFO.

Everything runs in float64.
"""
from __future__ import annotations

import collections
import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_jax import export

MEAN_RGB = (0.485, 0.456, 0.406)   # ImageNet statistics, as every torchvision recipe
STDDEV_RGB = (0.229, 0.224, 0.225)


import_torchvision = export.import_torchvision   # CUDA-build torchvision beside a CPU torch


# ------------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------------

def resnet18_cifar() -> nn.Module:
  tv = import_torchvision()
  model = tv.models.resnet18()
  model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
  model.maxpool = nn.Identity()
  model.fc = nn.Identity()
  return model


def mlp(in_dim: int, hidden_dim: int, out_dim: int, use_bn: bool) -> nn.Sequential:
  """BYOL's ``Linear - BN - ReLU - Linear`` / MoCo v2's ``Linear - ReLU - Linear``."""
  layers = [nn.Linear(in_dim, hidden_dim)]
  if use_bn:
    layers.append(nn.BatchNorm1d(hidden_dim))   # eps 1e-5, momentum 0.1 (torch defaults)
  layers += [nn.ReLU(), nn.Linear(hidden_dim, out_dim)]
  return nn.Sequential(*layers)


class Net(nn.Module):
  """uint8 NHWC images -> ImageNet normalisation -> backbone -> projector (-> predictor)."""

  def __init__(self, proj_cfg, pred_cfg=None):
    super().__init__()
    self.backbone = resnet18_cifar()
    self.projector = mlp(512, proj_cfg.hidden_dim, proj_cfg.out_dim, proj_cfg.use_bn)
    self.predictor = (mlp(proj_cfg.out_dim, pred_cfg.hidden_dim, pred_cfg.out_dim,
                          pred_cfg.use_bn) if pred_cfg is not None else None)
    self.register_buffer('mean', torch.tensor(MEAN_RGB, dtype=torch.float64).view(1, 3, 1, 1),
                         persistent=False)
    self.register_buffer('std', torch.tensor(STDDEV_RGB, dtype=torch.float64).view(1, 3, 1, 1),
                         persistent=False)

  def forward(self, images_u8: np.ndarray):
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2)
    x = (x.to(self.mean.dtype) / 255.0 - self.mean) / self.std
    feats = self.backbone(x)
    z = self.projector(feats)
    p = self.predictor(z) if self.predictor is not None else None
    return feats, z, p


def _head_map(prefix: str, use_bn: bool) -> dict[str, str]:
  """Flax ``MLP`` submodule name -> torch ``Sequential`` index."""
  m = {'dense_0': f'{prefix}.0', 'bn_0': f'{prefix}.1'} if use_bn else {'dense_0': f'{prefix}.0'}
  m['dense_1'] = f'{prefix}.{3 if use_bn else 2}'
  return m


def flax_to_torch(params, batch_stats, proj_cfg, pred_cfg=None) -> dict[str, np.ndarray]:
  """Our SSLNet variables as the state dict of :class:`Net` (numpy float64, without the
  ``num_batches_tracked`` counters). The backbone goes through ``ssl_jax.export``'s mapping;
  the heads' mapping (Dense kernel [in, out] -> Linear weight [out, in]; BN scale/bias/mean/var
  -> weight/bias/running_mean/running_var) is written here."""
  sd = collections.OrderedDict()
  bb = export.to_torchvision_state_dict(params['backbone'], batch_stats['backbone'])
  for k, v in bb.items():   # export writes float32: exact, our variables are float32
    if not k.endswith('num_batches_tracked'):
      sd[f'backbone.{k}'] = np.asarray(v, np.float64)
  heads = [('projector', proj_cfg)] + ([('predictor', pred_cfg)] if pred_cfg is not None else [])
  for name, cfg in heads:
    p, s = params[name], batch_stats.get(name, {})
    for flax_name, torch_name in _head_map(name, cfg.use_bn).items():
      if flax_name.startswith('dense'):
        sd[f'{torch_name}.weight'] = np.asarray(p[flax_name]['kernel'], np.float64).T
        sd[f'{torch_name}.bias'] = np.asarray(p[flax_name]['bias'], np.float64)
      else:
        sd[f'{torch_name}.weight'] = np.asarray(p[flax_name]['scale'], np.float64)
        sd[f'{torch_name}.bias'] = np.asarray(p[flax_name]['bias'], np.float64)
        if s:
          sd[f'{torch_name}.running_mean'] = np.asarray(s[flax_name]['mean'], np.float64)
          sd[f'{torch_name}.running_var'] = np.asarray(s[flax_name]['var'], np.float64)
  return sd


def torch_to_flax(state_dict: dict[str, np.ndarray], proj_cfg, pred_cfg=None
                  ) -> tuple[dict, dict]:
  """Inverse of :func:`flax_to_torch`: a :class:`Net` state dict (or a target's ``backbone.*`` /
  ``projector.*`` entries) as our ``(params, batch_stats)`` trees, at the dtype given. The
  backbone goes through ``export.from_torchvision_state_dict``."""
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  bb = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
  p_bb, s_bb, fc = export.from_torchvision_state_dict(bb)
  assert fc is None, 'the reference backbone has fc = Identity'
  params, stats = {'backbone': p_bb}, {'backbone': s_bb}
  heads = [('projector', proj_cfg)] + ([('predictor', pred_cfg)] if pred_cfg is not None else [])
  for name, cfg in heads:
    for flax_name, torch_name in _head_map(name, cfg.use_bn).items():
      w, b = sd[f'{torch_name}.weight'], sd[f'{torch_name}.bias']
      if flax_name.startswith('dense'):
        params.setdefault(name, {})[flax_name] = {'kernel': w.T, 'bias': b}
      else:
        params.setdefault(name, {})[flax_name] = {'scale': w, 'bias': b}
        if f'{torch_name}.running_mean' in sd:
          stats.setdefault(name, {})[flax_name] = {'mean': sd[f'{torch_name}.running_mean'],
                                                    'var': sd[f'{torch_name}.running_var']}
  return params, stats


def load_flax(net: Net, params, batch_stats, proj_cfg, pred_cfg=None) -> None:
  sd = {k: torch.from_numpy(np.ascontiguousarray(v))
        for k, v in flax_to_torch(params, batch_stats, proj_cfg, pred_cfg).items()}
  missing, unexpected = net.load_state_dict(sd, strict=False)
  assert not unexpected, unexpected
  assert all(k.endswith('num_batches_tracked') for k in missing), missing


def record_bn_counts(net: nn.Module) -> dict[str, int]:
  """``n`` (values per channel that each BN's batch statistics average over) of every BN,
  filled in by forward pre-hooks on the first forward."""
  counts: dict[str, int] = {}
  for name, mod in net.named_modules():
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
      def hook(m, inputs, name=name):
        x = inputs[0]
        counts[name] = x.numel() // x.shape[1]
      mod.register_forward_pre_hook(hook)
  return counts


# ------------------------------------------------------------------------------------------------
# Optimizers and schedules
# ------------------------------------------------------------------------------------------------

class LARS(torch.optim.Optimizer):
  """solo-learn's ``solo/utils/lars.py`` (from Lightning Bolts), ``LARS.step`` transcribed line by
  line; the test passes ``exclude_bias_n_norm_lars=True`` and ``clip_lars_lr=True`` as solo-learn's
  BYOL CIFAR recipe does."""

  def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
               eta=1e-3, eps=1e-8, clip_lars_lr=False, exclude_bias_n_norm_lars=False):
    super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                  weight_decay=weight_decay, nesterov=nesterov, eta=eta, eps=eps,
                                  clip_lars_lr=clip_lars_lr,
                                  exclude_bias_n_norm_lars=exclude_bias_n_norm_lars))

  @torch.no_grad()
  def step(self, closure=None):
    for group in self.param_groups:
      weight_decay = group['weight_decay']
      momentum = group['momentum']
      dampening = group['dampening']
      nesterov = group['nesterov']
      for p in group['params']:
        if p.grad is None:
          continue
        d_p = p.grad
        p_norm = torch.norm(p.data)
        g_norm = torch.norm(p.grad.data)
        # lars scaling + weight decay part
        if p.ndim != 1 or not group['exclude_bias_n_norm_lars']:
          if p_norm != 0 and g_norm != 0:
            lars_lr = p_norm / (g_norm + p_norm * weight_decay + group['eps'])
            lars_lr *= group['eta']
            if group['clip_lars_lr']:      # lr 0 (first warm-up step): inf -> clipped to 1
              lars_lr = min(lars_lr / group['lr'], 1)
            d_p = d_p.add(p, alpha=weight_decay)
            d_p *= lars_lr
        # sgd part
        if momentum != 0:
          param_state = self.state[p]
          if 'momentum_buffer' not in param_state:
            buf = param_state['momentum_buffer'] = torch.clone(d_p).detach()
          else:
            buf = param_state['momentum_buffer']
            buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
          d_p = d_p.add(buf, alpha=momentum) if nesterov else buf
        p.add_(d_p, alpha=-group['lr'])


def lr_at(t: int, *, peak: float, warmup: int, total: int, end_factor: float) -> float:
  """Linear warm-up from 0 over ``warmup`` steps, then cosine from ``peak`` to
  ``peak * end_factor`` at step ``total`` (0-based step ``t``)."""
  if t < warmup:
    return peak * t / warmup
  frac = min(t - warmup, total - warmup) / (total - warmup)
  end = peak * end_factor
  return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def cosine_tau(t: int, *, base: float, total: int, final: float = 1.0) -> float:
  """BYOL's ``final - (final - base)(cos(pi t / T) + 1) / 2`` at 0-based step ``t`` (final 1:
  BYOL; solo-learn's ``on_train_batch_end`` sets it from the step count)."""
  return final - (final - base) * (math.cos(math.pi * min(t / total, 1.0)) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target_modules, online_modules, tau: float) -> None:
  for tm, om in zip(target_modules, online_modules):
    for pt, po in zip(tm.parameters(), om.parameters()):
      pt.mul_(tau).add_(po, alpha=1.0 - tau)


# ------------------------------------------------------------------------------------------------
# Training steps
# ------------------------------------------------------------------------------------------------

def byol_loss(p, z):
  return (2.0 - 2.0 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


class _WithTarget:
  """An online ``Net`` with its EMA target (backbone + projector copies, no gradients)."""

  def __init__(self, net: Net, opt, lr_fn):
    self.net, self.opt, self.lr_fn = net, opt, lr_fn
    self.t_backbone = copy.deepcopy(net.backbone)
    self.t_projector = copy.deepcopy(net.projector)
    for p in list(self.t_backbone.parameters()) + list(self.t_projector.parameters()):
      p.requires_grad_(False)
    self.step_count = 0

  def target(self, images):
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    x = (x.to(self.net.mean.dtype) / 255.0 - self.net.mean) / self.net.std
    return self.t_projector(self.t_backbone(x))

  def begin_step(self) -> tuple[int, float]:
    """Step ``t``'s lr into the optimizer, every module in train mode, zero grads."""
    t = self.step_count
    lr = self.lr_fn(t)
    for g in self.opt.param_groups:
      g['lr'] = lr
    self.net.train(); self.t_backbone.train(); self.t_projector.train()
    self.opt.zero_grad()
    return t, lr


class Byol(_WithTarget):
  """Symmetric BYOL, solo-learn's order: online forwards of view 1 then view 2 (train mode),
  target forwards under no_grad, loss, LARS step, then the EMA with tau(t)."""

  def __init__(self, net: Net, opt, *, lr_fn, tau_fn):
    super().__init__(net, opt, lr_fn)
    self.tau_fn = tau_fn

  def step(self, x1, x2) -> dict[str, float]:
    t, lr = self.begin_step()
    _, _, p1 = self.net(x1)
    _, _, p2 = self.net(x2)
    with torch.no_grad():
      z1t, z2t = self.target(x1), self.target(x2)
    loss = byol_loss(p1, z2t) + byol_loss(p2, z1t)
    loss.backward()
    self.opt.step()
    tau = self.tau_fn(t)
    ema_update([self.t_backbone, self.t_projector], [self.net.backbone, self.net.projector], tau)
    self.step_count += 1
    return {'loss': float(loss.detach()), 'lr': lr, 'tau': tau}


class MocoV2(_WithTarget):
  """Asymmetric MoCo v2: q = n(online(x1)), k = n(target(x2)); CE over [q.k, q.queue^T] / T;
  SGD step; EMA with constant m; enqueue k at ptr (FIFO).

  The official MoCo updates the key encoder at the start of the next step's forward rather than
  at the end of this one; the keys each step sees are the same (the key encoder starts as a copy
  of the online one), so this is the same trajectory."""

  def __init__(self, net: Net, opt, queue: np.ndarray, *, lr_fn, m: float, temperature: float):
    super().__init__(net, opt, lr_fn)
    self.m, self.temperature = m, temperature
    self.queue = torch.from_numpy(np.asarray(queue, np.float64).copy())   # [K, d]
    self.ptr = 0

  def step(self, x1, x2) -> dict[str, float]:
    _, lr = self.begin_step()
    _, z1, _ = self.net(x1)
    q = F.normalize(z1, dim=1)
    with torch.no_grad():
      k = F.normalize(self.target(x2), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ self.queue.clone().detach().T
    logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature
    loss = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))
    loss.backward()
    self.opt.step()
    ema_update([self.t_backbone, self.t_projector], [self.net.backbone, self.net.projector],
               self.m)
    b, kq = k.shape[0], self.queue.shape[0]
    rows = (self.ptr + torch.arange(b)) % kq
    self.queue[rows] = k
    self.ptr = (self.ptr + b) % kq
    self.step_count += 1
    return {'loss': float(loss.detach()), 'lr': lr, 'tau': self.m}
