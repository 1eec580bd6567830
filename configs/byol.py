r"""BYOL (Grill et al. 2020) — the baseline the other methods build on.

    TFDS_DATA_DIR=../shared/data/tfds python -m ssl_jax.main \
        --config=configs/byol.py:cifar10,runlocal --workdir=/tmp/byol_local

(The README quick start is MoCo v2's ``quick``: BYOL's early epochs move kNN least — measured on
this CPU, ``byol.py:cifar10,quick`` at 1/4 width was at 28.25% vs 28.75% untrained after 65
steps, the MoCo quick start at +9.4 points after one epoch.)

Presets (``get_config('<dataset>[,<backbone>][,runlocal][,bs=N][,epochs=N][,steps=N]')``). Each
follows one named reference recipe field by field (tables below). Learning rates are per 256
images (``lr = base_lr x batch_size / 256``), as in both references.

* ``cifar10`` / ``cifar100``: solo-learn's CIFAR recipe — ResNet-18 (CIFAR stem), batch 256,
  LARS lr 1.0, eta 0.02 with lr clipping, wd 1e-5, tau 0.99 -> 1, 1000 epochs, 32 px, no blur.
  Expected (solo-learn README, 1000 ep): 92.58% (CIFAR-10) / 70.46% (CIFAR-100) linear;
  lightly's 200-epoch kNN (k=200) anchor on CIFAR-10 is 86.8%. Runtime: roughly 8 GPU-hours on
  one A100-class GPU (an estimate from solo-learn's reports, not measured with this code yet).
* ``imagenet100``: solo-learn's ImageNet-100 recipe — ResNet-18, batch 256, LARS lr 0.5,
  eta 0.02 with clipping, wd 1e-6, projector 512-4096-256, predictor 256-8192-256 (its input
  is the projector's 256-d output: ``pred_hidden_dim: 8192`` in the ImageNet-100 byol.yaml,
  ``nn.Linear(output_dim, pred_hidden_dim)`` in solo/methods/byol.py), 400 epochs. Expected
  (solo-learn README): 80.16% online / 80.32% offline linear.
* ``imagenet``: DeepMind's 300-epoch preset — ResNet-50, batch 4096, LARS lr 0.3, eta 1e-3
  without clipping, wd 1e-6, tau 0.99 -> 1, 300 epochs (paper: ~72.5% linear at 300 ep; the
  reference's 1000-epoch preset — ``epochs=1000`` plus ``--config.optimizer.base_lr=0.2
  --config.optimizer.weight_decay=1.5e-6 --config.ema.base=0.996`` — reaches 74.3%).
* ``runlocal``: resnet_tiny, 20 steps — a smoke test, not a result.
* ``quick``: ResNet-18 at 1/8 width, batch 128, 2 epochs of CIFAR-10 (the shared quick size).

    python -m ssl_jax.main --config=configs/byol.py:cifar10 --workdir=gs://bucket/byol_c10

``cifar10`` / ``cifar100`` — reference: vturrisi/solo-learn. S = scripts/pretrain/cifar/byol.yaml,
A = scripts/pretrain/cifar/augmentations/asymmetric.yaml, L = solo/utils/lars.py,
P = solo/args/pretrain.py, B = solo/methods/base.py, M = solo/methods/byol.py::

    field                        | ours                      | reference                 | source
    model.backbone               | resnet18, CIFAR stem      | resnet18, 3x3 conv, no    | S, B
                                 |                           | max-pool                  |
    model.projector              | 512-4096-256, BN          | 4096 / 256, BN            | S, M
    model.predictor              | 256-4096-256, BN          | 4096 / 256, BN            | S, M
    method.symmetric             | True (sum of both terms)  | sum over both view pairs  | M
    batch_size                   | 256                       | 256 x 1 device            | S
    optimizer.name               | lars, momentum 0.9        | lars, momentum 0.9        | S, P
    optimizer.base_lr            | 1.0 (x B/256)             | 1.0 (x B/256)             | S, P
    optimizer.weight_decay       | 1e-5                      | 1e-5                      | S
    optimizer.trust_coefficient  | 0.02                      | eta 0.02                  | S
    optimizer.trust_clip         | True                      | clip_lr True              | S, L
    LARS skips biases and norms  | yes (no decay, no ratio)  | exclude_bias_n_norm True  | S, L
    optimizer.warmup_epochs      | 10 (from 0)               | 10 (from 3e-5)            | B
    lr schedule                  | cosine per step to 0      | warmup_cosine, per step,  | S, B
                                 |                           | min_lr 0                  |
    ema                          | cosine 0.99 -> 1.0        | base_tau 0.99, final 1.0  | S
    total_epochs                 | 1000                      | max_epochs 1000           | S
    crop                         | 32 px, scale 0.08-1       | 32 px, scale 0.08-1       | A
    colour jitter                | 0.4/0.4/0.2/0.1, p 0.8    | 0.4/0.4/0.2/0.1, p 0.8    | A
    grayscale / flip             | p 0.2 / p 0.5             | p 0.2 / p 0.5             | A
    blur (view1 / view2)         | 0 / 0 (data.blur False)   | 0 / 0                     | A
    solarize (view1 / view2)     | 0 / 0.2                   | 0 / 0.2                   | A
    probe.lr (online linear)     | 0.1                       | classifier_lr 0.1         | S
    BatchNorm                    | global batch              | sync_batchnorm True       | S

``imagenet100`` — reference: vturrisi/solo-learn. S = scripts/pretrain/imagenet-100/byol.yaml,
A = scripts/pretrain/imagenet-100/augmentations/asymmetric.yaml; L, P, B, M as above::

    field                        | ours                      | reference                 | source
    model.backbone               | resnet18, ImageNet stem   | resnet18                  | S
    model.projector              | 512-4096-256, BN          | 4096 / 256, BN            | S, M
    model.predictor              | 256-8192-256, BN          | pred_hidden_dim 8192      | S, M
    batch_size                   | 256                       | 128 x 2 devices           | S
    optimizer.base_lr            | 0.5 (x B/256)             | 0.5 (x B/256)             | S, P
    optimizer.weight_decay       | 1e-6                      | 1e-6                      | S
    optimizer.trust_coefficient  | 0.02, trust_clip True     | eta 0.02, clip_lr True    | S, L
    optimizer.warmup_epochs      | 10 (from 0)               | 10 (from 3e-5)            | B
    ema                          | cosine 0.99 -> 1.0        | base_tau 0.99, final 1.0  | S
    total_epochs                 | 400                       | max_epochs 400            | S
    crop                         | 224 px, scale 0.08-1      | 224 px, scale 0.08-1      | A
    colour jitter / gray / flip  | 0.4/0.4/0.2/0.1 p 0.8;    | the same                  | A
                                 | 0.2; 0.5                  |                           |
    blur (view1 / view2)         | 1.0 / 0.1                 | 1.0 / 0.1                 | A
    solarize (view1 / view2)     | 0 / 0.2                   | 0 / 0.2                   | A
    probe.lr                     | 0.1                       | classifier_lr 0.1         | S
    BatchNorm                    | global batch              | sync_batchnorm True       | S

``imagenet`` — reference: google-deepmind/deepmind-research. C = byol/configs/byol.py (the
300-epoch presets), G = byol/utils/augmentations.py, H = byol/utils/schedules.py,
E = byol/byol_experiment.py, RM = byol/README.md::

    field                        | ours                      | reference                 | source
    model.backbone               | resnet50                  | ResNet50                  | C
    model.projector / predictor  | 4096 / 256, BN            | 4096 / 256, BN            | C
    batch_size                   | 4096                      | 4096                      | RM
    optimizer                    | lars, momentum 0.9        | lars, momentum 0.9        | C, E
    optimizer.base_lr            | 0.3 (x B/256)             | _LR_PRESETS[300] 0.3      | C, H
    optimizer.weight_decay       | 1e-6                      | _WD_PRESETS[300] 1e-6     | C
    optimizer.trust_coefficient  | 0.001, no clip            | eta 1e-3                  | C
    LARS skips biases and norms  | yes                       | exclude_bias_and_norm     | E
    optimizer.warmup_epochs      | 10                        | 10 epochs                 | C
    ema                          | cosine 0.99 -> 1.0        | _EMA_PRESETS[300] 0.99    | C, H
    total_epochs                 | 300                       | 300                       | C
    augmentations                | BYOL views (blur 1.0/0.1, | the same                  | G
                                 | solarize 0/0.2)           |                           |

Deviations (every preset), with reasons:

* Warm-up starts at lr 0 (solo-learn: 3e-5): our schedule is optax's warm-up from 0; the
  difference is gone after the first steps.
* float32 compute by default (solo-learn: fp16 mixed precision; DeepMind: bf16 on TPU): exact
  by default on every backend; ``--config.model.dtype=bfloat16`` for speed.
* ``imagenet``: our LARS is solo-learn's transcription (``ssl_jax/optim.py``), whose trust ratio
  divides by ``||g|| + wd ||w||``; DeepMind's divides by ``||g + wd w||`` and keeps momentum on
  lr-scaled updates. The two agree to first order; one LARS serves every preset.
* CIFAR stem conv pads by 1 (32 x 32 maps; solo-learn pads by 2, 34 x 34): the standard CIFAR
  ResNet stem, shared by every method here.

Notes: BatchNorm statistics are over the global batch, as the references' sync / cross-replica
BN. ImageNet-100 is an image folder; the references use the CMC class list
(solo-learn ``solo/data/dataset_subset/imagenet100_classes.txt``) — build the folder from it.
"""
from ssl_jax import config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  c = config_lib.base_config(args, method='byol')
  c.method.symmetric = True
  c.data.views = 'byol'
  c.model.projector.update({'hidden_dim': 4096, 'out_dim': 256, 'use_bn': True})
  c.model.predictor.update({'hidden_dim': 4096, 'out_dim': 256, 'use_bn': True})
  c.ema.update({'schedule': 'cosine', 'final': 1.0})
  if args.dataset.startswith('cifar'):        # solo-learn scripts/pretrain/cifar/byol.yaml
    c.batch_size = 256
    c.total_epochs = 1000
    c.optimizer.update({'name': 'lars', 'base_lr': 1.0, 'weight_decay': 1e-5,
                        'warmup_epochs': 10.0, 'end_lr_factor': 0.0,
                        'trust_coefficient': 0.02, 'trust_clip': True})
    c.ema.base = 0.99
    c.probe.lr = 0.1
  elif args.dataset == 'imagenet100':         # solo-learn scripts/pretrain/imagenet-100/byol.yaml
    if args.backbone is None:
      c.model.backbone = 'resnet18'
    c.model.predictor.hidden_dim = 8192
    c.batch_size = 256
    c.total_epochs = 400
    c.optimizer.update({'name': 'lars', 'base_lr': 0.5, 'weight_decay': 1e-6,
                        'warmup_epochs': 10.0, 'end_lr_factor': 0.0,
                        'trust_coefficient': 0.02, 'trust_clip': True})
    c.ema.base = 0.99
    c.probe.lr = 0.1
    c.evals.knn.update({'every_epochs': 20.0, 'train_examples': 100_000})
  else:                                       # deepmind-research byol/configs/byol.py, 300 ep
    c.batch_size = 4096
    c.total_epochs = 300
    c.optimizer.update({'name': 'lars', 'base_lr': 0.3, 'weight_decay': 1e-6,
                        'warmup_epochs': 10.0, 'end_lr_factor': 0.0,
                        'trust_coefficient': 0.001, 'trust_clip': False})
    c.ema.base = 0.99
    c.evals.knn.update({'every_epochs': 20.0, 'train_examples': 100_000})
  return config_lib.finish_config(c, args)
