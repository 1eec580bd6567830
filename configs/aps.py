r"""APS — Asymmetric Patch Sampling (arXiv 2306.02854) on ViTs; see ssl_jax/methods/aps.py.

Commands (``TFDS_DATA_DIR`` holds cifar10 / cifar100):

    TFDS_DATA_DIR=../shared/data/tfds python -m ssl_jax.main \
        --config=configs/aps.py:cifar10,vit_small --workdir=/tmp/aps_c10_vits
    python -m ssl_jax.main --config=configs/aps.py:cifar100,vit_base --workdir=gs://b/aps_c100_vitb
    python -m ssl_jax.main --config=configs/aps.py:cifar10,runlocal --workdir=/tmp/aps_local

Presets (``get_config('<dataset>[,<vit>][,runlocal][,bs=N][,epochs=N][,steps=N]')``; ``<vit>``
is ``vit_tiny`` / ``vit_small`` (default) / ``vit_base``):

* ``cifar10`` / ``cifar100`` — the released CIFAR recipe (table below): ViT/2 on 32 px (256
  patches), sparse ratio 0.25 (64 + 64 tokens per step), selective power 3, τ 0.1, no momentum
  encoder, batch 512, AdamW, lr = base x 512/256, 20 warm-up epochs then cosine to 0, 1600
  epochs. One chunk pair per optimizer step (``method.chunk_mode='one'``), so 1600 epochs here
  are a quarter of the official optimizer steps; ``epochs=6400`` with
  ``--config.optimizer.warmup_epochs=80`` matches the official step count
  (``--config.method.chunk_mode=all`` keeps 1600 epochs and the official compute per batch with
  one update per batch). Expected runtime, 1600 epochs on one H100 (NOT measured: the compiled
  step's FLOPs from ``benchmarks/bench_aps.py --flops-only`` at 30% of the 989 TFLOP/s bf16
  peak): ViT-T ~0.35 h (2.3 TFLOP/step), ViT-S ~1.3 h (8.9), ViT-B ~5 h (35) for 155k steps;
  ViT-T/S will likely be input-bound (that pace needs ~66k / 17k augmented pairs per second
  from tf.data), so budget more. x4 for the official step count.
  Paper / official README fine-tune top-1 after 1600 pre-training epochs (the **best** test
  accuracy over 100 fine-tuning epochs, as the official ``main_finetune.py`` reports it; the
  last-epoch number is not published): CIFAR-10 ViT-T 97.2, ViT-S 98.1, ViT-B 98.2; CIFAR-100
  83.4 / 84.9 / 85.9 (ViT-B 86.0 after 3200 epochs). Not yet reproduced here. Evaluate with
  ``--mode=finetune --config=configs/eval_finetune.py:cifar10,aps,vit_small`` (the released
  fine-tune recipe and its deviations are tabled in that file); it reports the best and the last
  epoch, each for the online and the EMA weights. The kNN monitor (k=200) during pre-training
  is a cheap sanity signal, not the paper's metric.
* ``imagenet`` / ``imagenet100`` — ViT-S/16 (default) or ViT-B/16 at 224 px (196 patches, 49 +
  49 tokens). The official code has no ImageNet recipe; this one is **inferred** from MoCo v3's
  ViT recipe (whose heads APS uses): batch 1024, AdamW lr 1.5e-4 x B/256, wd 0.1, 40 warm-up
  epochs, 300 epochs. ImageNet numbers are in the paper only; not reproduced here.
* ``runlocal`` — vit_test (width 32, 2 blocks) with patch 4 on 32 px (64 patches, 16 + 16
  tokens), heads 64-64-32, batch 32, 20 steps, float32, lr 1e-3: a smoke test (~1 min on a
  laptop CPU), not a result.

``cifar10`` / ``cifar100`` — reference: github.com/visresearch/aps at d761b9f (2025-06-27).
CFG = config/pretrain/vit_{tiny,small,base}_pretrain.py, MAIN = main_pretrain.py, MODEL =
module/model.py, README = README.md; timm = timm 0.6.11 (the repository's requirements.txt)
for ``Block``'s defaults. The three CFG files differ only in ``arch`` and ``lr_base`` and the
dataset is a command-line argument, so cifar10 and cifar100 share one table::

    field                   | ours                     | reference                 | source
    model.backbone          | vit_small (vit_tiny,     | vit-small in the README   | MAIN, README
                            | vit_base)                | command (vit-tiny,        |
                            |                          | vit-base)                 |
    D / depth / heads       | 192/12/3, 384/12/6,      | the same                  | MAIN
                            | 768/12/12                |                           |
    model.patch_size        | 2 (32 px, 256 patches)   | 2 (img_dim 32)            | MODEL, CFG
    model.qkv_bias          | False                    | False (timm               | MODEL, timm
                            |                          | Block(emb_dim, num_head)  |
                            |                          | default)                  |
    model.layer_norm_eps    | 1e-5, blocks and final   | 1e-5 (torch nn.LayerNorm  | MODEL, timm
                            | norm                     | default)                  |
    model.projector         | D-512-512-128, no bias,  | _build_mlp(3, D, 512,     | MODEL, CFG
                            | BN, last BN affine=False | 128): the same            |
    model.predictor         | 128-512-512-128, the     | _build_mlp(3, 128, 512,   | MODEL
                            | same                     | 128)                      |
    method.ratio            | 0.25                     | sampling_ratio 0.25       | CFG
    method.power            | 3                        | power 3                   | CFG
    method.temperature      | 0.1                      | temp 0.1                  | CFG
    method.momentum_target  | False                    | momentum False            | CFG
    ema.base (unused)       | 0.99                     | momentum_rate 0.99        | CFG
                            |                          | (unused)                  |
    batch_size              | 512                      | 512                       | CFG
    optimizer               | adamw, b1 0.9, b2 0.999  | AdamW, betas (0.9, 0.999) | MAIN
    optimizer.base_lr       | T 1e-3, S 5e-4, B 5e-4   | lr_base T 1e-3, S 5e-4, B | CFG, MAIN
                            | (x B/256: 2e-3 / 1e-3 /  | 5e-4; lr = lr_base *      |
                            | 1e-3 at B 512)           | batch_size / 256          |
    optimizer.weight_decay  | 0.05, every parameter    | 0.05, every parameter     | CFG, MAIN
    optimizer.warmup_epochs | 20                       | warmup_epoch 20           | CFG
    lr schedule             | linear warm-up, cosine   | min((e + 1) / 20,         | MAIN lr_func
                            | to 0, per step           | cosine), per epoch        |
    total_epochs            | 1600                     | 1600 (--nepoch default;   | MAIN, README
                            |                          | the CFG value 3200 is     |
                            |                          | overwritten)              |
    updates per batch       | 1 (chunk_mode one)       | nsampling 4               | CFG, MAIN
    model.dtype             | bfloat16                 | fp16 autocast +           | CFG, MAIN
                            |                          | GradScaler                |
    BatchNorm               | global batch             | SyncBatchNorm under DDP   | MAIN

(Before issue 14 the base lr here was twice the released ``lr_base`` (2e-3 / 1e-3 / 1e-3) and the
ViT had a qkv bias and LayerNorm eps 1e-6.)

``imagenet`` / ``imagenet100`` — no official recipe; the reference is MoCo v3's ViT-S 1-node
setup, whose heads APS reuses: github.com/facebookresearch/moco-v3, M3C = CONFIG.md,
M3V = vits.py::

    field                   | ours                     | reference                 | source
    model.backbone          | vit_small (vit_base),    | vit_small (vit_base),     | M3C
                            | patch 16, 224 px         | patch 16                  |
    vit_small heads         | 6 (the APS / DeiT ViT-S) | 12                        | M3V
    batch_size              | 1024                     | 1024 (1-node setup)       | M3C
    optimizer.base_lr       | 1.5e-4 (x B/256)         | --lr=1.5e-4 (x B/256)     | M3C
    optimizer.weight_decay  | 0.1                      | --weight-decay=.1         | M3C
    optimizer.warmup_epochs | 40                       | --warmup-epochs=40        | M3C
    total_epochs            | 300                      | 300                       | M3C
    method.temperature      | 0.1 (APS)                | --moco-t=.2               | CFG / M3C
    model.qkv_bias / eps    | False / 1e-5 (the APS    | True / 1e-6               | MODEL / M3V
                            | model)                   |                           |
    position embedding      | learned                  | fixed 2-D sin-cos         | M3V

Deviations from the released code, and why:

* **One optimizer step per batch** (``chunk_mode='one'``) instead of ``nsampling`` = 4 sequential
  steps on the same crops: the trainer's contract is one update per batch, so epochs,
  schedules and kNN cadences mean the same across methods. ``epochs=6400`` +
  ``warmup_epochs=80`` gives the official number of updates (fresh crops each time).
* **Per-step schedule** (linear warm-up, cosine to 0) instead of the official per-epoch
  ``LambdaLR``: the trainer's schedule; the two differ by at most one epoch's step of the lr.
* **bfloat16** compute instead of fp16 autocast + loss scaling: native on TPU / recent GPUs and
  needs no loss scaling; f32 parameters, losses and final norm.
* **Learned CLS position embedding** (``pos_embedding [1, 1 + N, D]``): the official model has
  none; the extra vector is added to ``cls_token`` and is the same function class, kept for the
  timm parameter layout.
* **Initialisation**: Dense / patch-embedding kernels Xavier-uniform (MAE / timm ViT); the
  official model leaves timm ``Block``'s Linears and the patchify conv at torch's defaults and
  only trunc-normal(0.02)-initialises ``cls_token`` / ``pos_embedding``. Not changed here.
* **Selective sampling handles flips** and fills from zero-ratio cells when fewer than K cells
  are uncovered (the official ``np.random.choice`` raises there); see ``ssl_jax/ops/patches.py``.
* ImageNet presets are inferred (above); the paper's ImageNet code is not released.
"""
from __future__ import annotations

