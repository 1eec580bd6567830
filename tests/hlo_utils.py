"""Read the collectives of a compiled program (``benchmarks/scaling.py``'s parser), for tests
that check what a step moves between devices."""
from __future__ import annotations

import importlib.util
import pathlib

_PATH = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks' / 'scaling.py'
_spec = importlib.util.spec_from_file_location('scaling', _PATH)
scaling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scaling)


def compiled_text(fn, *args) -> str:
  """HLO text of ``fn`` (a ``jax.jit``-ed function) compiled for ``args``."""
  return fn.lower(*args).compile().as_text()


def collectives_of(fn, *args) -> int:
  """Number of collectives in the compiled program of ``fn(*args)``."""
  c = scaling.collectives(compiled_text(fn, *args))
  return sum(v['count'] for v in c.values())


def collective_summary(fn, *args) -> dict[str, dict[str, int]]:
  """``{kind: {'count', 'bytes'}}`` of the compiled program of ``fn(*args)``."""
  return scaling.collectives(compiled_text(fn, *args))
