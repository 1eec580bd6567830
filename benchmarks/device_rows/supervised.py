"""Row ``supervised``: ResNet-50 + linear head, SGD momentum 0.9, weight decay 1e-4,
cross-entropy, bf16 compute, batch 256 per device, both frameworks (ours: :func:`prepare`;
peer: :class:`SupervisedPeer`, the better of eager and ``torch.compile``).

Derived rows:

* ``ssl_sup_ratio``: the SSL/supervised step-cost ratio (BYOL step time / supervised step time
  for the same batch; goal within 10% of the FLOP ratio 8/3: two online forward+backward passes
  and two target forwards per image against one forward+backward; XLA's counted ratio is printed
  beside it). BYOL's times come from the ``byol`` row.
* ``nvidia_context``: NVIDIA's published PyTorch ResNet-50 AMP training rate, 2,470 img/s on one
  A100-80GB (DeepLearningExamples, 21.03), against our supervised rate on this device.
"""
from __future__ import annotations

import statistics
import time

from device_rows import jax_steps
from device_rows.common import (Row, best_peer, flop_str, median_ratio, mfu_note,
                                time_against_peer, xla_flops)
from device_rows.torch_peers import TorchPeer

NVIDIA_A100_IMG_S = 2470.0   # DeepLearningExamples RN50 v1.5, PyTorch AMP, 1x A100-80GB, 21.03
BYOL_FLOP_RATIO = 8.0 / 3.0  # (2 x fwd+bwd + 2 x fwd) / (1 x fwd+bwd), fwd+bwd = 3 fwd


def prepare(suite):
  """Our supervised ResNet step: uint8 images -> normalise -> backbone (the SSL presets'
  ResNet, bf16 compute) -> pooled -> Dense; SGD momentum 0.9 + weight decay 1e-4, softmax
  cross-entropy; jitted with the batch sharded over 'data' (BN statistics over the global
  batch). Runs in a worker thread."""
  jax = suite.jax
  import jax.numpy as jnp
  import optax
  t = time.perf_counter()
  c = jax_steps.method_config(suite, 'byol')
  net = _supervised_net(c)
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
  views = jax_steps.first_batch(c)
  batch_np = {'image': views['view1'], 'label': views['label']}
  repl, dsh = suite.sharding.replicated(suite.mesh), suite.sharding.data_sharding(suite.mesh)

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

  batch = suite.sharding.global_batch(suite.mesh, batch_np)
  with jax.set_mesh(suite.mesh):
    state = jax.jit(init, out_shardings=repl)(jax.random.key(0))
    lowered = jax.jit(step, in_shardings=(repl, dsh), out_shardings=(repl, repl),
                      donate_argnums=(0,)).lower(state, batch)
    compiled = lowered.compile()
  return jax_steps.OursTrain(suite, 'supervised', compiled, state, batch, batch_np, c, None,
                             xla_flops(lowered, compiled), time.perf_counter() - t)


def _supervised_net(c):
  """The preset's backbone (bf16) + a Dense classifier on the pooled features."""
  import flax.linen as nn
  import jax.numpy as jnp
  import ml_collections
  from ssl_jax.models import normalize, ssl_model
  model_cfg = ml_collections.ConfigDict({'backbone': c.model.backbone, 'stem': c.model.stem,
                                         'width': c.model.width, 'dtype': 'bfloat16'})

  class SupervisedNet(nn.Module):
    backbone: nn.Module
    num_classes: int

    @nn.compact
    def __call__(self, images, train: bool = True):
      f = self.backbone(normalize.normalize(images), train=train)['pooled']
      return nn.Dense(self.num_classes, name='head')(f.astype(jnp.float32))

  return SupervisedNet(ssl_model.build_backbone(model_cfg), int(c.data.num_classes))


def row(suite):
  ours, peer, times = time_against_peer(suite, 'supervised')
  img = ours.images
  best, best_t, notes = best_peer(times)
  vs = median_ratio(times[best], times['ours'])
  sup_rate = img / statistics.median(times['ours'])
  rows = [Row('supervised', 'supervised R50 step' if not suite.args.smoke else
              'supervised step', 'img/s', sup_rate, img / best_t, f'torch {best}', vs,
              '(context)', '',
              notes=f'{notes}; {suite.compile_notes.get("supervised", "")}; ours '
                    f'{flop_str(ours.flops)}/step (XLA)'
                    f'{mfu_note(suite, ours.flops, times["ours"])}; compile {ours.build_s:.0f} s')]
  if hasattr(suite, 'byol_times'):
    rows.append(_ratio_row(suite, ours, times))
  rows.append(Row('nvidia_context', 'NVIDIA PyTorch R50 AMP, 1x A100-80GB (21.03)', 'img/s',
                  sup_rate, NVIDIA_A100_IMG_S, 'published, not measured here',
                  sup_rate / NVIDIA_A100_IMG_S, '(context)', '',
                  notes='DeepLearningExamples RN50 v1.5 training rate; a different GPU: '
                        'context only'))
  return rows


def _ratio_row(suite, ours, times) -> Row:
  """BYOL step time / supervised step time, ours and the peer's (eager / eager)."""
  b = suite.byol_times
  r_ours = median_ratio(b['ours'], times['ours'])
  r_peer = median_ratio(b['eager'], times['eager'])
  xla_ratio = suite.job('byol').flops / ours.flops
  dev = abs(r_ours / BYOL_FLOP_RATIO - 1.0)
  return Row('ssl_sup_ratio', 'SSL/supervised step-cost ratio', 'x (BYOL/sup time)',
             r_ours, r_peer, 'torch eager / eager', None,
             f'within 10% of {BYOL_FLOP_RATIO:.2f} (FLOP ratio)',
             'met' if dev <= 0.10 else 'not met', fmt='{:.2f}',
             notes=f'ours deviates {100 * dev:.0f}% from 8/3; XLA-counted FLOP ratio '
                   f'{xla_ratio:.2f}; the same images per step (BYOL: 2 views of each);'
                   ' BYOL times from the byol row')


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