import ml_collections

from ssl_jax import config_lib

# Released config/pretrain/vit_{tiny,small,base}_pretrain.py ``lr_base`` (lr = base x B / 256).
_BASE_LR_CIFAR = {'vit_tiny': 1e-3, 'vit_small': 5e-4, 'vit_base': 5e-4, 'vit_test': 1e-3}


def _head(hidden: int, out: int) -> ml_collections.ConfigDict:
  """APS / MoCo v3 head: Linear(no bias)-BN-ReLU-Linear-BN-ReLU-Linear-BN(affine=False)."""
  return ml_collections.ConfigDict({'hidden_dim': hidden, 'out_dim': out, 'num_layers': 3,
                                    'use_bn': True, 'use_bias': False, 'last_bn': True,
                                    'last_bn_affine': False})


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, backbones=config_lib.VITS)
  c = config_lib.base_config(args, method='aps')
  imagenet_like = args.dataset.startswith('imagenet')
  c.data.views = 'aps'
  c.method.update({
      'ratio': 0.25,            # sparse view keeps N * ratio patches; 1/ratio disjoint chunks
      'power': 3.0,             # selective view: p ∝ (1 - cover)^power
      'temperature': 0.1,
      'chunk_mode': 'one',      # 'one' chunk pair per optimizer step, or 'all' (see aps.py)
      'momentum_target': False,  # official: same encoder, stop-gradient targets
  })
  c.model.backbone = args.backbone or 'vit_small'
  c.model.patch_size = 16 if imagenet_like else 2
  c.model.dtype = 'bfloat16'
  c.model.qkv_bias = False        # official: timm Block(emb_dim, num_head), qkv_bias=False
  c.model.layer_norm_eps = 1e-5   # official: nn.LayerNorm default eps in blocks and final norm
  c.model.projector = _head(512, 128)
  c.model.predictor = _head(512, 128)
  # EMA target: only read with method.momentum_target=True (official momentum_rate 0.99).
  c.ema.update({'schedule': 'cosine', 'base': 0.99})
  c.optimizer.update({'name': 'adamw', 'b1': 0.9, 'b2': 0.999, 'end_lr_factor': 0.0})
  if imagenet_like:
    c.batch_size = 1024
    c.total_epochs = 300
    c.optimizer.update({'base_lr': 1.5e-4, 'weight_decay': 0.1, 'warmup_epochs': 40.0})
    c.evals.knn.update({'every_epochs': 20.0, 'train_examples': 100_000})
  else:
    c.batch_size = 512
    c.total_epochs = 1600
    c.optimizer.update({'base_lr': _BASE_LR_CIFAR[c.model.backbone], 'weight_decay': 0.05,
                        'warmup_epochs': 20.0})
    c.evals.knn.update({'every_epochs': 50.0})
  c = config_lib.finish_config(c, args)
  if args.runlocal:  # finish_config has set vit_test, 64-wide heads, batch 32, 20 steps
    c.model.patch_size = 4 if not imagenet_like else 16
    c.model.dtype = 'float32'
    c.optimizer.base_lr = 1e-3
  return c
