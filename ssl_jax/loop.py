"""The one step loop: durations, periodic actions, metric windows. Pre-training (``train.py``),
the linear probe and fine-tuning (``evals/``) all run through :func:`run`.

Durations (big_vision's ``u.steps``): a period or a length is given in the config as
``{prefix}_steps``, ``{prefix}_epochs`` or ``{prefix}_examples``; :func:`steps` turns whichever
is set into steps. A value <= 0 or None means "not set" (the config files write -1).

The loop, per step ``s`` (1-based: ``s`` steps are done after the update)::

  state, metrics, aux = step_fn(state, batch)         # jitted, asynchronous
  check the previous step's finite/* flags            # overlaps with this step's compute
  every log_every steps and at the end: average the window's metrics on the host -> on_log
  each Action whose period divides s (and at the end if action.last): action.fn(s, state, aux)
  stop(s) -> a reason: return early (preemption, a requested stop)

``finite/*`` metrics (booleans the step computes) are checked one step late, so checking never
stalls the device, and always before any action runs (no checkpoint of a non-finite state).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterator, Sequence

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


@dataclasses.dataclass
class Action:
  """``fn(step, state, aux)`` every ``every`` steps (None: never), and at the last step if
  ``last``; never at the last step if ``skip_last``."""
  name: str
  every: int | None
  fn: Callable[[int, Any, Any], None]
  last: bool = True
  skip_last: bool = False


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
    avg = {k: float(np.mean([m[k] for _, m in host])) for k in keys}
    now = time.time()
    avg['steps_per_sec'] = (step - self._t_step) / max(now - self._t, 1e-9)
    self._t, self._t_step = now, step
    partial = self._start % self._log_every != 0
    self._start = step
    return avg, host, partial


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
      raise NonFiniteError(f'{name} is NaN or Inf at step {step}; stopping. {on_fail()} {hint}'
                           .strip())


@dataclasses.dataclass
class Result:
  state: Any
  step: int
  stopped: str | None       # the reason returned by ``stop``, or None when the run finished


def run(state: Any, step_fn: Callable, batches: Iterator, *, start_step: int, total_steps: int,
        log_every: int, on_log: Callable[[int, dict[str, float], list, bool], None],
        actions: Sequence[Action] = (), stop: Callable[[int], str | None] | None = None,
        on_nonfinite: Callable[[], str] = lambda: '', nonfinite_hint: str = '',
        log: Callable[[str], None] = print) -> Result:
  """Run ``step_fn(state, batch) -> (state, metrics, aux)`` from ``start_step`` to ``total_steps``.

  ``on_log(step, averages, per_step_host_metrics, partial)`` at every ``log_every`` and at the
  end; ``actions`` as documented in the module; ``stop(step)`` returning a reason ends the run
  early (``Result.stopped``). ``on_nonfinite()`` returns text for the NaN error (what was kept),
  ``nonfinite_hint`` what to change. The first step's compile time is printed with ``log``.
  """
  window = Window(start_step, log_every)
  pending = None
  step = start_step
  for step in range(start_step + 1, total_steps + 1):
    batch = next(batches)
    first = step == start_step + 1
    if first:
      log('compiling the train step...')
      t_compile = time.time()
    state, metrics, aux = step_fn(state, batch)
    if first:
      jax.block_until_ready(metrics)
      log(f'first step compiled in {time.time() - t_compile:.0f} s')
      window.restart_clock(step)
    if pending is not None:   # the previous step's flags: ready by now, no stall
      check_finite(*pending, on_nonfinite, nonfinite_hint)
    pending = (step, metrics)
    window.add(step, metrics)
    due = [a for a in actions
           if itstime(step, a.every, total_steps, last=a.last, skip_last=a.skip_last)]
    logging_now = itstime(step, log_every, total_steps)
    if due or logging_now:
      check_finite(step, metrics, on_nonfinite, nonfinite_hint)
    if logging_now:
      on_log(step, *window.flush(step))
    for action in due:
      action.fn(step, state, aux)
    reason = stop(step) if stop is not None else None
    if reason:
      check_finite(step, metrics, on_nonfinite, nonfinite_hint)
      return Result(state, step, reason)
  if pending is not None:
    check_finite(*pending, on_nonfinite, nonfinite_hint)
  return Result(state, step, None)
