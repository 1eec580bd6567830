r"""Blur strength at 32 px: our Gaussian blur vs PIL's ``ImageFilter.GaussianBlur(radius=sigma)``.

solo-learn's CIFAR recipes (and MoCo v2, MSF) blur with PIL, ``radius = sigma ~ U(0.1, 2)``; we
blur with a sampled Gaussian kernel of a fixed side (:func:`augment.gaussian_kernel_size`: 9 at
32 px since it covers +-2 sigma_max; 3 before). A kernel too short for its sigma truncates the
Gaussian and blurs less. This measures the strength as
mean ``|blur(x) - x|`` (uint8 levels, both rounded to uint8 as the pipeline does) on real
CIFAR-10 training images, for several kernel sides, and its ratio to PIL's::

    PYTHONPATH=<a folder with Pillow> TFDS_DATA_DIR=../shared/data/tfds \
        python benchmarks/blur_strength.py [--n 2000] [--kernels 3,5,9,13]

(Pillow is not a dependency of this package; install it anywhere and point PYTHONPATH at it.)
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

SIGMAS = (0.1, 0.5, 1.0, 2.0)


def load_cifar(n: int) -> np.ndarray:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  tf.config.set_visible_devices([], 'GPU')
  ds = tfds.load('cifar10', split=f'train[:{n}]', data_dir=os.environ.get('TFDS_DATA_DIR'),
                 download=False)
  return np.stack([ex['image'] for ex in tfds.as_numpy(ds)])


def pil_strength(images: np.ndarray, sigma: float) -> float:
  from PIL import Image, ImageFilter  # pylint: disable=import-outside-toplevel
  out = np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(radius=sigma)))
                  for x in images])
  return float(np.abs(out.astype(int) - images.astype(int)).mean())


def pil_strength_law(images: np.ndarray, sigmas: np.ndarray) -> float:
  from PIL import Image, ImageFilter  # pylint: disable=import-outside-toplevel
  out = np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(radius=float(s))))
                  for x, s in zip(images, sigmas)])
  return float(np.abs(out.astype(int) - images.astype(int)).mean())


def ours_strength(images: np.ndarray, sigma, kernel_size: int) -> float:
  """``sigma``: one value for every image, or one per image."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from ssl_jax.data import augment  # pylint: disable=import-outside-toplevel
  x = tf.constant(images, tf.float32) / 255.0
  sig = tf.constant(np.broadcast_to(np.asarray(sigma, np.float32), [len(images)]))
  out = augment.to_uint8(augment.gaussian_blur(x, sig, kernel_size))
  return float(np.abs(out.numpy().astype(int) - images.astype(int)).mean())


def colour_stage_ms(images: np.ndarray, kernel_size: int, repeats: int = 5) -> float:
  """CPU ms per image of the fused colour stage (:func:`augment.colour_views`) with MoCo v2's
  view (jitter p 0.8, gray p 0.2, blur p 0.5) at 32 px, blur kernel side forced to
  ``kernel_size``; best of ``repeats`` passes over ``images`` in batches of 256."""
  import time  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from ssl_jax.data import augment  # pylint: disable=import-outside-toplevel
  saved = augment.gaussian_kernel_size
  augment.gaussian_kernel_size = lambda *a, **k: kernel_size
  try:
    batches = [tf.constant(images[i:i + 256]) for i in range(0, len(images) - 255, 256)]
    run = lambda b, i: augment.colour_views(  # noqa: E731
        b, augment.split_seed(tf.constant([i, 7], tf.int64), 4), jitter=(0.4, 0.4, 0.4, 0.1),
        jitter_p=0.8, gray_p=0.2, blur_p=0.5, solarize_p=0.0)
    run(batches[0], 0).numpy()  # compile
    best = float('inf')
    for r in range(repeats):
      t0 = time.perf_counter()
      for i, b in enumerate(batches):
        run(b, r * 1000 + i).numpy()
      best = min(best, time.perf_counter() - t0)
  finally:
    augment.gaussian_kernel_size = saved
  return 1e3 * best / (256 * len(batches))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--n', type=int, default=2000, help='CIFAR-10 training images (the first n)')
  ap.add_argument('--kernels', default='3,5,9,13', help='kernel sides to measure')
  ap.add_argument('--no_timing', action='store_true', help='skip the colour-stage timing')
  args = ap.parse_args()
  from ssl_jax.data import augment  # pylint: disable=import-outside-toplevel
  images = load_cifar(args.n)
  kernels = [int(k) for k in args.kernels.split(',')]
  try:
    side = augment.gaussian_kernel_size(32, sigma_max=2.0)
  except TypeError:  # before the kernel covered sigma
    side = augment.gaussian_kernel_size(32)
  print(f'CIFAR-10 train[:{len(images)}], 32 px; mean |blur(x) - x| in uint8 levels '
        f'(ratio to PIL). Pipeline kernel side at 32 px, sigma <= 2: {side}.')
  head = ['sigma', 'PIL'] + [f'k={k}' for k in kernels] + ['k=2ceil(3s)+1']
  print(' | '.join(f'{h:>16}' for h in head))
  for sigma in SIGMAS:
    ref = pil_strength(images, sigma)
    row = [f'{sigma:>16}', f'{ref:>16.4f}']
    for k in kernels + [2 * math.ceil(3 * sigma) + 1]:
      row.append(_cell(ours_strength(images, sigma, k), ref))
    print(' | '.join(row))
  # The recipe's law: sigma ~ U(0.1, 2) per image (the same draws on both sides).
  sigmas = np.random.default_rng(0).uniform(0.1, 2.0, len(images))
  ref = pil_strength_law(images, sigmas)
  row = [f'{"U(0.1, 2)":>16}', f'{ref:>16.4f}']
  row += [_cell(ours_strength(images, sigmas, k), ref) for k in kernels] + [f'{"-":>16}']
  print(' | '.join(row))
  if not args.no_timing:
    print('Fused colour stage (MoCo v2 view, blur p 0.5), CPU ms/image, best of 5, '
          + ', '.join(f'k={k}: {colour_stage_ms(images, k):.4f}' for k in kernels))


def _cell(v: float, ref: float) -> str:
  ratio = f'{v / ref:4.2f}x' if ref > 1e-3 else '  - '
  return f'{v:>7.4f} ({ratio})'.rjust(16)


if __name__ == '__main__':
  main()
