r"""Semi-supervised fine-tuning of the pretrained backbone + a linear head (``--mode=finetune``).

    python -m ssl_jax.main --mode=finetune --config=configs/eval_finetune.py:cifar10,1% \
        --config.pretrained=/tmp/byol_c10 --workdir=/tmp/byol_c10_ft1

Prints ``Fine-tuned on 500 examples (1% per class, ...): cifar10/test top-1 XX.XX% | top-5
XX.XX%`` and writes ``EVAL_DIR/results.json``, ``subset_indices.npy``, TensorBoard scalars
``finetune/*`` and Orbax checkpoints (a rerun resumes).

Arguments (``get_config('<dataset>[,1%|10%|<p>%][,runlocal]')``):

* the label fraction: ``1%`` (60 epochs) or ``10%`` (30 epochs; SimCLR's schedules), or any
  ``<p>%``; the subset is seeded and class-balanced (``subset_seed``), or the image ids of
  ``--config.subset_file=.../1percent.txt`` (SimCLR's ImageNet subsets).
* SGD with Nesterov momentum 0.9, base_lr 0.05 (lr = base_lr * B / 256), no weight decay,
  cosine, batch 256, RandomResizedCrop(0.08-1) + flip; BatchNorm trains on the global batch.
* ``runlocal``: 3 epochs on a 10% subset of 512 train images, 256 test images — a smoke test.

Expected: no CIFAR reference number in our papers — record yours in the README table. On
ImageNet (ResNet-50, 200-epoch pretraining) the papers report 1% / 10%: MSF (linear on frozen
features) 55.5 / 66.5, CsMl (fine-tuned) 66.7 / 75.1, CLIM (fine-tuned, 1%) 59.3.
"""
from __future__ import annotations

import ml_collections

from ssl_jax.evals import pretrained


def get_config(arg: str | None = None):
  c, rest = pretrained.base_eval_config(arg)
  c.label_fraction = '10%'
  c.subset_file = ''               # file of image ids (overrides label_fraction)
  c.subset_seed = 0
  c.epochs = 30
  c.batch_size = 256
  c.augment = 'rrc_flip'
  c.crop_scale = (0.08, 1.0)
  c.label_smoothing = 0.0
  c.head_init_std = 0.01
  c.optimizer = ml_collections.ConfigDict({
      'name': 'sgd', 'base_lr': 0.05, 'momentum': 0.9, 'nesterov': True, 'weight_decay': 0.0,
      'b1': 0.9, 'b2': 0.999, 'head_lr_mult': 1.0, 'warmup_epochs': 0.0})
  c.eval_every_epochs = 10         # <= 0: only at the end
  c.checkpoint_every_epochs = 5
  c.log_every_steps = 20
  for token in rest:
    if token.endswith('%'):
      c.label_fraction = token
      if token == '1%':
        c.epochs = 60
      elif token == '10%':
        c.epochs = 30
    elif token == 'runlocal':
      c.epochs = 3
      c.batch_size = 16
      c.eval_every_epochs = -1
      c.log_every_steps = 1
    else:
      pretrained.reject_tokens([token], ['1%', '10%', '<p>%'])
  return c
