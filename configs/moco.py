r"""MoCo v2 (Chen et al. 2020): InfoNCE against a global queue of EMA keys.

    TFDS_DATA_DIR=../shared/data/tfds python -m ssl_jax.main \
        --config=configs/moco.py:cifar10,runlocal --workdir=/tmp/moco_local

Presets. Each follows one named reference recipe field by field (tables below); learning rates are
per 256 images (``lr = base_lr x batch_size / 256``).

* ``cifar10`` / ``cifar100``: solo-learn's MoCo v2+ CIFAR recipe — ResNet-18 (CIFAR stem), batch
  256, SGD lr 0.3, wd 1e-4, 10 warm-up epochs, 1000 epochs, queue 32,768 per view, tau 0.2,
  symmetric loss, key-encoder momentum 0.99 -> 0.999, projector 512-2048-256.
  Expected (solo-learn README, 1000 ep): 92.94% (CIFAR-10) / 69.89% (CIFAR-100) linear;
  lightly's 200-epoch kNN (k=200) anchor on CIFAR-10: 84.7%.
* ``imagenet100``: MoCo v2 on ImageNet-100 as run by FT's official code (its README command
  without the FT flags) — ResNet-50, batch 256, SGD lr 0.03, cosine to lr/1000, m 0.99,
  200 epochs. This is the equal-budget baseline of ``configs/ft.py:imagenet100`` (and the base of
  CLIM and CsMl there). No MoCo v2 ImageNet-100 number in that repository's README.
* ``imagenet`` (the MoCo v2 paper): ResNet-50, batch 256, SGD lr 0.03, momentum 0.9, wd 1e-4,
  cosine to 0, 200 epochs, queue 65,536, tau 0.2, m 0.999, projector 2048-2048-128 without BN.
  Expected: 67.5% linear (ImageNet-1K). The MoCo v2 paper reports ~53 h on 8 V100s.
* ``runlocal``: resnet_tiny, 20 steps, queue 1,024.
* ``quick`` (the README quick start; a demonstration, not a recipe): ResNet-18 at 1/8 width,
  batch 128 (lr 0.3 x 128/256), 2 epochs, and three deliberate changes to the CIFAR recipe so
  that a 2-core CPU sees learning within minutes: queue 4,096 (the official CIFAR demo's; the
  recipe's 32,768 random keys take 256 steps to flush), temperature 0.1 (the demo's) and the
  one-directional loss (half the cost per step, so twice the steps in the same time)::

      TFDS_DATA_DIR=../shared/data/tfds python -m ssl_jax.main \
          --config=configs/moco.py:cifar10,quick --workdir=/tmp/moco_quick

  Measured (fresh checkout, 2-core CPU shared with other jobs, 6 min 54 s): kNN top-1 (k=200,
  10,000-image bank, 2,000 test images: seeded class-balanced draws) 26.25% untrained -> 34.05%
  after 780 steps; online probe 9.55% -> 22.30%. With the 9-tap blur at 32 px (PIL's strength;
  ``quick`` blurs with p 0.5 on both views). The former 3-tap kernel (0.70x PIL's strength) gave
  36.85% / 28.95%: weaker blur helps at this tiny budget, but the recipe's blur is PIL's.

``cifar10`` / ``cifar100`` — reference: vturrisi/solo-learn. S = scripts/pretrain/cifar/
mocov2plus.yaml, A = scripts/pretrain/cifar/augmentations/symmetric_weak.yaml,
M = solo/methods/mocov2plus.py, P = solo/args/pretrain.py, B = solo/methods/base.py,
D = solo/data/pretrain_dataloader.py (``GaussianBlur``)::

    field                        | ours                      | reference                 | source
    model.backbone               | resnet18, CIFAR stem      | resnet18, 3x3 conv, no    | S, B
                                 |                           | max-pool                  |
    model.projector              | 512-2048-256, ReLU, no BN | Linear-ReLU-Linear,       | S, M
                                 |                           | 2048 / 256                |
    method.queue_size            | 32,768 (one per view)     | 32768, queue[2, dim, K]   | S, M
    method.temperature           | 0.2                       | 0.2                       | S
    method.symmetric             | True: mean of both terms  | (L(q1,k2) + L(q2,k1)) / 2 | M
    ema                          | cosine 0.99 -> 0.999      | base_tau 0.99,            | S
                                 |                           | final_tau 0.999           |
    batch_size                   | 256                       | 256 x 1 device            | S
    optimizer                    | sgd, momentum 0.9         | sgd, momentum 0.9         | S, P
    optimizer.base_lr            | 0.3 (x B/256)             | 0.3 (x B/256)             | S, P
    optimizer.weight_decay       | 1e-4, every parameter     | 1e-4, every parameter     | S, B
    optimizer.warmup_epochs      | 10 (from 0)               | 10 (from 3e-5)            | B
    lr schedule                  | cosine per step to 0      | warmup_cosine, per step,  | S, B
                                 |                           | min_lr 0                  |
    total_epochs                 | 1000                      | max_epochs 1000           | S
    data.crop_scale              | (0.08, 1), 32 px          | 0.08-1, 32 px             | A
    colour jitter                | 0.4/0.4/0.4/0.1, p 0.8    | 0.4/0.4/0.4/0.1, p 0.8    | A
    grayscale / flip             | p 0.2 / p 0.5             | p 0.2 / p 0.5             | A
    blur (data.blur True)        | p 0.5, sigma 0.1-2; 9-tap | p 0.5, sigma 0.1-2; PIL   | A, D
                                 | Gaussian at 32 px: 0.98-  | GaussianBlur(radius =     |
                                 | 1.04x PIL's strength      | sigma)                    |
    solarize                     | 0                         | 0                         | A
    probe.lr (online linear)     | 0.3                       | classifier_lr 0.3         | S
    BatchNorm                    | global batch              | sync_batchnorm True       | S

``imagenet100`` — reference: DTennant/CL-Visualizing-Feature-Transformation. R = README.md
("Training on IN-100" without ``--mixnorm`` and the other FT flags), O = options/base_options.py
(method ``MoCov2``), T = options/train_options.py, D = dataset/util.py (aug ``B``),
N = networks/util.py, BT = learning/base_trainer.py, CT = learning/contrast_trainer.py::

    field                        | ours                      | reference                 | source
    model.backbone               | resnet50                  | resnet50 (--arch default) | O
    model.projector              | 2048-2048-128, no BN      | head mlp 2048-2048-128    | O, N
    method.queue_size            | 65,536                    | nce_k 65536               | O
    method.temperature           | 0.2                       | MoCov2: nce_t 0.2         | O
    method.symmetric             | False                     | asymmetric: q(x1), k(x2)  | CT
    ema                          | constant 0.99             | --alpha 0.99              | R
    batch_size                   | 256                       | 256                       | R
    optimizer                    | sgd, momentum 0.9, wd 1e-4| momentum 0.9, wd 1e-4     | O
    optimizer.base_lr            | 0.03                      | 0.03                      | R
    optimizer.warmup_epochs      | 0                         | warm-up only if batch>256 | T
    lr schedule                  | cosine to 1e-3 x lr, per  | cosine to lr x 0.1^3,     | R, BT
                                 | step                      | per epoch                 |
    total_epochs                 | 200                       | 200                       | R
    crop                         | 224 px, scale 0.2-1       | 224 px, scale 0.2-1       | R, D
    augmentations                | MoCo v2 (jitter 0.4/0.4/  | aug B: the same           | O, D
                                 | 0.4/0.1 p 0.8, gray 0.2,  |                           |
                                 | blur p 0.5, flip)         |                           |

``imagenet`` — reference: facebookresearch/moco. F = main_moco.py with the README's MoCo v2 flags
``--mlp --moco-t 0.2 --aug-plus --cos``, MB = moco/builder.py, R = README.md::

    field                        | ours                      | reference                 | source
    model.backbone               | resnet50                  | resnet50                  | F, R
    model.projector              | 2048-2048-128, no BN      | mlp: Linear(2048,2048)-   | MB, F
                                 |                           | ReLU-fc(128)              |
    method.queue_size            | 65,536                    | moco-k 65536              | F
    method.temperature           | 0.2                       | moco-t 0.2                | R
    method.symmetric             | False                     | asymmetric                | MB
    ema                          | constant 0.999            | moco-m 0.999              | F
    batch_size                   | 256                       | 256                       | F, R
    optimizer                    | sgd, momentum 0.9, wd 1e-4| momentum 0.9, wd 1e-4     | F
    optimizer.base_lr            | 0.03                      | 0.03                      | F, R
    optimizer.warmup_epochs      | 0                         | none                      | F
    lr schedule                  | cosine per step to 0      | --cos, per epoch, to 0    | F
    total_epochs                 | 200                       | 200                       | F
    crop                         | 224 px, scale 0.2-1       | 224 px, scale 0.2-1       | F
    augmentations                | jitter 0.4/0.4/0.4/0.1    | aug-plus: the same        | F
                                 | p 0.8, gray 0.2, blur     |                           |
                                 | p 0.5 sigma 0.1-2, flip   |                           |

Deviations, with reasons:

* BatchNorm over the global batch (SimCLR's sync BN) instead of MoCo's shuffling BN over 8
  per-GPU batches (facebookresearch/moco, the FT code): one mesh-wide batch is this codebase's
  rule, so a result does not change with the device count. solo-learn uses sync BN: no deviation.
* The lr follows its cosine per step (the facebookresearch and FT code step it once per epoch);
  warm-up starts at 0 (solo-learn: 3e-5). Both differences vanish after the first steps.
* float32 compute by default (solo-learn: fp16 mixed precision).
* CIFAR stem conv pads by 1 (32 x 32 maps; solo-learn pads by 2).

Notes: the queue is global (enqueued with the global batch), as in all three references (they
gather keys from every GPU). ImageNet-100 uses the CMC class list, the same 100 classes as the
FT code's ``dataset/imagenet100.class``.
"""
from ssl_jax import config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  c = config_lib.base_config(args, method='moco')
  c.data.views = 'moco'
  c.model.predictor = None
  c.batch_size = 256
  if args.dataset.startswith('cifar'):        # solo-learn scripts/pretrain/cifar/mocov2plus.yaml
    c.method.update({'queue_size': 32_768, 'temperature': 0.2, 'symmetric': True})
    c.model.projector.update({'hidden_dim': 2048, 'out_dim': 256, 'use_bn': False})
    c.total_epochs = 1000
    c.optimizer.update({'name': 'sgd', 'base_lr': 0.3, 'momentum': 0.9, 'weight_decay': 1e-4,
                        'warmup_epochs': 10.0, 'end_lr_factor': 0.0})
    c.ema.update({'schedule': 'cosine', 'base': 0.99, 'final': 0.999})
    c.data.crop_scale = (0.08, 1.0)
    c.data.blur = True
    c.probe.lr = 0.3
  else:
    c.method.update({'queue_size': 65_536, 'temperature': 0.2, 'symmetric': False})
    c.model.projector.update({'hidden_dim': 2048, 'out_dim': 128, 'use_bn': False})
    c.total_epochs = 200
    c.optimizer.update({'name': 'sgd', 'base_lr': 0.03, 'momentum': 0.9, 'weight_decay': 1e-4,
                        'warmup_epochs': 0.0})
    if args.dataset == 'imagenet100':         # FT's code, README "Training on IN-100", MoCov2
      c.optimizer.end_lr_factor = 1e-3
      c.ema.update({'schedule': 'constant', 'base': 0.99})
    else:                                     # facebookresearch/moco main_moco.py, MoCo v2 flags
      c.optimizer.end_lr_factor = 0.0
      c.ema.update({'schedule': 'constant', 'base': 0.999})
    c.evals.knn.update({'every_epochs': 20.0, 'train_examples': 100_000})
  c = config_lib.finish_config(c, args)
  if args.quick:    # README quick start: learns visibly within 2 epochs on a CPU (see above)
    c.method.update({'queue_size': 4096, 'temperature': 0.1, 'symmetric': False})
  if args.runlocal:
    c.method.queue_size = 1024
  return c
