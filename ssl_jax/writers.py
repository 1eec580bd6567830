"""Metric writers: CLU's TensorBoard writer when clu is installed, else a plain one.

``create(workdir, just_logging=...)`` returns an object with ``write_scalars(step, dict)``,
``write_histograms(step, dict)``, ``flush()`` and ``close()`` (CLU's ``MetricWriter`` API).
Without clu (and so without TensorFlow, e.g. on an accelerator image that has only jax), the
fallback :class:`JsonlWriter` appends one JSON line per ``write_scalars`` call to
``WORKDIR/metrics.jsonl`` and logs it; histograms are summarised (count, mean, min, max). A
named warning says that TensorBoard files are not written.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class JsonlWriter:
  """Scalars as JSON lines in ``WORKDIR/metrics.jsonl`` (process 0), and in the log."""

  def __init__(self, workdir: str, *, just_logging: bool):
    self._path = None if just_logging else os.path.join(workdir, 'metrics.jsonl')
    if self._path:
      os.makedirs(workdir, exist_ok=True)

  def _write(self, record: dict[str, Any]) -> None:
    log.info('%s', record)
    if self._path:
      with open(self._path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(record) + '\n')

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    self._write({'step': int(step), **{k: float(v) for k, v in scalars.items()}})

  def write_histograms(self, step: int, arrays: dict[str, Any], num_buckets=None) -> None:
    del num_buckets
    summary = {}
    for k, v in arrays.items():
      v = np.asarray(v, np.float64).ravel()
      summary.update({f'{k}/count': v.size, f'{k}/mean': float(v.mean()) if v.size else 0.0,
                      f'{k}/min': float(v.min()) if v.size else 0.0,
                      f'{k}/max': float(v.max()) if v.size else 0.0})
    self._write({'step': int(step), **summary})

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def create(workdir: str, *, just_logging: bool):
  """CLU's default writer (TensorBoard + log) if clu imports, else :class:`JsonlWriter`."""
  try:
    from clu import metric_writers  # pylint: disable=import-outside-toplevel
  except ImportError:
    if not just_logging:
      print(f'WARNING: clu is not installed: metrics go to {workdir}/metrics.jsonl, not '
            'TensorBoard (pip install -r requirements.txt for TensorBoard files).', flush=True)
    return JsonlWriter(workdir, just_logging=just_logging)
  return metric_writers.create_default_writer(workdir, just_logging=just_logging)
