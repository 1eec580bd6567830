r"""MSF — Mean Shift (Koohpayegani, Tejankar & Pirsiavash, ICCV 2021).

    TFDS_DATA_DIR=../shared/data/tfds python -m ssl_jax.main \
        --config=configs/msf.py:cifar10,runlocal --workdir=/tmp/msf_local

Recipe read in the official code (UMBCvision/MSF ``train_msf.py``): online = backbone +
projection MLP + predictor, each Linear-BN-ReLU-Linear, sized from the backbone's feature width
``d`` (hidden ``2d``, output ``d/4``: 2048-4096-512 + 512-4096-512 for ResNet-50, 512-1024-128 +
128-1024-128 for ResNet-18); target = EMA of backbone + projection with m = 0.99 (constant);
weak view (RandomResizedCrop 0.2-1 + flip) for the target, strong view (MoCo v2's) for the online
network ("MSF w/s"); k = 5; the batch is enqueued before the search (self is the first
neighbour). Fields: ``method.k``, ``method.bank_size``, ``method.online_view`` /
``method.target_view`` (weak|strong), ``ema.base``. We mask bank rows never written (the
official bank starts as random vectors).

Presets (one reference each, tables below):

* ``imagenet`` (the paper): ResNet-50, 200 epochs, batch 256, SGD lr 0.05 (x B/256), momentum
  0.9, wd 1e-4, cosine, no warm-up, bank 1,024,000, k 5. Expected: 72.4% linear, 62.0% 1-NN,
  64.9% 20-NN (BYOL-asym: 69.3 / 55.0 / 59.2). ~140 h on 4 RTX6000 in the paper.
* ``imagenet100``: the same recipe on ImageNet-100 (``train_msf.py --dataset imagenet100``) with a
  101,376-entry bank (~0.8 epoch, like the paper's ImageNet bank). No ImageNet-100 number in the
  repository.
* ``cifar10`` / ``cifar100``: the same recipe with ResNet-18 (CIFAR stem) and its heads
  (512-1024-128, 128-1024-128), 32 px, bank 40,960 (~0.8 epoch, like the paper's ImageNet bank).
  The paper has no CIFAR pretraining number: judge by the gain over BYOL-asym
  (``--config.method.k=1``) at equal budget.
* ``runlocal``: resnet_tiny, 20 steps, bank 1,024.

Every preset — reference: UMBCvision/MSF. T = train_msf.py, U = util.py, SH = run_msf.sh,
R = README.md::

    field                   | ours                         | reference                  | source
    model.backbone          | resnet50 (ImageNet, IN-100), | --arch resnet50            | SH, R
                            | resnet18 (CIFAR)             | (ImageNet only)            |
    model.projector         | d-2d-d/4, BN: 2048-4096-512; | get_mlp(feat_dim,          | T
                            | 512-1024-128 (ResNet-18)     | 2*feat_dim, feat_dim//4)   |
    model.predictor         | d/4-2d-d/4, BN               | get_mlp(proj, hidden, proj)| T
    method.k                | 5                            | --topk 5                   | SH
    method.bank_size        | 1,024,000 (ImageNet)         | --mem_bank_size 1024000    | SH
                            | 101,376 (IN-100)             | (default 128000)           | T
                            | 40,960 (CIFAR)               | -                          |
    online / target view    | strong / weak                | --augmentation default     | T
                            |                              | 'weak/strong'              |
    ema                     | constant 0.99                | --momentum 0.99            | SH
    batch_size              | 256                          | --batch_size 256 (default) | T
    optimizer               | sgd, momentum 0.9            | SGD, sgd_momentum 0.9      | T
    optimizer.base_lr       | 0.05                         | --learning_rate 0.05       | SH
    optimizer.weight_decay  | 1e-4, every parameter        | 1e-4 (default)             | T
    optimizer.warmup_epochs | 0                            | none                       | T, U
    lr schedule             | cosine per step to 0         | --cos, per epoch, to 0     | SH, U
    total_epochs            | 200                          | --epochs 200               | SH
    weak view               | crop 0.2-1, flip             | crop 0.2-1, flip           | T
    strong view             | crop 0.2-1, jitter 0.4/0.4/  | the same (MoCo v2)         | T
                            | 0.4/0.1 p 0.8, gray 0.2,     |                            |
                            | blur p 0.5 sigma 0.1-2, flip |                            |
    image size              | 224 (ImageNet), 32 (CIFAR)   | 224                        | T

Deviations, with reasons:

* Views: the released ``run_msf.sh`` passes ``--augmentation 'weak/weak'``; we keep
  ``train_msf.py``'s default, weak (target) / strong (online) — "MSF w/s", the setting the README's
  own training command asks for (``--weak_strong``) and the one the method is described with
  (the abstract reports the weak-only setting as a separate result). Weak/weak:
  ``--config.method.online_view=weak``.
* Bank on ImageNet-100 / CIFAR: 1,024,000 exceeds those training sets, and ``train_msf.py``'s
  default 128,000 exceeds ImageNet-100 (~126,700 images), so the bank would hold a stale copy of
  each image's own embedding. We keep the paper's ImageNet ratio instead (1,024,000 / 1,281,167
  = 0.8 epoch), in multiples of 1,024 so the bank shards evenly: 99 x 1,024 (IN-100) and
  40 x 1,024 (CIFAR).
* CIFAR (no reference recipe): ResNet-18 CIFAR stem and 32 px crops; every other value is the
  ImageNet recipe's, the heads sized by the code's own rule — except the strong view's blur,
  which is off at 32 px: measured on real CIFAR-10 (``tests/test_msf.py``'s 60-step run,
  resnet_tiny, k=20), kNN went 23.4 -> 22.0% with the blur and 23.4 -> 28.2% without it.
* BatchNorm over the global batch (the official code runs ``nn.DataParallel``: per-GPU BN over 4
  GPUs); lr cosine per step instead of per epoch; float32 compute; bank rows never written are
  masked out of the search (the official bank starts as random unit vectors).
* ImageNet-100: the CMC class list (``train_msf.py --dataset imagenet100`` draws 100 random
  classes with seed 1234) — the same list as the other methods' ImageNet-100 presets.
"""
from ssl_jax import config_lib


