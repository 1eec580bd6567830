"""Row ``aps`` (and ``vit_full``): APS ViT-S/16 step (224 px, 49 of 196 tokens per view) and the
full-token two-view step of the same network, with MFU = XLA cost-analysis FLOPs / step time /
the device's bf16 peak. Ours only (the comparison is kept vs all tokens). Goal: MFU >= 40%.
"""
from __future__ import annotations

import statistics

from device_rows import jax_steps
from device_rows.common import Row, flop_str, median_ratio, warm_then_time


def prepare(suite):
  """Our APS step (kept tokens), compiled in a worker thread."""
  return jax_steps.prepare_train(suite, 'aps')


def prepare_full(suite):
  """The same network and loss with every patch token in both views (no sampling)."""
  from _common import aps_full_tokens  # noqa: E402  (benchmarks/ is the script's directory)
  return jax_steps.prepare_train(suite, 'aps', make_method=aps_full_tokens)


def row(suite):
  aps, full = suite.job('aps'), suite.job('aps_full')
  times = warm_then_time({'aps': aps.run, 'full': full.run}, suite.args.repeats,
                         suite.args.steps)
  aps.check_finite()
  full.check_finite()
  out = []
  for key, obj, label in (('aps', aps, 'APS ViT step (kept tokens), MFU'),
                          ('vit_full', full, 'ViT full-token two-view step, MFU')):
    t = statistics.median(times[key if key == 'aps' else 'full'])
    mfu = obj.flops / t / (suite.peak * suite.n_dev) if suite.peak else None
    out.append(Row(key, label if not suite.args.smoke else label.replace('ViT', 'ViT-test'),
                   '% MFU', None if mfu is None else 100 * mfu, None, 'none (ours vs ours)',
                   None, 'MFU >= 40%' if key == 'aps' else '(context)',
                   ('' if key != 'aps' or mfu is None else
                    ('met' if mfu >= 0.40 else 'not met')), fmt='{:.1f}',
                   notes=f'{1e3 * t:.1f} ms/step, {flop_str(obj.flops)}/step (XLA), '
                         f'{obj.images / t:,.0f} img/s'
                         + ('' if mfu is not None else '; MFU n/a: give --peak_tflops')))
  speed = median_ratio(times['full'], times['aps'])
  out[0].notes += f'; {speed:.2f}x the full-token step\'s speed'
  return out
