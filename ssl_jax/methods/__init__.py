"""Method registry: ``get(name)`` returns the method class; ``names()`` lists them."""
from __future__ import annotations

import importlib

# name -> module path; each module defines ``Method`` (a subclass of ``base.Method``).
_REGISTRY = {
    'byol': 'ssl_jax.methods.byol',
    'moco': 'ssl_jax.methods.moco',
    'ft': 'ssl_jax.methods.ft',
    'msf': 'ssl_jax.methods.msf',
    'clim': 'ssl_jax.methods.clim',
    'csml': 'ssl_jax.methods.csml',
    'aps': 'ssl_jax.methods.aps',
}


def register(name: str, module: str) -> None:
  _REGISTRY[name] = module


def names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def get(name: str):
  if name not in _REGISTRY:
    raise ValueError(f'unknown method {name!r}; accepted: {", ".join(names())}')
  return importlib.import_module(_REGISTRY[name]).Method
