"""Plain helpers that the trainers, methods and evaluators share (big_vision's ``utils``):
durations in steps/epochs/examples, ``itstime``, the metric window and the finiteness check.
Nothing here runs a loop; importing it pulls in only jax and numpy.

Durations (big_vision's ``u.steps``): a period or a length is given in the config as
``{prefix}_steps``, ``{prefix}_epochs`` or ``{prefix}_examples``; :func:`steps` turns whichever
is set into steps. A value <= 0 or None means "not set" (the config files write -1).

``finite/*`` metrics are booleans a jitted step computes; :func:`check_finite` raises
:class:`NonFiniteError` naming the first one that is False.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax
import numpy as np


class NonFiniteError(FloatingPointError):
  """Loss or gradients became NaN/Inf; the message names the step and the metric."""


def is_set(value: Any) -> bool:
  """A duration or count field is set when it is a number > 0 (-1 / 0 / None: not set)."""
  return value is not None and not isinstance(value, bool) and value > 0


def optional(value: Any) -> int | None:
  """``int(value)`` when set (:func:`is_set`), else None (the "-1 means None" fields)."""
  return int(value) if is_set(value) else None


def steps(cfg, prefix: str, steps_per_epoch: int, *, batch_size: int | None = None,
          default: int | None = None) -> int | None:
  """Steps of the duration ``prefix`` in ``cfg``.

  ``cfg.{prefix}_steps`` if set, else ``round(cfg.{prefix}_epochs * steps_per_epoch)`` (at
  least 1), else ``ceil(cfg.{prefix}_examples / batch_size)``; ``default`` when none is set.
  Fields absent from ``cfg`` count as not set.
  """
  get = cfg.get if hasattr(cfg, 'get') else lambda k, d=None: getattr(cfg, k, d)
  n = get(f'{prefix}_steps', None)
  if is_set(n):
    return int(n)
  e = get(f'{prefix}_epochs', None)
  if is_set(e):
    return max(1, int(round(float(e) * steps_per_epoch)))
  x = get(f'{prefix}_examples', None)
  if is_set(x):
    if not batch_size:
      raise ValueError(f'{prefix}_examples needs the batch size')
    return max(1, math.ceil(float(x) / batch_size))
  return default


def total_steps(cfg, steps_per_epoch: int) -> int:
  """The run's length: ``total_steps``, ``total_epochs`` (rounded up) or ``total_examples``."""
  n = cfg.get('total_steps', None)
  if is_set(n):
    return int(n)
  e = cfg.get('total_epochs', None)
  if is_set(e):
    return int(math.ceil(float(e) * steps_per_epoch))
  n = steps(cfg, 'total', steps_per_epoch, batch_size=cfg.get('batch_size'))
  if n is None:
    raise ValueError('no run length: set total_steps, total_epochs or total_examples')
  return n


def itstime(step: int, every: int | None, total: int, *, last: bool = True,
            skip_last: bool = False) -> bool:
  """True at multiples of ``every`` (never if ``every`` is None/0) and, if ``last``, at
  ``total``; never at ``total`` if ``skip_last`` (the caller runs its own final one)."""
  if skip_last and step == total:
    return False
  return bool(every and step % every == 0) or (last and step == total)


class Window:
  """Per-step device metrics of one logging window, averaged on the host at :meth:`flush`.

  ``finite/*`` keys are checked, not averaged. The first window after a resume off the log
  grid holds only part of a window: :meth:`flush` marks it ``partial`` (the caller does not
  write it to TensorBoard, so no step carries two different values).
  """

  def __init__(self, start_step: int, log_every: int):
    self._items: list[tuple[int, dict[str, Any]]] = []
    self._log_every = log_every
    self._start = start_step
    self._t, self._t_step = time.time(), start_step

  def add(self, step: int, metrics: dict[str, Any]) -> None:
    self._items.append((step, metrics))

  def restart_clock(self, step: int) -> None:
    """Measure speed from now (after compilation)."""
    self._t, self._t_step = time.time(), step

  def flush(self, step: int) -> tuple[dict[str, float], list[tuple[int, dict[str, Any]]], bool]:
    """``(averages + steps_per_sec, per-step host metrics, partial)``; empties the window."""
    host = [(s, jax.device_get(m)) for s, m in self._items]
    self._items.clear()
    keys = [k for k in host[-1][1] if not k.startswith('finite/')]
    avg = {k: _mean_over_steps([m[k] for _, m in host]) for k in keys}
    now = time.time()
    avg['steps_per_sec'] = (step - self._t_step) / max(now - self._t, 1e-9)
    self._t, self._t_step = now, step
    partial = self._start % self._log_every != 0
    self._start = step
    return avg, host, partial


def _mean_over_steps(values: list) -> Any:
  """A float, or an array for per-replica metrics (``[replicas]`` per step)."""
  mean = np.mean(np.stack([np.asarray(v) for v in values]), axis=0)
  return float(mean) if mean.ndim == 0 else mean


def hms(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def progress(step: int, total: int, steps_per_sec: float, batch: int) -> str:
  """``(42%) | 3.10 steps/s, 397 img/s | ETA 0:01:23`` for a log line (no speed yet: ``--``)."""
  eta = hms((total - step) / steps_per_sec) if steps_per_sec > 0 else '--'
  return (f'({100 * step / max(total, 1):.0f}%) | {steps_per_sec:.2f} steps/s, '
          f'{steps_per_sec * batch:.0f} img/s | ETA {eta}')


def check_finite(step: int, metrics: dict[str, Any], on_fail: Callable[[], str] = lambda: '',
                 hint: str = '') -> None:
  """Raise :class:`NonFiniteError` if any ``finite/<name>`` flag of ``metrics`` is False."""
  flags = {k: v for k, v in metrics.items() if k.startswith('finite/')}
  for key, ok in jax.device_get(flags).items():
    if not bool(ok):
      name = key[len('finite/'):]
      raise NonFiniteError(' '.join(part for part in (
          f'{name} is NaN or Inf at step {step}; stopping.', on_fail(), hint) if part))
