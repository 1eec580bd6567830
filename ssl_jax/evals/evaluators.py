"""Evaluators as plug-ins listed in the config (big_vision's ``evaluators/``): one protocol for
training and for ``--mode=eval``.

A config lists its evaluators under ``config.evals``; each entry names its ``type`` and when it
runs::

  config.evals.knn = dict(type='knn', every_epochs=10, at_start=False, at_end=True, k=200, ...)
  config.evals.online_probe = dict(type='online_probe', every_epochs=10, ..., eval_examples=-1)

``every_steps`` / ``every_epochs`` / ``every_examples`` (:func:`ssl_jax.utils.steps`) set the
period (none set: only at the start/end), ``at_start`` runs it before the first step of a fresh
run, ``at_end`` after the last. The other fields belong to the type. Every ``evals.*`` field may
change when a run resumes (an evaluator only reads the state).

**The protocol.** A type is a class (a subclass of :class:`Evaluator`) built as
``Type(cfg, feature_fn, ctx, name=...)`` from its config entry, the run's jitted feature function
``feature_fn(variables, images) -> dict`` (``ssl_jax.evals.features.frozen_feature_fn``:
'features', 'probe_logits') and a :class:`Context` (the run's config, data, mesh, number of
classes and the round's :class:`ssl_jax.evals.features.ExtractionCache`). ``run(variables)``
yields ``(name, value)`` pairs; ``headline()`` says how its values appear in the final line
(``{metric name: label}``, see :func:`final_line`); ``validate(cfg, key)`` checks its fields
before anything is built. Neither the trainer nor ``--mode=eval`` knows any type by name: they
run whatever ``config.evals`` lists. Adding a type::

  class MeanLogitNorm(evaluators.Evaluator):                     # config: eval_examples, batch_size
    def run(self, variables):
      test = self.extract(variables, self.ctx.data.eval_split, self.cfg.eval_examples)
      yield 'monitor/logit_norm', float(np.linalg.norm(test['probe_logits'], axis=1).mean())
  evaluators.register('logit_norm', 'my_module:MeanLogitNorm')   # config.evals.x.type='logit_norm'

Types (``TYPES``): ``knn`` -- weighted kNN top-1 of the frozen backbone's features
(:class:`ssl_jax.evals.knn_eval.KnnEvaluator`); ``online_probe`` -- top-1 of the online probe
trained inside the train step, on the eval split
(:class:`ssl_jax.evals.online_probe.OnlineProbeEvaluator`). Defaults and the ``quick`` /
``runlocal`` sizes are :func:`default_config` and :func:`apply_preset` (``config_lib`` calls
them). This module imports no JAX at import time: configs build without it.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Any, Callable, Iterable, Iterator

import ml_collections
import numpy as np

from ssl_jax import config_lib

#: type -> 'module:Class' (a subclass of :class:`Evaluator`).
TYPES = {
    'knn': 'ssl_jax.evals.knn_eval:KnnEvaluator',
    'online_probe': 'ssl_jax.evals.online_probe:OnlineProbeEvaluator',
}
SCHEDULE_KEYS = ('type', 'every_steps', 'every_epochs', 'every_examples', 'at_start', 'at_end')
_SCHEDULE = {'every_epochs': 10.0, 'every_steps': -1, 'at_start': False, 'at_end': True}

#: The evaluators every training config lists, in this order (the final line's order).
DEFAULTS = {
    'knn': dict(type='knn', **_SCHEDULE, k=200, temperature=0.1, train_examples=-1,
                eval_examples=-1, batch_size=512),
    'online_probe': dict(type='online_probe', **_SCHEDULE, eval_examples=-1, batch_size=512),
}
#: Sizes of the ``quick`` and ``runlocal`` config tokens: each field is set in every listed
#: evaluator that has it (so the kNN and the online probe score the same eval images).
PRESETS = {
    # README quick start: at the start and the end only, on 10k bank / 2k eval images.
    'quick': dict(every_epochs=-1.0, at_start=True, train_examples=10000, eval_examples=2000),
    'runlocal': dict(every_epochs=-1.0, at_start=True, train_examples=1024, eval_examples=512,
                     k=20),
}


def register(type_name: str, target: str) -> None:
  """Make ``type_name`` available to ``config.evals.<name>.type``; ``target`` is
  ``'module:Class'`` (imported when a config lists the type)."""
  TYPES[type_name] = target


def default_config() -> ml_collections.ConfigDict:
  """``config.evals`` of every training config: :data:`DEFAULTS`."""
  return ml_collections.ConfigDict({k: dict(v) for k, v in DEFAULTS.items()})


def apply_preset(evals_cfg: ml_collections.ConfigDict, preset: str) -> None:
  """Set the :data:`PRESETS` ``preset`` fields in every listed evaluator that has them."""
  for cfg in evals_cfg.values():
    cfg.update({k: v for k, v in PRESETS[preset].items() if k in cfg})


def set_all(evals_cfg: ml_collections.ConfigDict, **fields) -> None:
  """Set ``fields`` (e.g. ``every_epochs=20.0``) in every listed evaluator: a recipe's cadence
  for all its monitors at once."""
  for cfg in evals_cfg.values():
    cfg.update(fields)


# =============================================================================================
# The protocol
# =============================================================================================
@dataclasses.dataclass(frozen=True)
class Context:
  """What the evaluators of one run share besides their own config entry."""
  run_config: Any     # the training run's config (read-only; e.g. knn.recall_target)
  data: Any           # the data config whose splits the evaluators read
  mesh: Any
  num_classes: int
  cache: Any          # ssl_jax.evals.features.ExtractionCache of this run's feature_fn


class Evaluator(abc.ABC):
  """Base of every type: keeps ``cfg``, ``feature_fn``, ``ctx``, ``name`` and reads features
  through the round's cache. Subclasses define :meth:`run`, and :meth:`validate` /
  :meth:`reads` / :meth:`headline` when they have fields, read features or appear in the final
  line."""

  def __init__(self, cfg, feature_fn: Callable, ctx: Context, *, name: str):
    self.cfg, self.feature_fn, self.ctx, self.name = cfg, feature_fn, ctx, name
    for split, examples in self.reads():
      ctx.cache.expect(split, examples, self.batch_size)

  @property
  def batch_size(self) -> int:
    return int(self.cfg.get('batch_size', 512))

  @staticmethod
  def validate(cfg, key: str) -> None:
    """Raise ``config_lib.ConfigError`` for a bad field of ``cfg`` (``key``: 'evals.<name>')."""
    del cfg, key

  def reads(self) -> list[tuple[str, int]]:
    """``(split, max_examples)`` of every extraction one :meth:`run` reads (shared with the
    other evaluators of the round through the cache)."""
    return []

  def extract(self, variables, split: str, max_examples: int) -> dict:
    """``features.extract`` of ``split`` (host arrays: the feature function's outputs and
    'label'), shared with the other evaluators of this round; read-only."""
    return self.ctx.cache.get(variables, split=split, max_examples=int(max_examples),
                              batch_size=self.batch_size)

  @abc.abstractmethod
  def run(self, variables) -> Iterable[tuple[str, float]]:
    """Yield ``(name, value)`` pairs for ``variables`` (the network's, as training holds them)."""

  def headline(self) -> dict[str, str]:
    """``{metric name: label}`` of the values shown in the final line (none by default)."""
    return {}


@dataclasses.dataclass
class Scheduled:
  """One listed evaluator with its schedule in steps."""
  name: str
  every: int | None
  at_start: bool
  at_end: bool
  evaluator: Evaluator

  def run(self, variables) -> Iterable[tuple[str, float]]:
    return self.evaluator.run(variables)

  def headline(self) -> dict[str, str]:
    return self.evaluator.headline()


def get(type_name: str):
  config_lib.require(type_name in TYPES, 'evals.<name>.type', type_name, ', '.join(TYPES))
  module, cls = TYPES[type_name].split(':')
  return getattr(importlib.import_module(module), cls)


def validate(config) -> None:
  """Every entry of ``config.evals``: a known type and valid fields (``ConfigError``)."""
  for name, cfg in (config.get('evals') or {}).items():
    config_lib.require('type' in cfg, f'evals.{name}.type', None, ', '.join(TYPES))
    config_lib.require(cfg.type in TYPES, f'evals.{name}.type', cfg.type, ', '.join(TYPES))
    get(cfg.type).validate(cfg, f'evals.{name}')


def build(evals_cfg, *, feature_fn: Callable, run_config, data_cfg, mesh,
          num_classes: int) -> list[tuple[str, Evaluator]]:
  """``(name, evaluator)`` of every entry of ``evals_cfg``, in the listed order, sharing one
  extraction cache (``features.ExtractionCache``)."""
  from ssl_jax.evals import features  # pylint: disable=import-outside-toplevel
  ctx = Context(run_config=run_config, data=data_cfg, mesh=mesh, num_classes=int(num_classes),
                cache=features.ExtractionCache(feature_fn, data_cfg, mesh))
  return [(name, get(cfg.type)(cfg, feature_fn, ctx, name=name))
          for name, cfg in (evals_cfg or {}).items()]


def from_config(config, *, feature_fn: Callable, mesh, steps_per_epoch: int) -> list[Scheduled]:
  """The evaluators a training ``config`` lists, with their schedules in steps."""
  from ssl_jax import utils  # pylint: disable=import-outside-toplevel
  built = build(config.get('evals'), feature_fn=feature_fn, run_config=config,
                data_cfg=config.data, mesh=mesh, num_classes=int(config.data.num_classes))
  return [Scheduled(
      name=name, every=utils.steps(config.evals[name], 'every', steps_per_epoch,
                                   batch_size=config.batch_size),
      at_start=bool(config.evals[name].get('at_start', False)),
      at_end=bool(config.evals[name].get('at_end', True)), evaluator=ev) for name, ev in built]


def make_feature_fn(apply: Callable, probe=None) -> Callable:
  """The evaluators' feature function (``ssl_jax.evals.features.frozen_feature_fn``)."""
  from ssl_jax.evals import features  # pylint: disable=import-outside-toplevel
  return features.frozen_feature_fn(apply, probe)


# =============================================================================================
# The final line
# =============================================================================================
def _percent(key: str, values: dict[str, float], replicas: dict[str, list[float]] | None,
             each: bool = True) -> str:
  """``X%``, or with per-replica values ``X ± s%`` (s: ddof=1 over the replicas whose mean X
  is) followed, when ``each``, by ``(replicas a / b / c, std ddof=1)``."""
  if not replicas or key not in replicas:
    return f'{100 * values[key]:.2f}%'
  vals = replicas[key]
  std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
  out = f'{100 * values[key]:.2f} ± {100 * std:.2f}%'
  return out + (' (replicas ' + ' / '.join(f'{100 * v:.2f}' for v in vals) + ', std ddof=1)'
                if each else '')


def _headline_parts(evals, values: dict[str, float], untrained: dict[str, float] | None,
                    replicas=None, untrained_replicas=None) -> Iterator[str]:
  seen = set()
  for ev in evals:
    for key, label in ev.headline().items():
      if key in values and key not in seen:
        seen.add(key)
        part = f'{label}: {_percent(key, values, replicas)}'
        if untrained and key in untrained:
          part += f' (untrained network: {_percent(key, untrained, untrained_replicas, False)})'
        yield part


def final_line(evals, step: int, final: dict[str, float],
               untrained: dict[str, float] | None = None, *,
               replicas: dict[str, list[float]] | None = None,
               untrained_replicas: dict[str, list[float]] | None = None) -> str:
  """``Final after N steps | <label>: X% (untrained network: Y%) | ...``: each evaluator's
  :meth:`Evaluator.headline` values, in the listed order (the untrained value when the run
  evaluated at its start). With replicas, ``X ± s% (replicas a / b / c, std ddof=1)``."""
  return f'Final after {step} steps | ' + ' | '.join(
      _headline_parts(evals, final, untrained, replicas, untrained_replicas))


def summary_line(evals, prefix: str, values: dict[str, float]) -> str:
  """``prefix | <label>: X% | ...`` (``--mode=eval``'s last line)."""
  return ' | '.join([prefix, *_headline_parts(evals, values, None)])
