"""Row ``byol``: ResNet-50 BYOL two-view step (online forward+backward of both views, predictor,
two EMA-target forwards, LARS, EMA update, online linear probe), bf16 compute, batch 256 per
device, images/s. Goal: ours >= 1.2x the peer.

* Ours: the trainer's jitted step (``train.build``, compiled by ``jax_steps.prepare_train``) on a
  batch sharded over the 'data' mesh (NamedSharding).
* Peer (:class:`ByolPeer`): torchvision ``resnet50`` with the same heads, the same step (LARS
  written with ``torch._foreach`` ops, EMA target, probe), AMP bf16 autocast, channels-last,
  cudnn.benchmark; the better of eager and ``torch.compile``.
"""
from __future__ import annotations

import statistics

from device_rows.common import Row, best_peer, flop_str, median_ratio, mfu_note, time_against_peer
from device_rows.torch_peers import TorchPeer


def row(suite):
  ours, peer, times = time_against_peer(suite, 'byol')
  suite.byol_times = times
  img = ours.images
  best, best_t, notes = best_peer(times)
  r_ours = img / statistics.median(times['ours'])
  vs = median_ratio(times[best], times['ours'])
  return [Row('byol', 'BYOL R50 two-view step' if not suite.args.smoke else 'BYOL two-view step',
              'img/s', r_ours, img / best_t, f'torch {best}', vs, 'ours/peer >= 1.2x',
              'met' if vs >= 1.2 else 'not met',
              notes=f'{notes}; {suite.compile_notes.get("byol", "")}; ours '
                    f'{1e3 * statistics.median(times["ours"]):.0f} ms/step, '
                    f'{flop_str(ours.flops)}/step (XLA)'
                    f'{mfu_note(suite, ours.flops, times["ours"])}; '
                    f'compile {ours.build_s:.0f} s (in a thread)')]


class ByolPeer(TorchPeer):
  """BYOL: online(x1), target(x2), online(x2), target(x1) in train mode; symmetric loss; LARS
  (solo-learn's rule without the trust-ratio clip, as the ImageNet preset: weight decay and
  trust ratio on weights with ndim > 1 only) with ``torch._foreach`` ops and no host sync
  (solo-learn's and timm's LARS loop over the parameters); probe; EMA of backbone + projector."""

  def __init__(self, suite, config, batch_np):
    super().__init__(suite, config, batch_np)
    torch = self.torch
    self.online_net(with_predictor=True)
    o = self.c.optimizer
    self.lr = o.base_lr * self.c.batch_size / 256
    self.wd, self.eta, self.mom = o.weight_decay, o.trust_coefficient, o.momentum
    params = list(self.online.parameters())
    self.adapt = [p for p in params if p.ndim > 1]
    self.plain = [p for p in params if p.ndim <= 1]
    self.buf_a = [torch.zeros_like(p) for p in self.adapt]
    self.buf_p = [torch.zeros_like(p) for p in self.plain]
    self.tau = float(self.c.ema.base)

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
