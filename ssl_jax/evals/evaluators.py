"""Evaluators as plug-ins listed in the config (big_vision's ``evaluators/``).

A training config lists its evaluators under ``config.evals``; each entry names its ``type``
and when it runs::

  config.evals.knn = dict(type='knn', every_epochs=10, at_start=False, at_end=True, k=200, ...)

``every_steps`` / ``every_epochs`` / ``every_examples`` (:func:`ssl_jax.utils.steps`) set the
period (none set: only at the start/end), ``at_start`` runs it before the first step of a fresh
run, ``at_end`` after the last. The other fields belong to the type. ``train.py`` knows no
evaluator by name: it runs whatever is listed, and each evaluator returns ``(name, value)``
pairs that are logged and written to TensorBoard.

Types (``TYPES``): ``knn`` -- weighted kNN top-1 of the frozen backbone's features (and the
online probe's top-1 on the same images), :class:`ssl_jax.evals.knn_eval.KnnEvaluator`; the
offline ``--mode=knn`` runs the same evaluator.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Iterable

from ssl_jax import config_lib, utils

#: type -> 'module:Class'. A class is built as ``Class(cfg, data_cfg=, mesh=, num_classes=,
#: search_cfg=)`` and called as ``instance.run(feature_fn, variables) -> [(name, value), ...]``.
TYPES = {
    'knn': 'ssl_jax.evals.knn_eval:KnnEvaluator',
}
SCHEDULE_KEYS = ('type', 'every_steps', 'every_epochs', 'every_examples', 'at_start', 'at_end')


@dataclasses.dataclass
class Scheduled:
  """One listed evaluator with its schedule in steps."""
  name: str
  every: int | None
  at_start: bool
  at_end: bool
  run: Callable[[Callable, Any], Iterable[tuple[str, float]]]


def get(type_name: str):
  config_lib.require(type_name in TYPES, 'evals.<name>.type', type_name, ', '.join(TYPES))
  module, cls = TYPES[type_name].split(':')
  return getattr(importlib.import_module(module), cls)


def validate(config) -> None:
  for name, cfg in (config.get('evals') or {}).items():
    config_lib.require('type' in cfg, f'evals.{name}.type', None, ', '.join(TYPES))
    get(cfg.type).validate(cfg, f'evals.{name}')


def from_config(config, *, mesh, steps_per_epoch: int) -> list[Scheduled]:
  """The evaluators ``config.evals`` lists, built for ``mesh``, in the listed order."""
  out = []
  for name, cfg in (config.get('evals') or {}).items():
    evaluator = get(cfg.type)(cfg, data_cfg=config.data, mesh=mesh,
                              num_classes=int(config.data.num_classes),
                              search_cfg=config.get('knn'))
    out.append(Scheduled(
        name=name, every=utils.steps(cfg, 'every', steps_per_epoch, batch_size=config.batch_size),
        at_start=bool(cfg.get('at_start', False)), at_end=bool(cfg.get('at_end', True)),
        run=evaluator.run))
  return out
