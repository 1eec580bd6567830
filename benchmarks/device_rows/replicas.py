"""Row ``replicas``: S seeds in one program (``config.replicas = S``) on one accelerator.
ResNet-18 CIFAR BYOL train step (the ``cifar10`` preset: CIFAR stem, 32 px, projector and
predictor 4096 -> 256, LARS, EMA target, online probe; synthetic images, bf16 compute,
``--batch`` (256, the preset's) per replica per device; smoke: the runlocal ResNet-tiny) at
S = ``--replicas`` (1, 4, 8): the trainer's step (``train.build`` with ``config.replicas = S``:
every state leaf and the batch with a leading replica axis, the step vmapped over it, replica r
fed seed r's batch), each S compiled up front, then all timed interleaved.

Reported per S: images/s per replica (batch / step time) and, for S > 1, the ratio to the
S = 1 rate (the median of per-repeat ratios) in the "ours vs peer" column, with S = 1 in the
peer column (ours, not PyTorch). 1.00x: the S seeds cost what one costs ("almost free", the
claim for a GPU that one CIFAR ResNet-18 does not fill); 1/S: no better than S runs one after
another. The notes give the total images/s against S = 1's. Ours only: no PyTorch peer.
"""
from __future__ import annotations

import statistics

from device_rows import jax_steps
from device_rows.common import Row, flop_str, median_ratio, mfu_note, warm_then_time


def job_key(replicas: int) -> str:
  return f'replicas_{replicas}'


def row_key(replicas: int) -> str:
  return 'replicas' if replicas == 1 else job_key(replicas)


def prepare(suite, replicas: int):
  """The BYOL CIFAR step of ``replicas`` seeds, compiled in a worker thread."""
  return jax_steps.prepare_train(suite, 'byol', preset='cifar10', replicas=replicas)


def row(suite):
  sizes = suite.args.replicas
  jobs = {s: suite.job(job_key(s)) for s in sizes}
  times = warm_then_time({s: j.run for s, j in jobs.items()}, suite.args.repeats,
                         suite.args.steps)
  for j in jobs.values():
    j.check_finite()
  net = 'ResNet-tiny' if suite.args.smoke else 'R18'
  base = statistics.median(times[1])
  out = []
  for s, j in jobs.items():
    t = statistics.median(times[s])
    notes = (f'{1e3 * t:.1f} ms/step for {s} x {j.images} images, {flop_str(j.flops)}/step '
             f'(XLA){mfu_note(suite, j.flops, times[s])}; compile {j.build_s:.0f} s')
    label = f'BYOL {net} CIFAR step, {s} replica{"s" if s > 1 else ""} in one program'
    if s == 1:
      out.append(Row(row_key(s), label, 'img/s per replica', j.images / t, None,
                     'none (ours; the base of the replicas rows)', None, '(context)', '',
                     notes=notes))
      continue
    vs = median_ratio(times[1], times[s])
    out.append(Row(row_key(s), label, 'img/s per replica', j.images / t, j.images / base,
                   'ours, 1 replica (not PyTorch)', vs,
                   f'(context: 1.00x free, {1 / s:.2f}x no gain)', '',
                   notes=f'{s * vs:.2f}x the total images/s of 1 replica; {notes}'))
  return out
