r"""The offline modes and export on a replicas run (``--config.replicas=S``): ``--config.replica``.

A replicas run stores every TrainState leaf with a leading replica axis of size S; replica r is
the run with seed ``seed + r``. Every eval config has ``replica`` (default -1):

* ``--config.replica=r`` (0 <= r < S): the mode, export included, reads replica r's slice of
  every leaf (``checkpoint.load_pretrained`` / ``restore_state``) and runs exactly as on a single
  run with seed ``seed + r``. On a run without replicas only -1 and 0 are accepted (both read the
  run itself).
* ``replica=-1`` on a replicas run: the evaluation modes (:data:`EVERY_REPLICA_MODES`) evaluate
  every replica, each as ``--config.replica=r --workdir=EVAL_DIR/replica_<r>`` (its own
  results.json, TensorBoard events and checkpoints; a rerun resumes each), then write
  ``EVAL_DIR/results.json``: every numeric result (the top-level numbers of the mode's results
  and those of its top-level dicts, e.g. ``values.monitor/knn_top1``) as ``mean``, ``std``
  (ddof=1, stated in the file) and ``per_replica``, and print one final line
  ``<result> X ± s% (replicas a / b / c)``. A replica frozen after a NaN (its step behind the
  others') is evaluated too, named in a warning, marked ``frozen`` and left out of the means.
  ``--mode=export`` writes one network: it asks for ``--config.replica``.

:func:`run` is how ``main.run_eval`` runs every mode; no mode knows about replicas beyond passing
its ``replica`` to the checkpoint readers.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import ml_collections
import numpy as np

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import paths, utils
from ssl_jax.evals import report

EVERY_REPLICA_MODES = ('eval', 'knn', 'linear', 'finetune', 'embed')
# The results on each mode's final line ('values.*': every evaluator value); percentages but
# for embed's mean pair scores.
HEADLINE = {'eval': ('values.*',), 'knn': ('test_top1',), 'linear': ('top1',),
            'finetune': ('top1', 'top1_best'), 'embed': ('pos_mean', 'neg_mean')}
NOT_PERCENT = ('pos_mean', 'neg_mean')


def _training_config(config) -> ml_collections.ConfigDict | None:
  """The training run's config when ``config.pretrained`` names one (else the mode's own checks
  report what is missing)."""
  where = config.get('pretrained')
  if not isinstance(where, str) or not where or not paths.exists(paths.join(where,
                                                                           'config.json')):
    return None
  return ckpt_lib.read_config(where)


def run(mode: str, mode_run: Callable[..., dict[str, Any]], config, workdir: str,
        **kwargs) -> dict[str, Any]:
  """``mode_run(config, workdir, **kwargs)`` (a mode's ``run``), or, for an evaluation mode with
  ``replica=-1`` on a replicas run, once per replica (:func:`evaluate_every`). ``replica`` is
  checked against the run before anything is built (``checkpoint.replica_index``: one line)."""
  pre = _training_config(config)
  replica = config.get('replica', -1)
  if pre is not None:
    ckpt_lib.replica_index(pre, replica, config.pretrained, every=mode in EVERY_REPLICA_MODES)
  if pre is not None and int(pre.get('replicas', 1)) > 1 and replica == -1:
    return evaluate_every(mode, mode_run, config, workdir, pre, **kwargs)
  return mode_run(config, workdir, **kwargs)


def replica_steps(config) -> np.ndarray:
  """``state.step`` of every replica in the checkpoint the evaluation reads ([S])."""
  state, _ = ckpt_lib.restore_state(config.pretrained, items=('step',),
                                    step=utils.optional(config.get('checkpoint_step', -1)))
  return np.atleast_1d(np.asarray(state['step']))


def for_replica(config, r: int) -> ml_collections.ConfigDict:
  """``config`` with ``replica = r`` (what ``--config.replica=r`` gives)."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.replica = r
  return c


def evaluate_every(mode: str, mode_run: Callable[..., dict[str, Any]], config, workdir: str,
                   pre, **kwargs) -> dict[str, Any]:
  """Every replica into ``workdir/replica_<r>`` (as ``--config.replica=r`` would), then the
  aggregate into ``workdir/results.json``; returns the aggregate."""
  n, seed = int(pre.replicas), int(pre.get('seed', 0))
  steps = replica_steps(config)
  frozen = {r: int(s) for r, s in enumerate(steps) if s < steps.max()}
  warnings = [f'WARNING: replica {r} (seed {seed + r}) was frozen after step {s} (NaN or Inf '
              f'at step {s + 1}; the others reached step {int(steps.max())}): it is evaluated '
              f'into {paths.join(workdir, f"replica_{r}")} but left out of the means.'
              for r, s in sorted(frozen.items())]
  for line in warnings:
    report.log(line)
  per = []
  for r in range(n):
    where = paths.join(workdir, f'replica_{r}')
    report.log(f'=== replica {r} of {n} (seed {seed + r}) -> {where}')
    per.append(mode_run(for_replica(config, r), where, **kwargs))
  live = [r for r in range(n) if r not in frozen]
  results = aggregate(per, live)
  line = final_line(mode, results, live, n)
  out = {'mode': mode, 'pretrained': config.pretrained, 'replicas': n,
         'seeds': [seed + r for r in range(n)], 'steps': [int(s) for s in steps],
         'frozen': {str(r): s for r, s in frozen.items()}, 'in_mean': live, 'ddof': 1,
         'std': 'sample standard deviation (ddof=1) over the replicas in the mean (in_mean); '
                '0 when only one is',
         'replica_dirs': [paths.join(workdir, f'replica_{r}') for r in range(n)],
         'results': results, 'warnings': warnings, 'final_line': line}
  path = report.write_json(workdir, 'results.json', out)
  for w in warnings:
    report.log(w)
  report.log(f'{line} Written to {path}.')
  return out


def numeric_results(out: dict[str, Any]) -> dict[str, float]:
  """The numbers of a mode's results: top-level ones, and those of its top-level dicts
  (``values.monitor/knn_top1``); booleans, strings and lists are not results."""
  flat = {}
  for key, value in out.items():
    items = value.items() if isinstance(value, dict) else [(None, value)]
    for sub, x in items:
      if isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool):
        flat[key if sub is None else f'{key}.{sub}'] = float(x)
  return flat


