r"""Offline linear probe on frozen pretrained features (``--mode=linear``).

    python -m ssl_jax.main --mode=linear --config=configs/eval_linear.py:cifar10 \
        --config.pretrained=/tmp/byol_c10 --workdir=/tmp/byol_c10_linear

Prints ``Offline linear probe (...) on cifar10/test: top-1 XX.XX% | top-5 XX.XX%`` and writes
``EVAL_DIR/results.json``, TensorBoard scalars ``offline_linear/*`` and the probe's Orbax
checkpoints (a rerun resumes). WORKDIR is the ``--workdir`` of a training run.

Arguments (``get_config('<dataset>[,cache][,msf|ft][,runlocal]')``):

* dataset (``cifar10``, ``cifar100``, ``imagenet100``, ``imagenet``): the labelled data of the
  probe; omitted = the pretraining dataset (e.g. ``cifar100`` on a CIFAR-10 run = transfer).
* default protocol: SGD momentum 0.9, base_lr 0.1 (lr = base_lr * B / 256), wd 0, cosine, 100
  epochs, batch 256, RandomResizedCrop(0.08-1) + flip on the train images, centre-crop eval.
* ``cache``: extract train features once (no augmentation) and train on the cached arrays on
  device (``cache_features=True``): a CIFAR-10 ResNet-18 probe then takes about a minute on one
  GPU (feature extraction) instead of ~10 minutes of streaming augmented images.
* ``msf``: MSF's protocol — features L2-normalised then standardised, base_lr 0.01, 40 epochs,
  steps x0.1 at 15 / 30.
* ``ft``: FT's official protocol — base_lr 30, no weight decay, 100 epochs, steps x0.1 at 60 / 80.
* ``runlocal``: 512 train / 256 test images, 2 epochs, batch 64 — a smoke test, not a result.

Expected (ResNet-18 CIFAR stem, CIFAR-10): BYOL after 1000 epochs ~92.6% top-1 (solo-learn's
online-linear anchor, 1000 epochs). FT's ImageNet-1K protocol (``ft``): MoCo v2 67.5% ->
MoCo v2 + FT 69.6% (200 epochs); MSF's (``msf``): MSF w/s 72.4% (ResNet-50, 200 epochs).
"""
from __future__ import annotations

import ml_collections

from ssl_jax.evals import eval_config


def get_config(arg: str | None = None):
  c, rest = eval_config.base_eval_config(arg)
  c.epochs = 100
  c.batch_size = 256
  c.features = 'backbone'          # 'backbone' (avg-pool / CLS) or 'projector'
  c.feature_norm = 'none'          # 'none', 'l2', 'l2_standardize' (MSF)
  c.augment = 'rrc_flip'           # 'rrc_flip' or 'none' (ignored with cache_features)
  c.crop_scale = (0.08, 1.0)
  c.cache_features = False
  c.optimizer = ml_collections.ConfigDict({
      'base_lr': 0.1, 'momentum': 0.9, 'nesterov': False, 'weight_decay': 0.0,
      'schedule': 'cosine',        # 'cosine', 'step', 'constant'
      'step_epochs': (60, 80), 'step_factor': 0.1})
  c.eval_every_epochs = 10         # <= 0: only at the end
  c.checkpoint_every_epochs = 1
  c.log_every_steps = 50
  accepted = ['cache', 'msf', 'ft']
  for token in rest:
    if token == 'cache':
      c.cache_features = True
      c.augment = 'none'
    elif token == 'msf':
      c.feature_norm = 'l2_standardize'
      c.epochs = 40
      c.optimizer.update({'base_lr': 0.01, 'schedule': 'step', 'step_epochs': (15, 30)})
    elif token == 'ft':
      c.epochs = 100
      c.optimizer.update({'base_lr': 30.0, 'weight_decay': 0.0, 'schedule': 'step',
                          'step_epochs': (60, 80)})
    elif token == 'runlocal':
      c.epochs = 2
      c.batch_size = 64
      c.eval_every_epochs = -1
      c.log_every_steps = 4
    else:
      eval_config.reject_tokens([token], accepted)
  return c
