"""ssl_jax: self-supervised visual representation learning in JAX/Flax."""
