"""What the PyTorch peers share: torchvision's ResNet at our width and stem, the heads, the
uint8-to-normalised network wrapper, and :class:`TorchPeer` (the device batch, eager / compiled
call paths, the online probe, the EMA target). Each row's own peer is in its module
(``byol.py``, ``supervised.py``, ``methods.py``).

No torch import at module level: ``torch`` / ``torchvision`` are passed in (the suite imports
torch after JAX's GPU backend has started)."""
from __future__ import annotations

import copy
import math
import time

from device_rows import jax_steps


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


def peer_batch(suite, key):
  """The config and numpy batch our step of ``key`` uses (identical images for the peer)."""
  c = jax_steps.method_config(suite, 'byol' if key == 'supervised' else key)
  b = jax_steps.first_batch(c)
  if key == 'supervised':
    b = {'image': b['view1'], 'label': b['label']}
  return c, b


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

  def online_net(self, with_predictor: bool):
    """The online network (backbone + projector [+ predictor]) on the device, its EMA target
    (:meth:`make_target`) and the probe; returns the backbone's feature dim."""
    torch = self.torch
    bb, feat = self.backbone()
    pc, qc = self.c.model.projector, self.c.model.predictor
    projector = torch_mlp(torch, pc, feat)
    predictor = torch_mlp(torch, qc, pc.out_dim) if with_predictor else None
    self.online = self.to_dev(self.Net(bb, projector, predictor))
    self.target = self.make_target(self.online)
    self.make_probe(feat)
    return feat

  def sgd(self):
    """``torch.optim.SGD`` of the preset (lr = base_lr x B / 256, weight decay on every
    parameter, foreach)."""
    o = self.c.optimizer
    return self.torch.optim.SGD(self.online.parameters(),
                                lr=o.base_lr * self.c.batch_size / 256, momentum=o.momentum,
                                weight_decay=o.weight_decay, foreach=True)

  def sgd_update(self, loss, f):
    """Backward of ``loss`` + the probe's loss on features ``f``, the :meth:`sgd` and probe
    steps, then the EMA of the target (rate ``self.tau``)."""
    (loss + self.probe_loss(f)).backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    self.probe_opt.step()
    self.probe_opt.zero_grad(set_to_none=True)
    self.ema(self.torch, self.t_params, self.o_params, self.tau)

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

  def modules(self):
    return {'online': self.online, 'target': self.target}

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
