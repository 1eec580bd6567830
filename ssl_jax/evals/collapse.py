"""Collapse warning: read the step's embedding spread and pos/neg scores, warn on the screen.

A run is flagged as collapsing in a logging window when either

    embed_std * sqrt(d) < EMBED_RATIO_MIN         (per-dim std of n(z); ~1 healthy, 0 collapsed)
    neg_mean >= NEG_MEAN_MIN and pos_mean - neg_mean < SCORE_GAP_MIN
                                                   (every pair scores alike, near 1)

(``ops.summaries.embedding_summary`` / ``score_summary`` compute the inputs in the step).
The monitor prints one ``WARNING: representations collapsing at step N (...)`` line when a run
enters that state and one ``representations recovering`` line when it leaves it, so a long
collapse does not flood the screen; ``collapse/flag`` (0/1) goes to TensorBoard every window.
"""
from __future__ import annotations

import math

# Measured on CIFAR-10 (README): the collapsed FT toy run reads 0.012 after 10 steps and 0.003
# after 150; healthy runs dip to 0.07 early (MoCo quick, step 40) and sit at 0.17-0.27 later.
EMBED_RATIO_MIN = 0.04
NEG_MEAN_MIN = 0.9
SCORE_GAP_MIN = 0.02


def is_collapsing(avg: dict[str, float]) -> bool:
  ratio = avg.get('collapse/embed_std_ratio')
  pos, neg = avg.get('score/pos_mean'), avg.get('score/neg_mean')
  low_spread = ratio is not None and math.isfinite(ratio) and ratio < EMBED_RATIO_MIN
  alike = (pos is not None and neg is not None and neg >= NEG_MEAN_MIN
           and pos - neg < SCORE_GAP_MIN)
  return bool(low_spread or alike)


def describe(avg: dict[str, float]) -> str:
  parts = []
  if 'collapse/embed_std' in avg:
    parts.append(f'embedding std {avg["collapse/embed_std"]:.4f}, '
                 f'{avg["collapse/embed_std_ratio"]:.2f}x the healthy 1/sqrt(d)')
  if 'score/pos_mean' in avg and 'score/neg_mean' in avg:
    parts.append(f'pos {avg["score/pos_mean"]:.3f} / neg {avg["score/neg_mean"]:.3f}')
  return ', '.join(parts)


class CollapseMonitor:
  """Stateful: ``update(step, avg)`` returns the line to print on a change of state, else None."""

  def __init__(self):
    self.collapsing = False
    self.warned_steps: list[int] = []

  def update(self, step: int, avg: dict[str, float]) -> str | None:
    now = is_collapsing(avg)
    avg['collapse/flag'] = float(now)
    line = None
    if now and not self.collapsing:
      self.warned_steps.append(step)
      line = (f'WARNING: representations collapsing at step {step} ({describe(avg)}). '
              'Every image is mapping to nearly one direction; lower the lr or read the score '
              'plots (README: "Reading the score plots").')
    elif self.collapsing and not now:
      line = f'Representations recovering at step {step} ({describe(avg)}).'
    self.collapsing = now
    return line
