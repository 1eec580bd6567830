"""Metric writers: CLU's TensorBoard writer when clu is installed, else a plain one.

``create(workdir, just_logging=...)`` returns an object with ``write_scalars(step, dict)``,
``write_histograms(step, dict)``, ``flush()`` and ``close()`` (CLU's ``MetricWriter`` API).
Without clu (and so without TensorFlow, e.g. on an accelerator image that has only jax), the
fallback :class:`JsonlWriter` appends one JSON line per ``write_scalars`` call to
``WORKDIR/metrics.jsonl`` and logs it; histograms are summarised (count, mean, min, max). A
named warning says that TensorBoard files are not written.

A ``gs://`` workdir: CLU's writer goes through TensorFlow's own file system, which this
project's path layer cannot route, so it writes into a :class:`ssl_jax.paths.Mirror` (a local
staging folder) that is uploaded to the workdir at most every 30 s while it writes, and on
``flush()``/``close()``; the JSON-lines fallback writes through ``ssl_jax.paths`` directly (on
gs://, which has no append, the file is re-uploaded at most every 30 s and on ``flush()``).
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from ssl_jax import paths

log = logging.getLogger(__name__)


class JsonlWriter:
  """Scalars as JSON lines in ``WORKDIR/metrics.jsonl`` (process 0), and in the log."""

  def __init__(self, workdir: str, *, just_logging: bool):
    self._path = None if just_logging else paths.join(workdir, 'metrics.jsonl')
    self._pending: list[str] = []
    self._flushed = time.monotonic()

  def _write(self, record: dict[str, Any]) -> None:
    log.info('%s', record)
    if self._path:
      self._pending.append(json.dumps(record) + '\n')
      # gs:// has no append (each flush re-uploads the file): at most every 30 s there.
      if not paths.is_remote(self._path) or time.monotonic() - self._flushed >= 30:
        self.flush()

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

  def write_texts(self, step: int, texts: dict[str, str]) -> None:
    self._write({'step': int(step), **{f'{k}/chars': len(v) for k, v in texts.items()}})

  def write_images(self, step: int, images: dict[str, Any]) -> None:
    self._write({'step': int(step), **{f'{k}/shape': 'x'.join(map(str, np.shape(v)))
                                        for k, v in images.items()}})

  def flush(self) -> None:
    if self._path and self._pending:
      paths.append_text(self._path, ''.join(self._pending))
      self._pending = []
    self._flushed = time.monotonic()

  def close(self) -> None:
    self.flush()


class MirroredWriter:
  """A CLU writer writing into ``mirror.local``; uploaded to the run folder at most every
  ``mirror.min_interval_s`` while writing, and whole on ``flush()``/``close()``."""

  def __init__(self, writer, mirror: paths.Mirror):
    self._writer, self._mirror = writer, mirror

  def _written(self) -> None:
    if self._mirror.due():
      self._writer.flush()
      self._mirror.sync()

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    self._writer.write_scalars(step, scalars)
    self._written()

  def write_histograms(self, step: int, arrays: dict[str, Any], num_buckets=None) -> None:
    self._writer.write_histograms(step, arrays, num_buckets)
    self._written()

  def write_images(self, step: int, images: dict[str, Any]) -> None:
    self._writer.write_images(step, images)
    self._written()

  def write_texts(self, step: int, texts: dict[str, str]) -> None:
    self._writer.write_texts(step, texts)
    self._written()

  def flush(self) -> None:
    self._writer.flush()
    self._mirror.sync(force=True)

  def close(self) -> None:
    self._writer.close()
    self._mirror.close()


def create(workdir: str, *, just_logging: bool):
  """CLU's default writer (TensorBoard + log) if clu imports, else :class:`JsonlWriter`."""
  try:
    from clu import metric_writers  # pylint: disable=import-outside-toplevel
  except ImportError:
    if not just_logging:
      print(f'WARNING: clu is not installed: metrics go to {workdir}/metrics.jsonl, not '
            'TensorBoard (pip install -r requirements.txt for TensorBoard files).', flush=True)
    return JsonlWriter(workdir, just_logging=just_logging)
  if just_logging or not paths.is_remote(workdir):
    return metric_writers.create_default_writer(workdir, just_logging=just_logging)
  mirror = paths.Mirror(workdir)
  return MirroredWriter(
      metric_writers.create_default_writer(mirror.local, just_logging=False), mirror)
