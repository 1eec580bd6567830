"""Shared by the benchmark scripts: the repo root, loading a config preset by name, and APS's
full-token comparison method."""
from __future__ import annotations

import os

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')


def load_config(name: str, arg: str):
  """``configs/<name>.py``'s ``get_config(arg)`` (``config_lib.load_config_file``)."""
  from ssl_jax import config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.load_config_file(os.path.join(REPO, 'configs', f'{name}.py'), arg)


def aps_full_tokens(config, steps_per_epoch=None):
  """APS's network and loss with every patch token in both views (no sampling): the
  comparison row of ``bench_aps.py`` and of the device suite's ``aps`` row."""
  from ssl_jax.methods import aps, base  # pylint: disable=import-outside-toplevel

  class FullTokens(aps.Method):
    """The same network and loss with every patch token in both views."""

    def loss(self, ctx, batch):
      loss, metrics, batch_stats, feats, scores = self.pair_loss(
          ctx, ctx.batch_stats, batch['view1'], batch['view2'], None, None)
      return loss, base.LossAux({'loss': loss, **metrics}, ctx.method_state, batch_stats, feats,
                                scores)

  return FullTokens(config, steps_per_epoch)
