"""The online probe's evaluator (``config.evals.<name>.type = 'online_probe'``).

The online linear probe is trained inside the train step on stop-gradient backbone features
(``train.probe_update``); this evaluator reports its top-1 on the eval split
(``online_probe/test_top1``): ``eval_examples`` images (<= 0: the whole split; a seeded
class-balanced subset otherwise, the same images the kNN evaluator queries with the same
value), eval transform, eval-mode network, the probe's logits from the feature function
(``features.frozen_feature_fn``). When the kNN evaluator runs at the same step on the same
images, the features are extracted once (``features.ExtractionCache``).

In ``--mode=eval`` the probe is the checkpoint's (``state.probe_params``); it exists only for
the online network on the pretraining data, so other weights or another dataset are a
``ConfigError`` naming the entry.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ssl_jax import config_lib
from ssl_jax.evals import evaluators


class OnlineProbeEvaluator(evaluators.Evaluator):
  """Top-1 of the online probe on ``eval_examples`` images of the eval split. Config fields:
  ``eval_examples``, ``batch_size``."""

  def __init__(self, cfg, feature_fn, ctx: evaluators.Context, *, name: str = 'online_probe'):
    super().__init__(cfg, feature_fn, ctx, name=name)
    run_data = ctx.run_config.get('data') if ctx.run_config is not None else None
    if run_data is not None and (run_data.get('name') != ctx.data.get('name')
                                 or run_data.get('folder_root') != ctx.data.get('folder_root')):
      raise config_lib.ConfigError(
          f'config.evals.{name} (online_probe) scores the probe trained on '
          f'{run_data.get("folder_root") or run_data.get("name")!r}, not '
          f'{ctx.data.get("folder_root") or ctx.data.get("name")!r}; accepted: the pretraining '
          f'dataset, or remove evals.{name}.')

  @staticmethod
  def validate(cfg, key: str) -> None:
    req = config_lib.require
    req(isinstance(cfg.eval_examples, int), f'{key}.eval_examples', cfg.eval_examples,
        'an integer (<= 0: the whole split)')
    req(isinstance(cfg.batch_size, int) and cfg.batch_size > 0, f'{key}.batch_size',
        cfg.batch_size, 'a positive integer')

  def reads(self) -> list[tuple[str, int]]:
    return [(self.ctx.data.eval_split, int(self.cfg.eval_examples))]

  def headline(self) -> dict[str, str]:
    return {'online_probe/test_top1': 'online-probe top-1'}

  def run(self, variables) -> Iterator[tuple[str, float]]:
    test = self.extract(variables, *self.reads()[0])
    if 'probe_logits' not in test:
      raise config_lib.ConfigError(
          f'config.evals.{self.name} (online_probe): the network has no online probe here (it is '
          'the online network\'s; --mode=eval reads it with --config.weights=online); accepted: '
          f'weights=online, or remove evals.{self.name}.')
    yield 'online_probe/test_top1', float(np.mean(test['probe_logits'].argmax(-1)
                                                  == test['label']))
