"""Test set-up: 4 simulated CPU devices, offline TFDS data dir, small thread pools."""
import os
import pathlib

# 4 simulated CPU devices; a cheap XLA backend pipeline (tiny models compile 2x faster).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4 '
                      '--xla_backend_optimization_level=0 '
                      '--xla_llvm_disable_expensive_passes=true')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
_REPO = pathlib.Path(__file__).resolve().parents[1]
_SHARED_TFDS = _REPO.parent / 'shared' / 'data' / 'tfds'
if 'TFDS_DATA_DIR' not in os.environ and _SHARED_TFDS.exists():
  os.environ['TFDS_DATA_DIR'] = str(_SHARED_TFDS)

import ssl_jax  # noqa: E402,F401  (first: its environment defaults precede TF's import)
import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update('jax_threefry_partitionable', True)
# Identical programs compiled by different tests (e.g. a run and its resume) hit this cache.
jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('SSL_JAX_TEST_CACHE', '/tmp/ssl_jax_test_jax_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

REPO = _REPO
TFDS_DATA_DIR = os.environ.get('TFDS_DATA_DIR')