def _heads(backbone: str) -> tuple[int, int]:
  """``train_msf.py``'s rule: hidden = 2 x feature width, output = feature width / 4."""
  feat = 2048 if backbone == 'resnet50' else 512  # resnet18/34 (and resnet_tiny: runlocal sets it)
  return 2 * feat, feat // 4


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  c = config_lib.base_config(args, method='msf')
  c.method.update({'k': 5, 'bank_size': 1_024_000, 'online_view': 'strong',
                   'target_view': 'weak'})
  c.data.views = 'weak_strong'
  hidden, out = _heads(c.model.backbone)
  c.model.projector.update({'hidden_dim': hidden, 'out_dim': out, 'use_bn': True})
  c.model.predictor.update({'hidden_dim': hidden, 'out_dim': out, 'use_bn': True})
  c.ema.update({'schedule': 'constant', 'base': 0.99})
  c.batch_size = 256
  c.total_epochs = 200
  c.optimizer.update({'name': 'sgd', 'base_lr': 0.05, 'momentum': 0.9, 'weight_decay': 1e-4,
                      'warmup_epochs': 0.0, 'end_lr_factor': 0.0})
  if args.dataset.startswith('cifar'):
    c.method.bank_size = 40_960
    c.data.blur = False                       # measured: blur at 32 px costs kNN (docstring)
  elif args.dataset == 'imagenet100':
    c.method.bank_size = 101_376
    c.evals.knn.update({'every_epochs': 20.0, 'train_examples': 100_000})
  else:
    c.evals.knn.update({'every_epochs': 20.0, 'train_examples': 100_000})
  c = config_lib.finish_config(c, args)
  if args.runlocal:
    c.method.bank_size = 1024
  return c
