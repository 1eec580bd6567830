"""What an offline evaluation reports: lines on process 0 (and the Python log), and result
files written whole by process 0 (``paths.write_json``: a run path may be on ``gs://``)."""
from __future__ import annotations

import logging
from typing import Any

import jax

from ssl_jax import paths


def log(msg: str) -> None:
  """``msg`` to the Python log on every process and printed (flushed) on process 0."""
  logging.info(msg)
  if jax.process_index() == 0:
    print(msg, flush=True)


def write_json(workdir: str, name: str, payload: dict[str, Any]) -> str:
  """``WORKDIR/name`` as JSON, whole or not at all (``paths.write_json``), by process 0."""
  path = paths.join(workdir, name)
  if jax.process_index() == 0:
    paths.write_json(path, payload)
  return path
