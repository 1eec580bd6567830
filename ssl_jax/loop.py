"""The step loop the linear probe and fine-tuning still run through (being replaced by their own
inline loop; pre-training's loop is written inline in ``train.py``)."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Sequence

import jax

from ssl_jax.utils import Window, check_finite, itstime


@dataclasses.dataclass
class Action:
  """``fn(step, state, aux)`` every ``every`` steps (None: never), and at the last step if
  ``last``; never at the last step if ``skip_last``."""
  name: str
  every: int | None
  fn: Callable[[int, Any, Any], None]
  last: bool = True
  skip_last: bool = False


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