def aggregate(per: list[dict[str, Any]], live: list[int]) -> dict[str, dict[str, Any]]:
  """``{result: {'mean', 'std', 'per_replica'}}`` for every numeric result all replicas have;
  mean and std (ddof=1; 0 for one replica) over the ``live`` replicas."""
  flat = [numeric_results(p) for p in per]
  out = {}
  for key in flat[0]:
    if all(key in f for f in flat):
      values = [f[key] for f in flat]
      kept = np.asarray([values[r] for r in live], np.float64)
      out[key] = {'mean': float(kept.mean()),
                  'std': float(kept.std(ddof=1)) if kept.size > 1 else 0.0,
                  'per_replica': values}
  return out


def final_line(mode: str, results: dict[str, dict[str, Any]], live: list[int], n: int) -> str:
  """``Replicas (mode, k of n in the mean, std ddof=1): <result> X ± s% (replicas a / b / c)``;
  a frozen replica's value is marked ``(frozen)``."""
  keys = [k for pattern in HEADLINE.get(mode, ()) for k in results
          if k == pattern or pattern.endswith('*') and k.startswith(pattern[:-1])]
  parts = []
  for key in keys:
    scale, unit, digits = (1.0, '', 3) if key in NOT_PERCENT else (100.0, '%', 2)
    r = results[key]
    each = ' / '.join(f'{scale * v:.{digits}f}' + ('' if i in live else ' (frozen)')
                      for i, v in enumerate(r['per_replica']))
    parts.append(f'{key} {scale * r["mean"]:.{digits}f} ± {scale * r["std"]:.{digits}f}{unit} '
                 f'(replicas {each})')
  return (f'--mode={mode} over {len(live)} of {n} replicas (mean ± std, ddof=1): '
          + (' | '.join(parts) or 'no headline result') + '.')
