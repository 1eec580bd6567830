"""Method registry: ``get(name)`` returns the method class; ``names()`` lists them."""
from __future__ import annotations

import importlib

from ssl_jax import config_lib

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
  """The ``Method`` class of ``name``; ``config_lib.ConfigError`` naming ``method.name`` and the
  registered names otherwise (the one check of the name: config_lib imports no method code)."""
  config_lib.require(name in _REGISTRY, 'method.name', name, ', '.join(names()))
  return importlib.import_module(_REGISTRY[name]).Method
