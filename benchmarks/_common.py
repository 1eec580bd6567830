"""Shared by the benchmark scripts: the repo root and loading a config preset by name."""
from __future__ import annotations

import os

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')


def load_config(name: str, arg: str):
  """``configs/<name>.py``'s ``get_config(arg)`` (``config_lib.load_config_file``)."""
  from ssl_jax import config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.load_config_file(os.path.join(REPO, 'configs', f'{name}.py'), arg)
