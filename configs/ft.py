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

Presets:

* ``imagenet`` (on MoCo v2's 200-epoch recipe): ResNet-50, batch 256, SGD lr 0.03, cosine,
  m 0.999, tau 0.2. Paper: 67.5 -> 69.6% linear; MoCo v2 reports ~53 h on 8 V100s.
* ``imagenet100`` (the paper's ImageNet-100 run, CMC class list): as above with m 0.99.
  Paper: MoCo v1 + FT 77.2%.
* ``cifar10``: MoCo v2 CIFAR recipe of ``configs/moco.py`` plus FT. Judge by the gain over
  ``configs/moco.py:cifar10`` at equal budget (no CIFAR number in the paper).
* ``runlocal``: resnet_tiny, 20 steps, queue 1,024.

Read the pos/neg score plots (``WORKDIR/score_plots/``, TensorBoard ``scores/*``) as in the README.
"""
import os

from ssl_jax import config_lib


def get_config(arg: str | None = None):
  config_lib.parse_arg(arg)  # validate tokens with the same rules
  c = config_lib.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), 'moco.py'), arg)
  c.method.name = 'ft'
  c.method.update({'extrapolate': True, 'interpolate': True, 'ex_alpha': 2.0, 'in_alpha': 1.6,
                   'renormalize': False})
  return c
