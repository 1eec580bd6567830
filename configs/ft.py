r"""FT — Feature Transformation (Zhu et al., ICCV 2021) on MoCo v2.

    TFDS_DATA_DIR=../shared/data/tfds python -m ssl_jax.main \
        --config=configs/ft.py:cifar10,runlocal --workdir=/tmp/ft_local

Defaults read in the official code (DTennant/CL-Visualizing-Feature-Transformation,
``memory/mem_moco.py`` with the README's flags ``--mixnorm_target posneg --sep_alpha
--pos_alpha 2.0 --neg_alpha 1.6 --mask_distribution beta --expolation_mask``, ``--dim_mask``
default ``none``): ``lam_ex = 1 + Beta(2, 2)`` and ``lam_in ~ Beta(1.6, 1.6)``, one scalar each
per iteration; no renormalisation after mixing; the queue is enqueued with the original
(gathered) keys. Switch each part off with ``--config.method.extrapolate=False`` /
``--config.method.interpolate=False``.

Negative interpolation across chips (``method.interp_pool``, ``ssl_jax/methods/ft.py`` has the
argument). The official code draws ``randperm(K)`` over the whole queue every step. On one
device we do exactly that. On ``n`` devices the queue is stored in ``n`` blocks of ``K / n``
rows, and a whole-queue permutation would move the queue between chips every step (32 MB at
K = 65,536; FT then cost 1.27x BYOL per FLOP at 64 chips against MoCo's 1.11x). So by default
(``interp_pool = 0``) each device permutes its own ``K / n`` rows uniformly and nothing moves.
What changes: a negative is mixed with a uniformly drawn row of its block rather than of the
whole queue. Why it is statistically the same: the queue is a FIFO of keys of shuffled images,
so the rows of a block are as exchangeable as the rows of the queue (they differ only in being
closer in age, at most ``K / (n B)`` steps apart: keys of a slightly more similar EMA encoder),
and each logit depends only on the pair it mixes; a row is paired with itself with probability
``n / K`` instead of ``1 / K``. ``interp_pool = N`` fixes blocks of N rows on every device count
(reproducible across device counts, nothing moves when N divides ``K / n``); ``-1`` keeps the
whole-queue law on a pod, at the cost of moving the queue every step.

Presets (one reference each, tables below; everything not listed is ``configs/moco.py``'s preset
for the same dataset, which is FT's equal-budget baseline):

* ``imagenet``: the FT README's "Training on IN-1K" — ResNet-50, batch 256, SGD lr 0.03, cosine
  to lr/1000, m 0.999, tau 0.2, 200 epochs. Paper: 67.5 -> 69.6% linear; MoCo v2 reports ~53 h
  on 8 V100s.
* ``imagenet100``: the FT README's "Training on IN-100" (CMC class list) — as above with m 0.99.
  Paper / README: MoCo v1 + FT 77.2%.
* ``cifar10`` / ``cifar100``: the FT code has no CIFAR recipe: MoCo v2's CIFAR preset
  (``configs/moco.py:cifar10``, solo-learn's MoCo v2+ recipe) with the asymmetric loss, plus FT.
  Judge by the gain over ``configs/moco.py:cifar10 --config.method.symmetric=False`` at equal
  budget (no CIFAR number in the paper).
* ``runlocal``: resnet_tiny, 20 steps, queue 1,024.

``imagenet`` and ``imagenet100`` — reference: DTennant/CL-Visualizing-Feature-Transformation.
R = README.md ("Training on IN-1K" / "Training on IN-100"), O = options/base_options.py,
T = options/train_options.py, D = dataset/util.py, N = networks/util.py,
BT = learning/base_trainer.py, CT = learning/contrast_trainer.py, MM = memory/mem_moco.py::

    field                        | ours                      | reference                 | source
    model.backbone               | resnet50                  | resnet50 (--arch default) | O
    model.projector              | 2048-2048-128, no BN      | MoCov2: head mlp,         | O, N
                                 |                           | 2048-2048-128             |
    method.queue_size            | 65,536                    | nce_k 65536               | O
    method.temperature           | 0.2                       | MoCov2: nce_t 0.2         | O
    method.symmetric             | False                     | asymmetric: q(x1), k(x2)  | CT
    method.extrapolate, ex_alpha | True, 2.0 (1 + Beta(2,2)) | --mixnorm_target posneg   | R, T, MM
                                 |                           | --expolation_mask         |
                                 |                           | --pos_alpha 2.0           |
    method.interpolate, in_alpha | True, 1.6 (Beta(1.6,1.6)) | --sep_alpha               | R, T, MM
                                 |                           | --neg_alpha 1.6           |
    method.renormalize           | False                     | --postmix_norm off        | R, T
    ema                          | constant 0.999 / 0.99     | --alpha 0.999 / 0.99      | R
    batch_size                   | 256                       | --batch_size 256          | R
    optimizer                    | sgd, momentum 0.9, wd 1e-4| momentum 0.9, wd 1e-4     | O
    optimizer.base_lr            | 0.03                      | --learning_rate 0.03      | R
    optimizer.warmup_epochs      | 0                         | warm-up only if batch>256 | T
    lr schedule                  | cosine to 1e-3 x lr, per  | --cosine, to lr x 0.1^3,  | R, BT
                                 | step                      | per epoch                 |
    total_epochs                 | 200                       | --epochs 200              | R
    crop                         | 224 px, scale 0.2-1       | --input_res 224, 0.2-1    | R, D
    augmentations                | MoCo v2 (jitter 0.4/0.4/  | aug B: the same           | O, D
                                 | 0.4/0.1 p 0.8, gray 0.2,  |                           |
                                 | blur p 0.5, flip)         |                           |

``cifar10`` / ``cifar100``: ``configs/moco.py``'s CIFAR table (vturrisi/solo-learn
``scripts/pretrain/cifar/mocov2plus.yaml``) with the FT rows above, except (MP =
vturrisi/solo-learn solo/methods/mocov2plus.py)::

    field                        | ours                      | reference                 | source
    method.symmetric             | False                     | True (MoCo v2+)           | MP

Deviations, with reasons:

* CIFAR: asymmetric loss, one queue (solo-learn's MoCo v2+ is symmetric): FT transforms one
  query/key pair and one queue per step, as in its official code. Because solo-learn's symmetric
  loss is the mean of its two terms, its lr (0.3) is the same step size for the asymmetric loss.
* BatchNorm over the global batch instead of the FT code's shuffling BN (per-GPU batches); the lr
  follows its cosine per step instead of per epoch; float32 compute. ``configs/moco.py`` has the
  same deviations, so the baseline and FT differ only in the feature transformation.
"""
import os

from ssl_jax import config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)  # validate tokens with the same rules
  c = config_lib.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), 'moco.py'), arg)
  c.method.name = 'ft'
  c.method.update({'extrapolate': True, 'interpolate': True, 'ex_alpha': 2.0, 'in_alpha': 1.6,
                   'renormalize': False, 'symmetric': False,
                   'interp_pool': 0})   # 0: each device's queue rows; -1: the whole queue; N
  if args.dataset == 'imagenet':
    # FT README "Training on IN-1K": PyContrast's cosine ends at lr * 0.1^3 (MoCo's code: at 0).
    c.optimizer.end_lr_factor = 1e-3
  return c
