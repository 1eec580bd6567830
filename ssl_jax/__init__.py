"""ssl_jax: self-supervised visual representation learning in JAX/Flax.

Importing ssl_jax or any of its modules has no side effect but one: this file sets the two
environment variables in ``IMPORT_TIME_ENV`` (when not already set). They must be at import:
XLA reads ``XLA_FLAGS`` once, when JAX starts its CPU backend, and TensorFlow reads
``TF_ENABLE_ONEDNN_OPTS`` once, when it is imported; a library user may do either right after
``import ssl_jax``, before calling anything of ours, so no later point is early enough.
Everything else (log levels, log filters, the command line) is set by ``ssl_jax.main.cli`` /
``main`` at run time (``tests/test_import.py`` checks this).
"""
import os as _os

#: The environment variables importing ssl_jax may set (see above); nothing else is changed.
IMPORT_TIME_ENV = ('XLA_FLAGS', 'TF_ENABLE_ONEDNN_OPTS')


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


_xla_cpu_defaults()   # at import on purpose: see the module docstring (IMPORT_TIME_ENV)

# TensorFlow's oneDNN rewrites serve only the input pipeline's image ops here (the model is JAX),
# and their start-up banner ignores TF_CPP_MIN_LOG_LEVEL: off for every use of the package (CLI,
# library, tests alike, so the input's numerics never depend on how a run was started). Set the
# variable yourself to choose otherwise; it must be set before TensorFlow is imported (so at our
# import: see the module docstring, IMPORT_TIME_ENV).
_os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
