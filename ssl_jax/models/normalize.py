"""The input normalisation every model applies to uint8 images (TF-free; ``data`` re-exports it).

    normalize(x) = (x / 255 - mean) / std      mean, std: ImageNet RGB statistics
"""
from __future__ import annotations

MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)


def normalize(images):
  """uint8 ``[..., 3]`` -> float32 ``(x / 255 - mean) / std`` with ImageNet mean/std (jnp)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(MEAN_RGB, jnp.float32)) / jnp.asarray(STDDEV_RGB, jnp.float32)
