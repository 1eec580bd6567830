"""The device suite's result row, interleaved timing and number formatting (standard library
only: imported before the suite's import gates)."""
from __future__ import annotations

import dataclasses
import statistics
from typing import Callable


@dataclasses.dataclass
class Row:
  key: str
  label: str
  metric: str
  ours: float | None = None
  peer: float | None = None
  peer_label: str = ''          # which peer variant, or why there is none
  vs: float | None = None       # ours vs peer (> 1: ours better), as the metric says
  goal: str = ''
  result: str = ''              # 'met' / 'not met' / '' (context)
  seconds: float = 0.0
  notes: str = ''
  status: str = 'ok'            # 'ok', 'skipped', 'error'
  fmt: str = '{:,.0f}'


class BudgetSkip(Exception):
  """A row that the budget guard did not run."""


def median_ratio(a: list[float], b: list[float]) -> float:
  return statistics.median(x / y for x, y in zip(a, b))


def interleave(contenders: dict[str, Callable[[int], float]], repeats: int, steps: int
               ) -> dict[str, list[float]]:
  """Seconds per step of every contender, one value per repeat; the contenders of one repeat
  run back to back. Each ``run(n)`` runs ``n`` steps and waits for the device."""
  times = {k: [] for k in contenders}
  for _ in range(repeats):
    for k, run in contenders.items():
      times[k].append(run(steps) / steps)
  return times


def warm_then_time(contenders: dict[str, Callable[[int], float]], repeats: int, steps: int
                   ) -> dict[str, list[float]]:
  """One warm-up call of every contender (compilation, cudnn autotuning), then
  :func:`interleave`."""
  for f in contenders.values():
    f(1)
  return interleave(contenders, repeats, steps)


def log(msg: str) -> None:
  print(f'# {msg}', flush=True)


def short(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  return f'{type(e).__name__}: {msg[0][:200] if msg else ""}'


def best_peer(times: dict[str, list[float]]) -> tuple[str, float, str]:
  """The faster peer variant (median), and a note with every variant's median."""
  peers = {k: statistics.median(v) for k, v in times.items() if k in ('eager', 'compiled')}
  best = min(peers, key=peers.get)
  note = 'peer ' + ', '.join(f'{k} {1e3 * v:.0f} ms/step' for k, v in peers.items())
  return best, peers[best], note


def flop_str(f: float) -> str:
  for unit, scale in (('TFLOP', 1e12), ('GFLOP', 1e9), ('MFLOP', 1e6)):
    if f >= scale:
      return f'{f / scale:.3g} {unit}'
  return f'{f:.3g} FLOP'


def mfu_note(suite, flops: float, t: list[float]) -> str:
  """``', MFU N%'`` of a step of ``flops`` at the median of ``t`` seconds ('' without a peak)."""
  if not suite.peak:
    return ''
  return f', MFU {100 * flops / statistics.median(t) / (suite.peak * suite.n_dev):.0f}%'


def xla_flops(lowered, compiled) -> float:
  """FLOPs of one step from XLA's cost analysis (the lowered HLO, else the compiled one)."""
  for obj in (lowered, compiled):
    try:
      ca = obj.cost_analysis()
    except Exception:  # pylint: disable=broad-except
      continue
    if isinstance(ca, (list, tuple)):
      ca = ca[0] if ca else None
    if ca and float(ca.get('flops', 0.0)) > 0:
      return float(ca['flops'])
  return float('nan')


def time_against_peer(suite, key: str):
  """``(ours, peer, times)``: our compiled step and the torch peer of ``key`` (eager and
  compiled), warmed up (eager: cudnn autotuning; compiled: already built), then timed in
  interleaved repeats; both checked finite."""
  ours = suite.job(key)
  peer = suite.make_peer(key)
  cont = {'ours': ours.run}
  cont.update(peer.contenders())
  times = warm_then_time(cont, suite.args.repeats, suite.args.steps)
  ours.check_finite()
  peer.check_finite()
  return ours, peer, times

