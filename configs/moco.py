r"""MoCo v2 (Chen et al. 2020): InfoNCE against a global queue of 65,536 EMA keys, tau 0.2.

    TFDS_DATA_DIR=../shared/data/tfds python -m ssl_jax.main \
        --config=configs/moco.py:cifar10,runlocal --workdir=/tmp/moco_local

Presets:

* ``imagenet`` (paper recipe): ResNet-50, batch 256, SGD lr 0.03 x B/256, momentum 0.9,
  wd 1e-4, cosine to lr*1e-3, 200 epochs, queue 65,536, tau 0.2, m 0.999; projector
  2048-2048-128 without BN. Expected: 67.5% linear (ImageNet-1K). The MoCo v2 paper reports ~53 h on 8 V100s.
* ``imagenet100``: as above with m 0.99 (the FT paper's ImageNet-100 setting).
* ``cifar10`` / ``cifar100``: ResNet-18 (CIFAR stem), batch 256, SGD lr 0.06 x B/256, wd 5e-4,
  m 0.99 (the official MoCo CIFAR-10 demo's optimizer) with MoCo v2's queue 65,536 and tau 0.2,
  projector 512-512-128, 800 epochs. lightly's 200-epoch kNN (k=200) anchor: 84.7% on CIFAR-10.
* ``runlocal``: resnet_tiny, 20 steps, queue 1,024.
"""
from ssl_jax import config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  c = config_lib.base_config(args, method='moco')
  c.method.update({'queue_size': 65_536, 'temperature': 0.2, 'symmetric': False})
  c.data.views = 'moco'
  c.model.predictor = None
  c.ema.schedule = 'constant'
  c.batch_size = 256
  if args.dataset.startswith('cifar'):
    c.model.projector.update({'hidden_dim': 512, 'out_dim': 128, 'use_bn': False})
    c.total_epochs = 800
    c.optimizer.update({'name': 'sgd', 'base_lr': 0.06, 'weight_decay': 5e-4,
                        'warmup_epochs': 0.0, 'end_lr_factor': 1e-3})
    c.ema.base = 0.99
  else:
    c.model.projector.update({'hidden_dim': 2048, 'out_dim': 128, 'use_bn': False})
    c.total_epochs = 200
    c.optimizer.update({'name': 'sgd', 'base_lr': 0.03, 'weight_decay': 1e-4,
                        'warmup_epochs': 0.0, 'end_lr_factor': 1e-3})
    c.ema.base = 0.99 if args.dataset == 'imagenet100' else 0.999
    c.knn.update({'every_epochs': 20.0, 'train_examples': 100_000})
  c = config_lib.finish_config(c, args)
  if args.runlocal:
    c.method.queue_size = 1024
  return c
