"""Rows ``moco``, ``msf``, ``clim``: each method's ImageNet preset step (ResNet-50, batch 256 per
device, bf16; banks pre-filled with random unit rows, the steady state) relative to BYOL's,
each timed interleaved with BYOL again. Peers (the same step written in torch, eager) for MoCo
v2 (:class:`MocoPeer`) and MSF (:class:`MsfPeer`); CLIM has none (not written: k-means bank,
mixing and multi-resolution views).
"""
from __future__ import annotations

import statistics

from device_rows.common import Row, median_ratio, warm_then_time
from device_rows.torch_peers import TorchPeer

LABELS = {'moco': 'MoCo v2 step vs BYOL', 'msf': 'MSF step vs BYOL', 'clim': 'CLIM step vs BYOL'}


def row(suite, key):
  ours = suite.job(key)
  byol = suite.job('byol')
  cont = {'ours': ours.run, 'ours byol': byol.run}
  peer = None
  if key in ('moco', 'msf'):
    peer = suite.make_peer(key)
    cont['peer'] = lambda n: peer.run(n, compiled=False)
    bp = suite.make_peer('byol')
    cont['peer byol'] = lambda n: bp.run(n, compiled=False)
  times = warm_then_time(cont, suite.args.repeats, suite.args.steps)
  ours.check_finite()
  r_ours = median_ratio(times['ours'], times['ours byol'])
  flop_ratio = ours.flops / byol.flops
  notes = (f'ours {1e3 * statistics.median(times["ours"]):.0f} ms/step; FLOPs vs BYOL '
           f'{flop_ratio:.2f}x (XLA; a search in a loop counts once); time per FLOP vs BYOL '
           f'{r_ours / flop_ratio:.2f}x')
  if key == 'clim':
    notes += '; bank full, so the step at warm-up ran k-means (not in the timed steps)'
  if peer is None:
    return [Row(key, LABELS[key], 'x BYOL step time', r_ours, None, 'none written', None,
                '(context)', '', fmt='{:.2f}', notes=notes)]
  peer.check_finite()
  r_peer = median_ratio(times['peer'], times['peer byol'])
  vs = median_ratio(times['peer'], times['ours'])
  return [Row(key, LABELS[key], 'x BYOL step time', r_ours, r_peer, 'torch eager', vs,
              '(context)', '', fmt='{:.2f}',
              notes=notes + f'; ours/peer speed {vs:.2f}x (peer eager)')]


class MocoPeer(TorchPeer):
  """MoCo v2: q = n(online(x1)), k = n(target(x2)); CE over [q.k, q.queue^T] / T; SGD (weight
  decay on every parameter); EMA m; enqueue k (FIFO); probe."""

  def __init__(self, suite, config, batch_np):
    super().__init__(suite, config, batch_np)
    torch = self.torch
    self.online_net(with_predictor=False)
    self.opt = self.sgd()
    kq = int(self.c.method.queue_size)
    self.queue = torch.nn.functional.normalize(
        torch.randn(kq, self.c.model.projector.out_dim, device=suite.tdev), dim=1)
    self.ptr, self.temp, self.tau = 0, float(self.c.method.temperature), float(self.c.ema.base)

  def step(self, mods):
    torch, F = self.torch, self.torch.nn.functional
    with self.s.autocast():
      f1, z1, _ = mods['online'](self.x['view1'])
      with torch.no_grad():
        _, zk, _ = mods['target'](self.x['view2'])
    q, k = F.normalize(z1.float(), dim=1), F.normalize(zk.float(), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.T], 1) / self.temp
    loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
    self.sgd_update(loss, f1)
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
    self.online_net(with_predictor=True)
    self.opt = self.sgd()
    m = self.c.method
    self.bank = torch.nn.functional.normalize(
        torch.randn(int(m.bank_size), self.c.model.projector.out_dim, device=suite.tdev), dim=1)
    self.ptr, self.k, self.tau = 0, int(m.k), float(self.c.ema.base)
    self.on_key, self.t_key = str(m.online_view), str(m.target_view)

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
    self.sgd_update(loss, f)
    return loss.detach()
