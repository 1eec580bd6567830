"""ssl_jax: self-supervised visual representation learning in JAX/Flax."""
import os as _os


def _xla_cpu_defaults() -> None:
  """Keep XLA:CPU's YNNPACK library for dots but not for convolutions.

  With jaxlib 0.10, XLA:CPU hands convolutions to YNNPACK by default, whose weight-gradient
  convolutions slow down super-linearly with the batch (ResNet stage-1 kernel gradient, 16
  channels at 32x32: 23 ms at batch 64, 80 ms at 128, 384 ms at 256; 12, 17 and 65 ms with
  XLA's own convolution) — measured in benchmarks/bench_methods.py, see BENCHMARKS.md. Only
  the CPU backend reads this flag (GPU and TPU runs are unaffected). Applied when the variable
  does not already choose a value, before JAX starts its CPU backend, and only for the jaxlib
  versions it was measured on (so a later jaxlib without the flag never sees it). Opt out with
  ``SSL_JAX_XLA_CPU_DEFAULTS=0``.
  """
  if _os.environ.get('SSL_JAX_XLA_CPU_DEFAULTS', '1') == '0':
    return
  flag = '--xla_cpu_experimental_ynn_fusion_type'
  current = _os.environ.get('XLA_FLAGS', '')
  if flag in current:
    return
  try:
    from importlib import metadata
    version = tuple(int(p) for p in metadata.version('jaxlib').split('.')[:2])
  except Exception:  # pylint: disable=broad-except
    return
  if version == (0, 10):
    _os.environ['XLA_FLAGS'] = f'{current} {flag}=individual_dot'.strip()


_xla_cpu_defaults()

# TensorFlow's oneDNN rewrites serve only the input pipeline's image ops here (the model is JAX),
# and their start-up banner ignores TF_CPP_MIN_LOG_LEVEL: off for every use of the package (CLI,
# library, tests alike, so the input's numerics never depend on how a run was started). Set the
# variable yourself to choose otherwise; it must be set before TensorFlow is imported.
_os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
