"""Shared by the benchmark scripts: the repo root and loading a config preset by name."""
from __future__ import annotations

import importlib.util
import os

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')


def load_config(name: str, arg: str):
  """``configs/<name>.py``'s ``get_config(arg)``."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)
